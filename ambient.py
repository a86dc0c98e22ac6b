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
Memorisation check (nearest training neighbours of generated images; --features=dinov2 as official):
    python ambient.py neighbors --network=NET.pt --data=cifar10 --num=10000 --output_dir=out/neighbors
The official command lines run as written with `ambient.py train`, `ambient.py eval` and `ambient.py neighbors` in
place of train.py, eval.py and find_dataset_neighbors.py; NET may also be an official network-snapshot-*.pkl.
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
import shutil
import sys
import tarfile
import tempfile
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
    cond: bool = False                     # class-conditional on dataset labels
    num_classes: int = 0                   # labels lie in [0, num_classes); 0 = the largest label + 1
    max_size: int = 0                      # keep this many images (RandomState(0) subset as official); 0 = all
    xflip: bool = False                    # add x-flipped copies of every image (dataset twice as long)
    corruption_probability: float = 0.4   # p: chance that A erases a pixel (dust), or the box/patch size
    delta_probability: float = 0.1         # delta: chance that B erases a pixel A kept
    mask_full_rgb: bool = False            # erase a pixel's channels together (dust)
    corruption_pattern: str = 'dust'       # dust, box, fixed_box or keep_patch (official dataset.py patterns)
    mask_seed: int = 0                     # 0 = the official masks (seeded by image index); other values redraw them
    resample_delta: bool = False           # draw B afresh every step (the paper's wording); official: fixed per image
    augment: float = 0.12                  # EDM augmentation probability
    augment_mode: str = 'official'         # official: augment the clean image, then mask; joint: image and masks
    cache: bool = True                     # hold the dataset in memory (always; False is refused)
    workers: int = 1                       # threads decoding images (official: DataLoader processes)
    cache_dir: str = ''                    # downloads: cifar10 and --transfer URLs (those default to nets' cache)
    # Network.
    arch: str = 'ddpmpp'                   # ddpmpp (EDM DDPM++) or a DDPM++ preset name of nets.UNET_PRESETS
    cbase: int = 0                         # model_channels, 0 = the arch's (128)
    cres: str = ''                         # channel_mult such as 1,2,2,2; empty = the arch's (2,2,2)
    dropout: float = 0.13                  # dropout probability
    gated: bool = True                     # gated convolutions, gate = sigmoid(sigmoid(conv))
    precond: str = 'ambient'               # ambient: masked input + mask channels; edm: EDM on the masked images
    sigma_data: float = 0.5                # EDM preconditioning (training/networks.py constant)
    transfer: str = ''                     # start from a network snapshot (.pkl / .pt, path or URL), fresh optimizer
    # Optimisation.
    norm: int = 2                          # 2 = squared error, 1 = absolute error (both times lambda)
    P_mean: float = -1.2                   # mean of ln(sigma) during training (training/loss.py constant)
    P_std: float = 1.2                     # std of ln(sigma) during training (training/loss.py constant)
    batch: int = 512                       # global batch
    batch_gpu: int = 0                     # per-GPU microbatch, 0 = batch / GPUs; gradient accumulation does the rest
    lr: float = 1e-3                       # learning rate (official 10e-4)
    lr_rampup_kimg: float = 10000          # linear warm-up (training_loop.py constant)
    weight_decay: float = 0.0              # > 0 switches Adam to AdamW
    max_grad_norm: float = 0.0             # gradient clipping, 0 = off (official None)
    ema: float = 0.5                       # EMA half-life in Mimg
    ema_rampup_ratio: float = 0.05         # EMA half-life <= ratio * images seen, 0 = off (training_loop.py constant)
    kimg: float = 200000                   # training length in kimg
    ls: float = 1.0                        # loss scaling
    # Run.
    outdir: str = 'runs'                   # run folders go here
    desc: str = ''                         # extra words for the run folder name
    nosubdir: bool = False                 # write into --outdir itself instead of a numbered run folder
    tick: float = 50                       # kimg between progress lines
    snap: int = 50                         # ticks between snapshots
    dump: int = 500                        # ticks between kept training states (others are replaced)
    seed: int = 0                          # training seed (data order, noise, augmentation, dropout)
    resume: str = ''                       # training-state-*.pt path, or auto
    precision: str = ''                    # bf16 (autocast + TF32) or fp32 (the official numerics)
    bench: bool = True                     # cuDNN benchmarking
    compile: bool = False                  # torch.compile the network
    device: str = ''                       # cuda or cpu
    experiment_name: str = ''              # a name for the run, kept in config.json (official: the wandb run name)
    dry_run: bool = False                  # print the resolved config and exit
    # Sampling (the progress grids; generate/eval/neighbors have their own flags).
    steps: int = 18                        # Heun steps (35 network evaluations)
    grid: int = 64                         # images in the progress grid
    S_churn: float = 10.0                  # parsed and unused, as in the official train.py (see generate/eval)
    S_min: float = 0.01                    # parsed and unused, as in the official train.py
    S_max: float = 1.0                     # parsed and unused, as in the official train.py
    S_noise: float = 1.007                 # parsed and unused, as in the official train.py


# Help groups of `ambient.py train --help`, in the order of the common CLI.
GROUPS = {
    'data and corruption': ['data', 'cond', 'num_classes', 'max_size', 'xflip', 'corruption_probability',
                            'delta_probability',
                            'mask_full_rgb', 'corruption_pattern', 'mask_seed', 'resample_delta', 'augment',
                            'augment_mode', 'cache', 'workers', 'cache_dir'],
    'network': ['arch', 'cbase', 'cres', 'dropout', 'gated', 'precond', 'sigma_data', 'transfer'],
    'optimisation': ['norm', 'P_mean', 'P_std', 'batch', 'batch_gpu', 'lr', 'lr_rampup_kimg', 'weight_decay',
                     'max_grad_norm', 'ema', 'ema_rampup_ratio', 'kimg', 'ls'],
    'run': ['outdir', 'desc', 'nosubdir', 'tick', 'snap', 'dump', 'seed', 'resume', 'precision', 'bench', 'compile',
            'device', 'experiment_name', 'dry_run'],
    'sampling': ['steps', 'grid', 'S_churn', 'S_min', 'S_max', 'S_noise'],
}
# Our names that differ from the official train.py's.
OFFICIAL_NAMES = {'batch_gpu': '--batch-gpu', 'dry_run': '--dry-run', 'kimg': '--duration (in Mimg)',
                  'precision': '--fp16'}
# Flags of ours that the official train.py does not have.
OURS_ONLY = {'num_classes', 'mask_seed', 'resample_delta', 'augment_mode', 'cache_dir', 'sigma_data', 'P_mean', 'P_std',
             'lr_rampup_kimg', 'ema_rampup_ratio', 'compile', 'device', 'steps', 'grid'}
# Defaults that are decided at run time, as --help shows them.
SHOWN_DEFAULTS = {'precision': 'bf16 on CUDA, fp32 on CPU', 'device': 'cuda when available',
                  'cache_dir': '~/.cache/ambient-diffusion', 'data': 'required'}

# Official recipes. celeba64 is the README command; cifar10 and afhq64 have no command in the official repo, so they
# take train.py's defaults (= EDM CIFAR-10) and EDM's AFHQv2-64 settings, with the README's masking flags. The README
# train command passes --delta_probability=<corruption_probability>, most likely a slip (its eval command passes
# <delta_probability>); no preset sets delta, so it stays train.py's default 0.1.
PRESETS = {
    'cifar10': dict(arch='ddpmpp-cifar10', batch=512, lr=1e-3, dropout=0.13, augment=0.12, mask_full_rgb=True,
                    max_grad_norm=1.0, cond=True),  # cond: the paper-time eval.py hard-coded label_dim=10 at 32x32
    'celeba64': dict(arch='ddpmpp-64', batch=256, lr=2e-4, dropout=0.1, augment=0.15, mask_full_rgb=True,
                     max_grad_norm=1.0, max_size=30000),
    'afhq64': dict(arch='ddpmpp-64', batch=256, lr=2e-4, dropout=0.25, augment=0.15, mask_full_rgb=True,
                   max_grad_norm=1.0),
    'tiny': dict(arch='tiny', cbase=16, cres='1,2,2', batch=16, lr=2e-3, lr_rampup_kimg=0.1, dropout=0.0,
                 augment=0.12, ema=0.0005, kimg=2, tick=0.5, snap=2, dump=4, grid=16, steps=10, mask_full_rgb=True,
                 workers=4),
}
PATTERNS = ('dust', 'box', 'fixed_box', 'keep_patch')
COMMANDS = {'train': 'train on corrupted images (the default command; official train.py)',
            'generate': 'one PNG per seed from a snapshot (.pt or official .pkl)',
            'eval': 'FID and other fid.py metrics of a snapshot or a folder of them (official eval.py)',
            'neighbors': 'nearest training images of generated ones (official find_dataset_neighbors.py)'}


class UsageError(Exception):
    """A bad flag or input: reported as one line, exit code 2, before anything is written."""


def refuse(flag, why, ours, script='train.py'):
    """The one-line refusal of an official flag (or of one of its values) that we do not offer."""
    return UsageError(f'{flag} (official ambient-diffusion {script} flag) is not supported: {why}; use {ours}')


def parse_bool(text):
    """True/False, 1/0, yes/no, y/n, t/f, on/off: the spellings click accepts for its BOOL flags."""
    value = {'1': True, 'true': True, 'yes': True, 'y': True, 't': True, 'on': True,
             '0': False, 'false': False, 'no': False, 'n': False, 'f': False, 'off': False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f'expected a boolean, got {text!r}')
    return value


class QuietParser(argparse.ArgumentParser):
    """argparse without prefix matching that raises UsageError (one line, exit 2) instead of printing usage."""

    def __init__(self, prog, **kwargs):
        super().__init__(prog=prog, usage=f'{prog} [--flag=value ...]', allow_abbrev=False, add_help=False,
                         **kwargs)

    def error(self, message):
        raise UsageError(message)


def flag(group, *names, help, default=None, shown=None, **kwargs):
    """One flag whose help ends in its default (`shown` where the default is decided later); booleans take --flag,
    --flag=True, --flag=0 (click's BOOL)."""
    shown = default if shown is None else shown
    shown = 'none' if shown in (None, '') else shown
    text = f'{help} (required)' if shown == 'required' else f'{help} (default: {shown})'
    if kwargs.get('type') is parse_bool:
        kwargs.update(nargs='?', const=True)
    if 'choices' not in kwargs:  # INT, FLOAT, BOOL or STR instead of the upper-cased flag name
        kwargs.setdefault('metavar', {int: 'INT', float: 'FLOAT', parse_bool: 'BOOL'}.get(kwargs.get('type'), 'STR'))
    group.add_argument(*names, help=text.replace('%', '%%'), default=default, **kwargs)


