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
Its theory (arXiv:2411.02780, sample complexity of learning Gaussian mixtures with heterogeneous variances): for large
data sets a noisy sample's marginal utility is exponentially worse than a clean one's, and a small clean set sharply
cuts the number of noisy samples needed; the official README prices a clean ImageNet image at 1.5-1.75 noisy ones
(sigma_n = 0.2).

Commands (the official train.py / generate.py / eval_fid.py command lines run as written; `python ambient_laws.py
COMMAND --help` lists the flags; `--preset` picks a CIFAR-10 / CelebA / ImageNet recipe, cifar10 = official defaults):
    # CPU smoke run on the embedded 200 CIFAR-10 images, about a minute
    python ambient_laws.py --preset=tiny --data=tests/data/cifar10_tiny.npz --sigma=0.2 --corruption_probability=0.9

    # 1 GPU: CIFAR-10, each image noisy with probability 0.9 at sigma_n = 0.2 (Table 1, "90% noisy + 10% clean")
    python ambient_laws.py --data=cifar10 --outdir=runs --sigma=0.2 --corruption_probability=0.9

    # 8 GPUs, the official README command; --resume=auto continues the newest matching run folder
    torchrun --standalone --nproc_per_node=8 ambient_laws.py --outdir=runs --data=datasets/cifar10-32x32.zip \
        --sigma=0.2 --corruption_probability=0.9 --dataset_keep_percentage=1.0 --consistency_coeff=0.0 \
        --expr_id=cifar_cp0.9_sigma0.2_dp1.0_cc0.0 --resume=auto

    # 50,000 samples of a released model (Hugging Face repo id, EDM .pkl or our snapshot), then FID + IS of the folder
    # as eval_fid.py computes them (fid_out.json); or FID of 50,000 samples drawn in memory under EDM's protocol.
    torchrun --standalone --nproc_per_node=8 ambient_laws.py generate --seeds=0-49999 --outdir=outputs --batch=64 \
        --network=giannisdaras/ambient_laws_celeba_sigma_0.05_corruption_0.1_keep_1.0
    torchrun --standalone --nproc_per_node=8 ambient_laws.py eval --gen_path=outputs \
        --ref_stats=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
    torchrun --standalone --nproc_per_node=8 -- ambient_laws.py eval --network=runs/.../network-snapshot-200000.pt \
        --protocol=edm --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
