"""How much is a noisy image worth? Data scaling laws for Ambient Diffusion.

Giannis Daras, Yeshwanth Cherapanamjeri, Constantinos Daskalakis. ICLR 2025, arXiv:2411.02780.
Reference implementation, faithful to the official code (giannisdaras/ambient-laws, commit 0d6c349, with
ambient_utils 2fe0e13), on EDM (Karras et al., NeurIPS 2022) preconditioning, networks and Heun sampler.

What changes relative to EDM: the training set is a fixed mixture of clean images and images that carry Gaussian
noise of known level sigma_n (y = x0 + sigma_n * eps, drawn once per image). Clean images train with the EDM loss.
A noisy image is only used at diffusion levels sigma >= sigma_n: it is noised further to x_t = y + sqrt(sigma^2 -
sigma_n^2) * eps', and the network's clean estimate D(x_t, sigma) ~ E[x0 | x_t] is mapped by Tweedie's formula to an
estimate of the *noisy* image, (1 - sigma_n^2/sigma^2) D + (sigma_n^2/sigma^2) x_t, which is regressed onto y
("ambient score matching"). Its minimiser is the clean-data denoiser, so the model samples clean images although
most of its data is noisy. An optional consistency loss (Daras et al., ICML 2024) teaches the levels below sigma_n.
Sampling is plain EDM. The paper's finding: 10% clean + 90% noisy images nearly match 100% clean data (Table 1).

Commands (the flags follow ambient-laws' train.py; `--preset` picks the CIFAR-10 / CelebA / ImageNet recipe):
    # CPU smoke run on the embedded 200 CIFAR-10 images, about a minute
    python ambient_laws.py --preset=tiny --data=tests/data/cifar10_tiny.npz --sigma=0.2 --corruption_probability=0.9

    # 1 GPU: CIFAR-10, 90% of the images noisy at sigma_n = 0.2 (Table 1, "90% noisy + 10% clean")
    python ambient_laws.py --preset=cifar10 --data=cifar10 --sigma=0.2 --corruption_probability=0.9

    # 8 GPUs, same run; --resume=auto continues the newest matching run folder after an interruption
    torchrun --standalone --nproc_per_node=8 ambient_laws.py --preset=cifar10 --data=cifar10 --sigma=0.2 \\
        --corruption_probability=0.9 --resume=auto

    # 50,000 samples as PNGs; then FID of 50,000 samples in memory against EDM's reference statistics (TF
    # preprocessing). The `--` stops torchrun from taking --num for its own --numa-binding.
    torchrun --standalone --nproc_per_node=8 ambient_laws.py generate --seeds=0-49999 --outdir=samples \\
        --network=runs/00000-cifar10-ddpmpp-cifar10-sigma0.2-p0.9-keep1/network-snapshot-200000.pt
    torchrun --standalone --nproc_per_node=8 -- ambient_laws.py eval --num=50000 --preprocess=tf \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz --network=runs/.../network-snapshot-...pt
"""

import argparse
import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import pathlib
import pickle
import re
import sys
import tarfile
import tempfile
import time
import zipfile

import numpy as np
import PIL.Image
import requests
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fid
import nets

# ----------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class Config:
    # Data and corruption (ambient-laws train.py, ambient_utils dataset_utils.py).
    data: str = ''                        # image folder, EDM-style zip, .npz (x, y) or the word cifar10
    cond: bool = False                    # class-conditional model (labels from the data); official default
    sigma: float = 0.0                    # noise std sigma_n of the noisy images, pixels in [-1, 1]; official flag
    corruption_probability: float = 0.0   # fraction of the kept images that are noisy; official flag
    dataset_keep_percentage: float = 1.0  # fraction of the data set used at all; official flag
    sigma_per_image: str = ''             # .npy of one sigma_n per image (0 = clean), replaces the two flags above
    already_noisy: bool = False           # the images already carry that noise (real data): add none
    corruption_seed: int = 0              # picks the noisy images and their noise; independent of --seed
    # Loss (ambient-laws training/loss.py EDMLoss; EDM Table 1).
    P_mean: float = -1.2                  # log-normal sigma distribution, mean of ln(sigma); EDM
    P_std: float = 1.2                    # its std; EDM
    sigma_data: float = 0.5               # EDM preconditioning constant
    consistency_coeff: float = 0.0        # weight of the consistency loss, 0 = off; official default
    consistency_batch_size: int = 32      # global rows of each batch that get the consistency term; official
    num_consistency_steps: int = 6        # grid points of the reverse SDE (5 steps); official train.py default
    num_primes: int = 6                   # reverse-SDE runs averaged per row; official train.py default
    with_weight: bool = False             # multiply the consistency term by lambda(sigma); official default
    with_grad: bool = True                # backpropagate through the reverse SDE; official default
    # Network and augmentation (ambient-laws train.py = EDM train.py).
    preset: str = 'cifar10'               # recipe, see PRESETS
    arch: str = 'ddpmpp-cifar10'          # nets.UNET_PRESETS name
    cbase: int = 0                        # model_channels override, 0 = the arch's; official flag
    cres: str = ''                        # channel_mult override, e.g. 1,2,2,2; official flag
    dropout: float = 0.13                 # dropout probability; official default
    augment: float = 0.12                 # EDM augmentation probability, 0 = off; official default
    # Optimisation (Adam, EDM training_loop.py).
    kimg: float = 200_000                 # training length in thousands of images; official --duration=200 (Mimg)
    batch: int = 512                      # global batch; official default
    batch_gpu: int = 0                    # per-GPU microbatch, 0 = batch / GPUs; accumulation makes up the rest
    lr: float = 1e-3                      # learning rate; official default 10e-4
    lr_rampup_kimg: float = 10_000        # linear warm-up; EDM training_loop default
    weight_decay: float = 0.0             # Adam's L2 weight decay (torch.optim.Adam); official default
    ema_halflife_kimg: float = 500        # EMA half-life; official --ema=0.5 (Mimg)
    ema_rampup_ratio: float = 0.05        # half-life <= this x images seen; EDM default
    # Sampler (EDM Algorithms 1-2): the grids during training and the defaults of generate / eval.
    steps: int = 18                       # Heun steps (2 x steps - 1 network calls); official default
    sigma_min: float = 0.002              # EDM default
    sigma_max: float = 80.0               # EDM default
    rho: float = 7.0                      # time-step exponent; EDM default
    S_churn: float = 0.0                  # stochasticity; 0 = deterministic; official default
    S_min: float = 0.0                    # churn only for sigma in [S_min, S_max]; EDM default
    S_max: float = float('inf')           # EDM default
    S_noise: float = 1.0                  # noise inflation; EDM default
    stop_variance: float = 0.0            # return D early once sigma_next^2 < this; official generate.py flag
    # Run.
    outdir: str = 'runs'                  # run folders go here (generate: the PNG folder)
    desc: str = ''                        # extra words for the run folder name
    tick: float = 50                      # kimg between progress lines; official default
    snap: int = 50                        # ticks between snapshots, grids and training states; official default
    grid: int = 64                        # images in the fixed-seed sample grid of each snapshot
    seed: int = 0                         # training randomness (official default: random)
    resume: str = ''                      # training-state-*.pt to continue from, or auto
    transfer: str = ''                    # network-snapshot-*.pt to start from (fresh optimizer); official flag
    precision: str = ''                   # fp32 or bf16; default bf16 on CUDA, fp32 on CPU (official: fp32)
    compile: bool = False                 # torch.compile the network
    workers: int = 4                      # threads that decode images
    dry_run: bool = False                 # print the resolved config and exit
    device: str = ''                      # default cuda when available
    # Generation and evaluation.
    network: str = ''                     # network-snapshot-*.pt
    seeds: str = '0-63'                   # image k uses seed k, e.g. 0-49999 or 1,5,10-20
    class_idx: int = -1                   # --class: generate only this class, -1 = random per seed
    subdirs: bool = False                 # one folder per 1000 seeds
    ref: str = ''                         # FID reference statistics (.npz or URL) or images
    num: int = 50_000                     # eval: number of samples
    metrics: str = 'fid'                  # eval: comma list of fid.METRICS
    preprocess: str = ''                  # eval: Inception preprocessing, '' = the reference's (tf for EDM refs)
    fid_weights: str = ''                 # Inception weights file, '' = $FID_WEIGHTS or the cache