class DurationAction(argparse.Action):
    """--duration=MIMG sets --kimg as the official train.py does: max(int(MIMG * 1000), 1)."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, 'kimg', float(max(int(value * 1000), 1)))


def add_help(parser, group):
    group.add_argument('-h', '--help', action='help', help='show this help and exit')


def parse_train_args(argv):
    """Flags from the Config fields (every official train.py flag among them); --preset fills in defaults that
    explicit flags override. Returns (Config, preset name)."""
    parser = QuietParser('ambient.py train', description='Train Ambient Diffusion on corrupted images. Official '
                         'train.py flags keep their names (also --batch-gpu, --duration, -n/--dry-run).')
    # One flag per Config field, its help from the field's comment, grouped as the common CLI wants; the official
    # spellings (--batch-gpu, --dry-run, -n, --duration, --fp16, --wandb_id) sit beside their fields. Defaults stay
    # None here so that a preset can fill in what the command line leaves out.
    meanings = dict(re.findall(r'^ +(\w+): .*?# (.*)$', inspect.getsource(Config), re.M))
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for title, names in GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            text = meanings[name] + (f'; official: {OFFICIAL_NAMES[name]}' if name in OFFICIAL_NAMES else '')
            text += '; ours only' if name in OURS_ONLY else ''
            kind = parse_bool if fields[name].type is bool else fields[name].type
            names_ = [f'--{name}'] + {'batch_gpu': ['--batch-gpu'], 'dry_run': ['--dry-run', '-n']}.get(name, [])
            flag(group, *names_, help=text, shown=SHOWN_DEFAULTS.get(name, fields[name].default), type=kind,
                 dest=name)
            if name == 'kimg':  # sets kimg: the later of --duration and --kimg wins
                flag(group, '--duration', help='training length in Mimg, official name; max(int(1000 x value), 1) '
                     'kimg as official', shown=200, type=float, dest='kimg', action=DurationAction)
            if name == 'precision':
                flag(group, '--fp16', help='official fp16 switch: False = --precision=fp32; True is refused',
                     shown=False, type=parse_bool, dest='fp16')
            if name == 'experiment_name':
                flag(group, '--wandb_id', help='official wandb run id; refused unless empty', dest='wandb_id')
        if title == 'run':
            flag(group, '--preset', help='a recipe that sets defaults: ' + ', '.join(sorted(PRESETS)),
                 choices=sorted(PRESETS), dest='preset')
            add_help(parser, group)
    # Preset values first, then every flag given on the command line.
    args = parser.parse_args(argv)
    values = dict(PRESETS[args.preset]) if args.preset else {}
    # Official spellings: --duration in Mimg (truncated to whole kimg, at least 1, as train.py does), --fp16.
    official_only = {'preset', 'fp16', 'wandb_id'}
    given = {k: v for k, v in vars(args).items() if v is not None and k not in official_only}
    # Official flags without a field of their own: refused values, and --fp16=False as --precision=fp32.
    if args.wandb_id:
        raise refuse('--wandb_id', 'there is no wandb logging (stats.jsonl and log.txt hold the metrics)',
                     '--resume=auto to continue a run')
    if args.fp16:
        raise refuse('--fp16=True', 'fp16 training is not offered', '--precision=bf16')
    if args.fp16 is False:
        if given.get('precision', 'fp32') != 'fp32':
            raise UsageError('--fp16=False and --precision=bf16 contradict each other')
        given['precision'] = 'fp32'
    values.update(given)
    cfg = Config(**values)
    validate(cfg)
    return cfg, args.preset


def validate(cfg):
    """Range checks of the training flags and refusals of official values we do not offer: the first failure becomes
    the one error line."""
    # Official values we do not offer: one refusal line naming our equivalent.
    if cfg.arch in ('ncsnpp', 'adm'):
        raise refuse(f'--arch={cfg.arch}', 'only the DDPM++ network (EDM SongUNet, gated) is built', '--arch=ddpmpp')
    if cfg.precond in ('vp', 've'):
        raise refuse(f'--precond={cfg.precond}', 'the VP/VE losses are not part of Ambient Diffusion',
                     '--precond=ambient (or edm, the naive baseline)')
    if cfg.corruption_pattern == 'downscale':
        raise refuse('--corruption_pattern=downscale', 'the official dataset.py rejects it too',
                     '--corruption_pattern=dust, box, fixed_box or keep_patch')
    if not cfg.cache:
        raise refuse('--cache=False', 'the dataset is always held in memory', '--cache=True (or leave it out)')
    # Ranges, in the order of the flags' groups.
    checks = [
        (0 <= cfg.corruption_probability < 1, '--corruption_probability must be in [0, 1)'),
        (0 <= cfg.delta_probability < 1, '--delta_probability must be in [0, 1)'),
        (cfg.corruption_pattern in PATTERNS, f'--corruption_pattern must be one of {", ".join(PATTERNS)}'),
        (cfg.norm in (1, 2), '--norm must be 1 or 2'),
        (cfg.precond in ('ambient', 'edm'), '--precond must be ambient or edm'),
        (cfg.augment_mode in ('joint', 'official'), '--augment_mode must be joint or official'),
        (0 <= cfg.augment <= 1, '--augment must be in [0, 1]'),
        (0 <= cfg.dropout <= 1, '--dropout must be in [0, 1]'),
        (cfg.batch >= 1 and cfg.batch_gpu >= 0, '--batch must be >= 1 and --batch_gpu >= 0'),
        (cfg.lr >= 0 and cfg.lr_rampup_kimg >= 0, '--lr and --lr_rampup_kimg must be >= 0'),
        (cfg.weight_decay >= 0 and cfg.max_grad_norm >= 0, '--weight_decay and --max_grad_norm must be >= 0'),
        (cfg.ema >= 0 and cfg.ema_rampup_ratio >= 0, '--ema and --ema_rampup_ratio must be >= 0'),
        (cfg.P_std > 0 and cfg.sigma_data > 0 and cfg.ls > 0, '--P_std, --sigma_data and --ls must be > 0'),
        (min(cfg.kimg, cfg.tick, cfg.snap, cfg.dump) > 0, '--kimg, --tick, --snap and --dump must be > 0'),
        (cfg.steps >= 2 and cfg.grid >= 0 and cfg.max_size >= 0, '--steps must be >= 2, --grid and --max_size >= 0'),
        (cfg.workers >= 1 and cfg.num_classes >= 0, '--workers must be >= 1, --num_classes >= 0'),
        (min(cfg.S_churn, cfg.S_min, cfg.S_max, cfg.S_noise) >= 0 and cfg.S_min <= 1 and cfg.S_max <= 1,
         '--S_churn and --S_noise must be >= 0, --S_min and --S_max in [0, 1]'),
        (cfg.precision in ('', 'fp32', 'bf16'), '--precision must be fp32 or bf16'),
        (re.fullmatch(r'(\d+,)*\d+', cfg.cres) is not None or cfg.cres == '', '--cres must look like 1,2,2,2'),
        (cfg.arch == 'ddpmpp' or nets.UNET_PRESETS.get(cfg.arch, {}).get('arch') == 'ddpmpp',
         f'--arch must be ddpmpp or a DDPM++ preset of nets.UNET_PRESETS, got {cfg.arch!r}'),
        (not (cfg.transfer and cfg.resume), '--transfer and --resume cannot be specified at the same time'),
        (bool(cfg.data), '--data is required'),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def parse_seeds(text):
    """'0-49999' or '1,2,5-10' -> list of ints (EDM's parse_int_list); an empty or reversed range is an error."""
    seeds = []
    for part in text.split(','):
        match = re.fullmatch(r'(\d+)(?:-(\d+))?', part)
        if not match:
            raise UsageError(f'--seeds: cannot parse {part!r} (expected a list such as 0-49999 or 1,2,5-10)')
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise UsageError(f'--seeds: the range {part} is empty (reversed)')
        seeds.extend(range(first, last + 1))
    return seeds


# ----------------------------------------------------------------------------------------------------------------------
# Data


class DataError(Exception):
    """Missing, corrupt or inconsistent input data, checkpoint or reference: one line, exit code 2 (bad input)."""


CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'


def download_cifar10(cache_dir):
    """Official CIFAR-10 train set as (50000, 32, 32, 3) uint8 and labels; downloaded once, checked, cached."""
    path = os.path.join(cache_dir, 'cifar-10-python.tar.gz')
    for stale in glob.glob(glob.escape(path) + '.tmp*'):  # left by a killed download whose process is gone
        with contextlib.suppress(ValueError, OSError):
            pid = int(stale.rsplit('.tmp', 1)[1])
            try:
                os.kill(pid, 0)  # raises ProcessLookupError when that process no longer exists
            except ProcessLookupError:
                os.remove(stale)
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
        if images is None or images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(f'--data: {path} needs an array x of shape (N, H, W, 3) or (N, H, W) uint8, got '
                            + ('none' if images is None else f'{images.dtype} {images.shape}'))
        if images.ndim == 4 and images.shape[-1] not in (1, 3):
            layout = ' (channels first? transpose it to (N, H, W, C))' if images.shape[1] in (1, 3) else ''
            raise DataError(f'--data: {path} has x of shape {images.shape}; expected (N, H, W, 3){layout}')
        if images.ndim == 3 or images.shape[-1] == 1:  # grayscale -> RGB, as for image files
            images = np.repeat(images.reshape(images.shape[:3] + (1,)), 3, axis=3)
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


def corruption_masks(raw_indices, image_shape, corruption_probability, delta_probability, mask_full_rgb, mask_seed=0,
                     pattern='dust'):
    """The training masks A (the paper's corruption matrix: what the dataset keeps) and A_tilde = B A (its further
    corruption: what the network is shown), fixed per image as in the official dataset.py: image i draws from
    NumPy's and torch's generators seeded by its raw index i, in the official order, so the corrupted dataset is the
    official one when mask_seed == 0 (other values redraw it). Patterns (official names):
    - dust: A keeps each pixel with probability 1 - p, B each with 1 - delta (per pixel, or per RGB pixel);
    - box: A erases a ceil(p H) x ceil(p W) box at a uniform corner (clipped at the border); B erases another box of
      the same size (the official code sizes B with p, not delta);
    - fixed_box: A erases an int(p H) square inside the image; B another one when delta > 0, else B = 1;
    - keep_patch: A keeps only an int((1 - p) H) square; A_tilde keeps an int((1 - delta) size) square inside it.

    raw_indices: (N,) ints; image_shape: (C, H, W). Returns A, A_tilde: (N, 1 or C, H, W) bool.
    """
    channels, height, width = image_shape
    p, delta = corruption_probability, delta_probability
    size = (height, width) if mask_full_rgb or pattern != 'dust' else (channels, height, width)
    A = np.empty((len(raw_indices),) + size, dtype=bool)
    A_tilde = np.empty_like(A)
    # One image at a time, each from generators seeded by its raw index (official __getitem__).
    for row, index in enumerate(raw_indices):
        if pattern == 'dust':
            rng = np.random.RandomState(int(index) if mask_seed == 0 else [mask_seed, int(index)])
            A[row] = rng.binomial(1, 1 - p, size=size)
            A_tilde[row] = A[row] & rng.binomial(1, 1 - delta, size=size).astype(bool)
        else:
            generator = torch.Generator().manual_seed(int(index) if mask_seed == 0 else derive_seed(mask_seed, index))
            A[row], A_tilde[row] = box_masks(pattern, height, width, p, delta, generator)
    if size == (height, width):
        A, A_tilde = A[:, None], A_tilde[:, None]
    return torch.from_numpy(A), torch.from_numpy(A_tilde)


def box_masks(pattern, height, width, p, delta, generator):
    """One image's (A, A_tilde) of the box patterns, (H, W) bool each, with the official sizes and the official
    order of draws (corner row, then column; A first) from a torch generator."""
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    draw = lambda high: int(torch.randint(0, high, (1,), generator=generator))  # noqa: E731

    def square(size_h, size_w, high_row, high_col):  # True inside a box with a random corner
        top, left = draw(high_row), draw(high_col)
        return (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)
    # box: A erases a box, A_tilde also a second one of the same size.
    if pattern == 'box':
        # The official sizes go through a float32 tensor: ceil(float32((1 - (1 - p)) H)).
        box_h, box_w = (int(torch.tensor((1 - (1 - p)) * n).ceil()) for n in (height, width))
        A = ~square(box_h, box_w, height, width)
        return A, A & ~square(box_h, box_w, height, width)
    # fixed_box: boxes inside the image; B only when delta > 0.
    if pattern == 'fixed_box':
        patch = int(p * height)
        A = ~square(patch, patch, width - patch, height - patch)  # official: rows up to W - size, columns H - size
        return A, A & ~square(patch, patch, width - patch, height - patch) if delta > 0 else A
    # keep_patch: the kept square, and a square inside it.
    patch = int((1 - p) * height)
    hat = int((1 - delta) * patch)
    A = square(patch, patch, width - patch, height - patch)
    top, left = draw(patch - hat), draw(patch - hat)
    inside = (rows >= top) & (rows < top + hat) & (cols >= left) & (cols < left + hat)
    A_tilde = np.zeros_like(A)
    A_tilde[A] = inside[:patch, :patch].reshape(-1)
    return A, A_tilde


def check_pattern(pattern, resolution, p, delta):
    """The box sizes that the official draws cannot handle (torch.randint over an empty range): one line."""
    if pattern == 'keep_patch':
        patch = int((1 - p) * resolution)
        if not 0 < patch < resolution or int((1 - delta) * patch) >= patch:
            raise UsageError(f'--corruption_pattern=keep_patch at {resolution}x{resolution} needs a kept square of '
                             f'0 < int((1 - p) x {resolution}) < {resolution} pixels and a smaller one inside it '
                             f'(int((1 - delta) x size)), got {patch} and {int((1 - delta) * patch)}')


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
                mask_full_rgb=cfg.mask_full_rgb, corruption_pattern=cfg.corruption_pattern)