"""

import argparse
import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
import glob
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
    # Data and corruption (ambient-laws train.py; ambient_utils dataset_utils.py ImageFolderDataset).
    data: str = ''                        # image folder, EDM-style zip, .npz (x, y) or the word cifar10
    cond: bool = False                    # class-conditional model (labels from the data)
    num_classes: int = 0                  # class count; 0 = from the folder classes or max label + 1 of dense labels
    xflip: bool = False                   # add x-flipped copies (the data set doubles; a copy keeps its image's noise)
    sigma: float = 0.0                    # noise std sigma_n of the noisy images, pixels in [-1, 1]
    corruption_probability: float = 0.0   # probability that an image is noisy
    dataset_keep_percentage: float = 1.0  # fraction of the data set used at all (a seeded subset; x2 with --xflip)
    noisy_count: str = 'random'           # random: each image noisy w.p. p, seeded by its index (official); exact: p n
    noise_rng: str = 'numpy'              # numpy: NumPy seeded by the image index (official); device: drawn on the GPU
    corruption_seed: int = 0              # seeds --noisy_count=exact and --noise_rng=device
    sigma_per_image: str = ''             # .npy of one sigma_n per image (0 = clean), replaces --sigma and p
    already_noisy: bool = False           # the images already carry that noise (real data): add none
    augment: float = 0.12                 # EDM augmentation probability, 0 = off
    cache: bool = True                    # keep the data set in memory (always: false is refused)
    # Network (ambient-laws train.py = EDM train.py).
    preset: str = 'cifar10'               # recipe, see PRESETS (cifar10 = the official defaults)
    arch: str = 'ddpmpp'                  # ddpmpp or adm (official), or a nets.UNET_PRESETS name
    precond: str = 'edm'                  # preconditioning and loss: edm (the official code asserts it)
    cbase: int = 0                        # model_channels override, 0 = the arch's
    cres: str = ''                        # channel_mult override, e.g. 1,2,2,2
    dropout: float = 0.13                 # dropout probability
    transfer: str = ''                    # start from these weights (fresh optimizer, no EMA ramp-up)
    # Optimisation (ambient-laws training/loss.py EDMLoss, training_loop.py).
    P_mean: float = -1.2                  # log-normal sigma distribution, mean of ln(sigma); EDM
    P_std: float = 1.2                    # its std; EDM
    sigma_data: float = 0.5               # EDM preconditioning constant
    consistency_coeff: float = 0.0        # weight of the consistency loss, 0 = off
    consistency_batch_size: int = 32      # rows that get the consistency term per step (see --consistency_rows)
    consistency_rows: str = 'per_gpu'     # per_gpu: first batch_size/GPUs rows of each microbatch; global: first rows
    num_consistency_steps: int = 6        # grid points of the reverse SDE (5 steps)
    num_primes: int = 6                   # reverse-SDE runs averaged per row
    with_weight: bool = False             # multiply the consistency term by lambda(sigma)
    with_grad: bool = True                # backpropagate through the reverse SDE
    kimg: float = 200_000                 # training length in thousands of images
    batch: int = 512                      # global batch
    batch_gpu: int = 0                    # per-GPU microbatch, 0 = batch / GPUs; accumulation makes up the rest
    lr: float = 1e-3                      # learning rate (Adam)
    lr_rampup_kimg: float = 10_000        # linear warm-up; EDM training_loop default
    weight_decay: float = 0.0             # Adam's L2 weight decay
    ema_halflife_kimg: float = 500        # EMA half-life
    ema_rampup_ratio: float = 0.05        # half-life <= this x images seen; EDM default
    ls: float = 1.0                       # loss scaling: the loss is multiplied by it before backward
    # Run.
    outdir: str = 'runs'                  # run folders go here (generate: the PNG folder)
    desc: str = ''                        # extra words for the run folder name
    expr_id: str = 'test'                 # experiment name (official: the wandb run name); kept in config.json
    nosubdir: bool = False                # write into --outdir itself instead of a numbered run folder
    tick: float = 50                      # kimg between progress lines
    snap: int = 50                        # ticks between network snapshots and sample grids
    dump: int = 500                       # ticks between training states (and at the end)
    grid: int = 64                        # images in the fixed-seed sample grid of each snapshot
    seed: int = -1                        # training randomness; -1 = random, drawn once and saved
    resume: str = ''                      # training-state-*.pt to continue from, or auto
    precision: str = ''                   # fp32 (TF32 off, official numerics) or bf16; '' = bf16 on CUDA, fp32 on CPU
    fp16: bool = False                    # FP16 network (false only: use --precision=bf16)
    bench: bool = True                    # cuDNN benchmarking
    compile: bool = False                 # torch.compile the network
    workers: int = 4                      # threads that decode images and draw the NumPy noise
    dry_run: bool = False                 # print the resolved config and exit
    device: str = ''                      # cpu or cuda; '' = cuda when available
    # Sampling (EDM Algorithms 1-2; ambient-laws generate.py): generate / eval, and the grids during training.
    steps: int = 18                       # Heun steps (2 x steps - 1 network calls)
    sigma_min: float = 0.002              # lowest noise level (raised to the network's own minimum)
    sigma_max: float = 80.0               # highest noise level (lowered to the network's own maximum)
    rho: float = 7.0                      # time-step exponent
    S_churn: float = 0.0                  # stochasticity; 0 = deterministic
    S_min: float = 0.0                    # churn only for sigma in [S_min, S_max]
    S_max: float = float('inf')           # see S_min
    S_noise: float = 1.0                  # noise inflation
    stop_variance: float = 0.0            # return D early once sigma_next^2 < this
    # Generation and evaluation.
    network: str = ''                     # our .pt, an EDM .pkl (path or URL), a Hugging Face repo id or folder
    seeds: str = '0-63'                   # image k uses seed k, e.g. 0-49999 or 1,5,10-20
    class_idx: int = -1                   # generate only this class, -1 = a random class per seed
    subdirs: bool = False                 # one folder per 1000 seeds
    gen_path: str = ''                    # eval: images to evaluate (a folder of PNGs) instead of sampling
    ref: str = ''                         # eval: FID reference statistics (.npz or URL)
    ref_path: str = ''                    # eval: reference images (statistics computed from them) instead of --ref
    num: int = 50_000                     # eval: number of samples drawn from --network
    metrics: str = ''                     # eval: comma list of fid.METRICS; '' = fid (and is with --gen_path)
    protocol: str = ''                    # eval: edm, adm or pytorch-fid (fid.PROTOCOLS); '' = the reference's
    preprocess: str = ''                  # eval: Inception preprocessing tf or pytorch-fid; '' = the protocol's
    fid_weights: str = ''                 # eval: Inception weights file, '' = $FID_WEIGHTS or the cache
    out_path: str = ''                    # eval: results JSON; '' = metrics.jsonl by the network, or fid_out.json


# Dataset recipes. cifar10 is ambient-laws' train.py default (= EDM's unconditional CIFAR-10 DDPM++). The repo gives
# no CelebA / ImageNet command; the paper's clean FIDs (2.40, 1.41) match EDM's 64x64 DDPM++ and ImageNet-64 ADM
# recipes (EDM README), which are used here; nets.py's 'adm-celeba64' has EDM's ImageNet-64 DhariwalUNet layout
# (192 channels, 1-2-3-4, 3 blocks, attention at 32/16/8). The sampler settings only draw the training grids.
PRESETS = {
    'cifar10': dict(arch='ddpmpp', cond=False, batch=512, lr=1e-3, dropout=0.13, augment=0.12,
                    kimg=200_000, ema_halflife_kimg=500),
    'celeba64': dict(arch='ddpmpp-64', cond=False, batch=256, lr=2e-4, dropout=0.05, augment=0.15, cres='1,2,2,2',
                     kimg=200_000, ema_halflife_kimg=500, steps=40),
    'imagenet64': dict(arch='adm', cond=True, batch=4096, lr=1e-4, dropout=0.10, augment=0.0,
                       kimg=2_500_000, ema_halflife_kimg=50_000, tick=200, steps=256, S_churn=40, S_min=0.05,
                       S_max=50, S_noise=1.003),
    'tiny': dict(arch='tiny', cond=False, batch=16, lr=1e-3, dropout=0.0, augment=0.12, kimg=0.5, lr_rampup_kimg=0.25,
                 ema_halflife_kimg=0.1, tick=0.1, snap=5, dump=5, grid=16, steps=8, workers=1),
}
# Official --arch values as nets.UNet kwargs: EDM train.py's SongUNet DDPM++ and DhariwalUNet (ADM as EDM re-implements
# it: FiLM, resampling ResBlocks, 64 channels per head, legacy attention order, GroupNorm groups of >= 4 channels).
ARCHES = {'ddpmpp': nets.UNET_PRESETS['ddpmpp-cifar10'],
          'adm': dict(arch='adm', model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
                      attn_resolutions=(32, 16, 8), num_head_channels=64, use_scale_shift_norm=True,
                      resblock_updown=True, use_new_attention_order=False, norm_min_group_size=4)}
COMMANDS = {'train': 'train a model on a mix of clean and noisy images (the default command)',
            'generate': 'one PNG per seed from a network (ours, an EDM .pkl or a Hugging Face checkpoint)',
            'eval': "FID (and IS, ...) of a network's samples, drawn in memory, or of a folder of images (--gen_path)"}

# The flags of each command, in the argument groups --help shows (titles and order shared by the four scripts).
SAMPLING = ['steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise', 'stop_variance']
GROUPS = {
    'train': {
        'data and corruption': ['data', 'cond', 'num_classes', 'xflip', 'sigma', 'corruption_probability',
                                'dataset_keep_percentage', 'noisy_count', 'noise_rng', 'corruption_seed',
                                'sigma_per_image', 'already_noisy', 'augment', 'cache'],
        'network': ['preset', 'arch', 'precond', 'cbase', 'cres', 'dropout', 'transfer'],
        'optimisation': ['P_mean', 'P_std', 'sigma_data', 'consistency_coeff', 'consistency_batch_size',
                         'consistency_rows', 'num_consistency_steps', 'num_primes', 'with_weight', 'with_grad', 'kimg',
                         'batch', 'batch_gpu', 'lr', 'lr_rampup_kimg', 'weight_decay', 'ema_halflife_kimg',
                         'ema_rampup_ratio', 'ls'],
        'run': ['outdir', 'desc', 'expr_id', 'nosubdir', 'tick', 'snap', 'dump', 'grid', 'seed', 'resume', 'precision',
                'fp16', 'bench', 'compile', 'workers', 'dry_run', 'device'],
        'sampling': SAMPLING},
    'generate': {'network': ['network'],
                 'run': ['outdir', 'seeds', 'subdirs', 'class_idx', 'batch', 'precision', 'device'],
                 'sampling': SAMPLING + ['solver', 'disc', 'schedule', 'scaling']},
    'eval': {'network': ['network'],
             'run': ['batch', 'precision', 'device', 'workers'],
             'sampling': SAMPLING,
             'evaluation': ['gen_path', 'ref', 'ref_path', 'num', 'metrics', 'protocol', 'preprocess', 'fid_weights',
                            'out_path']},
}
# Official spellings: flag -> (our field, factor). --duration and --ema count Mimg, ours kimg (EDM train.py truncates
# them to whole kimg, so do we).
ALIASES = {'train': {'duration': ('kimg', 1000), 'ema': ('ema_halflife_kimg', 1000), 'batch-gpu': ('batch_gpu', 1),
                     'dry-run': ('dry_run', 1)},
           'generate': {'class': ('class_idx', 1)},
           'eval': {'ref_stats': ('ref', 1), 'batch_size': ('batch', 1)}}
CHOICES = {'noisy_count': ('random', 'exact'), 'noise_rng': ('numpy', 'device'),
           'consistency_rows': ('per_gpu', 'global'), 'precision': ('', 'fp32', 'bf16')}
# Official flags we refuse, with the reason and what to use instead.
REFUSED = {
    'solver': "EDM's ablation sampler is not implemented; use the default Heun sampler (generate.py's edm_sampler)",
    'disc': "EDM's ablation sampler is not implemented; use --steps, --sigma_min, --sigma_max and --rho (EDM's grid)",
    'schedule': "EDM's ablation sampler is not implemented; use the default sampler (EDM's sigma(t) = t)",
    'scaling': "EDM's ablation sampler is not implemented; use the default sampler (EDM's s(t) = 1)",
}
REFUSAL = '{} (official giannisdaras/ambient-laws flag) is not supported: {}'
COMMAND_DEFAULTS = {'generate': dict(batch=64, outdir=''), 'eval': dict(batch=64)}  # official generate / eval_fid
HELP = {('generate', 'batch'): 'most images per sampling batch on each GPU',
        ('generate', 'outdir'): 'the folder that receives the PNGs',
        ('eval', 'batch'): 'images per sampling and Inception batch'}


def fail(message, code=2):
    """One clear line on stderr (from one rank), `ambient_laws.py: error: ...`, and a non-zero exit: 2 for a bad
    flag or input, 1 for a failure while running."""
    if os.environ.get('RANK', '0') == '0':
        message = ' '.join(str(message).split())  # one line, even for multi-line library errors
        print(f'ambient_laws.py: error: {message[:600]}{"..." if len(message) > 600 else ""}', file=sys.stderr)
    sys.exit(code)


def parse_bool(text):
    if text.lower() not in ('1', 'true', 'yes', 'on', '0', 'false', 'no', 'off'):
        raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')
    return text.lower() in ('1', 'true', 'yes', 'on')


def print_overview():
    print('usage: ambient_laws.py [COMMAND] [--flag=value ...]\n'
          'How much is a noisy image worth? Data scaling laws for Ambient Diffusion (Daras, Cherapanamjeri, '
          'Daskalakis, ICLR 2025, arXiv:2411.02780).\ncommands:')
    for name, text in COMMANDS.items():
        print(f'  {name:<9} {text}')
    print("Run 'python ambient_laws.py COMMAND --help' for the flags of a command.")


@functools.lru_cache(maxsize=None)
def flag_texts():
    """{field: its help text}, from the comments of Config."""
    return dict(re.findall(r'^    (\w+): \w+ = .*?# (.*)$', inspect.getsource(Config), re.M))


def build_parser(command):
    """The argparse parser of one command: flags in GROUPS order, each help ending in its default and naming the
    official flag where ours differs. No prefix matching."""
    parser = argparse.ArgumentParser(prog=f'ambient_laws.py {command}', allow_abbrev=False, add_help=False,
                                     usage=f'ambient_laws.py {command} [--flag=value ...]',
                                     description=COMMANDS[command])
    parser.error = fail  # bad flags: one error line and exit code 2
    fields = {field.name: field for field in dataclasses.fields(Config)}
    texts = flag_texts()
    defaults = {**{name: field.default for name, field in fields.items()}, **COMMAND_DEFAULTS.get(command, {})}
    official = {name: f'--{alias}' + (' (Mimg)' if scale == 1000 else '')
                for alias, (name, scale) in ALIASES[command].items() if alias != 'class'}
    official['dry_run'] = '-n, --dry-run'
    for title, names in GROUPS[command].items():
        group = parser.add_argument_group(title, 'the sampler of the training grids only' if
                                          (command, title) == ('train', 'sampling') else None)
        for name in names:
            if name in REFUSED:
                group.add_argument(f'--{name}', dest=f'refused_{name}', metavar='VALUE',
                                   help=f'official generate.py flag, refused: {REFUSED[name]} (default: none)')
                continue
            kind, default = fields[name].type, defaults[name]
            shown = 'random' if name == 'seed' else 'none' if default == '' else default
            text = HELP.get((command, name), texts[name]).replace('%', '%%')
            text += f'; official: {official[name]}' if name in official else ''
            text += ' (required)' if (name, command) in (('data', 'train'), ('network', 'generate'),
                                                          ('outdir', 'generate')) else f' (default: {shown})'
            flag = '--class' if name == 'class_idx' else f'--{name}'  # the official spelling
            if kind is bool:  # --flag and --flag=true both work
                group.add_argument(flag, dest=name, type=parse_bool, nargs='?', const=True, metavar='BOOL', help=text)
            else:
                group.add_argument(flag, dest=name, type=kind, metavar=kind.__name__.upper(), help=text,
                                   choices=CHOICES.get(name))
        if title == 'run':
            group.add_argument('-h', '--help', action='help', help='show this help and exit')
    for alias, (name, scale) in ALIASES[command].items():
        if alias != 'class':
            boolean = fields[name].type is bool
            parser.add_argument(f'--{alias}', dest=f'alias_{name}', help=argparse.SUPPRESS,
                                type=parse_bool if boolean else fields[name].type if scale == 1 else float,
                                **(dict(nargs='?', const=True) if boolean else {}))
    if command == 'train':
        parser.add_argument('-n', dest='alias_dry_run', action='store_const', const=True, help=argparse.SUPPRESS)
    return parser


def parse_args(argv):
    """(command, {field: value} of the flags given on the command line). `python ambient_laws.py --help` prints the
    commands; `COMMAND --help` the flags of one."""
    argv = list(argv)
    if argv[:1] in (['-h'], ['--help']):
        print_overview()
        sys.exit(0)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else 'train'
    given = {k: v for k, v in vars(build_parser(command).parse_args(argv)).items() if v is not None}
    for name in [k for k in given if k.startswith('refused_')]:
        flag = name[len('refused_'):]
        fail(REFUSAL.format(f'--{flag}', REFUSED[flag]))
    for alias, (name, scale) in ALIASES[command].items():
        if f'alias_{name}' in given:
            value = given.pop(f'alias_{name}')
            if scale != 1:  # EDM train.py: max(int(duration * 1000), 1) and int(ema * 1000)
                value = max(int(value * scale), 1) if name == 'kimg' else int(value * scale)
            given[name] = value
    return command, given


def resolve_config(given):
    """Preset values, then the explicit flags; every range checked before anything is written."""
    preset = given.get('preset', Config.preset)
    if preset not in PRESETS:
        fail(f'--preset must be one of {", ".join(PRESETS)}, not {preset!r}')
    cfg = Config(**{**PRESETS[preset], **given})
    official_seeded = cfg.noisy_count == 'random' and cfg.noise_rng == 'numpy' and not cfg.sigma_per_image
    checks = [
        (cfg.sigma >= 0, '--sigma must be >= 0'),
        (0 <= cfg.corruption_probability <= 1, '--corruption_probability must be in [0, 1]'),
        (0 < cfg.dataset_keep_percentage <= 1, '--dataset_keep_percentage must be in (0, 1]'),
        (cfg.num_classes >= 0, '--num_classes must be >= 0'),
        (not cfg.sigma_per_image or (cfg.sigma == 0 and cfg.corruption_probability == 0),
         '--sigma_per_image replaces --sigma and --corruption_probability: leave those at 0'),
        (not cfg.already_noisy or cfg.sigma_per_image or cfg.corruption_probability == 1,
         '--already_noisy needs --sigma_per_image or --corruption_probability=1'),
        (not official_seeded or cfg.corruption_seed == 0, '--corruption_seed needs --noisy_count=exact or '
         '--noise_rng=device (the official data set is seeded by the image index alone)'),
        (cfg.cache, REFUSAL.format('--cache=false', 'the data set is always held in memory (as uint8, on the GPU '
                                   'when it fits); use --cache=true')),
        (not cfg.fp16, REFUSAL.format('--fp16=true', 'FP16 networks are not implemented; use --precision=bf16')),
        (cfg.precond == 'edm', REFUSAL.format(f'--precond={cfg.precond}', 'the official train.py asserts edm too; '
                                              'use --precond=edm')),
        (cfg.arch != 'ncsnpp', REFUSAL.format('--arch=ncsnpp', 'nets.UNet has no NCSN++ (Fourier embedding, residual '
                                              'encoder); use --arch=ddpmpp')),
        (cfg.consistency_coeff >= 0, '--consistency_coeff must be >= 0'),
        (cfg.consistency_batch_size >= 1 and cfg.num_primes >= 1, '--consistency_batch_size and --num_primes >= 1'),
        (cfg.num_consistency_steps >= 2, '--num_consistency_steps must be >= 2'),
        (cfg.arch in ARCHES or cfg.arch in nets.UNET_PRESETS, f'--arch must be ddpmpp or adm (official) or one of '
         f'{", ".join(nets.UNET_PRESETS)}'),
        (re.fullmatch(r'(\d+,)*\d+|', cfg.cres) is not None, '--cres must look like 1,2,2,2'),
        (0 <= cfg.dropout <= 1, '--dropout must be in [0, 1]'),
        (0 <= cfg.augment <= 1, '--augment must be in [0, 1]'),
        (cfg.kimg > 0 and cfg.tick > 0 and cfg.snap >= 1 and cfg.dump >= 1 and cfg.grid >= 1,
         '--kimg, --tick > 0, --snap, --dump, --grid >= 1'),
        (cfg.batch >= 1 and cfg.batch_gpu >= 0, '--batch must be >= 1 and --batch_gpu >= 0'),
        (cfg.lr > 0 and cfg.lr_rampup_kimg >= 0 and cfg.weight_decay >= 0, '--lr must be > 0, ramp-up and decay >= 0'),
        (cfg.ema_halflife_kimg >= 0 and cfg.ema_rampup_ratio >= 0, '--ema_halflife_kimg must be >= 0'),
        (cfg.ls > 0, '--ls must be > 0'),
        (cfg.steps >= 1 and 0 < cfg.sigma_min < cfg.sigma_max and cfg.rho > 0, 'need --steps >= 1 and '
         '0 < --sigma_min < --sigma_max, --rho > 0'),
        (cfg.S_churn >= 0 and cfg.S_min >= 0 and cfg.S_max >= 0 and cfg.stop_variance >= 0,
         '--S_churn, --S_min, --S_max and --stop_variance must be >= 0'),
        (cfg.workers >= 1 and cfg.num >= 2, '--workers must be >= 1 and --num >= 2'),
        (not (cfg.resume and cfg.transfer), '--resume and --transfer cannot be used together'),
        (cfg.seed >= -1, '--seed must be >= 0 (or -1 = random)'),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)
    return cfg


def check_writable(path, flag):
    """Fail (exit 2) before any work when `path` cannot be created or written."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        fail(f'{flag}: cannot write {path} ({probe} is {"not a folder" if not os.path.isdir(probe) else "read-only"})')


