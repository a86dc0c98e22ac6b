"""Ambient Diffusion: Learning Clean Distributions from Corrupted Data.

Giannis Daras, Kulin Shah, Yuval Dagan, Aravind Gollakota, Alexandros G. Dimakis, Adam Klivans. NeurIPS 2023.
arXiv:2305.19256. Official code: github.com/giannisdaras/ambient-diffusion (EDM-based); this file follows it.

Every training image is seen only through a fixed random inpainting mask A (each pixel erased with probability p).
Ambient Diffusion corrupts it further with a second mask B (probability delta), A_tilde = B * A, shows the network
only A_tilde x_t and A_tilde, and asks it to predict the image on all pixels that A keeps, including those that B hid.
Since the network cannot tell which of its hidden pixels A kept, the minimiser is E[x0 | A_tilde x_t, A_tilde] on
every pixel (the paper's main theorem): a clean-data denoiser, learned without a clean image. Sampling runs EDM's Heun
sampler with that denoiser under one fixed mask (the official "fixed-mask sampler"), optionally with reconstruction
guidance across several masks. Everything else is EDM (Karras et al. 2022): preconditioning, noise levels, EMA.

Quick start (CPU, 1-2 minutes):
    python ambient.py --preset=tiny --data=tests/data/cifar10_tiny.npz --corruption_probability=0.6 --kimg=2
One GPU, the official CelebA-64 recipe with 90% of the pixels missing:
    python ambient.py --preset=celeba64 --data=datasets/celeba-64x64.zip --corruption_probability=0.9
Eight GPUs, CIFAR-10 (downloaded once); add --resume=auto to continue the newest matching run:
    torchrun --standalone --nproc_per_node=8 ambient.py --preset=cifar10 --data=cifar10 --corruption_probability=0.6
Generate 50k images, FID against reference statistics (`python fid.py ref --data=cifar10 --dest=cifar10.npz`); the
`--` keeps torchrun from reading --num as an abbreviation of its own --numa-binding:
    torchrun --standalone --nproc_per_node=8 ambient.py generate --network=NET.pt --seeds=0-49999 --outdir=out
    torchrun --standalone --nproc_per_node=8 -- ambient.py eval --network=NET.pt --ref=cifar10.npz --num=50000
Memorisation check (nearest training neighbours of generated images):
    python ambient.py neighbors --network=NET.pt --data=cifar10 --num=10000 --outdir=out/neighbors
"""

import argparse
import concurrent.futures
import contextlib
import copy
import dataclasses
import glob
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import re
import sys
import tarfile
import time
import zipfile

import numpy as np
import PIL.Image
import requests
import torch
import torch.nn.functional as F

import fid
import nets

# ----------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class Config:
    # Data and corruption.
    data: str = ''                         # image folder, EDM zip, .npz (x, y) or the word cifar10
    cond: bool = False                     # class-conditional on dataset labels; official train.py --cond
    max_size: int = 0                      # keep this many images (RandomState(0) subset, official --max_size); 0 = all
    corruption_probability: float = 0.4   # p: chance that A erases a pixel; official train.py default
    delta_probability: float = 0.1         # delta: chance that B erases a pixel A kept; official train.py default
    mask_full_rgb: bool = False            # erase a pixel's channels together; official default False, README True
    mask_seed: int = 0                     # 0 = the official masks (seeded by image index); other values redraw them
    resample_delta: bool = False           # draw B afresh every step (paper); official: one fixed B per image
    # Network.
    arch: str = 'ddpmpp'                   # nets.UNET_PRESETS name; ddpmpp = EDM DDPM++ CIFAR (official --arch=ddpmpp)
    cbase: int = 0                         # model_channels override, 0 = preset; official --cbase
    cres: str = ''                         # channel_mult override such as 1,2,2,2; official --cres
    dropout: float = 0.13                  # official train.py default (EDM CIFAR-10)
    gated: bool = True                     # gated convolutions, gate = sigmoid(sigmoid(conv)); official --gated default
    precond: str = 'ambient'               # ambient: masked input + mask channels; edm: plain EDM on the masked images
    # Loss and optimisation.
    norm: int = 2                          # 2 = squared error, 1 = absolute error (both times lambda); official
    P_mean: float = -1.2                   # mean of ln(sigma) during training; EDM default
    P_std: float = 1.2                     # std of ln(sigma) during training; EDM default
    sigma_data: float = 0.5                # EDM default
    batch: int = 512                       # global batch; official train.py default
    batch_gpu: int = 0                     # per-GPU microbatch, 0 = batch / GPUs; gradient accumulation does the rest
    lr: float = 1e-3                       # official train.py default (10e-4)
    lr_rampup_kimg: float = 10000          # linear warm-up; official training_loop default (not a CLI flag there)
    weight_decay: float = 0.0              # > 0 switches Adam to AdamW; official --weight_decay
    max_grad_norm: float = 0.0             # gradient clipping, 0 = off; official default None, README 1.0
    ema: float = 0.5                       # EMA half-life in Mimg; official --ema
    ema_rampup_ratio: float = 0.05         # EMA half-life <= ratio * images seen, 0 = off (official None)
    augment: float = 0.12                  # EDM augmentation probability; official train.py default
    augment_mode: str = 'joint'            # joint: masks move with the image (hidden pixels never read); official
    kimg: float = 200000                   # training length in kimg; official --duration=200 Mimg
    # Sampling (progress grids here; generate/eval/neighbors take the same flags).
    steps: int = 18                        # Heun steps (35 network evaluations); official eval.py --steps
    grid: int = 64                         # images in the progress grid
    # Run.
    outdir: str = 'runs'                   # run folders go here
    desc: str = ''                         # extra words for the run folder name
    tick: float = 50                       # kimg between progress lines; official --tick
    snap: int = 50                         # ticks between snapshots; official --snap
    dump: int = 500                        # ticks between kept training states (others are replaced); official --dump
    seed: int = 0                          # training seed (data order, noise, augmentation, dropout)
    resume: str = ''                       # training-state-*.pt path, or auto
    precision: str = ''                    # bf16 (autocast + TF32) or fp32 (official); default bf16 on CUDA
    compile: bool = False                  # torch.compile the network
    workers: int = 4                       # threads for decoding images
    cache_dir: str = ''                    # where cifar10 is downloaded, default ~/.cache/ambient-diffusion
    device: str = ''                       # default cuda when available
    dry_run: bool = False                  # print the resolved config and exit


# Official recipes. celeba64 is the README command; cifar10 and afhq64 have no command in the official repo, so they
# take train.py's defaults (= EDM CIFAR-10) and EDM's AFHQv2-64 settings, with the README's masking flags.
PRESETS = {
    'cifar10': dict(arch='ddpmpp-cifar10', batch=512, lr=1e-3, dropout=0.13, augment=0.12, mask_full_rgb=True,
                    max_grad_norm=1.0, cond=True),  # cond: the paper-time eval.py hard-coded label_dim=10 at 32x32
    'celeba64': dict(arch='ddpmpp-64', batch=256, lr=2e-4, dropout=0.1, augment=0.15, mask_full_rgb=True,
                     max_grad_norm=1.0, max_size=30000),
    'afhq64': dict(arch='ddpmpp-64', batch=256, lr=2e-4, dropout=0.25, augment=0.15, mask_full_rgb=True,
                   max_grad_norm=1.0),
    'tiny': dict(arch='tiny', cbase=16, cres='1,2,2', batch=16, lr=2e-3, lr_rampup_kimg=0.1, dropout=0.0,
                 augment=0.12, ema=0.0005, kimg=2, tick=0.5, snap=2, dump=4, grid=16, steps=10, mask_full_rgb=True),
}


class UsageError(Exception):
    """A bad flag or input: reported as one line, exit code 2, before anything is written."""


def parse_bool(text):
    """True/False, 1/0, yes/no: the spellings of the official click flags."""
    value = {'1': True, 'true': True, 'yes': True, '0': False, 'false': False, 'no': False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f'expected a boolean, got {text!r}')
    return value


class QuietParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing the usage block."""

    def error(self, message):
        raise UsageError(message)


def parse_train_args(argv):
    """Flags from the Config fields; --preset fills in defaults that explicit flags override."""
    parser = QuietParser(prog='ambient.py train')
    parser.add_argument('--preset', choices=sorted(PRESETS), default=None)
    parser.add_argument('--duration', type=float, default=None, help='training length in Mimg (official name)')
    meanings = dict(re.findall(r'^ +(\w+): .*?# (.*)$', inspect.getsource(Config), re.M))  # --help shows the comments
    for field in dataclasses.fields(Config):
        if field.type is bool:  # --flag, --flag=True, --flag=0 ...
            parser.add_argument(f'--{field.name}', type=parse_bool, nargs='?', const=True, help=meanings[field.name])
        else:
            parser.add_argument(f'--{field.name}', type=field.type, help=meanings[field.name])
    args = parser.parse_args(argv)
    values = dict(PRESETS[args.preset]) if args.preset else {}
    if args.duration is not None:
        values['kimg'] = args.duration * 1000
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in ('preset', 'duration')})
    cfg = Config(**values)
    validate(cfg)
    return cfg, args.preset


def validate(cfg):
    """Range checks of the training flags: the first failure becomes the one error line."""
    checks = [
        (0 <= cfg.corruption_probability < 1, '--corruption_probability must be in [0, 1)'),
        (0 <= cfg.delta_probability < 1, '--delta_probability must be in [0, 1)'),
        (cfg.norm in (1, 2), '--norm must be 1 or 2'),
        (cfg.precond in ('ambient', 'edm'), '--precond must be ambient or edm'),
        (cfg.augment_mode in ('joint', 'official'), '--augment_mode must be joint or official'),
        (0 <= cfg.augment <= 1, '--augment must be in [0, 1]'),
        (0 <= cfg.dropout < 1, '--dropout must be in [0, 1)'),
        (cfg.batch >= 1 and cfg.batch_gpu >= 0, '--batch must be >= 1 and --batch_gpu >= 0'),
        (cfg.lr > 0 and cfg.lr_rampup_kimg >= 0, '--lr must be > 0 and --lr_rampup_kimg >= 0'),
        (cfg.weight_decay >= 0 and cfg.max_grad_norm >= 0, '--weight_decay and --max_grad_norm must be >= 0'),
        (cfg.ema >= 0 and cfg.ema_rampup_ratio >= 0, '--ema and --ema_rampup_ratio must be >= 0'),
        (cfg.P_std > 0 and cfg.sigma_data > 0, '--P_std and --sigma_data must be > 0'),
        (min(cfg.kimg, cfg.tick, cfg.snap, cfg.dump) > 0, '--kimg, --tick, --snap and --dump must be > 0'),
        (cfg.steps >= 2 and cfg.grid >= 0 and cfg.max_size >= 0, '--steps must be >= 2, --grid and --max_size >= 0'),
        (cfg.precision in ('', 'fp32', 'bf16'), '--precision must be fp32 or bf16'),
        (re.fullmatch(r'(\d+,)*\d+', cfg.cres) is not None or cfg.cres == '', '--cres must look like 1,2,2,2'),
        (cfg.arch == 'ddpmpp' or nets.UNET_PRESETS.get(cfg.arch, {}).get('arch') == 'ddpmpp',
         f'--arch must be ddpmpp or a DDPM++ preset of nets.UNET_PRESETS, got {cfg.arch!r}'),
        (bool(cfg.data), '--data is required'),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def parse_seeds(text):
    """'0-49999' or '1,2,5-10' -> list of ints (EDM's parse_int_list)."""
    seeds = []
    for part in text.split(','):
        match = re.fullmatch(r'(\d+)(?:-(\d+))?', part)
        if not match:
            raise UsageError(f'--seeds: cannot parse {part!r}')
        seeds.extend(range(int(match.group(1)), int(match.group(2) or match.group(1)) + 1))
    return seeds


# ----------------------------------------------------------------------------------------------------------------------
# Data


class DataError(Exception):
    """Missing, corrupt or inconsistent data: reported as one line, exit code 1."""


CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'


def download_cifar10(cache_dir):
    """Official CIFAR-10 train set as (50000, 32, 32, 3) uint8 and labels; downloaded once, checked, cached."""
    path = os.path.join(cache_dir, 'cifar-10-python.tar.gz')
    if not os.path.exists(path):
        print(f'Downloading {CIFAR10_URL} ...')
        try:
            response = requests.get(CIFAR10_URL, timeout=60)
            response.raise_for_status()
        except requests.RequestException as error:
            raise DataError(f'cannot download CIFAR-10 ({error}); put cifar-10-python.tar.gz into {cache_dir}')
        if hashlib.md5(response.content).hexdigest() != CIFAR10_MD5:
            raise DataError('downloaded CIFAR-10 archive has a wrong md5 checksum')
        os.makedirs(cache_dir, exist_ok=True)
        write_atomic(path, response.content)
    with open(path, 'rb') as file:
        blob = file.read()
    if hashlib.md5(blob).hexdigest() != CIFAR10_MD5:
        raise DataError(f'{path} has a wrong md5 checksum; delete it to download again')
    images, labels = [], []
    with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
        for batch in range(1, 6):
            entry = pickle.load(archive.extractfile(f'cifar-10-batches-py/data_batch_{batch}'), encoding='bytes')
            images.append(entry[b'data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(entry[b'labels'], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_images(path, cache_dir='', workers=4):
    """Returns images (N, H, W, 3) uint8 and labels (N,) int64 or None, in sorted file-name order (as EDM)."""
    if path == 'cifar10':  # the official archive, downloaded once
        return download_cifar10(cache_dir or os.path.expanduser('~/.cache/ambient-diffusion'))
    if not os.path.exists(path):
        raise DataError(f'--data: {path} does not exist')
    if path.endswith('.npz'):
        try:
            with np.load(path) as npz:
                images, labels = npz.get('x'), np.asarray(npz['y']).astype(np.int64) if 'y' in npz else None
        except (OSError, ValueError, EOFError) as error:
            raise DataError(f'--data: cannot read {path} ({error})')
        if images is None or images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] != 3:
            raise DataError(f'{path}: expected an array x of shape (N, H, W, 3) uint8')
    else:
        if os.path.isdir(path):
            names = sorted(os.path.relpath(os.path.join(root, name), path).replace(os.sep, '/')
                           for root, _, files in os.walk(path) for name in files)
            read = lambda name: open(os.path.join(path, name), 'rb').read()  # noqa: E731
        elif zipfile.is_zipfile(path):
            archive = zipfile.ZipFile(path)
            names = sorted(archive.namelist())
            read = archive.read
        else:
            raise DataError(f'--data: {path} is not a folder, a zip or an .npz')
        image_names = [n for n in names if os.path.splitext(n)[1].lower() in ('.png', '.jpg', '.jpeg', '.bmp', '.webp')]
        if not image_names:
            raise DataError(f'--data: no images in {path}')
        def decode(name):  # -> (H, W, 3) uint8; grayscale and RGBA become RGB
            try:
                return np.asarray(PIL.Image.open(io.BytesIO(read(name))).convert('RGB'))
            except Exception as error:
                raise DataError(f'cannot read image {name}: {error}')
        # Decode in threads (PIL releases the GIL); every image must have the same size.
        with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
            decoded = list(pool.map(decode, image_names))
        shapes = {image.shape for image in decoded}
        if len(shapes) != 1:
            raise DataError(f'--data: images have different sizes {sorted(shapes)[:3]}; resize them first')
        images = np.stack(decoded)
        # Labels: EDM's dataset.json ({"labels": [[name, label], ...]}), else the class sub-folder of each image.
        labels = None
        if 'dataset.json' in names:
            table = json.loads(read('dataset.json')).get('labels')
            if table is not None:
                table = dict(table)
                missing = [n for n in image_names if n not in table]
                if missing:
                    raise DataError(f'dataset.json has no label for {missing[0]}')
                labels = np.asarray([table[n] for n in image_names], dtype=np.int64)
        elif all('/' in n for n in image_names):
            classes = sorted({n.split('/')[0] for n in image_names})
            labels = np.asarray([classes.index(n.split('/')[0]) for n in image_names], dtype=np.int64)
    # Checks shared by every source.
    if labels is not None and (labels.shape != (len(images),) or labels.min() < 0):
        raise DataError(f'--data: labels must be {len(images)} non-negative integers')
    if images.shape[1] != images.shape[2]:
        raise DataError(f'--data: images must be square, got {images.shape[1]}x{images.shape[2]}')
    return images, labels


# ----------------------------------------------------------------------------------------------------------------------
# Corruption: fixed masks A and A_tilde = B * A per image (official training/dataset.py)


def corruption_masks(raw_indices, image_shape, corruption_probability, delta_probability, mask_full_rgb, mask_seed=0):
    """The "dust" inpainting masks of the official dataset: A keeps a pixel with probability 1 - p, B keeps one with
    probability 1 - delta, A_tilde = A * B. Each image draws from its own RandomState seeded by its raw index, exactly
    as the official __getitem__ does, so the corrupted dataset is fixed for ever (and equal to the official one when
    mask_seed == 0). Note the official code fixes A_tilde per image too; it is not redrawn per step.

    raw_indices: (N,) ints; image_shape: (C, H, W). Returns A, A_tilde: (N, 1 or C, H, W) bool.
    """
    channels, height, width = image_shape
    size = (height, width) if mask_full_rgb else (channels, height, width)
    A = np.empty((len(raw_indices),) + size, dtype=bool)
    A_tilde = np.empty_like(A)
    for row, index in enumerate(raw_indices):
        rng = np.random.RandomState(int(index) if mask_seed == 0 else [mask_seed, int(index)])
        A[row] = rng.binomial(1, 1 - corruption_probability, size=size)
        A_tilde[row] = A[row] & rng.binomial(1, 1 - delta_probability, size=size).astype(bool)
    if mask_full_rgb:
        A, A_tilde = A[:, None], A_tilde[:, None]
    return torch.from_numpy(A), torch.from_numpy(A_tilde)


# ----------------------------------------------------------------------------------------------------------------------
# Augmentation: EDM's AugmentPipe(p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
        0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148]  # wavelet filter of EDM's augment.py


def affine(a, b, c, d, e, f):
    """Batch of 3x3 matrices [[a, b, c], [d, e, f], [0, 0, 1]] from (N,) tensors."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=-1).reshape(-1, 3, 3)


def draw_augmentation(p, n, height, width, generator):
    """EDM's random draws, in EDM's order. Returns flips (n, 2) in {0, 1}, G_inv (n, 3, 3) mapping output to input
    pixel coordinates (origin at the image centre) and the 9 augment labels (n, 9) that condition the network."""
    device = generator.device
    rand = lambda *shape: torch.rand(shape, generator=generator, device=device)  # noqa: E731
    randn = lambda *shape: torch.randn(shape, generator=generator, device=device)  # noqa: E731
    coin = lambda prob: rand(n) < prob  # noqa: E731
    flip_x = torch.randint(2, (n,), generator=generator, device=device) * coin(min(1e8 * p, 1))
    flip_y = torch.randint(2, (n,), generator=generator, device=device) * coin(p)
    scale = randn(n) * coin(p)
    rotate = (rand(n) * 2 - 1) * math.pi * coin(p)
    aniso, aniso_angle = randn(n), (rand(n) * 2 - 1) * math.pi
    aniso, aniso_angle = aniso * coin(p), aniso_angle * coin(0.5)
    translate = randn(2, n) * coin(p)
    one, zero = torch.ones(n, device=device), torch.zeros(n, device=device)
    rotation = lambda angle: affine(angle.cos(), -angle.sin(), zero, angle.sin(), angle.cos(), zero)  # noqa: E731
    s, a = (scale * 0.2).exp2(), (aniso * 0.2).exp2()
    G_inv = (affine(1 / s, zero, zero, zero, 1 / s, zero) @ rotation(rotate)
             @ rotation(-aniso_angle) @ affine(1 / a, zero, zero, zero, a, zero) @ rotation(aniso_angle)
             @ affine(one, zero, -translate[0] * width * 0.125, zero, one, -translate[1] * height * 0.125))
    labels = torch.stack([flip_x, flip_y, scale, rotate.cos() - 1, rotate.sin(), aniso * aniso_angle.cos(),
                          aniso * aniso_angle.sin(), translate[0], translate[1]], dim=1).float()
    return torch.stack([flip_x, flip_y], dim=1), G_inv, labels


def warp_official(images, G_inv):
    """EDM's geometric resampling: reflect padding, 2x upsampling with the sym6 wavelet, bilinear grid_sample, 2x
    downsampling. Always pads by the largest margin EDM uses, so that an image's result does not depend on the
    rest of the batch (EDM sizes the margin by the batch's largest warp)."""
    n, channels, height, width = images.shape
    taps, pad = len(SYM6), len(SYM6) // 4
    wavelet = torch.tensor(SYM6, dtype=images.dtype, device=images.device)[None, None].repeat(channels, 1, 1)
    images = F.pad(images, [width - 1, width - 1, height - 1, height - 1], mode='reflect')
    # Upsample 2x: zero insertion along each axis, then the time-reversed wavelet.
    images = torch.stack([images, torch.zeros_like(images)], dim=4).flatten(3)[:, :, :, :-1]
    images = F.conv2d(images, wavelet.flip(2)[:, :, None, :], groups=channels, padding=[0, (taps + 1) // 2])
    images = torch.stack([images, torch.zeros_like(images)], dim=3).flatten(2, 3)[:, :, :-1]
    images = F.conv2d(images, wavelet.flip(2)[:, :, :, None], groups=channels, padding=[(taps + 1) // 2, 0])
    # G_inv in affine_grid's normalised coordinates: EDM's chain of scalings and half-pixel shifts, multiplied out.
    out_h, out_w = (height + 2 * pad) * 2, (width + 2 * pad) * 2
    left = G_inv.new_tensor([[4 / images.shape[3], 0, -1 / images.shape[3]], [0, 4 / images.shape[2],
                             -1 / images.shape[2]], [0, 0, 1]])
    right = G_inv.new_tensor([[out_w / 4, 0, 0.25], [0, out_h / 4, 0.25], [0, 0, 1]])
    grid = F.affine_grid((left @ G_inv @ right)[:, :2].to(images.dtype), [n, channels, out_h, out_w],
                         align_corners=False)
    images = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    # Downsample 2x with the wavelet and crop the guard band.
    images = F.conv2d(images, wavelet[:, :, None, :], groups=channels, stride=[1, 2], padding=[0, (taps - 1) // 2])
    images = F.conv2d(images, wavelet[:, :, :, None], groups=channels, stride=[2, 1], padding=[(taps - 1) // 2, 0])
    return images[:, :, pad:-pad, pad:-pad]


def warp_nearest(images, G_inv):
    """The same warp with nearest-neighbour lookup and mirror reflection: every output pixel is a copy of one input
    pixel, so masks stay binary and an erased pixel can never leak into an observed one."""
    n, channels, height, width = images.shape
    rows, cols = torch.meshgrid(torch.arange(height, device=images.device, dtype=G_inv.dtype),
                                torch.arange(width, device=images.device, dtype=G_inv.dtype), indexing='ij')
    centred = torch.stack([cols - (width - 1) / 2, rows - (height - 1) / 2, torch.ones_like(rows)]).flatten(1)
    source = G_inv @ centred                                                            # (N, 3, H*W)
    reflect = lambda k, size: (size - 1) - ((size - 1) - k.remainder(2 * size - 2)).abs()  # noqa: E731
    x = reflect((source[:, 0] + (width - 1) / 2).round().long(), width)
    y = reflect((source[:, 1] + (height - 1) / 2).round().long(), height)
    index = (y * width + x)[:, None].expand(-1, channels, -1)                           # (N, C, H*W)
    return images.flatten(2).gather(2, index).reshape(n, channels, height, width)


def augment(images, flips, G_inv, mode):
    """Applies drawn augmentations. official: EDM's filtered warp of the given images; joint: exact flips and
    nearest-neighbour warps, meant for the image stacked with its masks along channels."""
    images = torch.where(flips[:, 0, None, None, None] == 1, images.flip(3), images)
    images = torch.where(flips[:, 1, None, None, None] == 1, images.flip(2), images)
    return warp_official(images, G_inv) if mode == 'official' else warp_nearest(images, G_inv)


# ----------------------------------------------------------------------------------------------------------------------
# Network: EDM preconditioning around nets.UNet (DDPM++ with the official gated convolutions)


class Precond(torch.nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1): D(x, sigma) = c_skip x + c_out F(c_in x, c_noise). For
    Ambient Diffusion x is the 2C-channel input [A_tilde x_t, A_tilde] and, as in the official code, the scalings act
    on all 2C channels; the caller keeps the first C output channels."""

    def __init__(self, unet, sigma_data=0.5):
        super().__init__()
        self.unet, self.sigma_data = unet, sigma_data

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4
        x_in = (c_in * x).contiguous(memory_format=torch.channels_last if x.is_cuda else torch.contiguous_format)
        F_x = self.unet(x_in, c_noise, class_labels=class_labels, augment_labels=augment_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)


def build_network(net_config):
    """Rebuilds the denoiser from a snapshot's network config (made by network_config)."""
    return Precond(nets.UNet(**net_config['unet']), sigma_data=net_config['sigma_data'])


def network_config(cfg, resolution, channels, label_dim):
    """Everything a snapshot needs to rebuild the network and sample from it (the official eval.py instead reads
    training_options.json and takes the corruption flags again)."""
    preset = 'ddpmpp-cifar10' if cfg.arch == 'ddpmpp' else cfg.arch
    # The official network is built with img_channels = 2C: it reads [A_tilde x_t, A_tilde] and writes 2C channels.
    # EDM gives the network augment labels only when it augments.
    img_channels = channels * (2 if cfg.precond == 'ambient' else 1)
    unet = dict(nets.UNET_PRESETS[preset], img_resolution=resolution, dropout=cfg.dropout, label_dim=label_dim,
                gated=cfg.gated, augment_dim=9 if cfg.augment > 0 else 0, in_channels=img_channels,
                out_channels=img_channels)
    if cfg.cbase:
        unet['model_channels'] = cfg.cbase
    if cfg.cres:
        unet['channel_mult'] = [int(c) for c in cfg.cres.split(',')]
    return dict(unet=unet, precond=cfg.precond, sigma_data=cfg.sigma_data, channels=channels,
                corruption_probability=cfg.corruption_probability, delta_probability=cfg.delta_probability,
                mask_full_rgb=cfg.mask_full_rgb)


# ----------------------------------------------------------------------------------------------------------------------
# Loss: penalise the prediction on every pixel A keeps, from an input further corrupted by B (training/loss.py)


def ambient_loss(net, y, A, A_tilde, sigma, eps, labels=None, augment_labels=None, norm=2, sigma_data=0.5):
    """The official AmbientLoss: the paper's training objective with EDM's weighting,
        lambda(sigma) * A * |D(A_tilde (y + sigma eps), A_tilde, sigma) - y|^norm,  lambda = 1 / c_out^2.
    Noise is added to the image and then masked (official order); D sees [A_tilde x_t, A_tilde] and only its first
    C output channels are used. Pixels that A erased never enter: y is multiplied by A_tilde <= A in the input and by
    A in the loss. Minimiser on every pixel: E[x0 | A_tilde x_t, A_tilde] (the paper's theorem), as the network cannot
    tell which of the pixels it does not see A kept.

    y: (B, C, H, W) image in [-1, 1] (erased pixels may hold anything); A, A_tilde: (B, C or 1, H, W) in {0, 1};
    sigma: (B,) noise levels; eps: (B, C, H, W) standard normal. Returns the per-element loss (B, C, H, W).
    """
    sigma = sigma.reshape(-1, 1, 1, 1)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    A_tilde = A_tilde.expand_as(y)
    x_t = A_tilde * (y + sigma * eps)                                                   # (B, C, H, W)
    D = net(torch.cat([x_t, A_tilde], dim=1), sigma.flatten(), labels, augment_labels)  # (B, 2C, H, W)
    error = D[:, :y.shape[1]] - y                                                       # (B, C, H, W)
    return weight * A * (error.square() if norm == 2 else error.abs())


def edm_loss(net, y, sigma, eps, labels=None, augment_labels=None, sigma_data=0.5):
    """EDM's loss (Karras et al. 2022, Eq. 2 with Table 1's weighting), here the naive baseline: trained on the
    masked images A * x0 it learns E[A x0 | x_t], which fills erased pixels with zeros."""
    sigma = sigma.reshape(-1, 1, 1, 1)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    D = net(y + sigma * eps, sigma.flatten(), labels, augment_labels)
    return weight * (D - y).square()


# ----------------------------------------------------------------------------------------------------------------------
# Sampler: EDM Heun with the fixed-mask denoiser and optional reconstruction guidance (official eval.py)


def ambient_sampler(net, latents, masks=None, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                    guidance_scale=0.0, clip=True):
    """The official eval.py ambient_sampler (S_churn = 0): EDM's deterministic Heun sampler with the denoiser
    D_hat(x, t) = clip(D([M x, M], t)[:C]) under a sampling mask M held fixed for all steps. With K > 1 masks and
    guidance_scale w > 0, every evaluation also moves by -w grad_x R(x), R = K/2 sum_k ||D_hat_1(x) - D_hat_k(x)||^2
    summed over the batch (reconstruction guidance, as the official code computes it); mask 1 drives the update.
    masks=None gives plain EDM Heun for a network trained with precond=edm; clip=False drops the official clip.
    The last step is Euler to t = 0, so the output is D_hat(x, sigma_min). 35 network evaluations at 18 steps.

    latents: (B, C, H, W) standard normal; masks: (K, B, C, H, W) in {0, 1} or None. Returns (B, C, H, W) float64.
    """
    channels = latents.shape[1]
    use_guidance = masks is not None and len(masks) > 1 and guidance_scale != 0

    def denoise(x, t, mask):
        inputs = x if mask is None else torch.cat([mask * x, mask], dim=1)
        sigma = t.to(torch.float32).expand(x.shape[0])                                 # (B,), no host sync
        D = net(inputs.to(torch.float32), sigma, class_labels).to(torch.float64)[:, :channels]
        if not clip:
            return D
        # Official tensor_clipping(static=False): s = max(np.percentile(|D|, 0.99), 1) per image, D = clip(D, s) / s.
        # The percentile is 0.99 percent, not 99, so s is 1 unless nearly every value exceeds 1: a clip to [-1, 1].
        s = D.detach().abs().flatten(1).quantile(0.0099, dim=1).clamp(min=1).reshape(-1, 1, 1, 1)
        return torch.minimum(torch.maximum(D, -s), s) / s

    def step(x, t, h):
        """h * dx/dt at (x, t), minus the guidance gradient."""
        if not use_guidance:
            with torch.no_grad():
                return h * (x - denoise(x, t, None if masks is None else masks[0])) / t
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            D = torch.stack([denoise(x, t, mask) for mask in masks])                   # (K, B, C, H, W)
            # The official cdist_masked broadcasts its all-ones masks to (K, K, N), which counts every difference
            # K times: R = K/2 sum_k ||D_hat_1 - D_hat_k||^2.
            R = 0.5 * len(masks) * (D[0] - D[1:]).square().sum()
            grad = torch.autograd.grad(R, x)[0]
        return h * (x.detach() - D[0].detach()) / t - guidance_scale * grad

    # EDM time steps (Karras et al. 2022, Eq. 5), t_N = 0.
    step_index = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_max, t_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    t_steps = (t_max + step_index / (num_steps - 1) * (t_min - t_max)) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

    x = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        # Euler step.
        euler = step(x, t_cur, t_next - t_cur)
        x_next = x + euler
        # Heun correction, except on the last step to t = 0.
        if i < num_steps - 1:
            x_next = x + 0.5 * (euler + step(x_next, t_next, t_next - t_cur))
        x = x_next
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Distributed helpers, seeds, images, checkpoints


def init_distributed(device_flag):
    """torchrun sets RANK / WORLD_SIZE; without them this is one process. nccl on CUDA, gloo on CPU."""
    rank, world, local_rank = (int(os.environ.get(name, default)) for name, default in
                               (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0)))
    device = torch.device(device_flag or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device


def derive_seed(*numbers):
    """A 63-bit seed from a tuple of integers (numpy's SeedSequence), for per-epoch and per-step generators."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1, np.uint64)[0] >> 1)


def to_uint8(images):
    """[-1, 1] floats -> uint8 with EDM's rounding (x * 127.5 + 128, clipped)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def save_grid(images, path, columns=None):
    """images: (N, C, H, W) uint8 -> one PNG, written atomically."""
    n, channels, height, width = images.shape
    columns = columns or max(1, int(math.ceil(math.sqrt(n))))
    rows = (n + columns - 1) // columns
    canvas = torch.zeros(rows * columns, channels, height, width, dtype=torch.uint8)
    canvas[:n] = images.cpu()
    canvas = canvas.reshape(rows, columns, channels, height, width).permute(0, 3, 1, 4, 2)
    canvas = canvas.reshape(rows * height, columns * width, channels).numpy()
    save_png(canvas, path)


def save_png(array, path):
    """(H, W, C) uint8 -> PNG, written atomically."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format='png')
    write_atomic(path, buffer.getvalue())


def write_atomic(path, data):
    """Temp file + os.replace: an interrupted write never destroys the previous file. The temp name is per process,
    as every rank may download CIFAR-10 into the same cache at once."""
    with open(f'{path}.tmp{os.getpid()}', 'wb') as file:
        file.write(data)
    os.replace(f'{path}.tmp{os.getpid()}', path)


def save_atomic(obj, path):
    """torch.save through a temp file, so a kill mid-write leaves the previous checkpoint intact."""
    torch.save(obj, path + '.tmp')
    os.replace(path + '.tmp', path)


def load_network(path, device):
    """Snapshot -> (Precond net in eval mode, its network config)."""
    try:
        snapshot = torch.load(path, map_location='cpu', weights_only=True)
        net = build_network(snapshot['config'])
        net.load_state_dict(snapshot['ema'])
    except FileNotFoundError:
        raise UsageError(f'--network: {path} does not exist')
    except Exception as error:
        raise UsageError(f'--network: cannot load {path} ({type(error).__name__}: {error})')
    cuda = torch.device(device).type == 'cuda'  # NHWC convolutions on tensor cores, as in training
    net.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    return net.eval().requires_grad_(False), snapshot['config']


# ----------------------------------------------------------------------------------------------------------------------
# Training loop


class Data:
    """The corrupted training set, on the GPU when it fits: uint8 images, bool masks A and A_tilde, labels."""

    def __init__(self, cfg, device):
        # Read, keep the official --max_size subset, draw each image's masks from its raw index.
        images, labels = load_images(cfg.data, cfg.cache_dir, cfg.workers)
        if cfg.cond and labels is None:
            raise DataError('--cond needs labels (dataset.json, class sub-folders or y in the .npz)')
        raw_indices = np.arange(len(images))
        if 0 < cfg.max_size < len(images):  # official dataset.py: a RandomState(0) shuffle, first max_size, sorted
            np.random.RandomState(0).shuffle(raw_indices)
            raw_indices = np.sort(raw_indices[:cfg.max_size])
        images = torch.from_numpy(images[raw_indices]).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W) uint8
        A, A_tilde = corruption_masks(raw_indices, images.shape[1:], cfg.corruption_probability,
                                      cfg.delta_probability, cfg.mask_full_rgb, cfg.mask_seed)
        # The fixed corrupted dataset: what A erased is gone for good. Only the official augmentation order (augment
        # the clean image, then mask: spec A10.1) needs the clean pixels, so only it keeps them.
        if not (cfg.augment_mode == 'official' and cfg.augment > 0):
            images = images * A
        self.num_images, self.channels, self.resolution = images.shape[0], images.shape[1], images.shape[2]
        self.label_dim = int(labels.max()) + 1 if cfg.cond else 0
        labels = torch.from_numpy(labels[raw_indices]) if cfg.cond else None
        # On the GPU when images and masks take less than a quarter of its free memory, else in pinned host memory.
        fits = device.type != 'cuda' or 3 * images.numel() < torch.cuda.mem_get_info(device)[0] // 4
        self.device = device if fits else torch.device('cpu')
        place = lambda t: None if t is None else t.to(self.device) if fits else t.pin_memory()  # noqa: E731
        self.images, self.A, self.A_tilde, self.labels = map(place, (images, A, A_tilde, labels))
        self.seed, self._orders = cfg.seed, {}

    def indices(self, positions):
        """Dataset indices at positions (int64, CPU) of the endless stream of per-epoch permutations, each seeded by
        (seed, epoch): the data order is a function of the image count alone, so a resumed run needs no state."""
        epochs, offsets = positions // self.num_images, positions % self.num_images
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            if epoch not in self._orders:
                generator = torch.Generator().manual_seed(derive_seed(self.seed, 0, epoch))
                self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
                self._orders[epoch] = torch.randperm(self.num_images, generator=generator)
            out[epochs == epoch] = self._orders[epoch][offsets[epochs == epoch]]
        return out

    def batch(self, index, device):
        """Images in [-1, 1] (B, C, H, W), A and A_tilde (B, 1 or C, H, W) as float, labels (B,) or None."""
        index = index.to(self.device)
        get = lambda t: None if t is None else t[index].to(device, non_blocking=True)  # noqa: E731
        y = get(self.images).to(torch.float32) / 127.5 - 1
        return y, get(self.A).to(torch.float32), get(self.A_tilde).to(torch.float32), get(self.labels)


def draw_step(cfg, data, cur_nimg, device):
    """All randomness of one global batch, a function of (seed, cur_nimg). Every rank draws it whole and takes its
    rows, so any number of GPUs and any --batch_gpu follow the same trajectory, and resuming needs no RNG state."""
    generator = torch.Generator(device).manual_seed(derive_seed(cfg.seed, 1, cur_nimg))
    size = (cfg.batch, data.channels, data.resolution, data.resolution)
    step = dict(index=data.indices(torch.arange(cur_nimg, cur_nimg + cfg.batch)),
                normal=torch.randn(cfg.batch, generator=generator, device=device),      # (batch,) for ln(sigma)
                eps=torch.randn(size, generator=generator, device=device))              # (batch, C, H, W)
    if cfg.augment > 0:
        step['flips'], step['G_inv'], step['augment_labels'] = draw_augmentation(
            cfg.augment, cfg.batch, data.resolution, data.resolution, generator)
    if cfg.resample_delta:
        mask_size = (cfg.batch, 1 if cfg.mask_full_rgb else data.channels, data.resolution, data.resolution)
        step['B'] = (torch.rand(mask_size, generator=generator, device=device) >= cfg.delta_probability).float()
    return step


def microbatch(cfg, data, step, rows, device):
    """Rows of the global batch: corrupted images, masks and labels, augmented; and the augment labels."""
    y, A, A_tilde, labels = data.batch(step['index'][rows], device)
    rows = rows.to(device)
    if cfg.resample_delta:
        A_tilde = A * step['B'][rows]                  # a fresh B every step instead of the fixed one per image
    augment_labels = None
    if cfg.augment > 0:
        augment_labels, flips, G_inv = step['augment_labels'][rows], step['flips'][rows], step['G_inv'][rows]
        if cfg.augment_mode == 'joint':               # the masks travel with the image
            stacked = augment(torch.cat([y, A, A_tilde], dim=1), flips, G_inv, 'joint')
            y, A, A_tilde = stacked.split([y.shape[1], A.shape[1], A_tilde.shape[1]], dim=1)
        else:                                         # official: augment the clean image, keep the masks as they are
            y = augment(y, flips, G_inv, 'official')
    return y, A, A_tilde, labels, augment_labels


class TickStats:
    """Loss, loss on the pixels the network saw, loss per noise-level bin and realised erasure rates, summed on the
    device and read once per tick. The bins split ln(sigma) at -1.5, -0.5, 0.5, 1.5 standard deviations."""

    def __init__(self, cfg, device):
        self.edges = torch.tensor([-1.5, -0.5, 0.5, 1.5], device=device)
        sigmas = [f'{math.exp(cfg.P_mean + cfg.P_std * z):.3g}' for z in self.edges.tolist()]
        self.bin_names = [f'<{sigmas[0]}'] + [f'{a}-{b}' for a, b in zip(sigmas, sigmas[1:])] + [f'>{sigmas[-1]}']
        self.sums = torch.zeros(5 + 2 * len(self.bin_names), device=device)

    def add(self, loss, A, A_tilde, normal):
        per_image = loss.flatten(1).mean(1)                                             # (B,)
        seen = (loss * A_tilde).flatten(1).mean(1)                                      # (B,)
        self.sums[:5] += torch.stack([per_image.sum(), seen.sum(), torch.ones_like(per_image).sum(),
                                      (1 - A).mean() * len(A), (1 - A_tilde).mean() * len(A)])
        bins = torch.bucketize(normal, self.edges)
        self.sums[5:].view(2, -1)[0].index_add_(0, bins, per_image)
        self.sums[5:].view(2, -1)[1].index_add_(0, bins, torch.ones_like(per_image))

    def read(self):
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.sums)
        values = self.sums.tolist()  # the one host sync of the tick
        self.sums.zero_()
        (loss, seen, n, erased_A, erased_A_tilde), bins = values[:5], values[5:]
        totals, counts = bins[:len(bins) // 2], bins[len(bins) // 2:]
        return dict(loss=loss / n, loss_seen=seen / n, erased_A=erased_A / n, erased_A_tilde=erased_A_tilde / n,
                    loss_by_sigma={k: t / c if c else None for k, t, c in zip(self.bin_names, totals, counts)})


# Flags that may differ between a run and its continuation by --resume=auto; any other difference starts a new run.
RESUMABLE_CHANGES = {'kimg', 'resume', 'outdir', 'tick', 'snap', 'dump', 'grid', 'steps', 'precision', 'compile',
                     'workers', 'cache_dir', 'device', 'dry_run'}


def find_resume(cfg, description):
    """--resume=auto: the latest training state of the newest run folder with this description and config."""
    folders = sorted(glob.glob(os.path.join(cfg.outdir, f'[0-9][0-9][0-9][0-9][0-9]-{glob.escape(description)}')))
    wanted = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    for folder in reversed(folders):
        states = glob.glob(os.path.join(folder, 'training-state-*.pt'))
        try:
            with open(os.path.join(folder, 'config.json')) as file:
                saved = json.load(file)['config']
        except (OSError, ValueError, KeyError):
            continue
        if states and all(saved.get(k) == v for k, v in wanted.items()):
            return max(states, key=lambda path: float(re.search(r'-([\d.]+)\.pt$', path).group(1)))
    return None


def open_run_dir(cfg, description, resume_path):
    """A new numbered folder, or the folder of the state that --resume=auto continues."""
    if resume_path and cfg.resume == 'auto':
        return os.path.dirname(resume_path)
    names = os.listdir(cfg.outdir) if os.path.isdir(cfg.outdir) else []
    run_ids = [int(name[:5]) for name in names if re.match(r'\d{5}-', name)]
    return os.path.join(cfg.outdir, f'{max(run_ids, default=-1) + 1:05d}-{description}')


def load_state(path, net, ema, optimizer, rank, world, device):
    """Restores a training state; returns (cur_nimg, cur_tick). Dropout generators are restored when the number
    of processes is unchanged (everything else does not depend on it)."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=False)
        net.load_state_dict(state['net'])
        ema.load_state_dict(state['ema'])
        optimizer.load_state_dict(state['optimizer'])
    except Exception as error:  # a truncated file, another script's state, another network: one line, not a trace
        raise UsageError(f'--resume: cannot load {path} ({type(error).__name__}: {error})')
    if len(state['rng_cpu']) == world:
        torch.set_rng_state(state['rng_cpu'][rank])
        if device.type == 'cuda' and state['rng_cuda'][rank] is not None:
            torch.cuda.set_rng_state(state['rng_cuda'][rank], device)
    return state['cur_nimg'], state['cur_tick']


def train(cfg):
    """The EDM training loop with the ambient loss (official training/training_loop.py); returns the run folder.
    One global batch per step, split into rounds of --batch_gpu per process; all randomness of a step is drawn by
    draw_step from (seed, cur_nimg), so resuming and changing the number of GPUs keep the trajectory."""
    # Processes, batch split and the flags that need them.
    rank, world, device = init_distributed(cfg.device)
    is_main = rank == 0
    batch_gpu = cfg.batch_gpu or cfg.batch // world
    if cfg.batch % (batch_gpu * world):
        raise UsageError(f'--batch={cfg.batch} must be divisible by GPUs x --batch_gpu = {world} x {batch_gpu}')
    rounds = cfg.batch // (batch_gpu * world)
    if cfg.resume not in ('', 'auto') and not os.path.isfile(cfg.resume):
        raise UsageError(f'--resume: {cfg.resume} does not exist')

    # Performance settings.
    precision = cfg.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')
    # TF32 for what stays fp32; fp32 = official numerics.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == 'bf16'
    torch.backends.cudnn.benchmark = True              # fixed shapes, so cuDNN's autotuning pays off
    memory_format = torch.channels_last if device.type == 'cuda' else torch.contiguous_format  # tensor-core convs

    # Data, corrupted once, and the network.
    data = Data(cfg, device)
    data_name = 'cifar10' if cfg.data == 'cifar10' else os.path.splitext(os.path.basename(cfg.data.rstrip('/')))[0]
    description = f'{data_name}-{cfg.precond}-p{cfg.corruption_probability:g}-d{cfg.delta_probability:g}-' \
                  f'{cfg.arch}-batch{cfg.batch}' + (f'-{cfg.desc}' if cfg.desc else '')  # run folder name, EDM-like
    resume_path = find_resume(cfg, description) if cfg.resume == 'auto' else cfg.resume or None
    net_config = network_config(cfg, data.resolution, data.channels, data.label_dim)
    torch.manual_seed(cfg.seed)                        # the same initial weights on every rank
    net = build_network(net_config).to(device, memory_format=memory_format).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = (torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam)(
        net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
        fused=device.type == 'cuda')                   # official: Adam, AdamW when --weight_decay > 0
    torch.manual_seed(cfg.seed * world + rank)         # dropout differs per rank
    cur_nimg, cur_tick = load_state(resume_path, net, ema, optimizer, rank, world, device) if resume_path else (0, 0)
    ddp = net if world == 1 else torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device] if device.type == 'cuda' else None)
    forward = torch.compile(ddp) if cfg.compile else ddp

    # Run folder: config, a copy of this file, the corrupted data as the network sees it.
    run_dir = open_run_dir(cfg, description, resume_path)

    def log(message):  # print() that also appends to the run's log.txt, on rank 0 only
        if is_main:
            print(message, flush=True)
            with open(os.path.join(run_dir, 'log.txt'), 'a') as file:
                file.write(message + '\n')
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        write_atomic(os.path.join(run_dir, 'config.json'), json.dumps(dict(
            config=dataclasses.asdict(cfg), network=net_config, command=sys.argv, world_size=world,
            torch=torch.__version__, device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'),
            indent=2).encode())
        with open(__file__, 'rb') as source:
            write_atomic(os.path.join(run_dir, 'ambient.py.txt'), source.read())
        y, A = data.batch(torch.arange(min(64, data.num_images)), 'cpu')[:2]
        save_grid(to_uint8(A * y), os.path.join(run_dir, 'data-corrupted.png'))
        stats_path = os.path.join(run_dir, 'stats.jsonl')
        if os.path.exists(stats_path):  # drop ticks logged after the resumed state (redone) and a line cut by a kill
            with open(stats_path) as file:
                lines = [line for line in file if line.endswith('\n')]
            kept = [line for line in lines if json.loads(line)['kimg'] <= cur_nimg / 1e3 + 1e-9]
            write_atomic(stats_path, ''.join(kept).encode())
    log(f'{run_dir}: {data.num_images} images {data.channels}x{data.resolution}x{data.resolution}, '
        f'{sum(p.numel() for p in net.parameters()):,} parameters, batch {cfg.batch} = {world} GPU(s) x {batch_gpu} '
        f'x {rounds} round(s), {precision}' + (f', resuming from {resume_path}' if resume_path else ''))

    # Tick bookkeeping: statistics stay on the device, clocks count images.
    stats = TickStats(cfg, device)
    total_nimg = int(cfg.kimg * 1000)
    start_time = tick_start_time = time.time()
    start_nimg = tick_start_nimg = cur_nimg
    previous_state = None
    while cur_nimg < total_nimg:  # a state resumed at or past --kimg trains no further
        step = draw_step(cfg, data, cur_nimg, device)

        # Accumulate gradients; DDP synchronises on the last round only.
        optimizer.zero_grad(set_to_none=True)
        for round_idx in range(rounds):
            rows = torch.arange(batch_gpu) + (round_idx * world + rank) * batch_gpu
            y, A, A_tilde, labels, augment_labels = microbatch(cfg, data, step, rows, device)
            rows = rows.to(device)
            sigma = (step['normal'][rows] * cfg.P_std + cfg.P_mean).exp()               # (batch_gpu,) EDM
            sync = ddp.no_sync() if world > 1 and round_idx < rounds - 1 else contextlib.nullcontext()
            with sync, autocast:
                if cfg.precond == 'ambient':
                    loss = ambient_loss(forward, y, A, A_tilde, sigma, step['eps'][rows], labels, augment_labels,
                                        cfg.norm, cfg.sigma_data)
                else:  # the naive baseline: EDM on the masked images
                    loss = edm_loss(forward, A * y, sigma, step['eps'][rows], labels, augment_labels, cfg.sigma_data)
                # Official normalisation: sum over pixels, mean over the global batch (DDP averages over GPUs).
                loss.sum().mul(world / cfg.batch).backward()
            stats.add(loss.detach(), A, A_tilde, step['normal'][rows])

        # Update weights: linear warm-up from lr 0 at the first step, nan/inf cleanup, clipping (all official).
        lr = cfg.lr * min(cur_nimg / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1)
        for group in optimizer.param_groups:
            group['lr'] = lr
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
        optimizer.step()

        # Update EMA: half-life --ema Mimg, at most --ema_rampup_ratio times the images seen (official).
        ema_halflife_nimg = cfg.ema * 1e6
        if cfg.ema_rampup_ratio > 0:
            ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * cfg.ema_rampup_ratio)
        ema_beta = 0.5 ** (cfg.batch / max(ema_halflife_nimg, 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - ema_beta)

        # Maintenance once per tick (and after the first step).
        cur_nimg += cfg.batch
        done = cur_nimg >= total_nimg
        if not done and cur_tick != 0 and cur_nimg < tick_start_nimg + cfg.tick * 1000:
            continue
        tick_stats = stats.read()  # the host sync first: the tick's time includes all of its GPU work
        tick_time = time.time() - tick_start_time
        sec_per_kimg = tick_time / (cur_nimg - tick_start_nimg) * 1e3
        entry = dict(kimg=cur_nimg / 1e3, tick=cur_tick, time=time.time() - start_time, sec_per_kimg=sec_per_kimg,
                     lr=lr, img_per_sec=(cur_nimg - tick_start_nimg) / tick_time, **tick_stats,
                     gpumem_gb=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else 0.0)
        log(f'kimg {entry["kimg"]:.1f} | time {format_time(entry["time"])} | sec/kimg {sec_per_kimg:.3g} | '
            f'ETA {format_time((total_nimg - cur_nimg) / 1e3 * sec_per_kimg)} | loss {entry["loss"]:.4g} | '
            f'lr {lr:.1e} | img/s {entry["img_per_sec"]:.0f} | gpumem {entry["gpumem_gb"]:.1f}G | '
            f'erased A {entry["erased_A"]:.3f} A~ {entry["erased_A_tilde"]:.3f} | loss by sigma '
            + ' '.join('-' if v is None else f'{v:.3g}' for v in entry['loss_by_sigma'].values()))
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        if is_main:
            with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as file:
                file.write(json.dumps(entry) + '\n')
        if done or (cur_tick % cfg.snap == 0 and cur_tick != 0):
            path = save_snapshot(cfg, run_dir, net, ema, optimizer, net_config, cur_nimg, cur_tick, device, rank,
                                 world, precision)
            if previous_state and previous_state != path:  # keep every --dump-th state, replace the others
                os.remove(previous_state)
            previous_state = None if cur_tick % cfg.dump == 0 else path
        cur_tick += 1
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
    log(f'Done: {(cur_nimg - start_nimg) / 1e3:.1f} kimg in {format_time(time.time() - start_time)}.')
    return run_dir


def save_snapshot(cfg, run_dir, net, ema, optimizer, net_config, cur_nimg, cur_tick, device, rank, world,
                  precision):
    """Writes samples-<kimg>.png (fixed seeds), network-snapshot-<kimg>.pt (EMA weights and the network config:
    all that generate/eval need) and training-state-<kimg>.pt (all that resuming needs); returns the state's path
    (None on other ranks)."""
    rng = [(torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == 'cuda' else None)] * world
    if world > 1:  # every rank's dropout generator
        torch.distributed.all_gather_object(rng, rng[0])
    if rank != 0:
        return None
    # EDM names files by whole kimg; runs that snapshot more often than every kimg (CPU tests) get 3 decimals.
    kimg = f'{cur_nimg // 1000:06d}' if cfg.tick * cfg.snap >= 1 else f'{cur_nimg / 1000:010.3f}'
    if cfg.grid:
        grid = generate_images(ema, net_config, list(range(cfg.grid)), device, steps=cfg.steps, precision=precision)
        save_grid(grid, os.path.join(run_dir, f'samples-{kimg}.png'))
    save_atomic(dict(config=net_config, ema=ema.state_dict()), os.path.join(run_dir, f'network-snapshot-{kimg}.pt'))
    path = os.path.join(run_dir, f'training-state-{kimg}.pt')
    save_atomic(dict(net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(), cur_nimg=cur_nimg,
                     cur_tick=cur_tick + 1, rng_cpu=[r[0] for r in rng], rng_cuda=[r[1] for r in rng],
                     config=dataclasses.asdict(cfg)), path)
    return path


def format_time(seconds):
    """4m05s style, as EDM's status line."""
    s = int(seconds)
    return f'{s}s' if s < 60 else f'{s // 60}m{s % 60:02d}s' if s < 3600 else f'{s // 3600}h{s // 60 % 60:02d}m'


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: generate, eval (FID through fid.py), neighbors (memorisation check)


def generate_images(net, net_config, seeds, device, sampler='ambient', num_masks=1, guidance_scale=0.0, steps=18,
                    corruption_probability=None, delta_probability=None, class_idx=None, precision='fp32'):
    """uint8 images (B, C, H, W), image k a function of seeds[k] alone: latents, label and sampling masks come from
    a generator seeded by it (the official masks come from NumPy's global RNG, which makes samples irreproducible)."""
    # Latents, labels and masks, in this order, from one generator per seed.
    unet = net_config['unet']
    channels, resolution = net_config['channels'], unet['img_resolution']
    generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]
    latents = torch.stack([torch.randn(channels, resolution, resolution, generator=g, device=device)
                           for g in generators])
    labels = None
    if unet.get('label_dim', 0):
        labels = torch.stack([torch.randint(unet['label_dim'], (), generator=g, device=device) for g in generators])
        if class_idx is not None:
            labels = torch.full_like(labels, class_idx)
    masks = None
    if net_config['precond'] == 'ambient':
        # Sampling masks keep a pixel with the training marginal of A_tilde: (1 - p)(1 - delta) (official eval.py).
        p = net_config['corruption_probability'] if corruption_probability is None else corruption_probability
        delta = net_config['delta_probability'] if delta_probability is None else delta_probability
        survival = (1 - p) * (1 - delta) if sampler == 'ambient' else 1.0
        mask_channels = 1 if net_config['mask_full_rgb'] else channels
        masks = torch.stack([torch.rand(num_masks, mask_channels, resolution, resolution, generator=g, device=device)
                             for g in generators], dim=1) < survival                    # (K, B, Cm, H, W)
        masks = masks.to(torch.float64).expand(-1, -1, channels, -1, -1)
    # The official clip belongs to the ambient sampler; plain EDM does not clip.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
        images = ambient_sampler(net, latents, masks, labels, num_steps=steps, guidance_scale=guidance_scale,
                                 clip=masks is not None)
    return to_uint8(images)


def sampling_parser(prog, network_required=True):
    """Flags shared by generate, eval and neighbors (official eval.py names)."""
    parser = QuietParser(prog=prog)
    parser.add_argument('--network', required=network_required)       # network-snapshot-*.pt
    parser.add_argument('--batch', type=int, default=64)               # per GPU
    parser.add_argument('--steps', type=int, default=18)               # official eval.py --steps
    parser.add_argument('--sampler', choices=['ambient', 'edm'], default='ambient')  # edm: all-ones mask
    parser.add_argument('--num_masks', type=int, default=1)            # official README
    parser.add_argument('--guidance_scale', type=float, default=0.0)   # official README
    parser.add_argument('--corruption_probability', type=float, default=None)  # default: the training value
    parser.add_argument('--delta_probability', type=float, default=None)       # default: the training value
    parser.add_argument('--class', dest='class_idx', type=int, default=None)   # default: random per seed
    parser.add_argument('--precision', choices=['fp32', 'bf16'], default=None)
    parser.add_argument('--device', default='')
    return parser


def prepare_sampling(args, device):
    """Checks the sampling flags and loads the network, before anything is written."""
    for name in ('corruption_probability', 'delta_probability'):
        value = getattr(args, name)
        if value is not None and not 0 <= value < 1:
            raise UsageError(f'--{name} must be in [0, 1)')
    if args.batch < 1 or args.steps < 2 or args.num_masks < 1:
        raise UsageError('--batch and --num_masks must be >= 1, --steps >= 2')
    net, net_config = load_network(args.network, device)
    label_dim = net_config['unet']['label_dim']
    if args.class_idx is not None and not 0 <= args.class_idx < label_dim:
        raise UsageError(f'--class must be in [0, {label_dim})' if label_dim else '--class needs a conditional network')
    return net, net_config


def sample_batches(net, net_config, args, seeds, device):
    """Yields (seeds, uint8 images) for this rank's share of the seeds (EDM's round-robin batches)."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    precision = args.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    num_batches = max((len(seeds) - 1) // (args.batch * world) + 1, 1) * world
    for batch_seeds in torch.as_tensor(seeds).tensor_split(num_batches)[rank::world]:
        if len(batch_seeds):
            yield batch_seeds.tolist(), generate_images(
                net, net_config, batch_seeds.tolist(), device, args.sampler, args.num_masks, args.guidance_scale,
                args.steps, args.corruption_probability, args.delta_probability, args.class_idx, precision)


def fid_call(function, *args, **kwargs):
    """Calls a fid.py function, turning its errors (missing weights offline, a bad reference) into one line."""
    try:
        return function(*args, **kwargs)
    except (FileNotFoundError, ValueError) as error:
        raise DataError(str(error))


def generate(argv):
    """Writes one PNG per seed, outdir/<seed>.png."""
    parser = sampling_parser('ambient.py generate')
    parser.add_argument('--seeds', default='0-63')
    parser.add_argument('--outdir', required=True)
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    rank, _, device = init_distributed(args.device)
    net, net_config = prepare_sampling(args, device)
    os.makedirs(args.outdir, exist_ok=True)
    for batch_seeds, images in sample_batches(net, net_config, args, seeds, device):
        for seed, image in zip(batch_seeds, images.permute(0, 2, 3, 1).cpu().numpy()):
            save_png(image, os.path.join(args.outdir, f'{seed:06d}.png'))
    if rank == 0:
        print(f'Wrote {len(seeds)} images to {args.outdir}')


def evaluate(argv):
    """fid.py metrics of --num samples (seeds 0..num-1) held in memory; appends a JSON line to metrics.jsonl next
    to the network."""
    parser = sampling_parser('ambient.py eval')
    parser.add_argument('--ref', required=True)                        # reference statistics (fid.py ref)
    parser.add_argument('--num', type=int, default=50000)              # official eval.py --num
    parser.add_argument('--metrics', default='fid')                    # any of fid,is,sfid,pr,kid
    parser.add_argument('--fid_weights', default=None)                 # default: $FID_WEIGHTS or download
    args = parser.parse_args(argv)
    metrics = args.metrics.split(',')
    if args.num < 2 or not set(metrics) <= set(fid.METRICS):
        raise UsageError(f'--num must be >= 2 and --metrics a list of {",".join(fid.METRICS)}')
    if not args.ref.startswith(('http://', 'https://')) and not os.path.exists(args.ref):
        raise UsageError(f'--ref: {args.ref} does not exist')
    rank, _, device = init_distributed(args.device)
    net, net_config = prepare_sampling(args, device)
    # Reference, detector and metric checks all fail here, before minutes of sampling.
    ref = fid_call(fid.load_ref, args.ref)
    detector = fid_call(fid.load_inception, args.fid_weights, device=device)
    batches = (images for _, images in sample_batches(net, net_config, args, list(range(args.num)), device))
    results = fid_call(fid.compute_metrics, batches, ref, metrics=metrics, detector=detector, device=device,
                       num_images=args.num)
    if rank == 0:
        entry = dict(network=os.path.basename(args.network), num=args.num, sampler=args.sampler, steps=args.steps,
                     num_masks=args.num_masks, guidance_scale=args.guidance_scale, ref=args.ref,
                     **{k: float(v) for k, v in results.items()}, timestamp=time.time())
        print(json.dumps(entry))
        with open(os.path.join(os.path.dirname(os.path.abspath(args.network)), 'metrics.jsonl'), 'a') as file:
            file.write(json.dumps(entry) + '\n')


def neighbors(argv):
    """Memorisation check (official find_dataset_neighbors.py, with fid.py's Inception pool features in place of
    DINOv2): cosine similarity of each generated image to every clean training image. Writes each image's top-3
    similarities and neighbours (neighbors.npz), the fraction whose top-1 similarity exceeds --threshold
    (neighbors.json) and the --top most similar pairs, generated | 3 nearest (neighbors.png)."""
    parser = sampling_parser('ambient.py neighbors', network_required=False)
    parser.add_argument('--images', default=None)                      # generated images instead of --network
    parser.add_argument('--data', required=True)                       # the training set (read clean: an audit)
    parser.add_argument('--num', type=int, default=10000)              # official README --max_size=10000
    parser.add_argument('--outdir', required=True)
    parser.add_argument('--threshold', type=float, default=0.95)       # our choice: the official code has none
    parser.add_argument('--top', type=int, default=16)
    parser.add_argument('--fid_weights', default=None)
    args = parser.parse_args(argv)
    if (args.network is None) == (args.images is None):
        raise UsageError('give one of --network and --images')
    if args.num < 1 or args.top < 1 or not -1 <= args.threshold <= 1:
        raise UsageError('--num and --top must be >= 1, --threshold in [-1, 1]')
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        raise UsageError('neighbors runs as one process')
    # Generated images (sampled here, or read from --images) and the clean training set.
    _, _, device = init_distributed(args.device)
    if args.network:
        net, net_config = prepare_sampling(args, device)
    train_images = torch.from_numpy(load_images(args.data)[0]).permute(0, 3, 1, 2)    # (N, 3, H, W) uint8
    detector = fid_call(fid.load_inception, args.fid_weights, device=device)
    if args.images:
        generated = torch.from_numpy(load_images(args.images)[0][:args.num]).permute(0, 3, 1, 2)
    else:
        seeds = list(range(args.num))
        generated = torch.cat([x.cpu() for _, x in sample_batches(net, net_config, args, seeds, device)])

    # Cosine similarity of L2-normalised pool features, top 3 per generated image.
    def features(images):
        batches = (images[i:i + args.batch] for i in range(0, len(images), args.batch))
        return F.normalize(fid.compute_features(batches, detector, device)['pool'].double(), dim=1)
    train_features, generated_features = features(train_images), features(generated)
    k = min(3, len(train_images))
    top = [(chunk @ train_features.T).topk(k, dim=1) for chunk in generated_features.split(1024)]
    similarity = torch.cat([t.values for t in top]).cpu()                            # (num, 3)
    neighbor = torch.cat([t.indices for t in top]).cpu()                             # (num, 3)

    # Outputs: the numbers, a summary, and a picture of the most similar pairs.
    os.makedirs(args.outdir, exist_ok=True)
    top1 = similarity[:, 0]
    summary = dict(source=args.network or args.images, num_generated=len(generated), num_train=len(train_images),
                   threshold=args.threshold, fraction_above=float((top1 > args.threshold).double().mean()),
                   mean_top1=float(top1.mean()), max_top1=float(top1.max()),
                   quantiles_top1={str(q): float(top1.quantile(q)) for q in (0.5, 0.9, 0.99)})
    buffer = io.BytesIO()
    np.savez(buffer, similarity=similarity.numpy(), neighbor=neighbor.numpy())
    write_atomic(os.path.join(args.outdir, 'neighbors.npz'), buffer.getvalue())
    write_atomic(os.path.join(args.outdir, 'neighbors.json'), json.dumps(summary, indent=2).encode())
    most_similar = top1.argsort(descending=True)[:args.top]
    rows = [torch.cat([generated[i:i + 1], train_images[neighbor[i]]]) for i in most_similar]
    save_grid(torch.cat(rows), os.path.join(args.outdir, 'neighbors.png'), columns=1 + neighbor.shape[1])
    print(json.dumps(summary))


# ----------------------------------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ('train', 'generate', 'eval', 'neighbors') else 'train'
    try:
        if command == 'train':
            cfg, preset = parse_train_args(argv)
            if cfg.dry_run:
                print(json.dumps(dict(preset=preset, **dataclasses.asdict(cfg)), indent=2))
                return
            train(cfg)
        elif command == 'generate':
            generate(argv)
        elif command == 'eval':
            evaluate(argv)
        else:
            neighbors(argv)
    except (UsageError, DataError) as error:
        print('error:', ' '.join(str(error).split()), file=sys.stderr)  # one line, even for multi-line messages
        sys.exit(2 if isinstance(error, UsageError) else 1)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