def official_training_options(cfg, net_config=None, num_images=None, run_dir=None):
    """The run's training_options.json in the official train.py layout (what its --dry-run prints and its eval.py
    reads with --training_options_loc). Fields that need the data (resolution, max_size) are None without it."""
    unet = net_config['unet'] if net_config else dict(nets.UNET_PRESETS[
        'ddpmpp-cifar10' if cfg.arch == 'ddpmpp' else cfg.arch])
    channel_mult = [int(c) for c in cfg.cres.split(',')] if cfg.cres else list(unet['channel_mult'])
    # The dict official train.py builds (and writes as training_options.json), key for key.
    options = dict(
        max_grad_norm=cfg.max_grad_norm or None,
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=cfg.data, use_labels=cfg.cond,
                            xflip=cfg.xflip, cache=cfg.cache, corruption_probability=cfg.corruption_probability,
                            delta_probability=cfg.delta_probability, mask_full_rgb=cfg.mask_full_rgb,
                            corruption_pattern=cfg.corruption_pattern,
                            resolution=unet['img_resolution'] if net_config else None,
                            max_size=None if num_images is None else min(num_images, cfg.max_size or num_images)),
        data_loader_kwargs=dict(pin_memory=True, num_workers=cfg.workers, prefetch_factor=2),
        network_kwargs=dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                            decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                            model_channels=cfg.cbase or unet['model_channels'], channel_mult=channel_mult,
                            gated=cfg.gated, class_name='training.networks.EDMPrecond', dropout=cfg.dropout,
                            use_fp16=False, **(dict(augment_dim=9) if cfg.augment > 0 else {})),
        loss_kwargs=dict(class_name='training.loss.AmbientLoss', norm=cfg.norm) if cfg.precond == 'ambient' else
        dict(class_name='training.loss.EDMLoss'),
        optimizer_kwargs=dict(class_name='torch.optim.AdamW' if cfg.weight_decay > 0 else 'torch.optim.Adam',
                              lr=cfg.lr, betas=[0.9, 0.999], eps=1e-8,
                              **(dict(weight_decay=cfg.weight_decay) if cfg.weight_decay > 0 else {})),
        total_kimg=max(int(cfg.kimg), 1), ema_halflife_kimg=int(cfg.ema * 1000), batch_size=cfg.batch,
        batch_gpu=cfg.batch_gpu or None, loss_scaling=cfg.ls, cudnn_benchmark=cfg.bench, kimg_per_tick=cfg.tick,
        snapshot_ticks=cfg.snap, state_dump_ticks=cfg.dump, seed=cfg.seed, run_dir=run_dir)
    if cfg.augment > 0:
        options['augment_kwargs'] = dict(class_name='training.augment.AugmentPipe', p=cfg.augment, xflip=1e8,
                                         yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    if cfg.transfer:
        options.update(resume_pkl=cfg.transfer, ema_rampup_ratio=None)
    return options


def transfer_weights(net, source, cache_dir=''):
    """--transfer: copies the tensors of a snapshot (ours or an official pickle, path or URL) whose names and shapes
    match into net, as the official copy_params_and_buffers(require_all=False); the optimizer starts afresh."""
    loaded, _ = load_network(source, 'cpu', cache_dir=cache_dir, flag='--transfer')
    # Same names must have the same shapes (official copy_params_and_buffers); missing names keep their init.
    own, theirs = net.state_dict(), loaded.state_dict()
    matching = {k: v for k, v in theirs.items() if k in own}
    wrong = [k for k, v in matching.items() if own[k].shape != v.shape]
    if wrong:
        raise UsageError(f'--transfer: {wrong[0]} of {source} has shape {tuple(theirs[wrong[0]].shape)}, this network '
                         f'{tuple(own[wrong[0]].shape)} (another --arch, --cbase, --cres or resolution?)')
    if not matching:
        raise UsageError(f'--transfer: no tensor of {source} fits this network (another --arch, --cres or size?)')
    net.load_state_dict(matching, strict=False)


# ----------------------------------------------------------------------------------------------------------------------
# Loss: penalise the prediction on every pixel A keeps, from an input further corrupted by B (training/loss.py)


def ambient_loss(net, y, A, A_tilde, labels=None, augment_labels=None, norm=2, P_mean=-1.2, P_std=1.2,
                 sigma_data=0.5, rnd_normal=None, eps=None):
    """The Ambient Diffusion training objective (arXiv:2305.19256: predict the image on every pixel A keeps from its
    further corrupted version A_tilde x_t) with EDM's noise levels and weighting, as the official AmbientLoss. Per
    image, with sigma = exp(P_mean + P_std n), n ~ N(0, 1):
        J = lambda(sigma) sum_pixels A |D(A_tilde (y + sigma eps), A_tilde, sigma) - y|^norm,  lambda = 1 / c_out^2.
    Noise is added to the image and then masked (official order); D sees [A_tilde x_t, A_tilde] and only its first
    C output channels count. Pixels that A erased never enter: y is multiplied by A_tilde <= A in the input and by A
    in the loss. Minimiser on every pixel: E[x0 | A_tilde x_t, A_tilde] (the paper's main theorem), since the
    network cannot tell which of the pixels it does not see A kept. The network is called with keyword arguments
    (class_labels=, augment_labels=), as EDM's preconditioners take them (a 4th positional argument is force_fp32).

    y: (B, C, H, W) image in [-1, 1] (erased pixels may hold anything); A, A_tilde: (B, C or 1, H, W) in {0, 1};
    rnd_normal: (B,) standard normal draws of ln(sigma), eps: (B, C, H, W) standard normal noise (both drawn here
    when None). Returns the per-image loss (B,), summed over pixels: the official objective is its batch mean.
    """
    if rnd_normal is None:
        rnd_normal = torch.randn(y.shape[0], device=y.device)
    if eps is None:
        eps = torch.randn_like(y)
    sigma = (rnd_normal * P_std + P_mean).exp().reshape(-1, 1, 1, 1)                    # (B, 1, 1, 1), EDM
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    A_tilde = A_tilde.expand_as(y)
    x_t = A_tilde * (y + sigma * eps)                                                   # (B, C, H, W)
    D = net(torch.cat([x_t, A_tilde], dim=1), sigma.flatten(), class_labels=labels,
            augment_labels=augment_labels)                                              # (B, 2C, H, W)
    error = D[:, :y.shape[1]] - y                                                       # (B, C, H, W)
    return (weight * A * (error.square() if norm == 2 else error.abs())).flatten(1).sum(1)  # (B,)


def edm_loss(net, y, labels=None, augment_labels=None, P_mean=-1.2, P_std=1.2, sigma_data=0.5, rnd_normal=None,
             eps=None):
    """EDM's loss (Karras et al. 2022, Eq. 2 with Table 1's weighting), here the naive baseline of the paper: trained
    on the masked images A x0 it learns E[A x0 | x_t], which fills erased pixels with zeros. Same arguments and
    per-image output (B,) as ambient_loss."""
    if rnd_normal is None:
        rnd_normal = torch.randn(y.shape[0], device=y.device)
    if eps is None:
        eps = torch.randn_like(y)
    sigma = (rnd_normal * P_std + P_mean).exp().reshape(-1, 1, 1, 1)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    D = net(y + sigma * eps, sigma.flatten(), class_labels=labels, augment_labels=augment_labels)
    return (weight * (D - y).square()).flatten(1).sum(1)


# ----------------------------------------------------------------------------------------------------------------------
# Sampler: EDM Heun with the fixed-mask denoiser and optional reconstruction guidance (official eval.py)


def ambient_sampler(net, latents, masks=None, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                    guidance_scale=0.0, clip=True, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
                    randn_like=torch.randn_like):
    """The fixed-mask sampler of the paper (arXiv:2305.19256, "fixed mask sampling", with its optional
    reconstruction guidance) as the official eval.py runs it: EDM's Heun sampler (Karras et al. 2022, Algorithm 2)
    with the denoiser D_hat(x, t) = clip(D([M x, M], t)[:C]) under a sampling mask M held fixed for all steps. With
    K > 1 masks and guidance_scale w > 0, every evaluation also moves by -w grad_x R(x),
    R = K/2 sum_k ||D_hat_1(x) - D_hat_k(x)||^2 summed over the batch (reconstruction guidance, as the official code
    computes it); mask 1 drives the update.
    S_churn > 0 adds EDM's noise (gamma = min(S_churn / N, sqrt(2) - 1) for S_min <= t <= S_max); as in the official
    eval.py the Euler point then starts from x_i, not from the noised x_hat (no difference at S_churn = 0).
    masks=None gives plain EDM Heun for a network trained with precond=edm; clip=False drops the official clip.
    The last step is Euler to t = 0, so the output is D_hat(x, sigma_min). 35 network evaluations at 18 steps.

    latents: (B, C, H, W) standard normal; masks: (K, B, C, H, W) in {0, 1} or None. Returns (B, C, H, W) float64.
    """
    channels = latents.shape[1]
    use_guidance = masks is not None and len(masks) > 1 and guidance_scale != 0

    def denoise(x, t, mask):
        inputs = x if mask is None else torch.cat([mask * x, mask], dim=1)
        sigma = t.to(torch.float32).expand(x.shape[0])                                 # (B,), no host sync
        D = net(inputs.to(torch.float32), sigma, class_labels=class_labels).to(torch.float64)[:, :channels]
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

    # EDM time steps (Karras et al. 2022, Eq. 5), t_N = 0; the churn per step is decided on the CPU.
    step_index = torch.arange(num_steps, dtype=torch.float64)
    t_max, t_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    t_steps = torch.cat([(t_max + step_index / (num_steps - 1) * (t_min - t_max)) ** rho, torch.zeros(1).double()])
    gammas = [min(S_churn / num_steps, math.sqrt(2) - 1) if S_churn > 0 and S_min <= t <= S_max else 0.0
              for t in t_steps[:-1].tolist()]
    t_steps = t_steps.to(latents.device)

    x = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        # Increase the noise temporarily (S_churn > 0; the official code draws the noise at every step then).
        t_hat, x_hat = t_cur, x
        if S_churn > 0:
            t_hat = t_cur * (1 + gammas[i])
            x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x)
        # Euler step (official: from x, the un-noised point).
        euler = step(x_hat, t_hat, t_next - t_hat)
        x_next = x + euler
        # Heun correction, except on the last step to t = 0.
        if i < num_steps - 1:
            x_next = x_hat + 0.5 * (euler + step(x_next, t_next, t_next - t_hat))
        else:
            x_next = x_hat + euler
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