# Dataset recipes. CIFAR-10 is ambient-laws' train.py default (= EDM's unconditional CIFAR-10 DDPM++). The repo gives
# no CelebA / ImageNet command; the paper's clean FIDs (2.40, 1.41) match EDM's 64x64 DDPM++ and ImageNet-64 ADM
# recipes (EDM README), which are used here; nets.py's 'adm-celeba64' has exactly EDM's ImageNet-64 DhariwalUNet
# layout (192 channels, 1-2-3-4, 3 blocks, attention at 32/16/8). Sampler settings are EDM's per resolution.
PRESETS = {
    'cifar10': dict(arch='ddpmpp-cifar10', cond=False, batch=512, lr=1e-3, dropout=0.13, augment=0.12,
                    kimg=200_000, ema_halflife_kimg=500, steps=18),
    'celeba64': dict(arch='ddpmpp-64', cond=False, batch=256, lr=2e-4, dropout=0.05, augment=0.15, cres='1,2,2,2',
                     kimg=200_000, ema_halflife_kimg=500, steps=40),
    'imagenet64': dict(arch='adm-celeba64', cond=True, batch=4096, lr=1e-4, dropout=0.10, augment=0.0,
                       kimg=2_500_000, ema_halflife_kimg=50_000, tick=200, steps=256, S_churn=40, S_min=0.05,
                       S_max=50, S_noise=1.003),
    'tiny': dict(arch='tiny', cond=False, batch=16, lr=1e-3, dropout=0.0, augment=0.12, kimg=0.5, lr_rampup_kimg=0.25,
                 ema_halflife_kimg=0.1, tick=0.1, snap=5, grid=16, steps=8, workers=1),
}
COMMANDS = ('train', 'generate', 'eval')
ALIASES = {'duration': ('kimg', 1000), 'ema': ('ema_halflife_kimg', 1000), 'class': ('class_idx', 1),
           'batch-gpu': ('batch_gpu', 1)}  # official spellings: --duration and --ema are in Mimg


def fail(message, code=2):
    """One clear line on stderr (from one rank) and a non-zero exit."""
    if os.environ.get('RANK', '0') == '0':
        message = ' '.join(str(message).split())  # one line, even for multi-line library errors
        print(f'error: {message[:600]}{"..." if len(message) > 600 else ""}', file=sys.stderr)
    sys.exit(code)


def parse_bool(text):
    if text.lower() not in ('1', 'true', 'yes', 'on', '0', 'false', 'no', 'off'):
        raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')
    return text.lower() in ('1', 'true', 'yes', 'on')