# ----------------------------------------------------------------------------------------------------------------------
# Data: loading, the fixed clean/noisy split, augmentation

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.ppm', '.tif', '.tiff')


def atomic_write(path, write):
    """write(file) into `path`.tmp, then rename: an interrupted write never leaves half a file, and a failed one
    leaves no .tmp behind (a killed one leaves `path`.tmp, which remove_partial_files deletes on the next start).
    Any failure (a full disk, a read-only folder) becomes one OSError that names the file."""
    tmp = f'{path}.tmp'
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        cause = error.strerror if isinstance(error, OSError) and error.strerror else str(error).split('\n')[0]
        raise OSError(getattr(error, 'errno', None), f'cannot write {path}: {cause}') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_partial_files(folder):
    """Delete the *.tmp files an interrupted atomic_write left in folder (run at the start of every run that writes
    into an existing folder)."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith('.tmp'):
            os.remove(os.path.join(folder, name))


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
        try:
            with np.load(path) as data:
                x, y = (data['x'] if 'x' in data else None), (data['y'] if 'y' in data else None)
        except Exception as error:
            raise ValueError(f'--data: cannot read {path} ({type(error).__name__}: {error})') from None
        if x is None or x.dtype != np.uint8 or x.ndim not in (3, 4):
            raise ValueError(f'--data: {path}: expected `x` as (N, H, W, C) or (N, H, W) uint8')
        if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
            raise ValueError(f'--data: {path}: `x` is {x.shape}, channels first; expected (N, H, W, C): transpose it')
        return (x if x.ndim == 4 else x[..., None]), y
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


def official_draws(raw_idx, shape, with_noise=True):
    """The random draws of one image in ambient_utils' ImageFolderDataset.__getitem__ (dataset_utils.py), bit for
    bit: NumPy's legacy generator seeded with the image's raw index draws a per-pixel Bernoulli mask (train.py sets
    its probability to 1; the mask is not used), then u ~ U[0, 1): the image is clean iff u > p (ambient_utils
    2fe0e13 on; before it, p was the clean fraction); then, for a noisy image, eps ~ N(0, I) in float64. Returns
    (u, eps or None); shape is (C, H, W)."""
    rng = np.random.RandomState(int(raw_idx))
    rng.binomial(1, 1.0, size=shape)
    u = rng.rand()
    return u, (rng.normal(size=shape) if with_noise else None)


def official_noisy(raw_index, shape, corruption_probability, pool):
    """bool (n,): which kept images are noisy in the official data set, each with probability p, seeded by its
    raw index (so the noisy set does not depend on --dataset_keep_percentage, the seed or the GPU count)."""
    u = np.array(list(pool.map(lambda i: official_draws(i, shape, with_noise=False)[0], raw_index)))
    return u <= corruption_probability


def exact_noisy(raw_index, num_images, corruption_probability, seed):
    """bool (n,) for --noisy_count=exact: exactly round(p n) of the n kept images are noisy, the ones with the
    lowest seeded priority, so noisy sets are nested across p (the official count is Binomial(n, p))."""
    priority = torch.rand(num_images, generator=torch.Generator().manual_seed(seed))[torch.as_tensor(raw_index)]
    noisy = np.zeros(len(raw_index), bool)
    noisy[priority.argsort()[:int(corruption_probability * len(raw_index) + 0.5)].numpy()] = True
    return noisy


def numpy_noise(raw_index, sigma_n, shape, pool):
    """float64 (n, C, H, W): the official noise eps of each image whose sigma_n > 0 (NumPy seeded by its raw index,
    official_draws), zeros for the clean ones. Drawn on the host by the worker threads."""
    noise = np.zeros((len(raw_index), *shape))
    noisy = np.flatnonzero(sigma_n > 0)
    for k, eps in zip(noisy, pool.map(lambda i: official_draws(i, shape)[1], raw_index[noisy])):
        noise[k] = eps
    return torch.from_numpy(noise)


def _hash32(x):
    """lowbias32 integer hash (C. Wellons) of int64 tensors holding 32-bit values. Products are split in 16-bit halves
    so no int64 product overflows."""
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = x ^ (x >> shift)
        x = (x * (multiplier & 0xFFFF) + (((x * (multiplier >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF
    return x ^ (x >> 16)


def image_noise(raw_index, shape, seed):
    """eps ~ N(0, I), (B, *shape), a pure function of (seed, image index) for --noise_rng=device: counter-based
    (hash + Box-Muller), so each image keeps the same noise in every epoch and run, drawn on the GPU with no host
    work. Same law as the official NumPy noise (numpy_noise), other numbers."""
    half = (math.prod(shape) + 1) // 2
    seed_key = int(_hash32(torch.tensor(seed % 2 ** 32)))                                           # on the host
    key = _hash32((raw_index.long() + seed_key) & 0xFFFFFFFF)                                        # (B,)
    bits = _hash32(key[:, None] ^ _hash32(torch.arange(2 * half, device=raw_index.device)))         # (B, 2 half)
    u = ((bits >> 8).float() + 0.5) / 2 ** 24                                                        # in (0, 1)
    radius, angle = (-2 * u[:, :half].log()).sqrt(), 2 * math.pi * u[:, half:]
    eps = torch.cat([radius * angle.cos(), radius * angle.sin()], dim=1)[:, :math.prod(shape)]
    return eps.reshape(-1, *shape)                                                                   # (B, *shape)


def observe(images, sigma_n, eps=None):
    """The training images as the method sees them, y = x0 + sigma_n eps (the noisy observation of
    arXiv:2411.02780 Sec. 2; VE noise, no clipping): uint8 (B, C, H, W) -> x0 in [-1, 1] (float32), plus sigma_n
    (B,) times the noise eps (B, C, H, W), None = clean. The sum is taken in float64 and rounded once to float32, as
    the official NumPy code does (float32 image += float sigma * float64 noise), so the observed images equal the
    official ones bit for bit."""
    x0 = images.float() / 127.5 - 1
    if eps is None:
        return x0
    return (x0.double() + sigma_n.double().view(-1, 1, 1, 1) * eps.double()).float()


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

    def __init__(self, unet, sigma_data=0.5, sigma_min=0.0, sigma_max=float('inf')):
        super().__init__()
        self.unet, self.sigma_data = unet, sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max  # supported levels; the sampler stays inside them

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
    ambient-laws training/loss.py EDMLoss computes it: the objective of arXiv:2411.02780 Sec. 2 (ambient diffusion
    with Gaussian noise, from "Consistent Diffusion Meets Tweedie", Daras, Dimakis, Daskalakis, ICML 2024),
    E || (1 - sigma_n^2/sigma^2) D(x_t, sigma) + (sigma_n^2/sigma^2) x_t - y ||^2 over sigma > sigma_n, with EDM's
    weight lambda(sigma) and log-normal sigma. With sigma_n = 0 it is EDM's loss (EDM Eq. 2, Table 1).

    net(x, sigma, labels) -> D, an estimate of E[x0 | x]; y (B, C, H, W) the (augmented) observed images; sigma_n (B,);
    rnd_normal (B,) and eps (B, C, H, W) standard normal draws, passed in so the caller owns all randomness.
    Returns the per-pixel loss (B, C, H, W), x_t (B, C, H, W), sigma (B, 1, 1, 1) and D(x_t, sigma).

    sigma = max(exp(P_mean + P_std n), sigma_n): a clamp, not a resample, as the official code. A clamped noisy sample
    has x_t = y and a loss of exactly 0 (no gradient): it is drawn but wasted, about 37% of noisy samples at
    sigma_n = 0.2. The minimiser over D is E[x0 | x_t] at every sigma > sigma_n (Tweedie applied twice, ibid.).
    The official code computes x_t, the Tweedie map and the weight in float64 (its data loader hands sigma_n over as
    float64; the network still sees float32); here they keep the inputs' dtype (float32 in training).
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
    no Heun correction, no step to 0. x (N, C, H, W); sigma_start, sigma_end (N, 1, 1, 1); z (steps - 1, N, C, H, W).
    The official steps run in float64 (its x_t and grid are float64, see ambient_loss); here x keeps its dtype."""
    fraction = torch.linspace(0, 1, z.shape[0] + 1, device=x.device).view(-1, 1, 1, 1, 1)
    t = (sigma_start ** (1 / rho) + fraction * (sigma_end ** (1 / rho) - sigma_start ** (1 / rho))) ** rho
    for j in range(z.shape[0]):                                                            # t: (steps, N, 1, 1, 1)
        d = (x - net(x, t[j], class_labels)) / t[j]
        x = x + 2 * (t[j + 1] - t[j]) * d + (2 * (t[j] - t[j + 1]).abs() * t[j]).sqrt() * z[j]
    return x