class RunError(Exception):
    """A failure while running (a full disk, a vanished folder): one line, exit code 1."""


def write_atomic(path, data):
    """Temp file + os.replace: an interrupted write never destroys the previous file, and a failed one (a full
    disk) removes its temp file and becomes one line. The temp name is per process, as every rank may download
    CIFAR-10 into the same cache at once."""
    temp = f'{path}.tmp{os.getpid()}'
    try:
        with open(temp, 'wb') as file:
            file.write(data)
        os.replace(temp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise RunError(f'cannot write {path} ({error.strerror or error})')


def save_atomic(obj, path):
    """torch.save through a temp file, so a kill mid-write leaves the previous checkpoint intact; a failed write
    (torch reports a full disk as 'unexpected pos') removes the temp file and becomes one line."""
    try:
        torch.save(obj, path + '.tmp')
        os.replace(path + '.tmp', path)
    except (OSError, RuntimeError) as error:
        with contextlib.suppress(OSError):
            os.remove(path + '.tmp')
        folder = os.path.dirname(os.path.abspath(path))
        full = os.path.isdir(folder) and shutil.disk_usage(folder).free < 2 ** 20
        cause = 'no space left on device' if full else getattr(error, 'strerror', None) or str(error).splitlines()[0]
        raise RunError(f'cannot write {path} ({cause})')


def read_json(source, flag, cache_dir=''):
    """A JSON file from a path or URL (training_options.json): one line when missing or broken."""
    try:
        with open(fetch(source, flag, cache_dir)) as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise DataError(f'{flag}: cannot read {source} ({error})')


def fetch(source, flag, cache_dir=''):
    """A local path for a path or an http(s) URL (downloaded once into the cache with nets.resolve_source:
    requests, atomic, size-checked); one line when it is missing or cannot be downloaded."""
    if source.startswith(('http://', 'https://')):
        try:
            return nets.resolve_source(source, cache_dir=cache_dir or None)
        except Exception as error:  # offline, 404, size mismatch: one line that names the URL
            raise DataError(f'{flag}: {" ".join(str(error).split())}')  # nets' message names the URL and the path
    if not os.path.exists(source):
        raise UsageError(f'{flag}: {source} does not exist')
    return source


def load_network(source, device, cache_dir='', flag='--network', training_options=None):
    """A snapshot -> (Precond net in eval mode, its network config). Reads our network-snapshot-*.pt and the
    official network-snapshot-*.pkl (path or URL) without executing code in it (nets.load_edm_network: a restricted
    unpickler mapping SongUNet / EDMPrecond keys, gated or not, onto nets.UNet). An official pickle's corruption
    settings come from training_options (a dict), else from the training_options.json beside it, else the official
    eval.py defaults (p = 0.4, delta = 0.1)."""
    # A local file (downloaded first for a URL) that is not empty.
    path = fetch(source, flag, cache_dir)
    if os.path.isdir(path):
        raise UsageError(f'{flag}: {source} is a folder; give a network-snapshot-*.pt or *.pkl file')
    if os.path.getsize(path) == 0:
        raise UsageError(f'{flag}: {source} is empty (0 bytes)')
    # torch.save writes zip archives: our snapshot (tensors and plain containers only); anything else is a pickle.
    if zipfile.is_zipfile(path):
        try:
            snapshot = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as error:
            raise UsageError(f'{flag}: cannot read {source} ({type(error).__name__}: {str(error).splitlines()[0]})')
        if not isinstance(snapshot, dict) or not {'config', 'ema'} <= set(snapshot):
            kind = 'a training state' if isinstance(snapshot, dict) and 'optimizer' in snapshot else 'not a snapshot'
            raise UsageError(f'{flag}: {source} is {kind}; give a network-snapshot-*.pt of ambient.py')
        net_config = snapshot['config']
        try:
            net = build_network(net_config)
            net.load_state_dict(snapshot['ema'])
        except Exception as error:
            raise UsageError(f'{flag}: {source} does not rebuild ({type(error).__name__}: '
                             f'{str(error).splitlines()[0]})')
    else:
        net, net_config = load_official_pickle(path, source, flag, training_options, cache_dir)
    cuda = torch.device(device).type == 'cuda'  # NHWC convolutions on tensor cores, as in training
    net.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    return net.eval().requires_grad_(False), net_config


def load_official_pickle(path, source, flag, training_options=None, cache_dir=''):
    """An official network-snapshot-*.pkl -> (Precond, network config), through nets.load_edm_network. The corruption
    settings come from training_options, else the training_options.json beside the pickle (also beside a URL)."""
    # The network, read without running pickled code; only EDM's preconditioning is sampled here.
    try:
        unet, info = nets.load_edm_network(path)
    except Exception as error:  # not a pickle, or objects other than the network's: one line
        raise UsageError(f'{flag}: cannot load {source} ({" ".join(str(error).split())})')
    if info.get('precond') != 'EDMPrecond':
        raise UsageError(f'{flag}: {source} holds a {info.get("precond")} network; ambient.py samples EDMPrecond '
                         f'networks (official --precond=ambient or edm)')
    # Its corruption settings: --training_options_loc, the options file beside it, else eval.py's defaults.
    options = training_options or info.get('training_options')
    if options is None and source.startswith(('http://', 'https://')):
        with contextlib.suppress(Exception):  # a URL without training_options.json beside it: official defaults
            options = read_json(source.rsplit('/', 1)[0] + '/training_options.json', flag, cache_dir)
    options = options or {}
    dataset, precond = options.get('dataset_kwargs', {}), info.get('precond_kwargs', {})
    loss = str(options.get('loss_kwargs', {}).get('class_name', '')) or str(info.get('loss_fn', ''))
    ambient = 'Ambient' in loss or (not loss and unet.in_channels == 6)  # image + mask channels
    net_config = dict(unet=dict(unet.config), precond='ambient' if ambient else 'edm',
                      sigma_data=precond.get('sigma_data', 0.5), sigma_min=precond.get('sigma_min', 0),
                      sigma_max=precond.get('sigma_max', float('inf')),
                      channels=unet.in_channels // 2 if ambient else unet.in_channels,
                      corruption_probability=dataset.get('corruption_probability', 0.4),
                      delta_probability=dataset.get('delta_probability', 0.1),
                      mask_full_rgb=bool(dataset.get('mask_full_rgb', False)),
                      corruption_pattern=dataset.get('corruption_pattern', 'dust'), source=str(source))
    return Precond(unet, sigma_data=net_config['sigma_data']), net_config


# ----------------------------------------------------------------------------------------------------------------------
# Training loop


class Data:
    """The corrupted training set, on the GPU when it fits: uint8 images, bool masks A and A_tilde, labels. With
    --xflip it is twice as long: items N..2N-1 are the x-flipped images (official dataset.py)."""

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
        check_pattern(cfg.corruption_pattern, images.shape[2], cfg.corruption_probability, cfg.delta_probability)
        A, A_tilde = corruption_masks(raw_indices, images.shape[1:], cfg.corruption_probability,
                                      cfg.delta_probability, cfg.mask_full_rgb, cfg.mask_seed, cfg.corruption_pattern)
        # The fixed corrupted dataset: what A erased is gone for good. Only the official order (augment or x-flip the
        # clean image, then apply the un-moved masks) reads clean pixels, so only it keeps them.
        if not (cfg.augment_mode == 'official' and (cfg.augment > 0 or cfg.xflip)):
            images = images * A
        self.num_raw, self.channels, self.resolution = images.shape[0], images.shape[1], images.shape[2]
        self.num_images = self.num_raw * (2 if cfg.xflip else 1)
        self.label_dim = 0
        if cfg.cond:  # labels index an embedding table: they must lie in [0, num_classes)
            self.label_dim = check_labels(labels, cfg.num_classes)
        labels = torch.from_numpy(labels[raw_indices]) if cfg.cond else None
        # On the GPU when images and masks take less than a quarter of its free memory, else in pinned host memory.
        fits = device.type != 'cuda' or 3 * images.numel() < torch.cuda.mem_get_info(device)[0] // 4
        self.device = device if fits else torch.device('cpu')
        place = lambda t: None if t is None else t.to(self.device) if fits else t.pin_memory()  # noqa: E731
        self.images, self.A, self.A_tilde, self.labels = map(place, (images, A, A_tilde, labels))
        self.seed, self.flip_masks, self._orders = cfg.seed, cfg.augment_mode == 'joint', {}

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
        """Images in [-1, 1] (B, C, H, W), A and A_tilde (B, 1 or C, H, W) as float, labels (B,) or None. An
        x-flipped item flips the image; its masks are the raw image's, flipped too only with --augment_mode=joint
        (official: the flipped image is masked by the un-flipped masks, which shows other pixels of it)."""
        index = index.to(self.device)
        rows = index % self.num_raw
        get = lambda t: None if t is None else t[rows].to(device, non_blocking=True)  # noqa: E731
        y, A, A_tilde = get(self.images).to(torch.float32) / 127.5 - 1, get(self.A), get(self.A_tilde)
        if self.num_images > self.num_raw:  # --xflip
            flipped = (index >= self.num_raw)[:, None, None, None].to(device)
            y = torch.where(flipped, y.flip(3), y)
            if self.flip_masks:
                A, A_tilde = torch.where(flipped, A.flip(3), A), torch.where(flipped, A_tilde.flip(3), A_tilde)
        return y, A.to(torch.float32), A_tilde.to(torch.float32), get(self.labels)


def check_labels(labels, num_classes):
    """Returns the number of classes (--num_classes, else the largest label + 1); a label outside [0, num_classes),
    or more classes than images without --num_classes, is one error line (not a huge embedding table)."""
    classes = num_classes or int(labels.max()) + 1
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        raise DataError(f'--data: label {labels[bad][0]} of image #{bad.argmax()} is outside [0, {classes}) '
                        f'(--num_classes={num_classes})')
    if not num_classes and classes > len(labels):
        raise DataError(f'--data: the largest label, {classes - 1}, implies {classes} classes for {len(labels)} '
                        f'images; pass --num_classes if that is right')
    return classes


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
    """Loss per pixel (official Loss/loss), loss per noise-level bin and realised erasure rates, summed on the
    device and read once per tick. The bins split ln(sigma) at -1.5, -0.5, 0.5, 1.5 standard deviations."""

    def __init__(self, cfg, device):
        self.edges = torch.tensor([-1.5, -0.5, 0.5, 1.5], device=device)
        sigmas = [f'{math.exp(cfg.P_mean + cfg.P_std * z):.3g}' for z in self.edges.tolist()]
        self.bin_names = [f'<{sigmas[0]}'] + [f'{a}-{b}' for a, b in zip(sigmas, sigmas[1:])] + [f'>{sigmas[-1]}']
        self.sums = torch.zeros(4 + 2 * len(self.bin_names), device=device)

    def add(self, per_image, A, A_tilde, normal):
        self.sums[:4] += torch.stack([per_image.sum(), torch.ones_like(per_image).sum(), (1 - A).mean() * len(A),
                                      (1 - A_tilde).mean() * len(A)])
        bins = torch.bucketize(normal, self.edges)
        self.sums[4:].view(2, -1)[0].index_add_(0, bins, per_image)
        self.sums[4:].view(2, -1)[1].index_add_(0, bins, torch.ones_like(per_image))

    def read(self):
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.sums)
        values = self.sums.tolist()  # the one host sync of the tick
        self.sums.zero_()
        (loss, n, erased_A, erased_A_tilde), bins = values[:4], values[4:]
        totals, counts = bins[:len(bins) // 2], bins[len(bins) // 2:]
        return dict(loss=loss / n, erased_A=erased_A / n, erased_A_tilde=erased_A_tilde / n,
                    loss_by_sigma={k: t / c if c else None for k, t, c in zip(self.bin_names, totals, counts)})


# Flags that may differ between a run and its continuation by --resume=auto; any other difference starts a new run.
RESUMABLE_CHANGES = {'kimg', 'resume', 'outdir', 'tick', 'snap', 'dump', 'grid', 'steps', 'precision', 'compile',
                     'workers', 'cache_dir', 'device', 'dry_run', 'bench', 'experiment_name', 'S_churn', 'S_min',
                     'S_max', 'S_noise'}


def find_resume(cfg, description):
    """--resume=auto: (run folder, its latest training state) of the newest run folder with this description and
    training config. A folder without a state (a run killed during its first write) is reused with state None."""
    if cfg.nosubdir:
        folders = [cfg.outdir]
    else:
        folders = sorted(glob.glob(os.path.join(cfg.outdir, f'[0-9][0-9][0-9][0-9][0-9]-{glob.escape(description)}')))
    wanted = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    for folder in reversed(folders):
        states = glob.glob(os.path.join(folder, 'training-state-*.pt'))
        try:
            with open(os.path.join(folder, 'config.json')) as file:
                saved = json.load(file)['config']
        except (OSError, ValueError, KeyError):
            saved = None  # killed before config.json was complete: reusable only without a state
        if saved is None and not states:
            return folder, None
        if saved is not None and all(saved.get(k) == v for k, v in wanted.items()):
            latest = max(states, key=lambda path: float(re.search(r'-([\d.]+)\.pt$', path).group(1)), default=None)
            return folder, latest
    return None, None


def open_run_dir(cfg, description, resume_folder):
    """--outdir itself (--nosubdir), the folder that --resume=auto continues, or a new numbered folder."""
    if cfg.nosubdir or resume_folder:
        return cfg.outdir if cfg.nosubdir else resume_folder
    names = os.listdir(cfg.outdir) if os.path.isdir(cfg.outdir) else []
    run_ids = [int(name[:5]) for name in names if re.match(r'\d{5}-', name)]
    return os.path.join(cfg.outdir, f'{max(run_ids, default=-1) + 1:05d}-{description}')


def check_writable(folder, flag='--outdir'):
    """Fails with one line (exit 2) before any work when folder cannot be created or written; writes nothing."""
    # The nearest existing folder must take a temporary file (it is deleted at once).
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f'{flag}: {existing} is not a folder')
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(f'{flag}: cannot write to {existing} ({error.strerror or error})')