def parse_args(argv):
    """(command, {flag: value} of the flags given on the command line)."""
    command = argv[0] if argv and argv[0] in COMMANDS else 'train'
    parser = argparse.ArgumentParser(prog='ambient_laws.py', description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.error = fail  # bad flags: one error line and exit code 2
    types = {field.name: field.type for field in dataclasses.fields(Config)}
    comments = dict(re.findall(r'^    (\w+): \w+ = .*?# (.*)$', inspect.getsource(Config), re.M))  # --help texts
    for name, kind in types.items():
        text = comments.get(name, '').replace('%', '%%')
        if kind is bool:  # --compile and --compile=true both work
            parser.add_argument(f'--{name}', type=parse_bool, nargs='?', const=True, help=text)
        else:
            parser.add_argument(f'--{name}', type=kind, help=text)
    for alias, (name, _) in ALIASES.items():
        parser.add_argument(f'--{alias}', dest=f'alias_{name}', type=types[name])
    given = {k: v for k, v in vars(parser.parse_args(argv[1:] if argv[:1] == [command] else argv)).items()
             if v is not None}
    for alias, (name, scale) in ALIASES.items():
        if f'alias_{name}' in given:
            given[name] = given.pop(f'alias_{name}') * scale
    return command, given


def resolve_config(given):
    """Preset values, then the explicit flags; every range checked before anything is written."""
    preset = given.get('preset', Config.preset)
    if preset not in PRESETS:
        fail(f'--preset must be one of {", ".join(PRESETS)}, not {preset!r}')
    cfg = Config(**{**PRESETS[preset], **given})
    checks = [
        (cfg.sigma >= 0, '--sigma must be >= 0'),
        (0 <= cfg.corruption_probability <= 1, '--corruption_probability must be in [0, 1]'),
        (0 < cfg.dataset_keep_percentage <= 1, '--dataset_keep_percentage must be in (0, 1]'),
        (not cfg.sigma_per_image or (cfg.sigma == 0 and cfg.corruption_probability == 0),
         '--sigma_per_image replaces --sigma and --corruption_probability: leave those at 0'),
        (not cfg.already_noisy or cfg.sigma_per_image or cfg.corruption_probability == 1,
         '--already_noisy needs --sigma_per_image or --corruption_probability=1'),
        (cfg.consistency_coeff >= 0, '--consistency_coeff must be >= 0'),
        (cfg.consistency_batch_size >= 1 and cfg.num_primes >= 1, '--consistency_batch_size and --num_primes >= 1'),
        (cfg.num_consistency_steps >= 2, '--num_consistency_steps must be >= 2'),
        (cfg.arch in nets.UNET_PRESETS, f'--arch must be one of {", ".join(nets.UNET_PRESETS)}'),
        (re.fullmatch(r'(\d+,)*\d+|', cfg.cres) is not None, '--cres must look like 1,2,2,2'),
        (0 <= cfg.dropout < 1, '--dropout must be in [0, 1)'),
        (0 <= cfg.augment <= 1, '--augment must be in [0, 1]'),
        (cfg.kimg > 0 and cfg.tick > 0 and cfg.snap >= 1 and cfg.grid >= 1, '--kimg, --tick > 0, --snap, --grid >= 1'),
        (cfg.batch >= 1 and cfg.batch_gpu >= 0, '--batch must be >= 1 and --batch_gpu >= 0'),
        (cfg.lr > 0 and cfg.lr_rampup_kimg >= 0 and cfg.weight_decay >= 0, '--lr must be > 0, ramp-up and decay >= 0'),
        (cfg.ema_halflife_kimg >= 0 and cfg.ema_rampup_ratio >= 0, '--ema_halflife_kimg must be >= 0'),
        (cfg.steps >= 1 and 0 < cfg.sigma_min < cfg.sigma_max and cfg.rho > 0, 'need --steps >= 1 and '
         '0 < --sigma_min < --sigma_max, --rho > 0'),
        (cfg.S_churn >= 0 and cfg.stop_variance >= 0, '--S_churn and --stop_variance must be >= 0'),
        (cfg.precision in ('', 'fp32', 'bf16'), '--precision must be fp32 or bf16'),
        (cfg.workers >= 1 and cfg.num >= 1, '--workers and --num must be >= 1'),
        (not (cfg.resume and cfg.transfer), '--resume and --transfer cannot be used together'),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Data: loading, the fixed clean/noisy split, augmentation

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.ppm', '.tif', '.tiff')


def atomic_write(path, write):
    """write(file) into a temporary file next to path, then rename: an interrupted write never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download_cifar10(cache_dir):
    """CIFAR-10 train set as (50000, 32, 32, 3) uint8 + labels, downloaded once, checksum verified, cached."""
    cached = os.path.join(cache_dir, 'cifar10-train.npz')
    if not os.path.isfile(cached):
        md5, buffer = hashlib.md5(), io.BytesIO()
        try:
            with requests.get(CIFAR10_URL, stream=True, timeout=60) as response:
                response.raise_for_status()
                for chunk in response.iter_content(1 << 20):
                    md5.update(chunk)
                    buffer.write(chunk)
        except requests.RequestException as error:
            raise ValueError(f'cannot download {CIFAR10_URL} ({type(error).__name__}); download it and pass '
                             f'--data=an image folder, zip or .npz instead') from None
        if md5.hexdigest() != CIFAR10_MD5:
            raise ValueError(f'{CIFAR10_URL}: md5 {md5.hexdigest()} != {CIFAR10_MD5}')
        x, y = [], []
        with tarfile.open(fileobj=io.BytesIO(buffer.getvalue()), mode='r:gz') as tar:
            for k in range(1, 6):
                batch = pickle.load(tar.extractfile(f'cifar-10-batches-py/data_batch_{k}'), encoding='bytes')
                x.append(batch[b'data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                y.append(np.asarray(batch[b'labels'], np.int64))
        atomic_write(cached, lambda f: np.savez(f, x=np.concatenate(x), y=np.concatenate(y)))
    with np.load(cached) as data:
        return data['x'], data['y']


def decode_images(names, read, workers):
    """(N, H, W, C) uint8 from image files; one error line names a broken or odd-sized file."""
    def decode(name):
        try:
            with PIL.Image.open(io.BytesIO(read(name))) as image:
                array = np.asarray(image.convert('RGB') if image.mode not in ('L', 'RGB') else image)
        except Exception as error:
            raise ValueError(f'cannot read image {name}: {error}') from None
        return array[:, :, None] if array.ndim == 2 else array

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(decode, names))
    if any(a.shape[2] == 3 for a in arrays):  # a few grayscale files in a colour data set (ImageNet has some)
        arrays = [a.repeat(3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    for name, array in zip(names, arrays):
        if array.shape != arrays[0].shape:
            raise ValueError(f'image {name} is {array.shape}, but {names[0]} is {arrays[0].shape}: resize them first')
    return np.stack(arrays)


def load_dataset(path, workers=4):
    """(images (N, H, W, C) uint8, labels (N,) int64 or None). Labels: dataset.json (EDM: {"labels": [[name, id],
    ...]}), else class sub-folders of an image folder, else the `y` array of an .npz."""
    if path == 'cifar10':
        cache = os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'ambient_laws')
        return download_cifar10(cache)
    if not os.path.exists(path):
        raise ValueError(f'--data: {path} does not exist')
    if path.endswith('.npz'):
        with np.load(path) as data:
            if 'x' not in data or data['x'].dtype != np.uint8 or data['x'].ndim not in (3, 4):
                raise ValueError(f'{path}: expected `x` as (N, H, W, C) uint8')
            x = data['x'] if data['x'].ndim == 4 else data['x'][..., None]
            return x, (data['y'] if 'y' in data else None)
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        names, read = archive.namelist(), archive.read
    elif os.path.isdir(path):
        names = [os.path.relpath(os.path.join(root, f), path).replace(os.sep, '/')
                 for root, _, files in os.walk(path) for f in files]
        read = lambda name: pathlib.Path(path, name).read_bytes()  # noqa: E731
    else:
        raise ValueError(f'--data: {path} is not an image folder, a zip or an .npz')
    images = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
    if not images:
        raise ValueError(f'--data: no images in {path}')
    labels = None
    if 'dataset.json' in names:
        table = json.loads(read('dataset.json')).get('labels')
        if table is not None:
            table = dict(table)
            missing = [n for n in images if n not in table]
            if missing:
                raise ValueError(f'{path}: dataset.json has no label for {missing[0]}')
            labels = [table[n] for n in images]
    elif all('/' in n for n in images):
        classes = sorted({n.split('/')[0] for n in images})
        labels = [classes.index(n.split('/')[0]) for n in images]
    return decode_images(images, read, workers), (None if labels is None else np.asarray(labels))


def keep_subset(num_images, keep):
    """Indices of the images used at all: the first int(keep * N) of a RandomState(0) permutation, sorted (ambient_utils
    dataset_utils.py max_size). Subsets are nested across keep fractions and identical across runs."""
    return np.sort(np.random.RandomState(0).permutation(num_images)[:int(num_images * keep)])  # = shuffle(arange)


def noise_levels(raw_index, num_images, sigma, corruption_probability, seed):
    """sigma_n per kept image: exactly round(p * n) of the n kept images are noisy, the ones with the lowest seeded
    priority, so noisy sets are nested across p. Official: each image is noisy with probability p (a Binomial
    count); an exact count is what the scaling-law axis "fraction noisy" means, so we realise it exactly."""
    priority = torch.rand(num_images, generator=torch.Generator().manual_seed(seed))[torch.as_tensor(raw_index)]
    num_noisy = int(corruption_probability * len(raw_index) + 0.5)
    sigma_n = torch.zeros(len(raw_index))
    sigma_n[priority.argsort()[:num_noisy]] = sigma
    return sigma_n


def _hash32(x):
    """lowbias32 integer hash (C. Wellons) of int64 tensors holding 32-bit values. Products are split in 16-bit halves
    so no int64 product overflows."""
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = x ^ (x >> shift)
        x = (x * (multiplier & 0xFFFF) + (((x * (multiplier >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF
    return x ^ (x >> 16)


def image_noise(raw_index, shape, seed):
    """eps ~ N(0, I), (B, *shape), a pure function of (seed, image index): counter-based (hash + Box-Muller), so each
    image keeps the same noise in every epoch and run without storing it, on any device. The official code reseeds
    NumPy with the image index in __getitem__ for the same effect."""
    half = (math.prod(shape) + 1) // 2
    seed_key = int(_hash32(torch.tensor(seed % 2 ** 32)))                                           # on the host
    key = _hash32((raw_index.long() + seed_key) & 0xFFFFFFFF)                                        # (B,)
    bits = _hash32(key[:, None] ^ _hash32(torch.arange(2 * half, device=raw_index.device)))         # (B, 2 half)
    u = ((bits >> 8).float() + 0.5) / 2 ** 24                                                        # in (0, 1)
    radius, angle = (-2 * u[:, :half].log()).sqrt(), 2 * math.pi * u[:, half:]
    eps = torch.cat([radius * angle.cos(), radius * angle.sin()], dim=1)[:, :math.prod(shape)]
    return eps.reshape(-1, *shape)                                                                   # (B, *shape)


def observe(images, sigma_n, raw_index, seed, add_noise=True):
    """The training images as the method sees them: uint8 (B, C, H, W) -> [-1, 1], plus sigma_n * eps for the noisy
    ones (VE noise, no clipping; dataset_utils.py with noise_type="ve", only_positive=False)."""
    x0 = images.float() / 127.5 - 1
    if not add_noise:
        return x0
    return x0 + sigma_n.view(-1, 1, 1, 1) * image_noise(raw_index, x0.shape[1:], seed)


def _affine(ref, a=1.0, b=0.0, c=0.0, d=1.0, tx=0.0, ty=0.0):
    """(B, 3, 3) matrices [[a, b, tx], [c, d, ty], [0, 0, 1]]; entries are (B,) tensors or numbers, ref is (B,)."""
    entries = [v if torch.is_tensor(v) else torch.full_like(ref, v) for v in (a, b, tx, c, d, ty, 0.0, 0.0, 1.0)]
    return torch.stack(entries, dim=-1).reshape(-1, 3, 3)


def _rotate(theta):
    return _affine(theta, theta.cos(), -theta.sin(), theta.sin(), theta.cos())


@functools.lru_cache(maxsize=None)
def _sym6(device):
    """Low-pass filter of the sym6 wavelet, with which EDM's AugmentPipe resamples around the warp (built once per
    device: a host-to-device copy in every step would be a sync)."""
    return torch.tensor([0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
                         0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
                         -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148],
                        device=device)


def augment(images, p, u, g):
    """EDM's AugmentPipe as ambient-laws configures it (xflip=1e8, yflip, scale, rotate_frac, aniso, translate_frac,
    each with probability p; NVlabs/edm training/augment.py). images (B, C, H, W); u (B, 11) uniforms and g (B, 4)
    normals drawn by the caller. Returns the images and the 9 augmentation labels the network is conditioned on.
    The official code augments noisy images too; the warps low-pass their noise (a quirk kept for faithfulness)."""
    B, C, H, W = images.shape
    gate = lambda k, mult=1.0: u[:, k] < mult * p  # noqa: E731
    zero = torch.zeros_like(u[:, 0])
    # Pixel blitting: x-flip (always eligible, xflip=1e8), y-flip.
    flip_x, flip_y = gate(0, 1e8) & (u[:, 1] < 0.5), gate(2) & (u[:, 3] < 0.5)
    images = torch.where(flip_x.view(-1, 1, 1, 1), images.flip(3), images)
    images = torch.where(flip_y.view(-1, 1, 1, 1), images.flip(2), images)
    # Inverse warp G^-1 in pixel units about the centre: isotropic scale, rotation, anisotropic scale, translation.
    w_scale = torch.where(gate(4), g[:, 0], zero)
    w_rot = torch.where(gate(5), (u[:, 6] * 2 - 1) * math.pi, zero)
    w_aniso = torch.where(gate(7), g[:, 1], zero)
    r_aniso = torch.where(u[:, 9] < 0.5, (u[:, 8] * 2 - 1) * math.pi, zero)
    t = torch.where(gate(10).view(-1, 1), g[:, 2:4], zero.view(-1, 1))                      # (B, 2)
    s, a = (0.2 * w_scale).exp2(), (0.2 * w_aniso).exp2()
    G_inv = (_affine(zero, 1 / s, d=1 / s) @ _rotate(w_rot) @ _rotate(-r_aniso) @ _affine(zero, 1 / a, d=a)
             @ _rotate(r_aniso) @ _affine(zero, tx=-t[:, 0] * W * 0.125, ty=-t[:, 1] * H * 0.125))  # (B, 3, 3)
    labels = torch.stack([flip_x.float(), flip_y.float(), w_scale, w_rot.cos() - 1, w_rot.sin(),
                          w_aniso * r_aniso.cos(), w_aniso * r_aniso.sin(), t[:, 0], t[:, 1]], dim=1)   # (B, 9)
    # Reflect-pad by the largest margin EDM can choose (same result, no host sync), then upsample 2x with sym6.
    filt = _sym6(images.device).to(images.dtype)
    images = F.pad(images, [W - 1, W - 1, H - 1, H - 1], mode='reflect')                  # (B, C, 3H-2, 3W-2)
    for dim in (3, 2):
        images = torch.stack([images, torch.zeros_like(images)], dim=dim + 1).flatten(dim, dim + 1)
        images = images.narrow(dim, 0, images.shape[dim] - 1)
        kernel = filt.flip(0).view(1, 1, -1, 1) if dim == 2 else filt.flip(0).view(1, 1, 1, -1)
        images = F.conv2d(images, kernel.repeat(C, 1, 1, 1), groups=C, padding=(6, 0) if dim == 2 else (0, 6))
    # Warp by bilinear sampling at 2x: move G^-1 to the upsampled pixel grid, then to normalised coordinates.
    size = [B, C, (H + 6) * 2, (W + 6) * 2]
    G_inv = (_affine(zero, 2.0, d=2.0, tx=-0.5, ty=-0.5) @ G_inv @ _affine(zero, 0.5, d=0.5, tx=0.25, ty=0.25))
    G_inv = (_affine(zero, 2 / images.shape[3], d=2 / images.shape[2]) @ G_inv
             @ _affine(zero, size[3] / 2, d=size[2] / 2))
    grid = F.affine_grid(G_inv[:, :2, :], size, align_corners=False)
    images = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    # Downsample 2x and crop the filter margin.
    images = F.conv2d(images, filt.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C, stride=(1, 2), padding=(0, 5))
    images = F.conv2d(images[:, :, :, 3:-3], filt.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C, stride=(2, 1),
                      padding=(5, 0))
    return images[:, :, 3:-3, :], labels                                                      # (B, C, H, W), (B, 9)


# ----------------------------------------------------------------------------------------------------------------------
# Preconditioning and loss (the paper core)


class EDMPrecond(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), EDM Table 1 (official training/networks.py EDMPrecond).
    D estimates E[x0 | x_t = x] at total noise level sigma."""

    def __init__(self, unet, sigma_data=0.5):
        super().__init__()
        self.unet, self.sigma_data = unet, sigma_data

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        x = x.float()                                                                      # (B, C, H, W)
        sigma = sigma.float() if torch.is_tensor(sigma) else x.new_full([1], sigma)        # no host-device copy
        sigma = sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)                     # (B, 1, 1, 1)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        F_x = self.unet(c_in * x, sigma.log().flatten() / 4, class_labels, augment_labels)
        return c_skip * x + c_out * F_x.float()