def consistency_loss(net, x_t, sigma, x0_pred, rnd_normal, z, num_rows, class_labels=None, P_mean=-1.2, P_std=1.2,
                     sigma_data=0.5, with_weight=False, with_grad=True):
    """The consistency term, whole (official training/loss.py EDMLoss; the consistency objective of Daras, Dimakis,
    Daskalakis, "Consistent Diffusion Meets Tweedie", ICML 2024, which arXiv:2411.02780 Sec. 2 uses for the levels
    below sigma_n): D(x_t, sigma) must equal the mean of D(x_t', sigma') over K reverse-SDE samples x_t' at the lower
    level sigma', which teaches the levels that noisy images cannot.

    Inside, as the official code: the target level sigma' = min(exp(P_mean + P_std rnd_normal), sigma), the raw draw
    of ambient_loss before its clamp to sigma_n (so only noisy rows whose draw fell below sigma_n move: the others
    make zero-length steps and get 0); the rows, the first num_rows of the microbatch; the weight lambda(sigma) when
    with_weight. x_t, x0_pred = D(x_t, sigma) (B, C, H, W), sigma (B, 1, 1, 1) and rnd_normal (B,) from ambient_loss;
    z (steps - 1, num_rows K, C, H, W) the reverse-SDE noise. Returns (B, C, H, W): the per-pixel term on the first
    num_rows rows, 0 on the rest, for the caller to add (times consistency_coeff) to the loss. Costs K (steps - 1) + K
    extra network passes per row, backpropagated through when with_grad (official default)."""
    B, m = x_t.shape[0], num_rows
    K = z.shape[1] // max(m, 1)
    sigma_prime = (rnd_normal[:m].reshape(-1, 1, 1, 1) * P_std + P_mean).exp().minimum(sigma[:m])  # (m, 1, 1, 1)
    repeat = lambda v: None if v is None else v[:m].repeat_interleave(K, dim=0)  # noqa: E731
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        x_prime = reverse_sde(net, repeat(x_t), repeat(sigma), repeat(sigma_prime), z, repeat(class_labels))
    x0_prime = net(x_prime, repeat(sigma_prime), repeat(class_labels))                     # (m K, C, H, W)
    term = (x0_prime.reshape(m, K, *x_t.shape[1:]).mean(dim=1) - x0_pred[:m]) ** 2          # (m, C, H, W)
    if with_weight:
        term = term * edm_weight(sigma[:m], sigma_data)
    return torch.cat([term, term.new_zeros(B - m, *term.shape[1:])])                        # (B, C, H, W)


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
        x = edm_sampler(net, latents, labels, cfg.steps, max(cfg.sigma_min, getattr(net, 'sigma_min', 0.0)),
                        min(cfg.sigma_max, getattr(net, 'sigma_max', float('inf'))), cfg.rho, cfg.S_churn,
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
    kwargs = {**(ARCHES.get(cfg.arch) or nets.UNET_PRESETS[cfg.arch]), 'img_resolution': resolution,
              'in_channels': channels, 'out_channels': channels, 'label_dim': label_dim, 'dropout': cfg.dropout,
              'augment_dim': 9 if cfg.augment > 0 else 0}  # EDM conditions both on the 9 augmentation labels
    if cfg.cbase:
        kwargs['model_channels'] = cfg.cbase
    if cfg.cres:
        kwargs['channel_mult'] = tuple(int(c) for c in cfg.cres.split(','))
    return EDMPrecond(nets.UNet(**kwargs), cfg.sigma_data), kwargs


def read_checkpoint(path, flag, kind):
    """Our network snapshot (kind 'snapshot': ema + net_kwargs) or training state (kind 'state') as a dict; any
    other file (missing, empty, another program's, the wrong kind) fails with one line naming it and the cause."""
    if not os.path.isfile(path):
        fail(f'{flag}: {path} does not exist')
    if os.path.getsize(path) == 0:
        fail(f'{flag}: {path} is empty (0 bytes, a write that was cut short): pass another file')
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        cause = (str(error).strip().splitlines() or [''])[0]
        fail(f'{flag}: {path} is not a checkpoint written by ambient_laws.py ({type(error).__name__}: {cause})')
    need = ('ema', 'net_kwargs') + (('net', 'optimizer', 'cur_nimg', 'cur_tick', 'config') if kind == 'state' else ())
    missing = [key for key in need if not isinstance(data, dict) or key not in data]
    if missing:
        hint = (f': it is a network snapshot, not a training state; pass training-state-*.pt, or --transfer={path} '
                f'to start from its weights' if kind == 'state' and not missing[0:1] == ['ema'] else '')
        fail(f'{flag}: {path} has no {", ".join(missing)}{hint}')
    return data


def load_network(source, device, flag='--network'):
    """(EDMPrecond in eval mode, config dict) from our network-snapshot-*.pt (or training-state-*.pt), or from a
    released checkpoint through nets.load_edm_network: an EDM-style network-snapshot-*.pkl (path or URL, read
    without running the code it embeds), a Hugging Face repo id (giannisdaras/ambient_laws_*), hf:// path or local
    folder with config.json + model.safetensors; SongUNet and DhariwalUNet weights are mapped onto nets.UNet."""
    source = os.fspath(source)
    if os.path.isfile(source) and not source.endswith('.pkl'):
        data = read_checkpoint(source, flag, 'snapshot')
        net = EDMPrecond(nets.UNet(**data['net_kwargs']), data.get('config', {}).get('sigma_data', 0.5))
        try:
            net.load_state_dict(data['ema'])
        except RuntimeError as error:
            fail(f'{flag}: {source}: the weights do not fit its net_kwargs ({str(error).splitlines()[0]})')
        config = data.get('config', {})
    else:
        try:
            unet, info = nets.load_edm_network(source)
        except (ValueError, OSError, RuntimeError, KeyError) as error:  # nets.WeightsNotFoundError is a RuntimeError
            fail(f'{flag}: cannot load {source}: {error}')
        if info.get('precond') != 'EDMPrecond' or info.get('gated'):
            fail(f'{flag}: {source} holds a {"gated " if info.get("gated") else ""}{info.get("precond")} network; '
                 f'ambient_laws.py samples EDMPrecond networks (as ambient-laws trains them)')
        kwargs = info.get('precond_kwargs') or {}
        net = EDMPrecond(unet, kwargs.get('sigma_data', 0.5), kwargs.get('sigma_min', 0.0),
                         kwargs.get('sigma_max', float('inf')))
        config = dict(sigma_data=net.sigma_data, format=info.get('format'),
                      training_options=info.get('training_options'))
    cuda = torch.device(device).type == 'cuda'  # NHWC convolutions on tensor cores
    net.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    return net.eval().requires_grad_(False), config


def find_run(cfg, desc):
    """(run folder, training state or None). --resume=PATH continues in PATH's folder. --resume=auto continues the
    newest run folder named NNNNN-desc (--nosubdir: --outdir itself) from its latest training state, or reuses it
    from the start when it holds none yet (a run killed before its first state). Otherwise a new numbered folder."""
    if cfg.resume and cfg.resume != 'auto':
        if not re.fullmatch(r'training-state-\d+\.pt', os.path.basename(cfg.resume)) and os.path.isfile(cfg.resume):
            fail(f'--resume must point to training-state-*.pt (or be auto), not {cfg.resume}')
        return os.path.dirname(cfg.resume) or '.', cfg.resume
    existing = sorted(d for d in os.listdir(cfg.outdir) if re.fullmatch(rf'\d{{5}}-{re.escape(desc)}', d)) \
        if os.path.isdir(cfg.outdir) else []
    if cfg.resume == 'auto' and (cfg.nosubdir or existing):
        run_dir = cfg.outdir if cfg.nosubdir else os.path.join(cfg.outdir, existing[-1])
        states = sorted(f for f in (os.listdir(run_dir) if os.path.isdir(run_dir) else [])
                        if re.fullmatch(r'training-state-\d+\.pt', f))
        return run_dir, (os.path.join(run_dir, states[-1]) if states else None)
    if cfg.nosubdir:
        return cfg.outdir, None
    names = os.listdir(cfg.outdir) if os.path.isdir(cfg.outdir) else []
    taken = [int(d[:5]) for d in names if re.match(r'\d{5}-', d)]
    return os.path.join(cfg.outdir, f'{max(taken, default=-1) + 1:05d}-{desc}'), None


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


def class_count(cfg, num_images, y):
    """The number of classes of a --cond run; labels must lie in [0, num_classes), with num_classes from
    --num_classes, else dense labels 0..K-1 (class folders are; dataset.json or an npz `y` must be)."""
    if y is None:
        fail('--cond=true needs labels (dataset.json, class folders or `y` in the .npz)')
    y = np.asarray(y)
    if y.shape != (num_images,) or y.dtype.kind not in 'iu':
        fail(f'--data: {cfg.data}: labels must be {num_images} integer class ids, got {y.dtype} {y.shape}')
    if y.min() < 0 or (cfg.num_classes and y.max() >= cfg.num_classes):
        bad = y.min() if y.min() < 0 else y.max()
        fail(f'--data: {cfg.data}: label {bad} is outside [0, {cfg.num_classes or "num_classes"})')
    if cfg.num_classes:
        return cfg.num_classes
    distinct = len(np.unique(y))
    if y.max() + 1 != distinct:
        fail(f'--data: {cfg.data}: labels are not 0..K-1 (largest {y.max()}, {distinct} distinct classes): pass '
             f'--num_classes to declare the class count')
    return int(y.max()) + 1


def prepare_data(cfg, log, pool):
    """The kept images (n, C, H, W) uint8 (their x-flipped copies appended with --xflip), labels (n,), sigma_n (n,)
    float64, raw indices (n,) (the images' indices in the data set: the keys of their noise; a flipped copy keeps its
    image's) and the class count. Which images are noisy follows ambient_utils' dataset unless --noisy_count=exact."""
    try:
        x, y = load_dataset(cfg.data, cfg.workers)
    except (ValueError, OSError) as error:
        fail(str(error))
    if x.shape[1] != x.shape[2]:
        fail(f'--data: {cfg.data}: images must be square, got height {x.shape[1]} x width {x.shape[2]}')
    label_dim = class_count(cfg, len(x), y) if cfg.cond else 0
    # Official quirk: train.py sets max_size = int(len(dataset) * keep) with len counting the x-flipped copies, then
    # applies it before xflip, so with --xflip twice the fraction is kept (all images once keep >= 0.5).
    raw_index = keep_subset(len(x), cfg.dataset_keep_percentage * (2 if cfg.xflip else 1))
    if len(raw_index) == 0:
        fail('--dataset_keep_percentage keeps no image')
    shape = (x.shape[3], x.shape[1], x.shape[2])  # (C, H, W), the shape of the official per-pixel draws
    if cfg.sigma_per_image:
        try:
            levels = np.load(cfg.sigma_per_image).astype(np.float32).reshape(-1)
        except Exception as error:
            fail(f'--sigma_per_image: cannot read {cfg.sigma_per_image} ({type(error).__name__}: {error})')
        if len(levels) != len(x) or not np.all(np.isfinite(levels) & (levels >= 0)):
            fail(f'--sigma_per_image must hold {len(x)} finite values >= 0 (one per image), got {len(levels)}')
        sigma_n = levels[raw_index].astype(np.float64)
    else:
        p = cfg.corruption_probability
        if cfg.noisy_count == 'exact':
            noisy = exact_noisy(raw_index, len(x), p, cfg.corruption_seed)
        elif cfg.sigma == 0 or p in (0, 1):  # u <= p decides nothing here (u = 0 exactly has probability 2^-53)
            noisy = np.full(len(raw_index), p > 0)
        else:
            noisy = official_noisy(raw_index, shape, p, pool)
        sigma_n = np.where(noisy, cfg.sigma, 0.0)
    log(f'Data: {len(x)} images of {x.shape[1:]} -> {len(raw_index)} kept, {int((sigma_n > 0).sum())} noisy '
        f'(sigma_n {sigma_n.max():.3g}), labels {"used" if cfg.cond else "ignored"}'
        + (', x-flipped copies added' if cfg.xflip else ''))
    images = torch.from_numpy(x[raw_index]).permute(0, 3, 1, 2).contiguous()                # (n, C, H, W) uint8
    labels = torch.from_numpy(y[raw_index].astype(np.int64) if cfg.cond else np.zeros(len(raw_index), np.int64))
    if cfg.xflip:  # official: the flipped copy of an image draws with its raw index, so it keeps its noise unflipped
        images, labels = torch.cat([images, images.flip(3)]), labels.repeat(2)
        raw_index, sigma_n = np.tile(raw_index, 2), np.tile(sigma_n, 2)
    return images, labels, sigma_n, raw_index, label_dim


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


def consistency_rows(cfg, world, rounds, batch_gpu):
    """Global row ids (sorted) of the step's rows that get the consistency term, and per rank and round how many
    leading rows of its microbatch they are. Official (per_gpu): the first consistency_batch_size // GPUs rows of
    every microbatch (more rows with more GPUs or accumulation rounds); global: the first consistency_batch_size rows
    of the global batch, the same for any GPU count."""
    if cfg.consistency_coeff == 0:
        return torch.zeros(0, dtype=torch.long), [[0] * rounds for _ in range(world)]
    rows = [torch.arange(cfg.batch)[k::world].view(rounds, batch_gpu) for k in range(world)]
    if cfg.consistency_rows == 'per_gpu':
        counts = [[min(cfg.consistency_batch_size // world, batch_gpu)] * rounds for _ in range(world)]
    else:
        counts = [(r < cfg.consistency_batch_size).sum(1).tolist() for r in rows]  # a prefix of each microbatch
    ids = torch.cat([rows[k][r, :m] for k in range(world) for r, m in enumerate(counts[k])]).sort().values
    return ids, counts


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


def open_run(cfg, run_dir, state, transfer, net, ema, optimizer, rank, world):
    """Load the training state (weights, EMA, optimizer, progress) or the --transfer weights, then prepare the run
    folder (rank 0): partial files of an interrupted run removed, ticks logged after the resumed state forgotten,
    config.json and the script written. Returns (cur_nimg, cur_tick, ema_rampup_ratio)."""
    cur_nimg, cur_tick, transferred = 0, 0, transfer is not None
    try:
        if state is not None:
            net.load_state_dict(state['net'])
            ema.load_state_dict(state['ema'])
            optimizer.load_state_dict(state['optimizer'])
            cur_nimg, cur_tick, transferred = state['cur_nimg'], state['cur_tick'], state.get('transferred', False)
        elif transfer is not None:  # official: the snapshot's EMA tensors whose names match, into net and EMA
            net.load_state_dict(transfer, strict=False)
            ema.load_state_dict(transfer, strict=False)
    except (RuntimeError, ValueError, KeyError) as error:
        flag = '--resume' if state is not None else '--transfer'
        fail(f'{flag}: {cfg.resume or cfg.transfer} does not fit this network ({str(error).splitlines()[0]}): '
             f'pass the flags it was trained with (--arch, --cbase, --cres, --cond, ...)')
    ema_rampup_ratio = None if transferred else cfg.ema_rampup_ratio  # official: no EMA ramp-up after --transfer
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        remove_partial_files(run_dir)
        stats_path = os.path.join(run_dir, 'stats.jsonl')
        if os.path.exists(stats_path):  # forget ticks logged after the state we resume from (all, if none)
            with open(stats_path) as f:  # stop at a later tick, or at a line cut short by a kill
                kept = list(itertools.takewhile(
                    lambda line: line.endswith('\n') and json.loads(line)['kimg'] <= cur_nimg / 1000 + 1e-9, f))
            atomic_write(stats_path, lambda f: f.write(''.join(kept).encode()))
        provenance = dict(dataclasses.asdict(cfg), command=' '.join(sys.argv), torch=torch.__version__,
                          world_size=world, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        atomic_write(os.path.join(run_dir, 'config.json'), lambda f: f.write(json.dumps(provenance, indent=2).encode()))
        code = pathlib.Path(__file__).read_bytes()  # the exact code of this run
        atomic_write(os.path.join(run_dir, os.path.basename(__file__)), lambda f: f.write(code))
    return cur_nimg, cur_tick, ema_rampup_ratio


def train(cfg):
    rank, world, device = init_distributed(cfg.device)
    log = Logger(rank)
    cuda = device.type == 'cuda'
    batch_gpu_total = cfg.batch // world
    batch_gpu = cfg.batch_gpu or batch_gpu_total
    if cfg.batch % (world * batch_gpu) or batch_gpu > batch_gpu_total:
        fail(f'--batch={cfg.batch} must be divisible by GPUs x --batch_gpu = {world} x {batch_gpu}')
    rounds = batch_gpu_total // batch_gpu

    # Every input check before any long work or any write: output folder, training state, transfer weights, seed.
    desc = (f'{os.path.splitext(os.path.basename(cfg.data.rstrip("/")))[0]}-{cfg.arch}-sigma{cfg.sigma:g}-'
            f'p{cfg.corruption_probability:g}-keep{cfg.dataset_keep_percentage:g}'
            + (f'-cc{cfg.consistency_coeff:g}' if cfg.consistency_coeff else '') + (f'-{cfg.desc}' if cfg.desc else ''))
    run_dir, state_path = find_run(cfg, desc)
    if not cfg.dry_run:
        check_writable(run_dir, '--outdir')
    state = read_checkpoint(state_path, '--resume', 'state') if state_path else None
    transfer = load_network(cfg.transfer, 'cpu', '--transfer')[0].state_dict() if cfg.transfer and not state else None
    if state is not None and cfg.seed == -1:
        cfg.seed = state['config']['seed']  # a resumed run keeps its (possibly random) seed
    if cfg.seed == -1:  # official default: a random seed, the same on every rank
        seed = torch.tensor(int.from_bytes(os.urandom(4), 'little') >> 1, device=device)
        if world > 1:
            dist.broadcast(seed, 0)
        cfg.seed = int(seed)

    # Performance settings.
    bf16 = (cfg.precision or ('bf16' if cuda else 'fp32')) == 'bf16'
    torch.backends.cuda.matmul.allow_tf32 = bf16          # TF32 with bf16; --precision=fp32 is the official fp32
    torch.backends.cudnn.allow_tf32 = bf16
    torch.backends.cudnn.benchmark = cfg.bench            # fixed shapes: let cuDNN pick its fastest kernels (official)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)  # bf16 convs, fp32 loss
    pool = concurrent.futures.ThreadPoolExecutor(cfg.workers)  # NumPy noise draws (NumPy releases the GIL)
    prefetch = concurrent.futures.ThreadPoolExecutor(1)       # the next step's noise, while this step runs

    # Data with its fixed clean/noisy split (rank 0 downloads first), as uint8 on the GPU when it fits.
    if world > 1 and rank != 0 and cfg.data == 'cifar10':
        dist.barrier()
    images, labels, sigma_host, raw_host, label_dim = prepare_data(cfg, log, pool)
    if world > 1 and rank == 0 and cfg.data == 'cifar10':
        dist.barrier()
    C, H, W = images.shape[1:]
    data_device = device if not cuda or images.numel() < 0.25 * torch.cuda.mem_get_info(device)[0] else 'cpu'
    images, labels = images.to(data_device), labels.to(data_device)
    sigma_n, raw_index = torch.from_numpy(sigma_host).to(data_device), torch.from_numpy(raw_host).to(data_device)
    add_noise = not cfg.already_noisy and bool(sigma_host.max() > 0)
    numpy_rng = add_noise and cfg.noise_rng == 'numpy'

    # Network, EMA, optimizer (Adam, official), run folder.
    torch.manual_seed(derive_seed(cfg.seed, 0))  # the same initial weights on every rank
    net, net_kwargs = build_network(cfg, H, C, label_dim)
    net.train().requires_grad_(True).to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    ema = copy.deepcopy(net).eval().requires_grad_(False)  # same weights and memory layout as net
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=cfg.weight_decay, fused=cuda)
    log(f'Network: {sum(p.numel() for p in net.parameters()):,} parameters ({cfg.arch}), '
        f'{"bf16" if bf16 else "fp32"}, {world} process(es), batch {cfg.batch} = {world} x {rounds} x {batch_gpu}')
    if cfg.dry_run:
        log(json.dumps(dataclasses.asdict(cfg), indent=2))
        log('Dry run; exiting.')
        return
    cur_nimg, cur_tick, ema_rampup_ratio = open_run(cfg, run_dir, state, transfer, net, ema, optimizer, rank, world)
    log.open(os.path.join(run_dir, 'log.txt'))
    log(f'{"Resuming from " + state_path if state else "Starting"} in {run_dir} at kimg {cur_nimg / 1000:g}, '
        f'seed {cfg.seed}')
    if rank == 0 and not os.path.exists(os.path.join(run_dir, 'dataset.png')):  # the data as the model sees it
        shown = np.arange(min(64, len(images)))
        eps = (numpy_noise(raw_host[shown], sigma_host[shown], (C, H, W), pool).to(data_device) if numpy_rng else
               image_noise(raw_index[shown], (C, H, W), cfg.corruption_seed) if add_noise else None)
        seen = observe(images[shown], sigma_n[shown], eps)
        save_grid(os.path.join(run_dir, 'dataset.png'), (seen * 127.5 + 128).clip(0, 255).to(torch.uint8))

    # DDP (several forward calls per backward, as the consistency loss makes, are fine: gradients reach each
    # parameter's accumulator once) and torch.compile.
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None) if world > 1 else net
    model = torch.compile(ddp) if cfg.compile else ddp
    # This rank's rows of the global batch, (rounds, batch_gpu), on the host and where they index; the consistency
    # rows of each microbatch (a prefix) and their slots in the step's consistency noise, known before training.
    my_rows = torch.arange(cfg.batch)[rank::world].view(rounds, batch_gpu)
    rows_device, rows_data = my_rows.to(device), my_rows.to(data_device)
    cons_ids, cons_counts = consistency_rows(cfg, world, rounds, batch_gpu)
    cons_slots = [torch.searchsorted(cons_ids, r[:m]).to(device) for r, m in zip(my_rows, cons_counts[rank])]

    def step_noise(nimg):  # the official noise of this rank's rows, (rounds, batch_gpu, C, H, W) float64, on the host
        positions = batch_indices(nimg, cfg.batch, len(images), cfg.seed)[my_rows].reshape(-1).numpy()
        eps = numpy_noise(raw_host[positions], sigma_host[positions], (C, H, W), pool)
        return (eps.pin_memory() if cuda else eps).view(rounds, batch_gpu, C, H, W)

    next_noise = prefetch.submit(step_noise, cur_nimg) if numpy_rng else None
    stats = torch.zeros(len(STATS), device=device)
    bins = torch.tensor(SIGMA_BINS, device=device)
    total_nimg = int(cfg.kimg * 1000)
    tick_start_nimg, tick_start_time, start_time = cur_nimg, time.time(), time.time()
    while True:
        step = cur_nimg // cfg.batch
        rnd_normal, eps, aug_u, aug_g, z = step_randomness(cfg, step, (C, H, W), len(cons_ids), device)
        torch.manual_seed(derive_seed(cfg.seed, 3, step, rank))  # dropout masks
        index = batch_indices(cur_nimg, cfg.batch, len(images), cfg.seed)
        index = (index.pin_memory() if cuda else index).to(data_device, non_blocking=True)  # no host sync
        if numpy_rng:
            noise = next_noise.result().to(device, non_blocking=True)
            next_noise = prefetch.submit(step_noise, cur_nimg + cfg.batch)

        # Accumulate gradients.
        optimizer.zero_grad(set_to_none=True)
        for round_idx, rows in enumerate(rows_device):
            i = index[rows_data[round_idx]]
            # The observed images (clean, or noisy with their fixed noise), augmented (in fp32) as the official code.
            y_sigma_n, y_labels = sigma_n[i].to(device), (labels[i].to(device) if cfg.cond else None)
            y_eps = (noise[round_idx] if numpy_rng else
                     image_noise(raw_index[i].to(device), (C, H, W), cfg.corruption_seed) if add_noise else None)
            y = observe(images[i].to(device, non_blocking=True), y_sigma_n, y_eps)
            y, aug_labels = augment(y, cfg.augment, aug_u[rows], aug_g[rows]) if cfg.augment > 0 else (y, None)
            y_sigma_n = y_sigma_n.float()
            with (contextlib.nullcontext() if round_idx == rounds - 1 or world == 1 else ddp.no_sync()), autocast:
                loss, x_t, sigma, x0_pred = ambient_loss(
                    functools.partial(model, augment_labels=aug_labels), y, y_sigma_n, rnd_normal[rows], eps[rows],
                    y_labels, cfg.P_mean, cfg.P_std, cfg.sigma_data)
                total = loss
                m = cons_counts[rank][round_idx]
                if m:  # like the official code, the consistency calls get no augmentation labels
                    cons = consistency_loss(model, x_t, sigma, x0_pred, rnd_normal[rows],
                                            z[:, cons_slots[round_idx]].flatten(1, 2), m, y_labels, cfg.P_mean,
                                            cfg.P_std, cfg.sigma_data, cfg.with_weight, cfg.with_grad)
                    total = loss + cfg.consistency_coeff * cons
                    stats[7:9] += torch.stack([cons[:m].detach().mean(dim=(1, 2, 3)).sum(), cons.new_full([], m)])
                # Sum over pixels, mean over the global batch (DDP averages over GPUs), times --ls, as EDM.
                total.sum().mul(cfg.ls / batch_gpu_total).backward()
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

        # Snapshot (EMA weights + how to rebuild them) and sample grid every --snap ticks, training state every
        # --dump ticks (official: not at tick 0) and at the end; all written atomically.
        tag = f'{cur_nimg // 1000:06d}'
        snapshot = dict(ema=ema.state_dict(), net_kwargs=net_kwargs, config=dataclasses.asdict(cfg), cur_nimg=cur_nimg)
        if (done or cur_tick % cfg.snap == 0) and rank == 0:
            atomic_write(os.path.join(run_dir, f'network-snapshot-{tag}.pt'), lambda f: torch.save(snapshot, f))
            save_grid(os.path.join(run_dir, f'samples-{tag}.png'),
                      sample_images(ema, list(range(cfg.grid)), device, cfg, autocast))
        if (done or (cur_tick % cfg.dump == 0 and cur_tick != 0)) and rank == 0:
            atomic_write(os.path.join(run_dir, f'training-state-{tag}.pt'), lambda f: torch.save(dict(
                snapshot, net=net.state_dict(), optimizer=optimizer.state_dict(), cur_tick=cur_tick + 1,
                transferred=ema_rampup_ratio is None), f))
        cur_tick += 1
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
        if done:
            break
    log('Done.')
    if next_noise is not None:
        next_noise.cancel()
    pool.shutdown(wait=True)
    prefetch.shutdown(wait=True)
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
    """'0-3,7' -> [0, 1, 2, 3, 7]; an empty or reversed range is an error."""
    seeds = []
    for part in text.split(','):
        match = re.fullmatch(r'(\d+)(?:-(\d+))?', part.strip())
        if not match:
            fail(f'--seeds must look like 0-49999 or 1,5,10-20, not {text!r}')
        if match[2] is not None and int(match[2]) < int(match[1]):
            fail(f'--seeds: the range {part.strip()} is reversed (empty); write {match[2]}-{match[1]}')
        seeds += range(int(match[1]), int(match[2] or match[1]) + 1)
    return seeds


def sampling_setup(given, default_batch):
    """Rank, device, the network and a config with the sampler settings: the official generate.py defaults (18 Heun
    steps, deterministic), overridden by the flags; not the snapshot's training-grid settings."""
    cfg = resolve_config({'batch': default_batch, **given})
    if not cfg.network:
        fail('--network is required: network-snapshot-*.pt, an EDM .pkl, or a Hugging Face repo id or folder')
    rank, world, device = init_distributed(cfg.device)
    net, _ = load_network(cfg.network, device)
    # Sampling runs in fp32 unless --precision=bf16 is given here (the official samplers run fp32 networks).
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision == 'bf16')
    if cfg.class_idx >= 0 and cfg.class_idx >= net.unet.label_dim:
        fail(f'--class must be < {net.unet.label_dim}' if net.unet.label_dim else
             '--class needs a class-conditional network; this one has no labels')
    return rank, world, device, net, cfg, autocast


def rank_batches(seeds, batch, rank, world):
    """This rank's batches of seeds (EDM generate.py): every rank gets the same number of batches."""
    num_batches = max((len(seeds) - 1) // (batch * world) + 1, 1) * world
    return [b.tolist() for b in torch.as_tensor(seeds).tensor_split(num_batches)[rank::world]]


def generate(given):
    """One PNG per seed; image k depends only on seed k (not on --batch or the number of GPUs)."""
    if not given.get('outdir'):
        fail('--outdir is required (the folder that receives the PNGs)')
    seeds = parse_seeds(given.get('seeds', Config.seeds))
    check_writable(given['outdir'], '--outdir')
    rank, world, device, net, cfg, autocast = sampling_setup(given, default_batch=COMMAND_DEFAULTS['generate']['batch'])
    outdir = cfg.outdir
    if rank == 0:  # partial PNGs of an interrupted run
        for folder in [outdir] + sorted(glob.glob(os.path.join(outdir, '[0-9]' * 6))):
            remove_partial_files(folder)
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
    """Metrics (fid.py, one Inception pass) of --num samples of --network drawn in memory (seeds 0..num-1), or of the
    images in --gen_path (official eval_fid.py). Prints them as JSON and appends them to metrics.jsonl beside the
    network (or writes --out_path; with --gen_path, fid_out.json with the official keys fid_score and
    inception_score). Every check (reference, protocol, weights, image count) runs before the long pass. --ref_path
    works here; the official eval_fid.py leaves ref_mu undefined with it."""
    cfg = resolve_config({'batch': COMMAND_DEFAULTS['eval']['batch'], **given})
    if bool(cfg.gen_path) == bool(cfg.network):
        fail('eval needs --network (sample from it) or --gen_path (a folder of images), not both')
    if bool(cfg.ref) == bool(cfg.ref_path):
        fail('eval needs --ref (official: --ref_stats; statistics .npz or URL) or --ref_path (reference images)')
    metrics = (cfg.metrics or ('fid,is' if cfg.gen_path else 'fid')).split(',')
    out_path = cfg.out_path or ('fid_out.json' if cfg.gen_path else '')
    metrics_folder = os.path.dirname(os.path.abspath(cfg.network)) if os.path.isfile(cfg.network) else '.'
    check_writable(out_path or metrics_folder, '--out_path' if out_path else 'metrics.jsonl beside --network')
    rank, world, device = init_distributed(cfg.device)
    try:
        ref = fid.load_ref(cfg.ref or cfg.ref_path)
        detector = fid.load_inception(cfg.fid_weights or None, device)
        source = fid.ImageSource(cfg.gen_path) if cfg.gen_path else None
        # eval_fid.py preprocesses as EDM (the TF Inception on uint8 images) and uses every image of the folder.
        preprocess = cfg.preprocess or ('tf' if cfg.gen_path and not cfg.protocol else None)
        num = len(source) if source is not None and 'num' not in given else cfg.num
        protocol = fid.resolve_protocol(cfg.protocol or None, preprocess, ref, metrics, detector, num=num,
                                        available=len(source) if source is not None else None)
    except (ValueError, OSError, RuntimeError) as error:  # nets/fid WeightsNotFoundError is a RuntimeError
        fail(str(error))
    if source is not None:
        indices = np.array_split(fid.select_images(len(source), protocol), world)[rank]
        batches = fid.image_batches(source, indices, cfg.batch, cfg.workers)
    else:
        _, _, _, net, cfg, autocast = sampling_setup({**given, 'batch': cfg.batch}, cfg.batch)
        batches = (sample_images(net, b, device, cfg, autocast)
                   for b in rank_batches(list(range(protocol['num'] or cfg.num)), cfg.batch, rank, world) if b)
    try:
        results = fid.compute_metrics(batches, ref, metrics=metrics, detector=detector, device=device,
                                      num_images=protocol['num'], protocol=protocol)
    except ValueError as error:  # found during the pass (an unreadable image, too few samples): a run failure
        fail(str(error), code=1)
    if rank == 0:
        result = dict(network=cfg.network, gen_path=cfg.gen_path, num=protocol['num'], steps=cfg.steps,
                      S_churn=cfg.S_churn, ref=cfg.ref or cfg.ref_path, **results)
        if cfg.gen_path:  # the keys of the official fid_out.json
            result.update(fid_score=results.get('fid'), inception_score=results.get('is'))
        print(json.dumps(result))
        if out_path:
            atomic_write(out_path, lambda f: f.write((json.dumps(result) + '\n').encode()))
        else:
            with open(os.path.join(metrics_folder, 'metrics.jsonl'), 'a') as f:
                f.write(json.dumps(result) + '\n')


def main(argv=None):
    command, given = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if command == 'train':
            cfg = resolve_config(given)
            if not cfg.data:
                fail('--data is required (image folder, zip, .npz or cifar10)')
            train(cfg)
        elif command == 'generate':
            generate(given)
        else:
            evaluate(given)
    except OSError as error:  # a failure while running (a full disk, a folder that became read-only): exit 1
        fail(str(error), code=1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