def remove_partial_files(folder):
    """Deletes the temporary files (*.tmp, *.tmp<pid>) that a killed or failed write left behind."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if re.search(r'\.tmp\d*$', name):
            os.remove(os.path.join(folder, name))


def load_state(path, net, ema, optimizer, rank, world, device):
    """Restores a training state; returns (cur_nimg, cur_tick). Dropout generators are restored when the number
    of processes is unchanged (everything else does not depend on it)."""
    if os.path.getsize(path) == 0:
        raise UsageError(f'--resume: {path} is empty (0 bytes)')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)  # tensors and plain containers only
    except Exception as error:  # a truncated file or not a torch file: one line, not a trace
        raise UsageError(f'--resume: cannot read {path} ({type(error).__name__}: {str(error).splitlines()[0]})')
    if not isinstance(state, dict) or not {'net', 'ema', 'optimizer', 'cur_nimg'} <= set(state):
        kind = ('an official ambient-diffusion training state (use --transfer=<its network-snapshot-*.pkl>)'
                if isinstance(state, dict) and 'optimizer_state' in state else
                'a network snapshot, not a training state (use --transfer)' if isinstance(state, dict) and 'ema' in
                state else 'not a training state of ambient.py')
        raise UsageError(f'--resume: {path} is {kind}')
    try:
        net.load_state_dict(state['net'])
        ema.load_state_dict(state['ema'])
        optimizer.load_state_dict(state['optimizer'])
    except Exception as error:  # another network
        raise UsageError(f'--resume: {path} holds another network ({type(error).__name__}: '
                         f'{str(error).splitlines()[0]})')
    if len(state['rng_cpu']) == world:
        torch.set_rng_state(state['rng_cpu'][rank])
        if device.type == 'cuda' and state['rng_cuda'][rank] is not None:
            torch.cuda.set_rng_state(state['rng_cuda'][rank], device)
    return state['cur_nimg'], state['cur_tick']


def train(cfg):
    """The EDM training loop with the ambient loss (official training/training_loop.py); returns the run folder.
    One global batch per step, split into rounds of --batch_gpu per process; all randomness of a step is drawn by
    draw_step from (seed, cur_nimg), so resuming and changing the number of GPUs keep the trajectory."""
    # Processes, batch split and the flags that need them; the output folder must be writable.
    rank, world, device = init_distributed(cfg.device)
    is_main = rank == 0
    batch_gpu = cfg.batch_gpu or cfg.batch // world
    if cfg.batch % (batch_gpu * world):
        raise UsageError(f'--batch={cfg.batch} must be divisible by GPUs x --batch_gpu = {world} x {batch_gpu}')
    rounds = cfg.batch // (batch_gpu * world)
    if cfg.resume not in ('', 'auto') and not os.path.isfile(cfg.resume):
        raise UsageError(f'--resume: {cfg.resume} does not exist')
    check_writable(cfg.outdir)

    # Performance settings.
    precision = cfg.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')
    # TF32 for what stays fp32; fp32 = official numerics (TF32 off, as the official training loop sets it).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == 'bf16'
    torch.backends.cudnn.benchmark = cfg.bench         # fixed shapes, so cuDNN's autotuning pays off
    memory_format = torch.channels_last if device.type == 'cuda' else torch.contiguous_format  # tensor-core convs

    # Data, corrupted once, and the network (all input checks happen here, before anything is written).
    data = Data(cfg, device)
    data_name = 'cifar10' if cfg.data == 'cifar10' else os.path.splitext(os.path.basename(cfg.data.rstrip('/')))[0]
    description = f'{data_name}-{cfg.precond}-p{cfg.corruption_probability:g}-d{cfg.delta_probability:g}-' \
                  f'{cfg.arch}-batch{cfg.batch}' + (f'-{cfg.desc}' if cfg.desc else '')  # run folder name, EDM-like
    resume_folder, resume_path = find_resume(cfg, description) if cfg.resume == 'auto' else (None, cfg.resume or None)
    net_config = network_config(cfg, data.resolution, data.channels, data.label_dim)
    torch.manual_seed(cfg.seed)                        # the same initial weights on every rank
    net = build_network(net_config).to(device, memory_format=memory_format).train()
    if cfg.transfer and not resume_path:               # official --transfer: weights of a snapshot, fresh optimizer
        transfer_weights(net, cfg.transfer, cfg.cache_dir)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = (torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam)(
        net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
        fused=device.type == 'cuda')                   # official: Adam, AdamW when --weight_decay > 0
    torch.manual_seed(cfg.seed * world + rank)         # dropout differs per rank
    cur_nimg, cur_tick = load_state(resume_path, net, ema, optimizer, rank, world, device) if resume_path else (0, 0)
    ddp = net if world == 1 else torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device] if device.type == 'cuda' else None)
    forward = torch.compile(ddp) if cfg.compile else ddp

    # Run folder: config (ours and the official training_options.json), a copy of this file, the corrupted data as
    # the network sees it. Temporary files of an interrupted earlier write are removed first.
    run_dir = open_run_dir(cfg, description, resume_folder)

    def log(message):  # print() that also appends to the run's log.txt, on rank 0 only
        if is_main:
            print(message, flush=True)
            with open(os.path.join(run_dir, 'log.txt'), 'a') as file:
                file.write(message + '\n')
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        remove_partial_files(run_dir)
        write_atomic(os.path.join(run_dir, 'config.json'), json.dumps(dict(
            config=dataclasses.asdict(cfg), network=net_config, command=sys.argv, world_size=world,
            torch=torch.__version__, device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'),
            indent=2).encode())
        write_atomic(os.path.join(run_dir, 'training_options.json'), json.dumps(
            official_training_options(cfg, net_config, data.num_raw, run_dir), indent=2).encode())
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
        f'x {rounds} round(s), {precision}' + (f', resuming from {resume_path}' if resume_path else '')
        + (f', weights from {cfg.transfer}' if cfg.transfer and not resume_path else ''))

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
            noise = dict(rnd_normal=step['normal'][rows], eps=step['eps'][rows], P_mean=cfg.P_mean, P_std=cfg.P_std,
                         sigma_data=cfg.sigma_data)                                     # this step's draws
            sync = ddp.no_sync() if world > 1 and round_idx < rounds - 1 else contextlib.nullcontext()
            with sync, autocast:
                if cfg.precond == 'ambient':
                    loss = ambient_loss(forward, y, A, A_tilde, labels, augment_labels, cfg.norm, **noise)
                else:  # the naive baseline: EDM on the masked images
                    loss = edm_loss(forward, A * y, labels, augment_labels, **noise)
                # Official normalisation: per-image sums, mean over the global batch (DDP averages over GPUs),
                # times the loss scaling --ls.
                loss.sum().mul(cfg.ls * world / cfg.batch).backward()
            stats.add(loss.detach() / y[0].numel(), A, A_tilde, step['normal'][rows])

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
        if cfg.ema_rampup_ratio > 0 and not cfg.transfer:  # official: no ramp-up when fine-tuning (--transfer)
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


def sampling_masks(net_config, seeds, generators, num_masks, device, sampler='ambient', corruption_probability=None,
                   delta_probability=None, mask_full_rgb=None, corruption_pattern=None):
    """The fixed sampling masks (K, B, C, H, W) float64, or None for a plain EDM network. dust: each pixel kept with
    the training marginal of A_tilde, (1 - p)(1 - delta) (official eval.py); box patterns: A_tilde drawn as in
    training (the official eval.py draws dust masks whatever the training pattern). Unset arguments take the
    training values. From the per-seed generators (the official masks come from NumPy's global RNG, which makes
    samples irreproducible)."""
    if net_config['precond'] != 'ambient':
        return None
    channels, resolution = net_config['channels'], net_config['unet']['img_resolution']
    training = lambda value, key, default: net_config.get(key, default) if value is None else value  # noqa: E731
    p = training(corruption_probability, 'corruption_probability', 0.4)
    delta = training(delta_probability, 'delta_probability', 0.1)
    full_rgb = training(mask_full_rgb, 'mask_full_rgb', False)
    pattern = training(corruption_pattern, 'corruption_pattern', 'dust')
    # One mask set per seed: all ones, dust (Bernoulli per pixel) or the box patterns' A_tilde.
    if sampler == 'edm':  # all-ones masks: every pixel observed
        return torch.ones(num_masks, len(seeds), channels, resolution, resolution, dtype=torch.float64, device=device)
    if pattern == 'dust':
        mask_channels = 1 if full_rgb else channels
        masks = torch.stack([torch.rand(num_masks, mask_channels, resolution, resolution, generator=g, device=device)
                             for g in generators], dim=1) < (1 - p) * (1 - delta)           # (K, B, Cm, H, W)
    else:
        check_pattern(pattern, resolution, p, delta)
        masks = torch.stack([torch.stack([torch.from_numpy(box_masks(
            pattern, resolution, resolution, p, delta, torch.Generator().manual_seed(derive_seed(seed, 2, k)))[1])
            for seed in seeds]) for k in range(num_masks)])[:, :, None].to(device)      # (K, B, 1, H, W)
    return masks.to(torch.float64).expand(-1, -1, channels, -1, -1)


def generate_images(net, net_config, seeds, device, sampler='ambient', num_masks=1, guidance_scale=0.0, steps=18,
                    corruption_probability=None, delta_probability=None, class_idx=None, precision='fp32',
                    mask_full_rgb=None, corruption_pattern=None, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0,
                    S_min=0, S_max=float('inf'), S_noise=1):
    """uint8 images (B, C, H, W), image k a function of seeds[k] alone: latents, label, sampling masks and churn
    noise come from a generator seeded by it (EDM's StackedRandomGenerator idea)."""
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
    masks = sampling_masks(net_config, seeds, generators, num_masks, device, sampler, corruption_probability,
                           delta_probability, mask_full_rgb, corruption_pattern)
    randn_like = lambda x: torch.stack([torch.randn(x.shape[1:], generator=g, device=device, dtype=x.dtype)  # noqa
                                        for g in generators])
    # The official noise range is clipped to the network's (EDMPrecond: 0 to inf); the clip belongs to the ambient
    # sampler (plain EDM does not clip).
    sigma_min = max(sigma_min, net_config.get('sigma_min', 0))
    sigma_max = min(sigma_max, net_config.get('sigma_max', float('inf')))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
        images = ambient_sampler(net, latents, masks, labels, num_steps=steps, sigma_min=sigma_min,
                                 sigma_max=sigma_max, rho=rho, guidance_scale=guidance_scale,
                                 clip=masks is not None, S_churn=S_churn, S_min=S_min,
                                 S_max=S_max, S_noise=S_noise, randn_like=randn_like)
    return to_uint8(images)


# Official eval.py flags that its ambient_sampler does not take (passing them fails there with a TypeError).
UNSAMPLED = {'solver': 'euler|heun', 'disc': 'vp|ve|iddpm|edm', 'schedule': 'vp|ve|linear', 'scaling': 'vp|none'}


def sampling_parser(prog, description, network_required=True):
    """Flags shared by generate, eval and neighbors (official eval.py names), in the common help layout."""
    parser = QuietParser(prog, description=description)
    parser.run_group = parser.add_argument_group('run')  # shown before sampling (the common order); empty = hidden
    group = parser.add_argument_group('sampling')
    flag(group, '--network', help='network-snapshot-*.pt of ambient.py or official network-snapshot-*.pkl (path or '
         'URL); eval also takes a folder of them (official: a folder)', shown='required' if network_required
         else None, required=network_required)
    flag(group, '--training_options_loc', help='official training_options.json (path or URL) for the corruption '
         'settings and the network of a bare-state-dict pickle', shown="the file beside the pickle")
    flag(group, '--batch', help='images per batch and GPU', default=64, type=int)
    flag(group, '--steps', help='Heun steps (2 x steps - 1 network evaluations)', default=18, type=int)
    flag(group, '--sigma_min', help='lowest noise level', default=0.002, type=float)
    flag(group, '--sigma_max', help='highest noise level', default=80.0, type=float)
    flag(group, '--rho', help='time step exponent', default=7.0, type=float)
    flag(group, '--S_churn', help='stochasticity strength; ours only (the official sampler takes it, eval.py has '
         'no flag)', default=0.0, type=float)
    flag(group, '--S_min', help='lowest noise level with churn', default=0.0, type=float)
    flag(group, '--S_max', help='highest noise level with churn', default=float('inf'), type=float)
    flag(group, '--S_noise', help='noise inflation of the churn', default=1.0, type=float)
    flag(group, '--sampler', help='ambient (fixed-mask sampler) or edm (all-ones sampling mask); ours only',
         default='ambient', choices=['ambient', 'edm'])
    flag(group, '--num_masks', help='sampling masks (reconstruction guidance when > 1)', default=1, type=int)
    flag(group, '--guidance_scale', help='reconstruction guidance weight', default=0.0, type=float)
    flag(group, '--corruption_probability', help='p of the sampling masks; official eval.py default 0.4',
         shown='the training value', type=float)
    flag(group, '--delta_probability', help='delta of the sampling masks; official eval.py default 0.1',
         shown='the training value', type=float)
    flag(group, '--mask_full_rgb', help='sampling masks per RGB pixel; official eval.py default False',
         shown='the training value', type=parse_bool)
    flag(group, '--corruption_pattern', help='pattern of the sampling masks (official eval.py: always dust); ours '
         'only', shown='the training value', choices=list(PATTERNS))
    flag(group, '--class', help='class of every image', shown='random per seed', type=int, dest='class_idx')
    flag(group, '--num_classes', help='number of classes of a conditional network, checked against it',
         default=0, type=int)
    flag(group, '--precision', help='bf16 or fp32 sampling; ours only', shown='bf16 on CUDA, fp32 on CPU',
         choices=['fp32', 'bf16'])
    flag(group, '--device', help='cuda or cpu; ours only', default='', shown='cuda when available')
    flag(group, '--cache_dir', help='where downloaded snapshots and weights are kept; ours only', default='',
         shown='$CORRUPTED_DIFFUSION_CACHE or ~/.cache/corrupted-diffusion')
    for name, values in UNSAMPLED.items():
        flag(group, f'--{name}', help=f'official eval.py flag ({values}) that its sampler never accepts: refused',
             default=None)
    return parser


def check_sampling_flags(args):
    """The sampling flags' refusals and ranges: one line, before anything is read or written."""
    for name in UNSAMPLED:
        if getattr(args, name) is not None:
            raise refuse(f'--{name}', 'the official ambient_sampler does not take it (eval.py fails with a '
                         'TypeError there)', 'the default Heun sampler with EDM time steps', 'eval.py')
    for name in ('corruption_probability', 'delta_probability'):
        value = getattr(args, name)
        if value is not None and not 0 <= value < 1:
            raise UsageError(f'--{name} must be in [0, 1)')
    if args.batch < 1 or args.steps < 2 or args.num_masks < 1:
        raise UsageError('--batch and --num_masks must be >= 1, --steps >= 2')
    if min(args.sigma_min, args.sigma_max, args.rho, args.S_churn, args.S_min, args.S_max, args.S_noise) < 0 or \
            args.sigma_min >= args.sigma_max:
        raise UsageError('--sigma_min < --sigma_max, --rho and the --S_* flags must be >= 0')


def prepare_sampling(args, device):
    """Checks the sampling flags and loads the network, before anything is written."""
    check_sampling_flags(args)
    options = read_json(args.training_options_loc, '--training_options_loc', args.cache_dir) \
        if args.training_options_loc else None
    net, net_config = load_network(args.network, device, args.cache_dir, training_options=options)
    if options and net_config.get('source') is None:  # our snapshot: the options file sets the corruption defaults
        dataset = options.get('dataset_kwargs', {})
        net_config = {**net_config, **{k: dataset[k] for k in ('corruption_probability', 'delta_probability',
                                                               'mask_full_rgb', 'corruption_pattern') if k in dataset}}
    label_dim = net_config['unet']['label_dim']
    if args.num_classes and args.num_classes != label_dim:
        raise UsageError(f'--num_classes={args.num_classes}, but the network has {label_dim} classes')
    if args.class_idx is not None and not 0 <= args.class_idx < label_dim:
        raise UsageError(f'--class must be in [0, {label_dim})' if label_dim else '--class needs a conditional network')
    return net, net_config


def sample_batches(net, net_config, args, seeds, device):
    """Yields (seeds, uint8 images) for this rank's share of the seeds (EDM's round-robin batches)."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    # Everything generate_images takes, from the flags; each rank takes every world-th batch of seeds.
    options = dict(sampler=args.sampler, num_masks=args.num_masks, guidance_scale=args.guidance_scale,
                   steps=args.steps, corruption_probability=args.corruption_probability,
                   delta_probability=args.delta_probability, class_idx=args.class_idx,
                   precision=args.precision or ('bf16' if device.type == 'cuda' else 'fp32'),
                   mask_full_rgb=args.mask_full_rgb, corruption_pattern=args.corruption_pattern,
                   sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho, S_churn=args.S_churn,
                   S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise)
    num_batches = max((len(seeds) - 1) // (args.batch * world) + 1, 1) * world
    for batch_seeds in torch.as_tensor(seeds).tensor_split(num_batches)[rank::world]:
        if len(batch_seeds):
            yield batch_seeds.tolist(), generate_images(net, net_config, batch_seeds.tolist(), device, **options)


def save_pngs(outdir, seeds, images, subdirs=False):
    """One PNG per seed, outdir/<seed>.png (or outdir/<thousands>/<seed>.png with --subdirs, as official)."""
    for seed, image in zip(seeds, images.permute(0, 2, 3, 1).cpu().numpy()):
        folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
        os.makedirs(folder, exist_ok=True)
        save_png(image, os.path.join(folder, f'{seed:06d}.png'))


def fid_call(function, *args, **kwargs):
    """Calls a fid.py function, turning its errors (missing weights offline, a bad reference) into one line."""
    try:
        return function(*args, **kwargs)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise DataError(' '.join(str(error).split()))


def generate_parser():
    parser = sampling_parser('ambient.py generate', 'One PNG per seed from a snapshot; image k depends on seed k '
                             'only.')
    group = parser.run_group
    flag(group, '--seeds', help='seeds such as 0-49999 or 1,2,5-10', default='0-63')
    flag(group, '--outdir', help='where the PNGs go', shown='required', required=True)
    flag(group, '--subdirs', help='a sub-folder per 1000 seeds', default=False, type=parse_bool)
    add_help(parser, group)
    return parser


def generate(argv):
    """Writes one PNG per seed, outdir/<seed>.png."""
    args = generate_parser().parse_args(argv)
    check_sampling_flags(args)
    seeds = parse_seeds(args.seeds)
    check_writable(args.outdir)
    rank, _, device = init_distributed(args.device)
    net, net_config = prepare_sampling(args, device)
    for batch_seeds, images in sample_batches(net, net_config, args, seeds, device):
        save_pngs(args.outdir, batch_seeds, images, args.subdirs)
    if rank == 0:
        print(f'Wrote {len(seeds)} images to {args.outdir}')


def snapshots_to_evaluate(network, eval_step):
    """--network as the official eval.py reads it: a snapshot, or a folder whose snapshots (*.pkl, or ours) are
    evaluated in name order, every eval_step-th, each once (the official script polls the folder for ever)."""
    # Official pickles first; a run folder of ours has .pt snapshots instead.
    if os.path.isdir(network):
        found = sorted(glob.glob(os.path.join(network, '*.pkl'))) or \
            sorted(glob.glob(os.path.join(network, 'network-snapshot-*.pt')))
        if not found:
            raise UsageError(f'--network: no network-snapshot-*.pkl or *.pt in {network}')
        return found[::eval_step]
    return [network]


def eval_parser():
    parser = sampling_parser('ambient.py eval', 'FID and other fid.py metrics of a snapshot, or of every snapshot '
                             'in a folder (official eval.py flags keep their names).')
    group = parser.add_argument_group('evaluation')
    flag(group, '--ref', help='reference statistics (fid.py ref, EDM fid-refs .npz; path or URL)',
         shown='required', required=True)
    flag(group, '--num', help='images to evaluate', default=50000, type=int)
    flag(group, '--seeds', help='seeds of the images; their first --num are evaluated', shown='0 to num - 1')
    flag(group, '--seed', help='random choice of --num images among more (official); a no-op for FID when exactly '
         '--num are sampled', default=0, type=int)
    flag(group, '--metrics', help='any of ' + ','.join(fid.METRICS) + '; ours only', default='fid')
    flag(group, '--protocol', help='edm (official eval.py: EDM fid.py), adm or pytorch-fid', default='edm',
         choices=list(fid.PROTOCOLS))
    flag(group, '--fid_weights', help='Inception weights file', shown='$FID_WEIGHTS or a download')
    flag(group, '--outdir', help='also write the PNGs to outdir/<snapshot>/ (official)', default=None)
    flag(group, '--subdirs', help='a PNG sub-folder per 1000 seeds', default=False, type=parse_bool)
    flag(group, '--eval_step', help='evaluate every eval_step-th snapshot of a folder', default=1, type=int)
    flag(group, '--skip_generation', help='evaluate the PNGs in the --network folder instead of sampling',
         default=False, type=parse_bool)
    flag(group, '--skip_calculation', help='only write the PNGs (needs --outdir)', default=False, type=parse_bool)
    flag(group, '--experiment_name', help='a name kept in the metrics JSON (official: the wandb run name)',
         default=None)
    flag(group, '--with_wandb', help='official wandb switch: False is honoured, True refused (metrics.jsonl holds '
         'the numbers)', default=False, type=parse_bool)
    flag(group, '--wandb_id', help='official wandb run id: refused unless empty', default='')
    add_help(parser, group)
    return parser


def evaluate(argv):
    """fid.py metrics of --num samples (the first --num of --seeds) held in memory; with --outdir also the PNGs, in
    outdir/<snapshot kimg>/ as official. Prints the numbers and appends a JSON line to metrics.jsonl beside the
    network (or in --outdir)."""
    # Flags: refusals, ranges and the seeds, before anything is read or written.
    args = eval_parser().parse_args(argv)
    check_sampling_flags(args)
    if args.with_wandb:
        raise refuse('--with_wandb=True', 'there is no wandb logging', '--with_wandb=False (metrics go to '
                     'metrics.jsonl)', 'eval.py')
    if args.wandb_id:
        raise refuse('--wandb_id', 'there is no wandb logging', 'metrics.jsonl', 'eval.py')
    metrics = args.metrics.split(',')
    if args.num < 2 or not set(metrics) <= set(fid.METRICS) or args.eval_step < 1:
        raise UsageError(f'--num must be >= 2, --eval_step >= 1 and --metrics a list of {",".join(fid.METRICS)}')
    seeds = parse_seeds(args.seeds)[:args.num] if args.seeds else list(range(args.num))
    if len(seeds) < args.num:
        raise UsageError(f'--seeds gives {len(seeds)} images, but --num={args.num}')
    if args.skip_calculation and not args.outdir:
        raise UsageError('--skip_calculation writes PNGs only: give --outdir')
    if args.outdir:
        check_writable(args.outdir)
    if not args.ref.startswith(('http://', 'https://')) and not os.path.exists(args.ref):
        raise UsageError(f'--ref: {args.ref} does not exist')
    rank, _, device = init_distributed(args.device)
    # Reference, detector, protocol and metric checks all fail here, before minutes of sampling.
    ref = fid_call(fid.load_ref, args.ref)
    detector = fid_call(fid.load_inception, args.fid_weights, device=device)
    protocol = fid_call(fid.resolve_protocol, args.protocol, ref=ref, metrics=metrics, detector=detector,
                        num=args.num)
    if args.skip_generation:  # the official calc() on a folder of images
        images, _ = load_images(args.network, workers=4)
        index = fid_call(fid.select_images, len(images), protocol, seed=args.seed)
        batches = (torch.from_numpy(images[index[i:i + args.batch]]).permute(0, 3, 1, 2)
                   for i in range(0, len(index), args.batch))
        results = fid_call(fid.compute_metrics, batches, ref, metrics=metrics, detector=detector, device=device,
                           num_images=args.num, protocol=protocol, seed=args.seed)
        report_metrics(args, args.network, results, args.outdir or args.network, rank)
        return
    # Every snapshot of --network: sample the seeds (and write their PNGs with --outdir), then score them in one
    # streaming Inception pass; metrics.jsonl goes beside the snapshot.
    for network in snapshots_to_evaluate(args.network, args.eval_step):
        folder = os.path.dirname(os.path.abspath(network)) if os.path.isfile(network) else args.outdir or '.'
        if not args.skip_calculation:
            check_writable(folder, 'metrics.jsonl folder')  # before minutes of sampling
        args.network = network
        net, net_config = prepare_sampling(args, device)
        name = re.sub(r'^network-snapshot-|\.(pt|pkl)$', '', os.path.basename(network))
        outdir = os.path.join(args.outdir, name.lstrip('0').split('.')[0] or '0') if args.outdir else None

        def batches():
            for batch_seeds, images in sample_batches(net, net_config, args, seeds, device):
                if outdir:
                    save_pngs(outdir, batch_seeds, images, args.subdirs)
                yield images
        if args.skip_calculation:
            for _ in batches():
                pass
            continue
        results = fid_call(fid.compute_metrics, batches(), ref, metrics=metrics, detector=detector, device=device,
                           num_images=args.num, protocol=protocol, seed=args.seed)
        report_metrics(args, network, results, folder, rank)


def report_metrics(args, network, results, folder, rank):
    """Prints the metrics as JSON and appends them to folder/metrics.jsonl (rank 0)."""
    if rank != 0:
        return
    entry = dict(network=os.path.basename(network.rstrip('/')), num=args.num, sampler=args.sampler, steps=args.steps,
                 num_masks=args.num_masks, guidance_scale=args.guidance_scale, ref=args.ref,
                 experiment_name=args.experiment_name,
                 **{k: v if isinstance(v, str) else float(v) for k, v in results.items()}, timestamp=time.time())
    print(json.dumps(entry))
    with open(os.path.join(folder, 'metrics.jsonl'), 'a') as file:
        file.write(json.dumps(entry) + '\n')


def neighbors_parser():
    parser = sampling_parser('ambient.py neighbors', 'Nearest clean training images of generated ones (official '
                             'find_dataset_neighbors.py flags keep their names).', network_required=False)
    group = parser.add_argument_group('evaluation')
    flag(group, '--input_dir', '--images', help='generated images instead of --network (official name: '
         '--input_dir)', default=None, dest='images')
    flag(group, '--data', help='the training set (read clean: an audit)', shown='required', required=True)
    flag(group, '--output_dir', '--outdir', help='where the outputs go (official name: --output_dir)',
         shown='required', required=True, dest='outdir')
    flag(group, '--features_path', help='.npy of the training features: loaded when it exists, else computed and '
         'saved (official)', default=None)
    flag(group, '--max_size', help='generated images used (RandomState(0) subset as official); 0 = all',
         default=0, type=int)
    flag(group, '--num', help='images sampled from --network; ours only', default=10000, type=int)
    flag(group, '--features', help='dinov2 (official) or inception; ours only', default='inception',
         choices=['inception', 'dinov2'])
    flag(group, '--dinov2', help='DINOv2 weights: a hub name, URL or .pth; ours only', default='dinov2_vitg14')
    flag(group, '--normalize', help='unit-length features (cosine similarity)', default=True, type=parse_bool)
    flag(group, '--batch-gpu', help='feature batch limit (official)', default=None, type=int, dest='batch_gpu')
    flag(group, '--workers', help='threads decoding images', default=1, type=int)
    flag(group, '--cache', help='hold the dataset in memory (always; False is refused)', default=True,
         type=parse_bool)
    flag(group, '--seed', help='official flag with no effect (its sampler does not shuffle)', default=42, type=int)
    flag(group, '--threshold', help='top-1 similarity counted as a copy in neighbors.json; ours only',
         default=0.95, type=float)
    flag(group, '--top', help='pairs in neighbors.png; ours only', default=16, type=int)
    flag(group, '--fid_weights', help='Inception weights file (--features=inception)',
         shown='$FID_WEIGHTS or a download')
    add_help(parser, group)
    return parser


def neighbors(argv):
    """Memorisation check (official find_dataset_neighbors.py): for every generated image, the similarity of its
    features to those of every clean training image. --features=dinov2 is the official ViT-g/14 CLS token with its
    preprocessing; inception (default, works offline with fid.py's weights) takes the FID pool features. Writes the
    official files (max_products.pkl, softmax_products.pkl, <i>_dataset_image_<i>.png and
    <i>_nearest_neighbors_<k>_dataset_index_<j>.png) plus neighbors.npz (top-3 similarities and indices),
    neighbors.json (a summary) and neighbors.png (the --top most similar pairs)."""
    # Flags and the writable output folders, before any image is read.
    args = neighbors_parser().parse_args(argv)
    check_sampling_flags(args)
    if args.cache is False:
        raise refuse('--cache=False', 'the dataset is always held in memory', '--cache=True',
                     'find_dataset_neighbors.py')
    if (args.network is None) == (args.images is None):
        raise UsageError('give one of --network and --input_dir')
    if args.num < 1 or args.top < 1 or args.max_size < 0 or args.workers < 1 or not -1 <= args.threshold <= 1:
        raise UsageError('--num, --top and --workers must be >= 1, --max_size >= 0, --threshold in [-1, 1]')
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        raise UsageError('neighbors runs as one process')
    check_writable(args.outdir, '--output_dir')
    if args.features_path and not os.path.exists(args.features_path):
        check_writable(os.path.dirname(os.path.abspath(args.features_path)), '--features_path')
    # Generated images (sampled here, or read from --input_dir) and the clean training set.
    _, _, device = init_distributed(args.device)
    if args.network:
        net, net_config = prepare_sampling(args, device)
    train_images = torch.from_numpy(load_images(args.data, args.cache_dir, args.workers)[0]).permute(0, 3, 1, 2)
    if args.features == 'dinov2':
        try:
            detector = nets.load_dinov2(args.dinov2, cache_dir=args.cache_dir or None).to(device)
        except Exception as error:  # offline: one line naming the URL and where to put the file
            raise DataError(f'--dinov2: {" ".join(str(error).split())}')
    else:
        detector = fid_call(fid.load_inception, args.fid_weights, device=device)
    if args.images:
        generated = torch.from_numpy(load_images(args.images, workers=args.workers)[0]).permute(0, 3, 1, 2)
        if 0 < args.max_size < len(generated):  # official: a RandomState(0) subset of the outputs, sorted
            keep = np.arange(len(generated))
            np.random.RandomState(0).shuffle(keep)
            generated = generated[np.sort(keep[:args.max_size])]
    else:
        seeds = list(range(args.num))
        generated = torch.cat([x.cpu() for _, x in sample_batches(net, net_config, args, seeds, device)])

    # Features of both sets (the training set's cached in --features_path), top 3 training images per image.
    batch = min(args.batch, args.batch_gpu or args.batch)

    def features(images):
        chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
        if args.features == 'dinov2':
            with torch.no_grad():
                return torch.cat([nets.dinov2_features(detector, x.to(device), normalize=False).cpu()
                                  for x in chunks]).double()
        return fid.compute_features(iter(chunks), detector, device)['pool'].double().cpu()
    if args.features_path and os.path.exists(args.features_path):
        train_features = torch.from_numpy(np.load(args.features_path)).double()
        if train_features.shape[0] != len(train_images):
            raise DataError(f'--features_path: {args.features_path} holds {train_features.shape[0]} features, the '
                            f'data {len(train_images)} images')
    else:
        train_features = features(train_images)
        if args.features_path:
            buffer = io.BytesIO()
            np.save(buffer, train_features.float().numpy())
            write_atomic(args.features_path, buffer.getvalue())
    generated_features = features(generated)
    if args.normalize:
        train_features, generated_features = F.normalize(train_features, dim=1), F.normalize(generated_features, dim=1)
    k = min(3, len(train_images))
    products = [chunk @ train_features.T for chunk in generated_features.split(1024)]
    top = [p.topk(k, dim=1) for p in products]
    similarity = torch.cat([t.values for t in top])                                   # (num, 3)
    neighbor = torch.cat([t.indices for t in top])                                    # (num, 3)
    softmax_max = torch.cat([p.softmax(dim=1).max(dim=1).values for p in products])   # official softmax_products
    write_neighbors(args, generated, train_images, similarity, neighbor, softmax_max)


def write_neighbors(args, generated, train_images, similarity, neighbor, softmax_max):
    """The official per-image files and pickles, and our summary, arrays and picture."""
    # The official files: each generated image and its 3 nearest training images, the top-1 similarities and the
    # largest softmax weights (pickled lists of floats).
    os.makedirs(args.outdir, exist_ok=True)
    for i, image in enumerate(generated):
        save_png(image.permute(1, 2, 0).numpy(), os.path.join(args.outdir, f'{i}_dataset_image_{i}.png'))
        for rank_k, j in enumerate(neighbor[i].tolist()):
            save_png(train_images[j].permute(1, 2, 0).numpy(),
                     os.path.join(args.outdir, f'{i}_nearest_neighbors_{rank_k}_dataset_index_{j}.png'))
    write_atomic(os.path.join(args.outdir, 'max_products.pkl'), pickle.dumps(similarity[:, 0].tolist()))
    write_atomic(os.path.join(args.outdir, 'softmax_products.pkl'), pickle.dumps(softmax_max.tolist()))
    # Ours: a summary with the fraction above --threshold, the arrays, and a picture of the closest pairs.
    top1 = similarity[:, 0]
    summary = dict(source=args.network or args.images, features=args.features, num_generated=len(generated),
                   num_train=len(train_images), threshold=args.threshold,
                   fraction_above=float((top1 > args.threshold).double().mean()), mean_top1=float(top1.mean()),
                   max_top1=float(top1.max()),
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


def print_overview():
    """`python ambient.py --help`: the commands of this script."""
    print('usage: ambient.py [COMMAND] [--flag=value ...]')
    print('Ambient Diffusion: Learning Clean Distributions from Corrupted Data (Daras et al., NeurIPS 2023, '
          'arXiv:2305.19256).')
    print('commands:')
    for name, text in COMMANDS.items():
        print(f'  {name:<10} {text}')
    print("Run 'python ambient.py COMMAND --help' for the flags of a command.")


def main(argv=None):
    # The command (train when none is given), then one line and an exit code for every expected failure.
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (['-h'], ['--help']):
        print_overview()
        return
    command = argv.pop(0) if argv and argv[0] in COMMANDS else 'train'
    try:
        if command == 'train':
            cfg, preset = parse_train_args(argv)
            if cfg.dry_run:  # ours, then what the official train.py would print for the same flags
                print(json.dumps(dict(preset=preset, **dataclasses.asdict(cfg)), indent=2))
                print('Official training options (train.py --dry-run; resolution and max_size come with the data):')
                print(json.dumps(official_training_options(cfg), indent=2))
                return
            train(cfg)
        elif command == 'generate':
            generate(argv)
        elif command == 'eval':
            evaluate(argv)
        else:
            neighbors(argv)
    except (UsageError, DataError, RunError, OSError) as error:
        # One line, even for multi-line messages; exit 2 for bad flags and input, 1 for a failure while running.
        message = f'{error.filename}: {error.strerror}' if isinstance(error, OSError) and error.filename else str(error)
        print(f'ambient.py: error: {" ".join(message.split())}', file=sys.stderr)
        sys.exit(2 if isinstance(error, (UsageError, DataError)) else 1)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