def edm_weight(sigma, sigma_data=0.5):
    """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM Table 1)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def ambient_loss(net, y, sigma_n, rnd_normal, eps, class_labels=None, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
    """Ambient score matching for a batch of clean (sigma_n = 0) and noisy (y = x0 + sigma_n eps_n) images, exactly as
    ambient-laws training/loss.py EDMLoss computes it. With sigma_n = 0 it is EDM's loss (EDM Eq. 2, Table 1).

    net(x, sigma, labels) -> D, an estimate of E[x0 | x]; y (B, C, H, W) the (augmented) observed images; sigma_n (B,);
    rnd_normal (B,) and eps (B, C, H, W) standard normal draws, passed in so the caller owns all randomness.
    Returns the per-pixel loss (B, C, H, W), x_t (B, C, H, W), sigma (B, 1, 1, 1) and D(x_t, sigma).

    sigma = max(exp(P_mean + P_std n), sigma_n): a clamp, not a resample, as the official code. A clamped noisy sample
    has x_t = y and a loss of exactly 0 (no gradient): it is drawn but wasted, about 37% of noisy samples at
    sigma_n = 0.2. The minimiser over D is E[x0 | x_t] at every sigma > sigma_n (Tweedie applied twice: Daras,
    Dimakis, Daskalakis, "Consistent Diffusion Meets Tweedie", ICML 2024).
    """
    sigma_n = sigma_n.reshape(-1, 1, 1, 1)                                                 # (B, 1, 1, 1)
    sigma = (rnd_normal.reshape(-1, 1, 1, 1) * P_std + P_mean).exp().maximum(sigma_n)      # (B, 1, 1, 1)
    # Add just enough noise to bring the observed image from sigma_n to sigma.
    x_t = y + (sigma ** 2 - sigma_n ** 2).sqrt() * eps
    x0_pred = net(x_t, sigma, class_labels)
    # Tweedie, VE to VE: E[y | x_t] = (1 - r) E[x0 | x_t] + r x_t with r = sigma_n^2 / sigma^2 (ambient_utils
    # from_x0_pred_to_xnature_pred_ve_to_ve, written out: its later versions broadcast these shapes wrongly).
    ratio = sigma_n ** 2 / sigma ** 2
    y_pred = (1 - ratio) * x0_pred + ratio * x_t
    return edm_weight(sigma, sigma_data) * (y_pred - y) ** 2, x_t, sigma, x0_pred


def reverse_sde(net, x, sigma_start, sigma_end, z, class_labels=None, rho=7.0):
    """Euler-Maruyama on the VE reverse SDE from per-sample sigma_start to sigma_end (official training/sampler.py):
    the Karras grid t_j between the two, then x += 2 (t_{j+1} - t_j)(x - D(x, t_j)) / t_j + sqrt(2 |dt| t_j) z_j,
    no Heun correction, no step to 0. x (N, C, H, W); sigma_start, sigma_end (N, 1, 1, 1); z (steps - 1, N, C, H, W)."""
    fraction = torch.linspace(0, 1, z.shape[0] + 1, device=x.device).view(-1, 1, 1, 1, 1)
    t = (sigma_start ** (1 / rho) + fraction * (sigma_end ** (1 / rho) - sigma_start ** (1 / rho))) ** rho
    for j in range(z.shape[0]):                                                            # t: (steps, N, 1, 1, 1)
        d = (x - net(x, t[j], class_labels)) / t[j]
        x = x + 2 * (t[j + 1] - t[j]) * d + (2 * (t[j] - t[j + 1]).abs() * t[j]).sqrt() * z[j]
    return x


def consistency_loss(net, x_t, sigma, sigma_prime, x0_pred, z, class_labels=None, with_grad=True):
    """Consistency term (official training/loss.py; Daras et al. ICML 2024): E[x0 | x_t] must equal the mean
    of E[x0 | x_t'] over reverse-SDE samples x_t' at sigma' < sigma. It teaches levels below sigma_n, which noisy
    images cannot. x_t, x0_pred = D(x_t, sigma) (b, C, H, W); sigma, sigma_prime (b, 1, 1, 1); z (steps - 1, b K, C,
    H, W) for K runs per row. Returns the per-pixel term (b, C, H, W). Costs K (steps - 1) + K extra network passes
    per row, with backward through all of them when with_grad (official default)."""
    b, K = x_t.shape[0], z.shape[1] // x_t.shape[0]
    repeat = lambda v: None if v is None else v.repeat_interleave(K, dim=0)  # noqa: E731
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        x_prime = reverse_sde(net, repeat(x_t), repeat(sigma), repeat(sigma_prime), z, repeat(class_labels))
    x0_prime = net(x_prime, repeat(sigma_prime), repeat(class_labels))                      # (b K, C, H, W)
    return (x0_prime.reshape(b, K, *x_t.shape[1:]).mean(dim=1) - x0_pred) ** 2


# ----------------------------------------------------------------------------------------------------------------------
# Sampler


def edm_sampler(net, latents, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                S_churn=0.0, S_min=0.0, S_max=float('inf'), S_noise=1.0, randn_like=torch.randn_like,
                stop_variance=0.0):
    """EDM Algorithms 1 and 2 (Heun; stochastic with S_churn > 0), as in ambient-laws generate.py edm_sampler.
    latents (B, C, H, W) standard normal; returns samples (B, C, H, W) in float64. The schedule stays on the host, so
    the loop has no host syncs."""
    t_steps = [(sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho)))
               ** rho for i in range(num_steps)] + [0.0]                                   # t_N = 0
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Increase the noise temporarily (churn).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * randn_like(x_cur) if S_churn > 0 else x_cur
        # Euler step.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        if t_next ** 2 < stop_variance:
            return denoised
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Second-order (Heun) correction, except on the last step to 0.
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * (x_next - denoised) / t_next)
    return x_next


def sample_images(net, seeds, device, cfg, autocast):
    """uint8 (B, C, H, W) samples of the EMA network for a list of seeds (latents and labels as EDM generate.py). One
    torch.Generator per seed (EDM's StackedRandomGenerator): image k depends on seed k only. The churn noise is
    drawn in the sampler's float64, as EDM, so the streams match."""
    unet = net.unet
    generators = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]
    randn = lambda shape, dtype=torch.float32: torch.stack(  # noqa: E731
        [torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators])
    latents = randn([unet.in_channels, unet.img_resolution, unet.img_resolution])           # (B, C, H, W)
    labels = (torch.stack([torch.randint(unet.label_dim, [], generator=g, device=device) for g in generators])
              if unet.label_dim else None)                                                  # (B,) class ids
    if labels is not None and cfg.class_idx >= 0:
        labels.fill_(cfg.class_idx)
    with torch.no_grad(), autocast:
        x = edm_sampler(net, latents, labels, cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho, cfg.S_churn,
                        cfg.S_min, cfg.S_max, cfg.S_noise, lambda x: randn(x.shape[1:], x.dtype), cfg.stop_variance)
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Distributed helpers, logging, checkpoints


def init_distributed(device_flag):
    """(rank, world_size, device). torchrun sets RANK / WORLD_SIZE; without them this is a single process."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    requested = device_flag or ('cuda' if torch.cuda.is_available() else 'cpu')
    cuda = requested.startswith('cuda')
    if requested not in ('cpu', 'cuda') or (cuda and not torch.cuda.is_available()):
        fail(f'--device must be cpu or cuda (with CUDA available), not {requested!r}')
    device = torch.device(f'cuda:{int(os.environ.get("LOCAL_RANK", "0"))}') if cuda else torch.device(requested)
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if cuda else 'gloo')
    return rank, world, device


class Logger:
    """print0 to stdout and, once the run folder exists, to its log.txt (lines printed before are kept)."""

    def __init__(self, rank):
        self.rank, self.file, self.pending = rank, None, []

    def open(self, path):
        if self.rank == 0:
            self.file = open(path, 'a', buffering=1)  # line-buffered: each line reaches the file at once
            self.file.writelines(self.pending)

    def __call__(self, *args):
        if self.rank == 0:
            line = ' '.join(str(a) for a in args)
            print(line, flush=True)
            if self.file:
                self.file.write(line + '\n')
            else:
                self.pending.append(line + '\n')


def derive_seed(*values):
    """A 63-bit seed from a tuple of non-negative ints (SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> 1)


@functools.lru_cache(maxsize=2)
def epoch_permutation(num_images, seed, epoch):
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(derive_seed(seed, 1, epoch)))


def batch_indices(cur_nimg, batch, num_images, seed):
    """Dataset indices of the global batch that starts at image cur_nimg: one seeded permutation per epoch, so the data
    order is a function of (seed, cur_nimg) and resumes exactly."""
    epochs = range(cur_nimg // num_images, (cur_nimg + batch - 1) // num_images + 1)        # the epochs it spans
    order = torch.cat([epoch_permutation(num_images, seed, e) for e in epochs])
    return order[torch.arange(cur_nimg, cur_nimg + batch) - epochs[0] * num_images]


def format_time(seconds):
    s = int(seconds)
    return (f'{s}s' if s < 60 else f'{s // 60}m{s % 60:02d}s' if s < 3600 else
            f'{s // 3600}h{s % 3600 // 60:02d}m' if s < 86400 else f'{s // 86400}d{s % 86400 // 3600:02d}h')


def build_network(cfg, resolution, channels, label_dim):
    """EDMPrecond around a nets.UNet, and the UNet kwargs that rebuild it (stored in every snapshot)."""
    kwargs = {**nets.UNET_PRESETS[cfg.arch], 'img_resolution': resolution, 'in_channels': channels,
              'out_channels': channels, 'label_dim': label_dim, 'dropout': cfg.dropout}
    if kwargs['arch'] == 'ddpmpp':
        kwargs['augment_dim'] = 9 if cfg.augment > 0 else 0  # EDM conditions DDPM++ on the augmentation labels
    elif cfg.augment > 0:
        fail('--augment needs a ddpmpp arch (EDM trained its ADM without augmentation); pass --augment=0')
    if cfg.cbase:
        kwargs['model_channels'] = cfg.cbase
    if cfg.cres:
        kwargs['channel_mult'] = tuple(int(c) for c in cfg.cres.split(','))
    return EDMPrecond(nets.UNet(**kwargs), cfg.sigma_data), kwargs


def load_snapshot(path, device):
    """The EMA network of a network-snapshot-*.pt (or training-state-*.pt), in eval mode, and its config."""
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
        net = EDMPrecond(nets.UNet(**data['net_kwargs']), data['config']['sigma_data'])
        net.load_state_dict(data['ema'])
    except Exception as error:
        fail(f'--network: cannot load {path}: {error}')
    cuda = torch.device(device).type == 'cuda'  # NHWC convolutions on tensor cores
    net.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    return net.eval().requires_grad_(False), data['config']


def find_resume_state(cfg, desc):
    """--resume: a path, or auto = the latest training state in the newest run folder named *-desc (None if none)."""
    if cfg.resume != 'auto':
        if not os.path.isfile(cfg.resume):
            fail(f'--resume: {cfg.resume} does not exist')
        return cfg.resume
    runs = sorted(d for d in os.listdir(cfg.outdir) if re.fullmatch(rf'\d{{5}}-{re.escape(desc)}', d)) \
        if os.path.isdir(cfg.outdir) else []
    for run in reversed(runs):
        states = sorted(f for f in os.listdir(os.path.join(cfg.outdir, run))
                        if re.fullmatch(r'training-state-\d+\.pt', f))
        if states:
            return os.path.join(cfg.outdir, run, states[-1])
    return None


def save_grid(path, images, columns=8):
    """uint8 (N, C, H, W) -> one PNG grid."""
    N, C, H, W = images.shape
    rows = math.ceil(N / columns)
    grid = torch.zeros(rows * columns, C, H, W, dtype=torch.uint8)
    grid[:N] = images.cpu()
    grid = grid.view(rows, columns, C, H, W).permute(0, 3, 1, 4, 2).reshape(rows * H, columns * W, C)
    image = PIL.Image.fromarray(grid.squeeze(-1).numpy())  # (H, W) or (H, W, 3)
    atomic_write(path, lambda f: image.save(f, format='PNG'))


# ----------------------------------------------------------------------------------------------------------------------
# Training loop

STATS = ['loss', 'count', 'clean_loss', 'clean', 'noisy_loss', 'noisy', 'noisy_used', 'consistency', 'consistency_rows',
         'bin0_loss', 'bin1_loss', 'bin2_loss', 'bin3_loss', 'bin0', 'bin1', 'bin2', 'bin3']
SIGMA_BINS = (0.134, 0.301, 0.675)  # quartiles of EDM's training distribution exp(N(-1.2, 1.2^2))


def prepare_data(cfg, log):
    """Kept images on the device (uint8), labels, per-image sigma_n and raw indices (the noise keys)."""
    try:
        x, y = load_dataset(cfg.data, cfg.workers)
    except (ValueError, OSError) as error:
        fail(str(error))
    if x.shape[1] != x.shape[2]:
        fail(f'--data: images must be square, got {x.shape[1]}x{x.shape[2]}')
    if cfg.cond and y is None:
        fail('--cond=true needs labels (dataset.json, class folders or `y` in the .npz)')
    if cfg.cond and (y.shape != (len(x),) or y.dtype.kind not in 'iu' or y.min() < 0):
        fail(f'--data: labels must be {len(x)} integers >= 0 (one class id per image)')
    raw_index = keep_subset(len(x), cfg.dataset_keep_percentage)
    if len(raw_index) == 0:
        fail('--dataset_keep_percentage keeps no image')
    if cfg.sigma_per_image:
        try:
            levels = np.load(cfg.sigma_per_image).astype(np.float32).reshape(-1)
        except Exception as error:
            fail(f'--sigma_per_image: cannot read {cfg.sigma_per_image}: {error}')
        if len(levels) != len(x) or not np.all(np.isfinite(levels) & (levels >= 0)):
            fail(f'--sigma_per_image must hold {len(x)} finite values >= 0 (one per image), got {len(levels)}')
        sigma_n = torch.from_numpy(levels[raw_index])
    else:
        sigma_n = noise_levels(raw_index, len(x), cfg.sigma, cfg.corruption_probability, cfg.corruption_seed)
    log(f'Data: {len(x)} images of {x.shape[1:]} -> {len(raw_index)} kept, {int((sigma_n > 0).sum())} noisy '
        f'(sigma_n {sigma_n.max():.3g}), labels {"used" if cfg.cond else "ignored"}')
    images = torch.from_numpy(x[raw_index]).permute(0, 3, 1, 2).contiguous()                # (n, C, H, W) uint8
    labels = torch.from_numpy(y[raw_index].astype(np.int64) if cfg.cond else np.zeros(len(raw_index), np.int64))
    label_dim = int(y.max()) + 1 if cfg.cond else 0
    return images, labels, sigma_n, torch.from_numpy(raw_index), label_dim


def open_run(cfg, desc, net, ema, optimizer, rank, world):
    """Resume (a training state: weights, EMA, optimizer, progress) or transfer (a snapshot's weights, official
    --transfer), then the run folder: a resumed run continues in its own folder. Returns (run_dir, cur_nimg,
    cur_tick, ema_rampup_ratio, state_path)."""
    state_path = find_resume_state(cfg, desc) if cfg.resume else None
    cur_nimg, cur_tick, transferred = 0, 0, bool(cfg.transfer)
    if state_path or cfg.transfer:
        try:
            data = torch.load(state_path or cfg.transfer, map_location='cpu', weights_only=True)
            net.load_state_dict(data['net'] if state_path else data['ema'])
            ema.load_state_dict(data['ema'])
            if state_path:
                optimizer.load_state_dict(data['optimizer'])
                cur_nimg, cur_tick, transferred = data['cur_nimg'], data['cur_tick'], data.get('transferred', False)
        except Exception as error:
            fail(f'cannot load {state_path or cfg.transfer}: {error}')
    ema_rampup_ratio = None if transferred else cfg.ema_rampup_ratio  # official: no EMA ramp-up after --transfer
    if state_path:
        run_dir = os.path.dirname(state_path)
    else:
        taken = [int(d[:5]) for d in (os.listdir(cfg.outdir) if os.path.isdir(cfg.outdir) else [])
                 if re.match(r'\d{5}-', d)]
        run_dir = os.path.join(cfg.outdir, f'{max(taken, default=-1) + 1:05d}-{desc}')
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        stats_path = os.path.join(run_dir, 'stats.jsonl')
        if state_path and os.path.exists(stats_path):  # forget ticks logged after the state we resume from
            with open(stats_path) as f:  # stop at a later tick, or at a line cut short by a kill
                kept = list(itertools.takewhile(
                    lambda line: line.endswith('\n') and json.loads(line)['kimg'] <= cur_nimg / 1000 + 1e-9, f))
            atomic_write(stats_path, lambda f: f.write(''.join(kept).encode()))
        provenance = dict(dataclasses.asdict(cfg), command=' '.join(sys.argv), torch=torch.__version__,
                          world_size=world, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        atomic_write(os.path.join(run_dir, 'config.json'), lambda f: f.write(json.dumps(provenance, indent=2).encode()))
        code = pathlib.Path(__file__).read_bytes()  # the exact code of this run
        atomic_write(os.path.join(run_dir, os.path.basename(__file__)), lambda f: f.write(code))
    return run_dir, cur_nimg, cur_tick, ema_rampup_ratio, state_path


def step_randomness(cfg, step, shape, num_cons, device):
    """Every random draw of one training step, for the whole global batch, from a generator seeded by (seed, step):
    each rank takes its rows, so the draws do not depend on the number of GPUs or microbatches, and resuming needs no
    saved RNG state. Returns rnd_normal (B,), eps (B, C, H, W), aug_u (B, 11), aug_g (B, 4) and the consistency
    noise z (steps - 1, num_cons, K, C, H, W)."""
    gen = torch.Generator(device).manual_seed(derive_seed(cfg.seed, 2, step))
    draw = lambda *size: torch.randn(*size, generator=gen, device=device)  # noqa: E731
    rnd_normal, eps = draw(cfg.batch), draw(cfg.batch, *shape)
    aug_u, aug_g = torch.rand(cfg.batch, 11, generator=gen, device=device), draw(cfg.batch, 4)
    z = draw(cfg.num_consistency_steps - 1, num_cons, cfg.num_primes, *shape)
    return rnd_normal, eps, aug_u, aug_g, z


def tally(stats, loss, sigma, sigma_n, bins):
    """Add one microbatch's diagnostics to the on-device sums named by STATS (no host sync): loss per sample, split
    into clean and noisy, the noisy samples that trained (sigma > sigma_n; the clamped rest give zero loss), and the
    loss per quartile of sigma. loss (b, C, H, W); sigma (b, 1, 1, 1); sigma_n (b,)."""
    per_sample = loss.detach().mean(dim=(1, 2, 3))                                          # (b,)
    noisy = (sigma_n > 0).float()
    used = noisy * (sigma.view(-1) > sigma_n).float()
    stats[:7] += torch.stack([per_sample.sum(), noisy.new_full([], len(noisy)), (per_sample * (1 - noisy)).sum(),
                              (1 - noisy).sum(), (per_sample * noisy).sum(), noisy.sum(), used.sum()])
    sigma_bin = torch.bucketize(sigma.view(-1), bins)
    stats[9:13].index_add_(0, sigma_bin, per_sample)
    stats[13:17].index_add_(0, sigma_bin, torch.ones_like(per_sample))


def train(cfg):
    rank, world, device = init_distributed(cfg.device)
    log = Logger(rank)
    cuda = device.type == 'cuda'
    batch_gpu_total = cfg.batch // world
    batch_gpu = cfg.batch_gpu or batch_gpu_total
    if cfg.batch % (world * batch_gpu) or batch_gpu > batch_gpu_total:
        fail(f'--batch={cfg.batch} must be divisible by GPUs x --batch_gpu = {world} x {batch_gpu}')
    rounds = batch_gpu_total // batch_gpu

    # Performance settings.
    torch.backends.cuda.matmul.allow_tf32 = True          # TF32 matmuls/convs: free speed (official: fp32, TF32 off)
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True                 # fixed shapes: let cuDNN pick its fastest kernels
    precision = cfg.precision or ('bf16' if cuda else 'fp32')
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == 'bf16')  # bf16 convs, fp32 loss

    # Data with its fixed clean/noisy split (rank 0 downloads first), as uint8 on the GPU when it fits.
    if world > 1 and rank != 0 and cfg.data == 'cifar10':
        dist.barrier()
    images, labels, sigma_n, raw_index, label_dim = prepare_data(cfg, log)
    if world > 1 and rank == 0 and cfg.data == 'cifar10':
        dist.barrier()
    C, H, W = images.shape[1:]
    data_device = device if not cuda or images.numel() < 0.25 * torch.cuda.mem_get_info(device)[0] else 'cpu'
    images, labels, sigma_n, raw_index = (t.to(data_device) for t in (images, labels, sigma_n, raw_index))

    # Network, EMA, optimizer (Adam, official), run folder.
    torch.manual_seed(derive_seed(cfg.seed, 0))  # the same initial weights on every rank
    net, net_kwargs = build_network(cfg, H, C, label_dim)
    net.train().requires_grad_(True).to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    ema = copy.deepcopy(net).eval().requires_grad_(False)  # same weights and memory layout as net
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=cfg.weight_decay, fused=cuda)
    desc = (f'{os.path.splitext(os.path.basename(cfg.data.rstrip("/")))[0]}-{cfg.arch}-sigma{cfg.sigma:g}-'
            f'p{cfg.corruption_probability:g}-keep{cfg.dataset_keep_percentage:g}'
            + (f'-cc{cfg.consistency_coeff:g}' if cfg.consistency_coeff else '') + (f'-{cfg.desc}' if cfg.desc else ''))
    log(f'Network: {sum(p.numel() for p in net.parameters()):,} parameters ({cfg.arch}), {precision}, '
        f'{world} process(es), batch {cfg.batch} = {world} x {rounds} x {batch_gpu}')
    if cfg.dry_run:
        log(json.dumps(dataclasses.asdict(cfg), indent=2))
        return
    run_dir, cur_nimg, cur_tick, ema_rampup_ratio, state_path = open_run(cfg, desc, net, ema, optimizer, rank, world)
    log.open(os.path.join(run_dir, 'log.txt'))
    log(f'{"Resuming from " + state_path if state_path else "Starting"} in {run_dir} at kimg {cur_nimg / 1000:g}')
    if rank == 0 and not os.path.exists(os.path.join(run_dir, 'dataset.png')):  # the data as the model sees it
        shown = torch.arange(min(64, len(images)), device=data_device)
        seen = observe(images[shown], sigma_n[shown], raw_index[shown], cfg.corruption_seed, not cfg.already_noisy)
        save_grid(os.path.join(run_dir, 'dataset.png'), (seen * 127.5 + 128).clip(0, 255).to(torch.uint8))

    # DDP (several forward calls per backward, as the consistency loss makes, are fine: gradients reach each
    # parameter's accumulator once) and torch.compile.
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None) if world > 1 else net
    model = torch.compile(ddp) if cfg.compile else ddp
    # This rank's rows of the global batch, (rounds, batch_gpu), on the host and where they index.
    my_rows = torch.arange(cfg.batch)[rank::world].view(rounds, batch_gpu)
    rows_device, rows_data = my_rows.to(device), my_rows.to(data_device)
    num_cons = min(cfg.consistency_batch_size, cfg.batch) if cfg.consistency_coeff > 0 else 0
    cons_per_round = (my_rows < num_cons).sum(1).tolist()  # consistency rows in each round, known before training
    stats = torch.zeros(len(STATS), device=device)
    bins = torch.tensor(SIGMA_BINS, device=device)
    total_nimg = int(cfg.kimg * 1000)
    tick_start_nimg, tick_start_time, start_time = cur_nimg, time.time(), time.time()
    while True:
        step = cur_nimg // cfg.batch
        rnd_normal, eps, aug_u, aug_g, z = step_randomness(cfg, step, (C, H, W), num_cons, device)
        torch.manual_seed(derive_seed(cfg.seed, 3, step, rank))  # dropout masks
        index = batch_indices(cur_nimg, cfg.batch, len(images), cfg.seed)
        index = (index.pin_memory() if cuda else index).to(data_device, non_blocking=True)  # no host sync

        # Accumulate gradients.
        optimizer.zero_grad(set_to_none=True)
        for round_idx, rows in enumerate(rows_device):
            i = index[rows_data[round_idx]]
            # The observed images (clean, or noisy with their fixed noise), augmented (in fp32) as the official code.
            y_sigma_n, y_labels = sigma_n[i].to(device), (labels[i].to(device) if cfg.cond else None)
            y = observe(images[i].to(device, non_blocking=True), y_sigma_n, raw_index[i].to(device),
                        cfg.corruption_seed, not cfg.already_noisy)
            y, aug_labels = augment(y, cfg.augment, aug_u[rows], aug_g[rows]) if cfg.augment > 0 else (y, None)
            with (contextlib.nullcontext() if round_idx == rounds - 1 or world == 1 else ddp.no_sync()), autocast:
                loss, x_t, sigma, x0_pred = ambient_loss(
                    functools.partial(model, augment_labels=aug_labels), y, y_sigma_n, rnd_normal[rows], eps[rows],
                    y_labels, cfg.P_mean, cfg.P_std, cfg.sigma_data)
                total = loss.sum()
                # Consistency on the first consistency_batch_size rows of the global batch (official: of each
                # per-GPU batch), from sigma to sigma' = min(raw draw, sigma), the official target. Like the official
                # code, these network calls get no augmentation labels.
                m = cons_per_round[round_idx]
                if m:
                    sigma_raw = (rnd_normal[rows[:m]] * cfg.P_std + cfg.P_mean).exp().view(-1, 1, 1, 1)
                    cons = consistency_loss(model, x_t[:m], sigma[:m], sigma_raw.minimum(sigma[:m]), x0_pred[:m],
                                            z[:, rows[:m]].flatten(1, 2), None if y_labels is None else y_labels[:m],
                                            cfg.with_grad)
                    if cfg.with_weight:
                        cons = cons * edm_weight(sigma[:m], cfg.sigma_data)
                    total = total + cfg.consistency_coeff * cons.sum()
                    stats[7:9] += torch.stack([cons.detach().mean(dim=(1, 2, 3)).sum(), cons.new_full([], m)])
                # Sum over pixels, mean over the global batch (DDP averages over GPUs), as EDM.
                total.mul(1 / batch_gpu_total).backward()
            tally(stats, loss, sigma, y_sigma_n, bins)  # nothing in it needs gradients

        # Update weights: EDM's linear lr warm-up, non-finite gradients zeroed (the official code does not clip).
        lr = cfg.lr * min(cur_nimg / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1)
        for group in optimizer.param_groups:
            group['lr'] = lr
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()

        # Update EMA: half-life in images, at most ema_rampup_ratio x the images seen (EDM).
        ema_halflife_nimg = cfg.ema_halflife_kimg * 1000
        if ema_rampup_ratio is not None:
            ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
        ema_beta = 0.5 ** (cfg.batch / max(ema_halflife_nimg, 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - ema_beta)

        # Maintenance once per tick.
        cur_nimg += cfg.batch
        done = cur_nimg >= total_nimg
        if not done and cur_tick != 0 and cur_nimg < tick_start_nimg + cfg.tick * 1000:
            continue
        if world > 1:
            dist.all_reduce(stats)
        report_tick(log, run_dir, rank, dict(zip(STATS, stats.tolist())), cur_nimg, cur_tick, tick_start_nimg,
                    tick_start_time, start_time, total_nimg, lr, device, cfg)  # .tolist(): the one host sync per tick
        stats.zero_()

        # Snapshot (EMA weights + how to rebuild them), sample grid and training state, all written atomically.
        if (done or cur_tick % cfg.snap == 0) and rank == 0:
            tag = f'{cur_nimg // 1000:06d}'
            config = dataclasses.asdict(cfg)
            snapshot = dict(ema=ema.state_dict(), net_kwargs=net_kwargs, config=config, cur_nimg=cur_nimg)
            atomic_write(os.path.join(run_dir, f'network-snapshot-{tag}.pt'), lambda f: torch.save(snapshot, f))
            save_grid(os.path.join(run_dir, f'samples-{tag}.png'),
                      sample_images(ema, list(range(cfg.grid)), device, cfg, autocast))
            atomic_write(os.path.join(run_dir, f'training-state-{tag}.pt'), lambda f: torch.save(dict(
                snapshot, net=net.state_dict(), optimizer=optimizer.state_dict(), cur_tick=cur_tick + 1,
                transferred=ema_rampup_ratio is None), f))
        cur_tick += 1
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
        if done:
            break
    log('Done.')
    if world > 1:
        dist.barrier()


def report_tick(log, run_dir, rank, s, cur_nimg, cur_tick, tick_start_nimg, tick_start_time, start_time, total_nimg,
                lr, device, cfg):
    """The progress line and one stats.jsonl entry from the tick's summed statistics s."""
    now = time.time()
    sec_per_kimg = (now - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1000
    cuda = device.type == 'cuda'
    entry = dict(
        kimg=cur_nimg / 1000, tick=cur_tick, time=now - start_time, sec_per_kimg=sec_per_kimg, lr=lr,
        loss=s['loss'] / max(s['count'], 1), clean_loss=s['clean_loss'] / max(s['clean'], 1),
        noisy_loss=s['noisy_loss'] / max(s['noisy'], 1), noisy_frac=s['noisy'] / max(s['count'], 1),
        noisy_used=s['noisy_used'] / max(s['noisy'], 1), consistency=s['consistency'] / max(s['consistency_rows'], 1),
        loss_by_sigma=[s[f'bin{k}_loss'] / max(s[f'bin{k}'], 1) for k in range(4)],
        gpumem_gb=torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else 0.0)
    log(f'kimg {entry["kimg"]:.1f} | time {format_time(entry["time"])} | sec/kimg {sec_per_kimg:.2f} | ETA '
        f'{format_time((total_nimg - cur_nimg) / 1000 * sec_per_kimg)} | loss {entry["loss"]:.4f} | lr {lr:.1e} | '
        f'img/s {1000 / sec_per_kimg:.0f} | gpumem {entry["gpumem_gb"]:.1f}G | clean {entry["clean_loss"]:.4f} | '
        f'noisy {entry["noisy_loss"]:.4f} | noisy_frac {entry["noisy_frac"]:.2f} | noisy_used {entry["noisy_used"]:.2f}'
        + (f' | cons {entry["consistency"]:.4f}' if cfg.consistency_coeff else '')
        + ' | loss by sigma ' + '/'.join(f'{v:.3f}' for v in entry['loss_by_sigma']))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if rank == 0:
        with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as f:
            f.write(json.dumps(entry) + '\n')


# ----------------------------------------------------------------------------------------------------------------------
# Generation and evaluation


def parse_seeds(text):
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    seeds = []
    for part in text.split(','):
        match = re.fullmatch(r'(\d+)(?:-(\d+))?', part.strip())
        if not match:
            fail(f'--seeds must look like 0-49999 or 1,5,10-20, not {text!r}')
        seeds += range(int(match[1]), int(match[2] or match[1]) + 1)
    return seeds


def sampling_setup(given, default_batch):
    """Rank, device, the EMA network, and a config: the snapshot's sampler settings overridden by the flags."""
    if not given.get('network'):
        fail('--network=network-snapshot-*.pt is required')
    rank, world, device = init_distributed(given.get('device', ''))
    net, saved = load_snapshot(given['network'], device)
    fields = {f.name for f in dataclasses.fields(Config)}
    cfg = resolve_config({**{k: v for k, v in saved.items() if k in fields}, 'batch': default_batch, 'resume': '',
                          'transfer': '', **given})
    # Sampling runs in fp32 unless --precision=bf16 is given here (the official samplers run fp32 networks).
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=given.get('precision') == 'bf16')
    if net.unet.label_dim and cfg.class_idx >= net.unet.label_dim:
        fail(f'--class must be < {net.unet.label_dim}')
    return rank, world, device, net, cfg, autocast


def rank_batches(seeds, batch, rank, world):
    """This rank's batches of seeds (EDM generate.py): every rank gets the same number of batches."""
    num_batches = max((len(seeds) - 1) // (batch * world) + 1, 1) * world
    return [b.tolist() for b in torch.as_tensor(seeds).tensor_split(num_batches)[rank::world]]


def generate(given):
    """One PNG per seed; image k depends only on seed k (not on --batch or the number of GPUs)."""
    if not given.get('outdir'):
        fail('--outdir is required (the folder that receives the PNGs)')
    rank, world, device, net, cfg, autocast = sampling_setup(given, default_batch=64)
    outdir = given['outdir']
    seeds = parse_seeds(cfg.seeds)
    for batch_seeds in rank_batches(seeds, cfg.batch, rank, world):
        if batch_seeds:
            for seed, image in zip(batch_seeds, sample_images(net, batch_seeds, device, cfg, autocast).cpu()):
                folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if cfg.subdirs else outdir
                pil = PIL.Image.fromarray(image.permute(1, 2, 0).squeeze(-1).numpy())  # (H, W) or (H, W, 3)
                atomic_write(os.path.join(folder, f'{seed:06d}.png'), lambda f: pil.save(f, format='PNG'))
    if world > 1:
        dist.barrier()
    if rank == 0:
        print(f'Generated {len(seeds)} images in {outdir}')


def evaluate(given):
    """Sample --num images in memory (seeds 0..num-1), compute fid.py metrics, append them to metrics.jsonl."""
    rank, world, device, net, cfg, autocast = sampling_setup(given, default_batch=256)
    metrics = cfg.metrics.split(',')
    if not cfg.ref or set(metrics) - set(fid.METRICS):
        fail(f'--ref (reference .npz, URL or images) is required and --metrics must be some of {",".join(fid.METRICS)}')
    try:
        ref = fid.load_ref(cfg.ref)
        detector = fid.load_inception(cfg.fid_weights or None, device)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    batches = (sample_images(net, b, device, cfg, autocast)
               for b in rank_batches(list(range(cfg.num)), cfg.batch, rank, world) if b)
    metrics = fid.compute_metrics(batches, ref, metrics=metrics, detector=detector, device=device,
                                  preprocess=cfg.preprocess or None, num_images=cfg.num)
    if rank == 0:
        result = dict(network=os.path.abspath(cfg.network), num=cfg.num, steps=cfg.steps, S_churn=cfg.S_churn,
                      ref=cfg.ref, **metrics)
        print(json.dumps(result))
        with open(os.path.join(os.path.dirname(os.path.abspath(cfg.network)), 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps(result) + '\n')


def main(argv=None):
    command, given = parse_args(sys.argv[1:] if argv is None else argv)
    if command == 'train':
        cfg = resolve_config(given)
        if not cfg.data:
            fail('--data is required (image folder, zip, .npz or cifar10)')
        train(cfg)
    elif command == 'generate':
        generate(given)
    else:
        evaluate(given)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
