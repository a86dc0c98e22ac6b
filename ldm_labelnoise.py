"""Slight corruption of conditions in pre-training, and conditional embedding perturbation (CEP).

Paper: "Slight Corruption in Pre-training Data Makes Better Diffusion Models", Hao Chen, Yujin Han, Diganta Misra,
Xiang Li, Kai Hu, Difan Zou, Masashi Sugiyama, Jindong Wang, Bhiksha Raj. NeurIPS 2024 (spotlight), arXiv 2405.20494.

What the method changes relative to plain conditional diffusion training:
  1. Condition corruption (Sec. 3.1): before training, a fraction eta of the samples get a wrong condition, fixed for
     the whole run: a label flipped to another class drawn by the class prior, or captions swapped between pairs.
     Slight corruption (eta <= 7.5%) gives better FID/IS/diversity than clean data; severe corruption hurts.
  2. CEP (Sec. 5, Eq. 8): instead of corrupting data, add fresh noise delta to the condition embedding c(y) at every
     training step, uniform on [-gamma/sqrt(d), gamma/sqrt(d)] (CEP-U) or Gaussian with std gamma/sqrt(d) (CEP-G),
     d the embedding width. Sampling is unchanged (no noise). Table 1: DiT-XL/2 FID 6.76 -> 5.51, LDM-4 9.44 -> 6.91.
  Everything else is a standard DDPM (T = 1000, eps-prediction, classifier-free guidance with a null condition
  dropped in with probability 0.1) on a DiT (label embedding in adaLN) or an LDM UNet (class or text embedding as
  cross-attention context), in pixel space or on cached VQ-f4 / KL-f8 latents. The official repository releases
  inference scripts only; this file is a training implementation written from the paper and the codebases it follows,
  which also samples the released models (diffusers pipelines, facebookresearch/DiT checkpoints).

Quick start (CPU, about a minute):
  python ldm_labelnoise.py --preset=tiny --data=tests/data/cifar10_tiny.npz --corruption_ratio=0.05 --cep=uniform
One GPU, CIFAR-10 in pixel space:
  python ldm_labelnoise.py --preset=cifar10 --data=cifar10 --corruption_ratio=0.025 --cep=gaussian
Eight GPUs, DiT-XL/2 on ImageNet latents (Table 1; latents are encoded once and cached):
  torchrun --standalone --nproc_per_node=8 ldm_labelnoise.py --preset=in1k-dit --data=imagenet/train --cep=uniform
  torchrun --standalone --nproc_per_node=8 ldm_labelnoise.py --preset=in1k-ldm --data=imagenet/train \\
      --corruption_ratio=0.025
  torchrun --standalone --nproc_per_node=8 ldm_labelnoise.py --preset=cc3m-ldm --data=cc3m --cep=uniform
Generation (one PNG per seed, class k % num_classes) and evaluation (FID, IS, sFID, precision/recall, 50k samples):
  torchrun --standalone --nproc_per_node=8 ldm_labelnoise.py generate --network=runs/00000-.../network-snapshot.pt \\
      --seeds=0-49999 --outdir=out --scheduler=dpm --scale=1.75
  python fid.py ref --data=imagenet/val --dest=in1k_val.npz
  torchrun --standalone --nproc_per_node=8 -- ldm_labelnoise.py eval --network=... --ref=in1k_val.npz --num=50000 \\
      --scheduler=dpm --scale=1.75   # the `--` keeps torchrun from reading --num as its own --numa-binding
Released models (a DiffusionNoise repo id, a diffusers folder, or facebookresearch/DiT's .pt under DiT's protocol):
  python ldm_labelnoise.py generate --pretrained_model_name_or_path DiffusionNoise/dit-xl-2_imagenet_clean \\
      --outdir out --ddim_steps 50 --scheduler dpm --batch_size 10 --n_samples 10 --scale 2.25 --fixed_code
  python ldm_labelnoise.py generate --network=DiT-XL-2-256x256.pt --seeds=0-63 --scheduler=ddpm --ddim_steps=250 \\
      --cfg_channels=dit --scale=4
Circular walk between two noises, one row per network (as the official visualisation scripts):
  python ldm_labelnoise.py walk --network=clean.pt,eta2.5.pt --classes=88,207 --walk_steps=20 --scale=7.5
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
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
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import requests
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fid
import nets

# ----------------------------------------------------------------------------------------------------------------------
# Configuration.

NUM_TIMESTEPS = 1000  # DDPM steps T (paper App. B.3, B.4)
TEXT_LENGTH = 77  # BERT max_length in the official text pipeline


@dataclasses.dataclass
class SamplerConfig:
    scheduler:          str   = 'ddim'       # ddim | dpm (DPM-Solver++ 2M, paper's evaluation) | ddpm (DiT ancestral)
    ddim_steps:         int   = 50           # sampling steps (DiT's protocol: --scheduler=ddpm --ddim_steps=250)
    ddim_eta:           float = 0.0          # DDIM stochasticity; 0 = deterministic
    scale:              float = 7.5          # guidance scale s of Eq. 2; 1 = plain conditional sampling
    cfg_channels:       str   = 'all'        # guided eps channels: all (diffusers pipelines) | dit (first 3, DiT)
    timestep_spacing:   str   = ''           # linspace | leading; '' = diffusers' own (dpm: linspace, ddim: leading)


@dataclasses.dataclass
class TrainConfig(SamplerConfig):
    # Data and conditions.
    data:               str   = ''           # image folder, EDM-style zip, .npz (x, y) or 'cifar10' (downloaded)
    cond:               str   = 'class'      # class labels, or text captions (CC3M setting, LDM backbone only)
    captions:           str   = ''           # file with one caption a line in image order; '' = captions.txt beside
    resolution:         int   = 0            # ADM center crop to this size (DiT train.py: 256); 0 = keep as is
    num_classes:        int   = 0            # labels lie in [0, num_classes); 0 = from the data (classes, folders)
    xflip:              bool  = False        # random horizontal flips (DiT train.py: on; LDM ImageNetTrain: off)
    # Condition corruption, fixed once before training (Sec. 3.1, App. B.1).
    corruption_ratio:   float = 0.0          # eta: fraction of samples with a wrong label or a swapped caption
    corruption_classes: str   = ''           # asymmetric: corrupt only within these class ids (Sec. 3.3), e.g. 1,5,9
    # Training-time perturbations (Sec. 5) and classifier-free guidance.
    cep:                str   = 'none'       # conditional embedding perturbation: none | uniform | gaussian (Eq. 8)
    cep_gamma:          float = 1.0          # gamma of Eq. 8; the paper uses 1 for all models
    cep_perturb_null:   bool  = True         # CEP also perturbs the null condition of CFG training (paper: silent)
    input_perturbation: float = 0.0          # IP baseline (Ning et al.): gamma of eps + gamma * xi; DDPM-IP: 0.1
    embedding_dropout:  float = 0.0          # dropout on the condition embedding (App. E.3 baseline: 0.1); LDM only
    class_dropout_prob: float = 0.1          # null class / empty caption rate (DiT; LDMs: paper silent, SD2's 0.1)
    # Network and diffusion.
    arch:               str   = 'DiT-XL/2'   # DiT-XL/2, DiT-B/2, ... or an LDM UNet preset (ldm-cin256, ldm-cc3m)
    vae:                str   = 'none'       # autoencoder: ema | mse (KL-f8 sd-vae-ft-*), vq-f4, a file or URL, or none
    transfer:           str   = ''           # start from these weights: a facebookresearch/DiT .pt or our snapshot
    dropout:            float = 0.0          # UNet dropout (LDM cin256-v2: 0)
    text_layers:        int   = 4            # depth of the byte-level text encoder that stands in for BERT
    beta_schedule:      str   = 'linear'     # linear (DiT) | scaled_linear (LDM's "linear": sqrt-spaced)
    linear_start:       float = 1e-4         # beta_1 (DiT 1e-4; LDM cin256-v2 0.0015)
    linear_end:         float = 0.02         # beta_T (DiT 0.02; LDM cin256-v2 0.0195)
    # Optimisation (DiT train.py defaults; paper App. B.4).
    batch:              int   = 256          # global batch (DiT: 256; LDM: 8 GPUs x 64)
    batch_gpu:          int   = 0            # per-GPU microbatch, accumulation makes up the rest; 0 = batch / GPUs
    lr:                 float = 1e-4         # AdamW learning rate, constant (paper App. B.3, B.4)
    weight_decay:       float = 0.0          # AdamW weight decay (DiT: 0; LDM: torch default 0.01)
    lr_rampup_kimg:     float = 0.0          # linear warm-up in kimg; neither official recipe has one
    grad_clip:          float = 0.0          # max gradient norm; 0 = off (DiT and LDM do not clip)
    ema_decay:          float = 0.9999       # per-step EMA (DiT); 0 = snapshot the raw weights (LDM: use_ema False)
    kimg:               float = 102400       # training length in kimg: DiT-XL/2 400K steps x 256 images
    # Bookkeeping.
    outdir:             str   = 'runs'       # run folders go here
    tick:               float = 10.0         # kimg between progress lines
    snap:               int   = 50           # ticks between snapshots, sample grids and training states
    grid:               int   = 64           # images in the sample grids (text models: the first captions)
    seed:               int   = 0            # seeds the corruption, the data order and all training noise
    resume:             str   = ''           # training-state-*.pt to continue, or auto (latest matching run)
    precision:          str   = ''           # fp32 | bf16 autocast; '' = bf16 on CUDA, fp32 on CPU
    compile:            bool  = False        # torch.compile the network
    workers:            int   = 4            # threads decoding images
    cache_dir:          str   = ''           # CIFAR-10 and latent cache; '' = ~/.cache/ldm_labelnoise
    device:             str   = ''           # cpu | cuda; '' = cuda when available
    dry_run:            bool  = False        # print the resolved config and exit


@dataclasses.dataclass
class GenerateConfig(SamplerConfig):
    network:            str   = ''           # our snapshot, a DiT .pt, a diffusers folder or repo id (walk: a list)
    vae:                str   = ''           # autoencoder of a DiT .pt: ema | mse | file; '' = generate mse, eval ema
    seeds:              str   = ''           # one image per seed, e.g. 0-49999; '' = the official per-class layout
    n_samples:          int   = 0            # images per class / prompt (walk: walks per class); 0 = official 100/5/5
    class_start_idx:    int   = 0            # first class (or prompt) of the official layout
    class_end_idx:      int   = -1           # end of the class (or prompt) range; -1 = all (official: 1000 / 100)
    fixed_code:         bool  = False        # fixed start codes; ours always are (a function of the seed alone)
    image_size:         int   = 0            # output side; 0 = the network's (the official scripts ignore it)
    outdir:             str   = 'tmp'        # generate: image folder; walk: grid folder
    batch:              int   = 50           # images per forward pass and GPU (never changes an image)
    class_idx:          int   = -1           # --seeds: the class of every image; -1 = seed % num_classes
    prompts:            str   = ''           # text models: file with one prompt a line (--seeds: image k, prompt k % n)
    num:                int   = 50000        # eval: number of samples (class-balanced)
    ref:                str   = ''           # eval: reference statistics .npz from `python fid.py ref`
    protocol:           str   = ''           # eval: edm | adm | pytorch-fid; '' = the reference's tag
    metrics:            str   = 'fid,is,sfid,pr'  # eval: fid.compute_metrics names
    fid_weights:        str   = ''           # eval: Inception weights file; '' = FID_WEIGHTS env or download
    classes:            str   = '0'          # walk: class ids (text models: use --prompt)
    prompt:             str   = ''           # walk: the captions of a text model (several: one walk each)
    walk_steps:         int   = 20           # walk: points on the circle
    seed:               int   = 42           # base seed of the official layout and of the walk noises
    hub_token:          str   = ''           # Hugging Face token for gated repos (also read from HF_TOKEN)
    precision:          str   = ''           # fp32 | bf16 (official: full | autocast); '' = bf16 on CUDA
    device:             str   = ''           # cpu | cuda; '' = cuda when available


# The LDM presets train on VQ-f4 latents (64 x 64 x 3 at 256 px, the paper's LDM-4); --vae=ema gives KL-f8 instead.
_LDM_IN1K = dict(arch='ldm-cin256', cond='class', vae='vq-f4', resolution=256, beta_schedule='scaled_linear',
                 linear_start=0.0015, linear_end=0.0195, batch=512, weight_decay=0.01, ema_decay=0.0)
PRESETS = {
    # LDM-4 class-conditional ImageNet, 178K iterations of 8 x 64 (App. B.3); s = 2.0 in Table 1.
    'in1k-ldm': dict(_LDM_IN1K, kimg=91136, scale=2.0, scheduler='dpm'),
    # LDM-4 text-conditional CC3M, 396K iterations of 8 x 64 (App. B.3); s = 3.0 in Table 1.
    'cc3m-ldm': dict(_LDM_IN1K, arch='ldm-cc3m', cond='text', kimg=202752, scale=3.0, scheduler='dpm'),
    # DiT-XL/2 ImageNet: DiT train.py, 400K iterations of 256 (App. B.4); s = 1.75 in Table 1. App. B.4 calls its
    # autoencoder a fine-tuned VQ-VAE with 16384 codes; DiT's is the KL-f8 sd-vae-ft (no codebook), used here.
    'in1k-dit': dict(arch='DiT-XL/2', vae='ema', resolution=256, xflip=True, kimg=102400, scale=1.75,
                     scheduler='dpm'),
    # CIFAR-10 in pixel space: our recipe for small experiments (not in the paper).
    'cifar10': dict(arch='DiT-B/2', xflip=True, batch=128, kimg=100000, tick=50, scale=1.5, scheduler='dpm'),
    # Seconds on a CPU: a tiny LDM UNet in pixel space.
    'tiny': dict(arch='tiny-ldm', batch=16, lr=2e-4, ema_decay=0.99, kimg=0.5, tick=0.1, snap=5, grid=16,
                 ddim_steps=10, scale=1.5, scheduler='dpm', workers=1),
}

CHOICES = dict(scheduler=('ddim', 'dpm', 'ddpm'), cfg_channels=('all', 'dit'), timestep_spacing=('', 'linspace',
               'leading'), cond=('class', 'text'), cep=('none', 'uniform', 'gaussian'),
               beta_schedule=('linear', 'scaled_linear'), precision=('', 'fp32', 'bf16', 'full', 'autocast'),
               protocol=('', *fid.PROTOCOLS), preset=('', *PRESETS))
COMMANDS = {  # extra flags of each command beyond the sampler's (train: all of TrainConfig)
    'generate': ('network', 'vae', 'seeds', 'n_samples', 'class_start_idx', 'class_end_idx', 'fixed_code',
                 'image_size', 'outdir', 'batch', 'class_idx', 'prompts', 'seed', 'hub_token', 'precision', 'device'),
    'eval': ('network', 'vae', 'num', 'ref', 'protocol', 'metrics', 'fid_weights', 'batch', 'class_idx', 'prompts',
             'hub_token', 'precision', 'device'),
    'walk': ('network', 'vae', 'classes', 'prompt', 'walk_steps', 'n_samples', 'seed', 'outdir', 'batch',
             'hub_token', 'precision', 'device'),
}
COMMAND_DEFAULTS = {  # the official circular-walk script's own defaults
    'walk': dict(scheduler='dpm', ddim_steps=25, n_samples=5, batch=20),
}
GROUPS = {  # --help sections (the same titles and order in the four scripts)
    'data and corruption': ('data', 'cond', 'captions', 'resolution', 'num_classes', 'xflip', 'corruption_ratio',
                            'corruption_classes', 'cep', 'cep_gamma', 'cep_perturb_null', 'input_perturbation',
                            'embedding_dropout', 'class_dropout_prob'),
    'network': ('network', 'arch', 'vae', 'transfer', 'dropout', 'text_layers', 'beta_schedule', 'linear_start',
                'linear_end', 'hub_token'),
    'optimisation': ('batch', 'batch_gpu', 'lr', 'weight_decay', 'lr_rampup_kimg', 'grad_clip', 'ema_decay', 'kimg'),
    'run': ('preset', 'outdir', 'tick', 'snap', 'grid', 'seed', 'resume', 'precision', 'compile', 'workers',
            'cache_dir', 'device', 'dry_run'),
    'sampling': ('scheduler', 'ddim_steps', 'ddim_eta', 'scale', 'cfg_channels', 'timestep_spacing', 'seeds',
                 'n_samples', 'class_start_idx', 'class_end_idx', 'fixed_code', 'image_size', 'class_idx', 'prompts',
                 'classes', 'prompt', 'walk_steps'),
    'evaluation': ('num', 'ref', 'protocol', 'metrics', 'fid_weights'),
}
SAMPLING_GROUP = {'batch', 'outdir', 'seed'}  # under `sampling` for generate / eval / walk, not optimisation / run
OFFICIAL_NAMES = {  # our flag -> the official DiffusionNoise scripts' spelling (both accepted)
    'network': ('pretrained_model_name_or_path', 'model_list'), 'batch': ('batch_size',),
    'prompts': ('prompt_data',),
}
ALIASES = {'input_perturbation': ('input_pertub',)}  # DDPM-IP's spelling of the IP baseline's gamma
REFUSED = {  # official flags we do not take: why; what to use
    'push_to_hub': 'uploading to the Hugging Face Hub is not part of sampling; use an upload of --outdir afterwards',
    'class_synset': 'WordNet synsets need the ImageNet index; use --classes=ID,ID (the official data/index_synset.yaml '
                    'maps synsets to ids)',
    'f': 'the downsampling factor is the network\'s own autoencoder\'s; use nothing (drop the flag)',
}
TOP_HELP = """usage: ldm_labelnoise.py [COMMAND] [--flag=value ...]
Slight Corruption in Pre-training Data Makes Better Diffusion Models (Chen et al., NeurIPS 2024)
commands:
  train      train a DiT or LDM with condition corruption and CEP (default)
  generate   one image per seed, or the official per-class folders of JPEGs
  eval       FID, IS, sFID, precision/recall of samples held in memory
  walk       the official circular walk between two noises, one row per network
Run 'python ldm_labelnoise.py COMMAND --help' for the flags of a command."""


class UserError(Exception):
    """Bad input (a flag, a data, checkpoint or resume file): one 'ldm_labelnoise.py: error: ...' line, exit 2."""
    exit_code = 2


class FlagError(UserError):
    pass


class RunError(Exception):
    """A failure while running (e.g. a full disk during training): one error line, exit 1."""
    exit_code = 1


@functools.lru_cache
def field_help(cls):
    """Each field's trailing comment in the dataclass source: the one place a flag is described."""
    helps = {}
    for klass in reversed(cls.__mro__[:-1]):
        for line in inspect.getsource(klass).splitlines():
            match = re.match(r'\s+(\w+):\s+\w+\s+=.*?#\s*(.*)$', line)
            if match:
                helps[match[1]] = match[2]
    return helps


def parse_config(cls, argv, command=None):
    """Flags from the dataclass fields (`--name=value`), grouped for --help; `--preset` sets defaults that explicit
    flags override; official spellings are aliases; refused official flags fail with one line."""
    command = command or ('train' if cls is TrainConfig else 'generate')
    parser = argparse.ArgumentParser(prog=f'ldm_labelnoise.py {command}', allow_abbrev=False, add_help=False,
                                     usage=f'ldm_labelnoise.py {command} [--flag=value ...]', formatter_class=
                                     lambda prog: HelpFormatter(prog, max_help_position=40, width=120))
    parser.error = lambda message: (_ for _ in ()).throw(FlagError(message))
    fields = {field.name: field for field in dataclasses.fields(cls)}
    names = list(fields) + ['preset'] if cls is TrainConfig else \
        [name for name in fields if name in COMMANDS[command] or name in SamplerConfig.__dataclass_fields__]
    defaults = {name: field.default for name, field in fields.items()}
    defaults.update(COMMAND_DEFAULTS.get(command, {}))
    helps = dict(field_help(cls))
    helps['preset'] = 'a paper recipe: ' + ', '.join(PRESETS)
    for title, members in GROUPS.items():
        group = parser.add_argument_group(title)
        if title == 'run':
            group.add_argument('-h', '--help', action='help', help='print this help and exit')
        for name in names:
            in_group = title == 'sampling' if cls is GenerateConfig and name in SAMPLING_GROUP else name in members
            if not in_group:
                continue
            default = defaults.get(name, '')
            official, aliases = OFFICIAL_NAMES.get(name, ()), ALIASES.get(name, ())
            shown = '(required)' if name in ('data', 'network') else \
                f'(default: {"none" if default == "" else default})'
            text = helps[name] + (f'; official: {", ".join("--" + n for n in official)}' if official else '') + \
                (f'; also --{aliases[0]} (DDPM-IP)' if aliases else '') + f' {shown}'
            text = text.replace('%', '%%')  # argparse formats help with %
            flags = [f'--{name}'] + [f'--{n}' for n in official + aliases]
            if name in fields and fields[name].type is bool:
                group.add_argument(*flags, dest=name, default=default, nargs='?', const='true', type=parse_bool,
                                   metavar='BOOL', help=text)  # --flag alone means true
            else:
                kind = fields[name].type if name in fields else str
                nargs = '+' if name in ('network', 'prompt') else None  # the walk's --model_list / --prompt: several
                group.add_argument(*flags, dest=name, default=default, type=kind, choices=CHOICES.get(name),
                                   nargs=nargs, help=text, metavar=kind.__name__.upper())
    for name, why in REFUSED.items():
        if cls is GenerateConfig:
            parser.add_argument(f'--{name}', nargs='*', help=argparse.SUPPRESS, action=RefusedFlag, why=why)
    if cls is TrainConfig:
        parser.set_defaults(**PRESETS.get(parser.parse_known_args(argv)[0].preset, {}))
    args = vars(parser.parse_args(argv))
    if isinstance(args.get('network'), list):
        args['network'] = ','.join(args['network'])
    if isinstance(args.get('prompt'), list):  # one walk per prompt, kept one a line
        args['prompt'] = '\n'.join(args['prompt'])
    if args.get('precision') in ('full', 'autocast'):  # the official spellings
        args['precision'] = 'fp32' if args['precision'] == 'full' else 'bf16'
    return cls(**{name: args.get(name, defaults[name]) for name in fields})


class HelpFormatter(argparse.HelpFormatter):
    """Flags shown as they are typed: --name=TYPE."""

    def _format_action_invocation(self, action):
        value = '' if action.nargs == 0 else f'={action.metavar}'
        return ', '.join(option + value for option in action.option_strings)


class RefusedFlag(argparse.Action):
    def __init__(self, *args, why='', **kwargs):
        super().__init__(*args, **kwargs)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None):
        raise FlagError(f'{option_string} (official Hhhhhhao/DiffusionNoise flag) is not supported: {self.why}')


def parse_bool(text):
    if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(text)
    return text.lower() in ('true', '1')


def check_config(cfg, world_size):
    """Every range check in one place, before anything is written."""
    # Sampler flags, shared by every command.
    if not 1 <= cfg.ddim_steps <= NUM_TIMESTEPS or cfg.ddim_eta < 0 or cfg.scale < 1:
        raise FlagError('--ddim_steps must be in [1, 1000], --ddim_eta >= 0 and --scale >= 1')
    if cfg.ddim_eta > 0 and cfg.scheduler != 'ddim':
        raise FlagError('--ddim_eta needs --scheduler=ddim')
    if cfg.scheduler == 'ddpm' and (cfg.ddim_steps < 2 or cfg.timestep_spacing):
        raise FlagError('--scheduler=ddpm takes --ddim_steps >= 2 and DiT\'s own spacing (no --timestep_spacing)')
    if (cfg.timestep_spacing or {'dpm': 'linspace', 'ddim': 'leading', 'ddpm': ''}[cfg.scheduler]) == 'leading' \
            and cfg.ddim_steps > NUM_TIMESTEPS // 2:
        raise FlagError(f'--timestep_spacing=leading allows at most {NUM_TIMESTEPS // 2} --ddim_steps')
    if isinstance(cfg, GenerateConfig):
        if not cfg.network or min(cfg.batch, cfg.num, cfg.walk_steps) < 1 or cfg.n_samples < 0:
            raise FlagError('--network is required; --batch, --num and --walk_steps must be >= 1, --n_samples >= 0')
        if set(cfg.metrics.split(',')) - set(fid.METRICS):
            raise FlagError(f'--metrics must be a comma-separated subset of {",".join(fid.METRICS)}')
        if cfg.class_start_idx < 0 or (cfg.class_end_idx != -1 and cfg.class_end_idx <= cfg.class_start_idx):
            raise FlagError('--class_start_idx must be >= 0 and below --class_end_idx (or --class_end_idx=-1)')
        if cfg.image_size < 0:
            raise FlagError('--image_size must be >= 0')
        return
    # Training: data, corruption and perturbation rates, network, schedule, batch, optimiser, bookkeeping.
    if not cfg.data:
        raise FlagError('--data is required (an image folder, a zip, an .npz or cifar10)')
    for name in ('corruption_ratio', 'class_dropout_prob', 'embedding_dropout', 'dropout'):
        if not 0 <= getattr(cfg, name) < 1:
            raise FlagError(f'--{name} must be in [0, 1)')
    if cfg.cep_gamma < 0 or cfg.input_perturbation < 0:
        raise FlagError('--cep_gamma and --input_perturbation must be >= 0')
    if cfg.class_dropout_prob == 0 and cfg.scale != 1:
        raise FlagError('the sample grids use --scale, which needs null conditions: --class_dropout_prob > 0')
    if cfg.corruption_classes and (cfg.cond != 'class' or not re.fullmatch(r'\d+(,\d+)+', cfg.corruption_classes)):
        raise FlagError('--corruption_classes must list at least two class ids, e.g. 3,5,9, with --cond=class')
    if not is_dit(cfg.arch) and nets.UNET_PRESETS.get(cfg.arch, {}).get('arch') != 'ldm':
        raise FlagError(f'--arch must be a DiT ({", ".join(nets.DiT_models)}) or an LDM UNet preset')
    if is_dit(cfg.arch) and (cfg.cond == 'text' or cfg.embedding_dropout > 0):
        raise FlagError('--cond=text and --embedding_dropout need an LDM UNet --arch (DiT embeds labels in adaLN)')
    if not 0 < cfg.linear_start < cfg.linear_end < 1:
        raise FlagError('--linear_start and --linear_end must satisfy 0 < linear_start < linear_end < 1')
    batch_gpu = cfg.batch_gpu or cfg.batch // world_size
    if cfg.batch < 1 or batch_gpu < 1 or cfg.batch % (batch_gpu * world_size):
        raise FlagError(f'--batch={cfg.batch} must be divisible by GPUs ({world_size}) x --batch_gpu ({batch_gpu})')
    if cfg.lr <= 0 or cfg.weight_decay < 0 or cfg.grad_clip < 0 or not 0 <= cfg.ema_decay < 1:
        raise FlagError('--lr must be > 0, --weight_decay and --grad_clip >= 0, --ema_decay in [0, 1)')
    if cfg.kimg <= 0 or cfg.tick <= 0 or min(cfg.snap, cfg.grid, cfg.text_layers, cfg.workers) < 1:
        raise FlagError('--kimg and --tick must be > 0; --snap, --grid, --text_layers and --workers >= 1')
    if min(cfg.resolution, cfg.num_classes, cfg.lr_rampup_kimg) < 0:
        raise FlagError('--resolution, --num_classes and --lr_rampup_kimg must be >= 0')
    check_writable(cfg.outdir, '--outdir')


def check_writable(path, flag):
    """A folder we will write into: it, or the nearest existing folder above it, must be writable (nothing is
    created here, so a refused run leaves no trace)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        state = 'read-only' if os.path.isdir(existing) else 'not a folder'
        raise UserError(f'{flag}={path} is not writable ({existing} is {state})')


# ----------------------------------------------------------------------------------------------------------------------
# Data: images, labels, captions.

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')
CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'


def center_crop_arr(image, size):
    """ADM / DiT preprocessing: halve with BOX while large, resize the short side to `size` (BICUBIC), crop."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=PIL.Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=PIL.Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def download_cifar10(cache_dir):
    """The official CIFAR-10 archive, checksum-verified and cached (written atomically)."""
    path = os.path.join(cache_dir, 'cifar-10-python.tar.gz')
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        try:
            response = requests.get(CIFAR10_URL, timeout=60)
            response.raise_for_status()
        except requests.RequestException as error:
            raise UserError(f'cannot download CIFAR-10 ({error}); put cifar-10-python.tar.gz in {cache_dir}')
        if hashlib.md5(response.content).hexdigest() != CIFAR10_MD5:
            raise UserError(f'CIFAR-10 download from {CIFAR10_URL} failed its md5 check')
        with open(path + '.tmp', 'wb') as file:
            file.write(response.content)
        os.replace(path + '.tmp', path)
    x, y = [], []
    with tarfile.open(path) as archive:
        for i in range(1, 6):
            batch = pickle.load(archive.extractfile(f'cifar-10-batches-py/data_batch_{i}'), encoding='latin1')
            x.append(batch['data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            y += batch['labels']
    return np.concatenate(x), np.asarray(y, dtype=np.int64)


class ImageDataset:
    """Images as uint8 (H, W, 3), with labels and captions, from a folder, an EDM-style zip, an .npz or 'cifar10'.

    Labels: dataset.json {"labels": [[name, id], ...]} (EDM), else class sub-folders in sorted order (ImageFolder),
    else `y` of the .npz. Captions: --captions, else captions.txt in the folder / zip, else `captions` of the .npz;
    one per image, in the sorted order of the image names.
    """

    def __init__(self, path, resolution, cache_dir, captions_path=''):
        self.path, self.resolution, self._local = path, resolution, threading.local()
        self.array = labels = captions = self.num_classes = None
        # Arrays (CIFAR-10, .npz) are held in memory; folders and zips are read image by image.
        # Labels come with the array, or from dataset.json or the class folders of a folder / zip.
        if path == 'cifar10':
            self.array, labels = download_cifar10(cache_dir)
        elif path.endswith('.npz') and os.path.isfile(path):
            try:
                with np.load(path) as data:
                    self.array, labels = data.get('x'), data.get('y')
                    captions = data['captions'].tolist() if 'captions' in data else None
                    self.num_classes = len(data['classes']) if 'classes' in data else None
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
                raise UserError(f'--data={path} is not a readable .npz ({type(error).__name__}: {error})')
            shape = getattr(self.array, 'shape', None)
            if self.array is None or self.array.dtype != np.uint8 or self.array.ndim not in (3, 4):
                raise UserError(f'--data={path} must hold x: (N, H, W) or (N, H, W, C) uint8, got '
                                f'{"no x" if shape is None else f"{self.array.dtype} {shape}"}')
            if self.array.ndim == 4 and shape[3] not in (1, 3):
                hint = ' (channels first: transpose to (N, H, W, C))' if shape[1] in (1, 3) else ''
                raise UserError(f'--data={path}: x has shape {shape}, expected (N, H, W, C) with C = 1 or 3{hint}')
        elif os.path.isdir(path) or zipfile.is_zipfile(path):
            files = zipfile.ZipFile(path).namelist() if not os.path.isdir(path) else [
                os.path.relpath(os.path.join(root, f), path).replace(os.sep, '/') for root, _, fs in os.walk(path)
                for f in fs]
            self.names = sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
            table = dict(json.loads(self._read_file('dataset.json')).get('labels') or {}) \
                if 'dataset.json' in files else {}
            if table:
                if any(name not in table for name in self.names):
                    raise UserError(f'dataset.json in {path} has no label for some images')
                labels = [table[name] for name in self.names]
            elif self.names and all('/' in name for name in self.names):
                folders = sorted({name.split('/')[0] for name in self.names})
                self.num_classes = len(folders)
                labels = [folders.index(name.split('/')[0]) for name in self.names]
            captions = self._read_file('captions.txt').decode().splitlines() if 'captions.txt' in files else None
        else:
            raise UserError(f'--data not found or not a folder, zip, .npz or cifar10: {path}')
        # An explicit caption file overrides the one next to the images.
        if captions_path:
            if not os.path.isfile(captions_path):
                raise UserError(f'--captions file not found: {captions_path}')
            with open(captions_path, encoding='utf-8') as file:
                captions = file.read().splitlines()
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.captions = captions
        if len(self) == 0:
            raise UserError(f'no images in {path}')

    def __len__(self):
        return len(self.array) if self.array is not None else len(self.names)

    def _read_file(self, name):
        if os.path.isdir(self.path):
            with open(os.path.join(self.path, name), 'rb') as file:
                return file.read()
        if not hasattr(self._local, 'zip'):  # one handle per thread: ZipFile is not thread-safe
            self._local.zip = zipfile.ZipFile(self.path)
        return self._local.zip.read(name)

    def read(self, index):
        """One image as uint8 (H, W, 3), center-cropped to --resolution when given."""
        if self.array is not None:
            image = PIL.Image.fromarray(self.array[index].squeeze()).convert('RGB')
        else:
            try:
                image = PIL.Image.open(io.BytesIO(self._read_file(self.names[index]))).convert('RGB')
            except Exception as error:
                raise UserError(f'cannot read image {self.names[index]} in {self.path}: {error}')
        return center_crop_arr(image, self.resolution) if self.resolution else np.asarray(image)

    def read_many(self, indices, workers):
        """uint8 (n, 3, H, W); images of different sizes are an error unless --resolution is set."""
        with ThreadPoolExecutor(workers) as pool:  # PIL decodes outside the GIL: threads overlap the decoding
            images = list(pool.map(self.read, indices))
        # One size for all, so that the images stack into one array.
        for index, image in zip(indices, images):
            if image.shape != images[0].shape:
                name = self.names[index] if self.array is None else f'#{index}'
                raise UserError(f'image {name} is {image.shape[1]}x{image.shape[0]}, not '
                                f'{images[0].shape[1]}x{images[0].shape[0]}; set --resolution to crop all images')
        return np.stack(images).transpose(0, 3, 1, 2)


def tokenize(captions, length=TEXT_LENGTH):
    """Byte-level tokens: BOS, UTF-8 bytes (truncated), EOS, padding. (N,) strings -> int64 (N, length)."""
    bos, eos, pad = 256, 257, 258
    tokens = torch.full((len(captions), length), pad, dtype=torch.int64)
    for i, caption in enumerate(captions):
        row = [bos] + list(caption.encode('utf-8'))[:length - 2] + [eos]
        tokens[i, :len(row)] = torch.tensor(row)
    return tokens

# ----------------------------------------------------------------------------------------------------------------------
# Condition corruption (Sec. 3.1, 3.3, App. B.1).


def corrupted_count(eta, n):
    """floor(eta * n), robust to eta * n landing a hair below an integer in floating point."""
    return math.floor(round(eta * n, 6))


def corrupt_labels(y, eta, generator=None, classes=None):
    """Symmetric label noise: floor(eta * N) samples, drawn without replacement, get another class y' != y with
    P(y') proportional to the class prior n_y' (App. B.1). With `classes` (asymmetric, Sec. 3.3), only samples of
    those classes are eligible, eta is relative to them, and labels flip within `classes`.

    y: int64 (N,). Returns (the corrupted labels (N,), the flipped indices (M,)).
    """
    # The class prior n_k, restricted to `classes` for the asymmetric variant.
    prior = torch.bincount(y).double()
    eligible = torch.ones_like(y, dtype=torch.bool)
    if classes is not None:
        inside = torch.zeros_like(prior, dtype=torch.bool)
        inside[classes[classes < len(prior)]] = True
        prior, eligible = prior * inside, inside[y]

    # Pick the samples to corrupt, then draw their new labels.
    candidates = eligible.nonzero()[:, 0]                                 # (N_eligible,)
    picked = candidates[torch.randperm(len(candidates), generator=generator)]
    index = picked[:corrupted_count(eta, len(candidates))]                # (M,) without replacement
    if len(index) and (prior > 0).sum() < 2:
        raise ValueError('label corruption needs samples of at least two (eligible) classes')
    new = y[index].clone()
    todo = torch.ones_like(index, dtype=torch.bool)
    while todo.any():  # rejection sampling: the prior restricted to the other classes, without an (M, K) table
        new[todo] = torch.multinomial(prior, int(todo.sum()), replacement=True, generator=generator)
        todo = new == y[index]
    y_noisy = y.clone()
    y_noisy[index] = new
    return y_noisy, index


def swap_captions(n, eta, generator=None):
    """Text swapping (App. B.1): floor(eta * N / 2) disjoint random pairs of samples exchange captions, so
    2 * floor(eta * N / 2) samples are corrupted. Returns (source (N,): sample i trains on caption source[i],
    the corrupted indices)."""
    pairs = corrupted_count(eta, n) // 2
    index = torch.randperm(n, generator=generator)[:2 * pairs]
    source = torch.arange(n)
    source[index[:pairs]], source[index[pairs:]] = index[pairs:], index[:pairs]
    return source, index

# ----------------------------------------------------------------------------------------------------------------------
# Diffusion loss with conditional embedding perturbation (Eq. 1, 8) and the IP baseline.


def make_alphas_cumprod(schedule='linear', start=1e-4, end=0.02, num_timesteps=NUM_TIMESTEPS):
    """alpha_bar_t, float64 (T,). 'linear': DiT; 'scaled_linear': LDM's "linear", beta = linspace(sqrt, sqrt)^2."""
    if schedule == 'linear':
        betas = torch.linspace(start, end, num_timesteps, dtype=torch.float64)
    else:
        betas = torch.linspace(start ** 0.5, end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def cep_noise(shape, cep, gamma, generator=None, device=None):
    """CEP perturbation delta of Eq. 8, fresh for every sample: (B, ..., d) with d = shape[-1], the width of c(y).

    'uniform' (CEP-U): U(-gamma/sqrt(d), gamma/sqrt(d)) per element. 'gaussian' (CEP-G): the paper writes
    N(0, (gamma/sqrt(d)) I); we read gamma/sqrt(d) as the standard deviation, as every public port does.
    For token sequences d is the per-token width (community ports), not L * d.
    """
    scale = gamma / math.sqrt(shape[-1])
    if cep == 'uniform':
        return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * scale
    if cep == 'gaussian':
        return torch.randn(shape, generator=generator, device=device) * scale
    raise ValueError(f'unknown CEP kind {cep!r}')


def drop_conditions(y, y_null, drop):
    """Classifier-free guidance training: replace the condition by the null one where drop (B,) is True."""
    return torch.where(drop.view(-1, *[1] * (y.ndim - 1)), y_null, y)


def diffusion_loss(net, x0, y, t, eps, alphas_cumprod, delta=None, xi=None, gamma_ip=0.0):
    """Per-sample L_simple (Eq. 1) with the perturbed condition of Eq. 8: ||eps - eps_theta(x_t, t, c(y) + delta)||^2.

    x0, eps, xi: (B, C, H, W); y: (B,) class ids or (B, L) tokens; t: int64 (B,); delta: (B, *cond_shape) or None.
    IP baseline: x_t is built from eps + gamma_ip * xi while the target stays eps (Ning et al., Eq. 9).
    A network that also outputs v (2C channels, DiT's learned sigma) adds DiT's VB term (hybrid loss).
    Returns (B,).
    """
    # sqrt(alpha_bar) and sqrt(1 - alpha_bar) from the float64 table, rounded to float32 last, as DiT's q_sample:
    # from a float32 alpha_bar, sqrt(1 - alpha_bar) at t = 0 is off by 7.5e-4 relative.
    a = alphas_cumprod[t].view(-1, 1, 1, 1)                              # (B, 1, 1, 1) float64
    noise = eps if xi is None else eps + gamma_ip * xi
    x_t = a.sqrt().float() * x0 + (1 - a).sqrt().float() * noise
    out = net(x_t, t, y, delta).float()                                   # (B, C or 2C, H, W)
    channels = x0.shape[1]
    loss = (eps - out[:, :channels]).square().mean(dim=(1, 2, 3))
    if out.shape[1] == 2 * channels:  # only v gets the VB gradient (DiT's frozen mean)
        loss = loss + vb_terms(x0, x_t, t, out[:, :channels].detach(), out[:, channels:], alphas_cumprod)
    return loss


def vb_terms(x0, x_t, t, eps_hat, v, alphas_cumprod):
    """Improved-DDPM variational bound in bits per dim for the learned-range variance, as DiT trains it:
    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the discretised decoder NLL at t = 0. Returns (B,)."""
    # Posterior q(x_{t-1} | x_t, x0) and the model's mean (from eps_hat) and variance (interpolated by v).
    a, a_prev = alphas_cumprod, F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
    beta = 1 - a / a_prev
    var_post = beta * (1 - a_prev) / (1 - a)
    logvar_post = torch.cat([var_post[1:2], var_post[1:]]).log()          # "clipped": beta_tilde_0 := beta_tilde_1

    def at(v_):
        return v_[t].float().view(-1, 1, 1, 1)

    coef_x0, coef_xt = at(beta * a_prev.sqrt() / (1 - a)), at((1 - a_prev) * (1 - beta).sqrt() / (1 - a))
    x0_hat = at((1 / a).sqrt()) * x_t - at((1 / a - 1).sqrt()) * eps_hat
    mean, mean_hat = coef_x0 * x0 + coef_xt * x_t, coef_x0 * x0_hat + coef_xt * x_t
    frac = (v + 1) / 2
    logvar, logvar_hat = at(logvar_post), frac * at(beta.log()) + (1 - frac) * at(logvar_post)
    kl = 0.5 * (-1 + logvar_hat - logvar + (logvar - logvar_hat).exp() + (mean - mean_hat).square() / logvar_hat.exp())

    # Decoder NLL of x0 on 256 bins of [-1, 1], with the tanh approximation of the normal CDF.
    def cdf(z):
        return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    inv_std = (-0.5 * logvar_hat).exp()
    upper, lower = cdf(inv_std * (x0 - mean_hat + 1 / 255)), cdf(inv_std * (x0 - mean_hat - 1 / 255))
    log_probs = torch.where(x0 < -0.999, upper.clamp(min=1e-12).log(), torch.where(
        x0 > 0.999, (1 - lower).clamp(min=1e-12).log(), (upper - lower).clamp(min=1e-12).log()))
    return torch.where(t == 0, -log_probs.mean(dim=(1, 2, 3)), kl.mean(dim=(1, 2, 3))) / math.log(2)

# ----------------------------------------------------------------------------------------------------------------------
# Samplers with classifier-free guidance: DDIM and DPM-Solver++(2M).


def sampling_timesteps(num_timesteps, steps, spacing='linspace', solver='dpm', offset=1):
    """Descending timesteps, spaced as diffusers' schedulers do: DPM-Solver places steps + 1 points and drops the
    last (it then steps to sigma = 0), DDIM places steps points. 'leading' adds steps_offset (LDM's DDIM: 1)."""
    points = steps + 1 if solver == 'dpm' else steps
    if spacing == 'linspace':
        timesteps = np.linspace(0, num_timesteps - 1, points).round()
    else:
        timesteps = np.arange(points) * (num_timesteps // points) + offset
    return timesteps[::-1][:steps].astype(np.int64).tolist()


def guided_output(net, x, t, y, y_null=None, scale=1.0, cfg_channels='all'):
    """Eq. 2, eps_u + s (eps_c - eps_u), from one batched forward pass; y_null=None is plain conditional sampling.
    Returns the network output (B, C or 2C, H, W) with guided eps and, for a learned sigma, the conditional v.
    cfg_channels 'all' guides every eps channel, as the paper's diffusers pipelines (DiTPipeline, LDM); 'dit' guides
    the first three only and passes the others through from the conditional pass, as DiT's forward_with_cfg (its
    sample.py and the FID 2.27 of DiT-XL/2; a GLIDE leftover its authors keep for exact reproducibility)."""
    t = torch.full((len(x),), t, dtype=torch.int64, device=x.device)
    if y_null is None:
        return net(x, t, y).float()
    out_c, out_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).float().chunk(2)
    guided = 3 if cfg_channels == 'dit' else x.shape[1]
    eps = out_u[:, :guided] + scale * (out_c[:, :guided] - out_u[:, :guided])
    return torch.cat([eps, out_c[:, guided:]], dim=1)


def guided_eps(net, x, t, y, y_null=None, scale=1.0, cfg_channels='all'):
    return guided_output(net, x, t, y, y_null, scale, cfg_channels)[:, :x.shape[1]]


def respaced_timesteps(num_timesteps, steps):
    """The kept timesteps of improved DDPM's (and DiT's) space_timesteps(T, str(steps)), ascending: a running sum
    of the stride (T - 1) / (steps - 1), rounded (Python's round, as the official code)."""
    stride, position, kept = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1, 0.0, []
    for _ in range(steps):
        kept.append(round(position))
        position += stride
    return kept


def ddpm_sample(net, noise, y, alphas_cumprod, steps=250, scale=1.0, y_null=None, cfg_channels='all',
                randn_like=torch.randn_like):
    """Ancestral sampling (Ho et al. Alg. 2) on the chain respaced to `steps` timesteps, with the learned-range
    variance of improved DDPM (Nichol & Dhariwal Eq. 15) when the network outputs v (2C channels), else the fixed
    large variance beta_t (DiT's create_diffusion default; LDM's and diffusers' DDPM use beta_tilde instead): DiT's
    p_sample_loop with clip_denoised=False, its FID protocol at steps=250. The network sees the original timestep
    indices. noise: x_T (B, C, H, W); alphas_cumprod: float64 (T,) on the CPU."""
    # Respaced chain, float64 tables as guided-diffusion builds them: beta_i = 1 - alpha_bar_i / alpha_bar_{i-1}.
    kept = respaced_timesteps(len(alphas_cumprod), steps)
    beta = 1 - alphas_cumprod[kept] / F.pad(alphas_cumprod[kept][:-1], (1, 0), value=1.0)
    a = torch.cumprod(1 - beta, dim=0)
    a_prev = F.pad(a[:-1], (1, 0), value=1.0)
    var_post = beta * (1 - a_prev) / (1 - a)                              # beta_tilde of the posterior
    logvar_min = torch.cat([var_post[1:2], var_post[1:]]).log()           # "clipped": beta_tilde_0 := beta_tilde_1
    logvar_fixed = torch.cat([var_post[1:2], beta[1:]]).log()             # fixed large, for networks without v
    coef_x0, coef_xt = beta * a_prev.sqrt() / (1 - a), (1 - a_prev) * (1 - beta).sqrt() / (1 - a)
    x, channels = noise, noise.shape[1]
    for i in reversed(range(steps)):
        # x0 from the guided eps, the posterior mean, the variance interpolated by v between beta_tilde and beta.
        out = guided_output(net, x, kept[i], y, y_null, scale, cfg_channels)  # (B, C or 2C, H, W)
        x0 = (1 / a[i]).sqrt().item() * x - (1 / a[i] - 1).sqrt().item() * out[:, :channels]
        mean = coef_x0[i].item() * x0 + coef_xt[i].item() * x
        if out.shape[1] == 2 * channels:
            frac = (out[:, channels:] + 1) / 2
            logvar = frac * beta[i].log().item() + (1 - frac) * logvar_min[i].item()
        else:
            logvar = torch.full_like(mean, logvar_fixed[i].item())
        x = mean + (0.5 * logvar).exp() * randn_like(x) if i > 0 else mean
    return x


def ddim_sample(net, noise, y, alphas_cumprod, steps=50, scale=1.0, y_null=None, eta=0.0, spacing='leading',
                randn_like=torch.randn_like, cfg_channels='all', offset=1, clip=0.0, final_alpha_bar=1.0):
    """DDIM (Song et al., Eq. 12) from x_T = noise (B, C, H, W), as diffusers' DDIMScheduler: the last step lands
    on final_alpha_bar (1: set_alpha_to_one), x0 is clipped to [-clip, clip] when clip > 0 (clip_sample). Each step
    goes to the next listed timestep (diffusers goes to t - T // steps, the same for its default 'leading'
    spacing). alphas_cumprod: float64 (T,) on the CPU."""
    timesteps = sampling_timesteps(len(alphas_cumprod), steps, spacing, 'ddim', offset)
    x = noise
    for i, t in enumerate(timesteps):
        # Predict x0, then move it to the next noise level with the DDIM eps share and sigma of fresh noise.
        a = alphas_cumprod[t].item()
        a_prev = alphas_cumprod[timesteps[i + 1]].item() if i + 1 < len(timesteps) else final_alpha_bar
        eps = guided_eps(net, x, t, y, y_null, scale, cfg_channels)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x0 = x0.clamp(-clip, clip) if clip else x0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
        if sigma > 0:
            x = x + sigma * randn_like(x)
    return x


def dpm_solver_sample(net, noise, y, alphas_cumprod, steps=50, scale=1.0, y_null=None, spacing='linspace',
                      cfg_channels='all', offset=1):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint form) on the data prediction, as diffusers'
    DPMSolverMultistepScheduler with its defaults (first step first order; the final step to sigma = 0 is first
    order, i.e. returns the x0 prediction). lambda = log(alpha / sigma)."""
    timesteps = sampling_timesteps(len(alphas_cumprod), steps, spacing, 'dpm', offset)
    alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    lam = (alpha / sigma).log()
    x, x0_prev, h_prev = noise, None, None
    for i, t in enumerate(timesteps):
        # Data prediction at t; the last step returns it (a first-order step to sigma = 0).
        x0 = (x - sigma[t].item() * guided_eps(net, x, t, y, y_null, scale, cfg_channels)) / alpha[t].item()
        if i + 1 == len(timesteps):
            return x0
        # Second-order multistep update from the last two data predictions (first order on the first step).
        s = timesteps[i + 1]
        h = (lam[s] - lam[t]).item()
        d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)  # D0 + D1 / 2 with r0 = h_prev / h
        x = (sigma[s] / sigma[t]).item() * x - alpha[s].item() * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x

# ----------------------------------------------------------------------------------------------------------------------
# Networks: the conditioning front ends around nets.DiT and the LDM nets.UNet.

TINY_DITS = {'DiT-tiny': dict(depth=2, hidden_size=64, patch_size=2, num_heads=2),  # CPU tests only
             'DiT-S-tiny': dict(depth=1, hidden_size=384, patch_size=4, num_heads=6)}  # DiT-S's width and heads


def is_dit(arch):
    return arch in nets.DiT_models or arch in TINY_DITS


class ClassEmbedder(nn.Module):
    """LDM's class embedder: label -> (B, 1, width) cross-attention context; id num_classes is the null class."""

    def __init__(self, num_classes, width):
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, width)

    def forward(self, y):
        return self.embedding(y)[:, None]                                # (B, 1, width)


class TextEncoder(nn.Module):
    """Our stand-in for the trainable BERT of the CC3M model (App. B.3): byte tokens -> a pre-norm transformer
    trained jointly -> (B, 77, width). Padding tokens are ordinary tokens (no mask), so the context always has
    77 positions, like BERT's padded last_hidden_state; the null condition is the empty caption."""

    def __init__(self, width, depth, length=TEXT_LENGTH):
        super().__init__()
        self.token = nn.Embedding(259, width)
        self.position = nn.Parameter(torch.randn(1, length, width) * 0.02)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(
            width, max(1, width // 64), 4 * width, dropout=0.0, activation='gelu', batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens):
        h = self.token(tokens) + self.position                           # (B, L, width)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)


def perturb_condition(embedding, delta, is_null, perturb_null=True):
    """CEP (Eq. 8): the condition embedding c(y) + delta, formed where the network forms c(y).

    embedding: (B, D) DiT label embedding or (B, L, D) LDM context; delta: the same shape (cep_noise) or None;
    is_null: (B,) bool, the samples whose condition was dropped to the null one for classifier-free guidance.
    perturb_null (default True) decides whether those get delta too. The paper is silent on it: it "adds
    perturbation to every data instance during training on the fly" (Sec. 5.1) and never mentions the null
    condition; True perturbs whatever embedding is fed, the reading closest to that sentence.
    """
    if delta is None:
        return embedding
    if not perturb_null:
        delta = delta * (~is_null).view(-1, *[1] * (delta.ndim - 1))
    return embedding + delta


class Denoiser(nn.Module):
    """eps_theta(x_t, t, c(y) + delta): y is int64 (B,) class ids or (B, 77) tokens; delta (B, *cond_shape)."""

    def __init__(self, backbone, encoder=None, cond_shape=(), embedding_dropout=0.0, null=None, perturb_null=True,
                 tokenize=tokenize):
        super().__init__()
        self.backbone, self.encoder, self.cond_shape = backbone, encoder, tuple(cond_shape)
        self.embedding_dropout = nn.Dropout(embedding_dropout)
        self.null, self.perturb_null = null, perturb_null  # the null condition: a class id, or the tokens of ''
        self.tokenize = tokenize                           # captions -> the token ids the encoder reads

    def is_null(self, y):
        if torch.is_tensor(self.null) and self.null.device != y.device:  # the tokens of '': moved once
            self.null = self.null.to(y.device)
        return (y == self.null).view(len(y), -1).all(dim=1)               # (B,)

    def forward(self, x, t, y, delta=None):
        is_null = self.is_null(y) if delta is not None and not self.perturb_null else None
        if self.encoder is None:  # DiT: c = t_emb + (y_emb + delta) inside adaLN (the paper does not say where)
            return self.backbone(x, t, y, embedding_hook=lambda embedding: perturb_condition(
                embedding, delta, is_null, perturb_null=self.perturb_null))
        context = self.embedding_dropout(self.encoder(y))                 # (B, L, context_dim)
        context = perturb_condition(context, delta, is_null, perturb_null=self.perturb_null)
        return self.backbone(x, t, context=context)


def build_network(spec):
    """The Denoiser from the spec saved in every snapshot (arch, cond, num_classes, latent shape, ...)."""
    channels, resolution = spec['shape'][0], spec['shape'][1]
    if is_dit(spec['arch']):
        kwargs = dict(input_size=resolution, in_channels=channels, num_classes=spec['num_classes'],
                      learn_sigma=True, class_dropout_prob=spec['class_dropout_prob'])
        if spec['arch'] in TINY_DITS:
            backbone = nets.DiT(**TINY_DITS[spec['arch']], **kwargs)
        else:
            backbone = nets.DiT_models[spec['arch']](**kwargs)
        return Denoiser(backbone, None, (backbone.hidden_size,), null=spec['num_classes'],
                        perturb_null=spec.get('cep_perturb_null', True))
    # LDM places attention by downsampling factor: keep the factors when the latents are not the preset's size.
    preset = nets.UNET_PRESETS[spec['arch']]
    attn = tuple(r * resolution // preset['img_resolution'] for r in preset['attn_resolutions'])
    kwargs = {**preset, 'img_resolution': resolution, 'in_channels': channels, 'out_channels': channels,
              'attn_resolutions': attn, 'label_dim': 0, 'dropout': spec['dropout']}
    width = kwargs['context_dim']
    if spec['cond'] == 'class':
        encoder, cond_shape = ClassEmbedder(spec['num_classes'], width), (1, width)
    else:
        encoder, cond_shape = TextEncoder(width, spec['text_layers']), (TEXT_LENGTH, width)
    null = spec['num_classes'] if spec['cond'] == 'class' else tokenize([''])[0]
    return Denoiser(nets.UNet(**kwargs), encoder, cond_shape, spec['embedding_dropout'], null,
                    spec.get('cep_perturb_null', True))



# ----------------------------------------------------------------------------------------------------------------------
# Latent cache: encode every image once with the VAE (fast-DiT style), then train from the cached moments.


@torch.no_grad()
def cache_latents(dataset, vae, path, xflip, batch, device, rank, world_size, workers):
    """Store the posterior moments (mean, logvar) of every image, and of its mirror image when xflip, as float16
    (N, 1 or 2, 2C, h, w) in an .npy file. Sampling z = mean + exp(logvar / 2) n afresh at every step keeps the
    on-the-fly DiT recipe (latent_dist.sample()) while epochs after the first skip the encoder."""
    if os.path.isfile(path):
        return np.load(path, mmap_mode='r')
    # Latent shape from one image; rank 0 creates the temporary file that every rank fills.
    views = 2 if xflip else 1
    probe = torch.from_numpy(dataset.read_many([0], workers)).to(device)
    channels, height, width = vae.encode_moments(probe.float() / 127.5 - 1)[0].shape[1:]
    temp = f'{path}.tmp'
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.lib.format.open_memmap(temp, 'w+', np.float16, (len(dataset), views, 2 * channels, height, width)).flush()
    barrier()

    # Encode each rank's share in chunks, then publish the file under its final name (atomic).
    store = np.load(temp, mmap_mode='r+')
    for start in range(rank * batch, len(dataset), world_size * batch):  # each rank its strided share of chunks
        indices = list(range(start, min(start + batch, len(dataset))))
        x = torch.from_numpy(dataset.read_many(indices, workers)).to(device).float() / 127.5 - 1
        for view in range(views):
            mean, logvar = vae.encode_moments(x.flip(3) if view else x)
            store[indices[0]:indices[-1] + 1, view] = torch.cat([mean, logvar], 1).half().cpu().numpy()
    store.flush()
    barrier()
    if rank == 0:
        os.replace(temp, path)
    barrier()
    return np.load(path, mmap_mode='r')


def clean_batch(rows, flip, z=None, scaling_factor=1.0):
    """x0 of a batch. Pixels: uint8 rows (B, 3, H, W) -> [-1, 1], mirrored where flip (B,). Latents: cached moments
    (B, views, 2C, h, w) -> a fresh sample mean + exp(logvar / 2) z of the image's (or, flipped, its mirror's)
    posterior, times the VAE scaling factor, as DiT's latent_dist.sample() * 0.18215. Returns (B, C, H, W)."""
    if z is None:
        x0 = rows.float() / 127.5 - 1
        return torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
    mean, logvar = rows[torch.arange(len(rows), device=rows.device), flip.long()].float().chunk(2, dim=1)
    return (mean + (0.5 * logvar).exp() * z) * scaling_factor


class RowServer:
    """Rows of a big array by index: from a device tensor when the array fits in 30% of the GPU (or on a CPU),
    else gathered from host memory (or the memory-mapped cache) and copied from pinned memory."""

    def __init__(self, array, device):
        budget = torch.cuda.get_device_properties(device).total_memory * 0.3 if device.type == 'cuda' else math.inf
        self.device, self.on_device = device, array.nbytes <= budget
        self.data = torch.from_numpy(np.array(array)).to(device) if self.on_device else array

    def get(self, index, index_device):
        """index: int64 numpy (B,) for the host path, index_device: the same on the device."""
        if self.on_device:
            return self.data[index_device]
        return to_device(torch.from_numpy(self.data[np.asarray(index)]), self.device)

# ----------------------------------------------------------------------------------------------------------------------
# Distributed helpers, EMA, checkpoints.


def init_distributed(device_flag):
    """torchrun (RANK / WORLD_SIZE in the environment) or a single process; nccl on CUDA, gloo on CPU."""
    device = torch.device(device_flag or ('cuda' if torch.cuda.is_available() else 'cpu'))
    rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world_size, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value):
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def atomic_save(obj, path):
    """Write to a temporary name and rename, so an interrupted write never destroys the previous file; a failed
    write (a full disk) removes its partial file and stops the run with one line naming the file."""
    try:
        torch.save(obj, path + '.tmp')
        os.replace(path + '.tmp', path)
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError from its zip writer
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')
        reason = error.strerror if isinstance(error, OSError) and error.strerror else 'write failed (disk full?)'
        raise RunError(f'cannot write {path}: {reason}') from None


def draw_step_noise(cfg, cur_nimg, shape, cond_shape, latent, device):
    """All per-sample randomness of the training step that starts at image cur_nimg, for the whole global batch,
    from a generator seeded by (seed, cur_nimg): identical for every GPU count and restored exactly on resume;
    each rank takes its own samples. t (B,), eps (B, C, H, W), z: posterior noise of the cached latents, flip (B,),
    drop (B,): null condition for CFG, delta (B, *cond_shape): CEP, xi (B, C, H, W): IP."""
    state = np.random.SeedSequence([cfg.seed, cur_nimg]).generate_state(1, np.uint64)
    g = torch.Generator(device).manual_seed(int(state[0] >> 1))
    b, full = cfg.batch, (cfg.batch,) + tuple(shape)
    return dict(
        t=torch.randint(0, NUM_TIMESTEPS, (b,), generator=g, device=device),
        eps=torch.randn(full, generator=g, device=device),
        z=torch.randn(full, generator=g, device=device) if latent else None,
        flip=torch.rand(b, generator=g, device=device) < (0.5 if cfg.xflip else 0),
        drop=torch.rand(b, generator=g, device=device) < cfg.class_dropout_prob,
        delta=cep_noise((b,) + cond_shape, cfg.cep, cfg.cep_gamma, g, device) if cfg.cep != 'none' else None,
        xi=torch.randn(full, generator=g, device=device) if cfg.input_perturbation else None)


def data_order(seed, cur_nimg, batch, n, cache):
    """Dataset indices of the global batch starting at image cur_nimg: one seeded permutation per epoch."""
    position = np.arange(cur_nimg, cur_nimg + batch)
    index = np.empty(batch, dtype=np.int64)
    for epoch in np.unique(position // n):
        if epoch not in cache:
            cache.clear()
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + int(epoch)))
        mask = position // n == epoch
        index[mask] = cache[epoch].numpy()[position[mask] % n]
    return index


def to_device(tensor, device):
    """Host-to-device copy from pinned memory, which does not wait for the GPU."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == 'cuda' else tensor


def format_time(seconds):
    s = int(seconds)
    return f'{s // 3600}h{s // 60 % 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s' if s >= 60 else f'{s}s'


VQ_F4 = 'hf://DiffusionNoise/ldm_in1k_clean/vqvae'  # the paper's LDM-4 autoencoder (CompVis vq-f4, diffusers layout)


class VQLatents(nn.Module):
    """LDM-4's VQ-f4 seen as a posterior of zero variance, so that it caches and decodes like the KL autoencoder:
    the diffusion runs on the pre-quantisation latents, unscaled (LDM cin256: scale_factor 1), and decoding
    quantises them first (CompVis VQModelInterface.decode, diffusers VQModel.decode)."""

    def __init__(self, vq, scaling_factor=1.0):
        super().__init__()
        self.vq, self.scaling_factor = vq, scaling_factor

    def encode_moments(self, x):
        h = self.vq.encode(x).float()                                     # (B, 3, H/4, W/4)
        return h, torch.full_like(h, -math.inf)                           # exp(-inf / 2) = 0: no sampling noise

    def decode(self, z):
        return self.vq.decode(z / self.scaling_factor)


def load_vae(source, device, cache_dir=None):
    """The autoencoder of --vae: ema / mse (KL-f8, DiT), vq-f4 (LDM-4), or a file, folder, URL or repo id of
    either kind (a file is tried as a VQ model first, by its codebook)."""
    try:
        if source in nets.VAE_URLS:
            vae = nets.load_autoencoder(source, cache_dir=cache_dir)
        else:
            try:
                vae = VQLatents(nets.load_vqmodel(VQ_F4 if source == 'vq-f4' else source, cache_dir=cache_dir))
            except ValueError as error:  # a KL autoencoder has no codebook
                if 'VQ' not in str(error) or os.path.isdir(source):
                    raise
                vae = nets.load_autoencoder(source, cache_dir=cache_dir)
    except (nets.WeightsNotFoundError, ValueError) as error:
        raise UserError(f'--vae={source}: {error}')
    return vae.to(device).eval().requires_grad_(False)


def load_checkpoint(path, flag, keys):
    """One of our .pt files as a dict holding `keys`; a missing, damaged or foreign file is one clear error line."""
    checkpoint = read_checkpoint(path, flag)
    missing = [key for key in keys if key not in checkpoint]
    if missing and 'spec' in checkpoint and 'optimizer' not in checkpoint:
        raise UserError(f'{flag}={path} is a network snapshot, not a training state (training-state-*.pt)')
    if missing:
        raise UserError(f'{flag}={path} was not written by this script (it has no {", ".join(missing)})')
    return checkpoint


def read_checkpoint(path, flag):
    """Any torch checkpoint as a dict (weights only: no code in it runs), or one error line naming the file."""
    if not os.path.isfile(path):
        raise UserError(f'{flag} file not found: {path}')
    if os.path.getsize(path) == 0:
        raise UserError(f'{flag}={path} is empty (0 bytes), e.g. cut short by a full disk')
    try:
        checkpoint = nets.load_weights_file(path)
    except Exception as error:  # torch's own message spans several lines
        raise UserError(f'{flag}={path} is damaged or not a checkpoint ({type(error).__name__})')
    if not isinstance(checkpoint, dict):
        raise UserError(f'{flag}={path} holds a {type(checkpoint).__name__}, not a checkpoint dict')
    return checkpoint


def dit_spec(dit, vae):
    """The spec of a facebookresearch/DiT network: DiT's diffusion (linear betas 1e-4 .. 0.02 over 1000 steps) on
    the latents of the SD KL-f8 autoencoder (scaled by 0.18215), class-conditional with null label num_classes."""
    name = next((name for name, make in nets.DiT_models.items() if dict(make.keywords) == dict(
        depth=len(dit.blocks), hidden_size=dit.hidden_size, num_heads=dit.num_heads, patch_size=dit.patch_size)),
        'DiT-custom')
    return dict(arch=name, cond='class', num_classes=dit.num_classes, shape=(dit.in_channels, dit.input_size,
                dit.input_size), dropout=0.0, text_layers=0, embedding_dropout=0.0, class_dropout_prob=
                float(dit.y_embedder.embedding_table.num_embeddings > dit.num_classes), vae=vae, scaling_factor=
                0.18215, beta_schedule='linear', linear_start=1e-4, linear_end=0.02, cep_perturb_null=True)


def load_network(path, device, vae='', for_fid=False):
    """(Denoiser in eval mode on device, spec) from our network snapshot or a facebookresearch/DiT checkpoint (the
    released DiT-XL-2-256x256.pt, or train.py's {model, ema, opt, args}, whose EMA is taken as DiT's find_model
    does). A DiT's config comes from its shapes (latent size from pos_embed, classes from the label table) and its
    autoencoder is `vae`, default 'mse' as DiT's sample.py, or 'ema' for_fid as its sample_ddp.py."""
    if os.path.isdir(path) or not (os.path.exists(path) or path.endswith(('.pt', '.pth', '.pkl', '.ckpt'))):
        return load_pipeline(path, device, vae)[:2]  # a diffusers folder or a Hugging Face repo id
    checkpoint = read_checkpoint(path, '--network')
    if 'spec' in checkpoint and 'ema' in checkpoint:
        spec = checkpoint['spec']
        net = build_network(spec)
        net.load_state_dict(checkpoint['ema'])
        spec = {**spec, 'vae': vae or spec['vae']}
    elif 'x_embedder.proj.weight' in checkpoint.get('ema', checkpoint.get('model', checkpoint)):
        try:
            dit = nets.dit_from_state_dict(checkpoint)
        except (ValueError, RuntimeError, KeyError) as error:
            raise UserError(f'--network={path}: not a DiT checkpoint this script can read ({error})')
        net = Denoiser(dit, None, (dit.hidden_size,), null=dit.num_classes)
        spec = dit_spec(dit, vae or ('ema' if for_fid else 'mse'))
    else:
        raise UserError(f'--network={path} is neither a snapshot of this script nor a facebookresearch/DiT '
                        f'checkpoint (first keys: {", ".join(list(checkpoint)[:3])})')
    channels_last = torch.device(device).type == 'cuda' and not spec['arch'].startswith('DiT')  # as in training
    net.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    return net.eval().requires_grad_(False), spec


def load_snapshot(path, device, scale, vae='', for_fid=False):
    """A network for sampling -> (EMA Denoiser in eval mode, spec, autoencoder or None)."""
    if os.path.isdir(path) or not (os.path.exists(path) or path.endswith(('.pt', '.pth', '.pkl', '.ckpt'))):
        net, spec, autoencoder = load_pipeline(path, device, vae)
    else:
        net, spec = load_network(path, device, vae, for_fid)
        autoencoder = load_vae(spec['vae'], device) if spec['vae'] else None
    if scale != 1 and not spec['class_dropout_prob']:
        raise FlagError(f'{path} was trained without null conditions (--class_dropout_prob=0): use --scale=1')
    return net, spec, autoencoder


def load_pipeline(source, device, vae=''):
    """(Denoiser, spec, autoencoder) of a released diffusers pipeline, from a folder or a Hugging Face repo id: the
    DiffusionNoise DiTs (DiTPipeline: transformer, KL-f8 vae, scheduler, id2label), the LDM class models
    (LDMClassToImagePipeline: unet, VQ-f4 vqvae, class embedder; null class n_classes - 1, latents decoded unscaled)
    and LDM text models whose encoder is LDM-BERT (LDMTextToImagePipeline: bert + WordPiece tokenizer; latents
    decoded after division by the vqvae's scaling_factor). The betas, spacing and offset come from the scheduler
    config, as the official scripts' Scheduler.from_config(pipeline.scheduler.config)."""
    try:
        parts = nets.load_diffusers_pipeline(source)
    except (ValueError, OSError) as error:
        raise UserError(f'--network={source}: {error}')
    scheduler = parts['scheduler'] or nets.SCHEDULER_DEFAULTS
    if scheduler.get('prediction_type', 'epsilon') != 'epsilon' or scheduler['num_train_timesteps'] != NUM_TIMESTEPS:
        raise UserError(f'--network={source}: only eps-prediction over {NUM_TIMESTEPS} steps is supported, not '
                        f'{scheduler.get("prediction_type")} over {scheduler["num_train_timesteps"]}')
    network, tokenizer = parts['network'], parts['tokenizer']
    if parts['network_kind'] == 'dit':
        rows = network.y_embedder.embedding_table.num_embeddings
        net, cond = Denoiser(network, None, (network.hidden_size,), null=network.num_classes), 'class'
        num_classes, side, has_null = network.num_classes, network.input_size, rows > network.num_classes
    elif parts['class_embedder'] is not None:  # LDM's ClassEmbedder: its last row is the null class
        table = parts['class_embedder']
        encoder = ClassEmbedder(table.num_embeddings - 1, table.embedding_dim)
        encoder.embedding = table
        net = Denoiser(network, encoder, (1, table.embedding_dim), null=table.num_embeddings - 1)
        cond, num_classes, side, has_null = 'class', table.num_embeddings - 1, network.img_resolution, True
    elif parts['text_encoder'] is not None and tokenizer is not None:
        null = tokenizer([''])[0]
        net = Denoiser(network, parts['text_encoder'], (tokenizer.max_length, network.config['context_dim']),
                       null=null, tokenize=tokenizer)
        cond, num_classes, side, has_null = 'text', 0, network.img_resolution, True
    else:
        raise UserError(f'--network={source}: a {parts["pipeline"]} without a class embedder or an LDM-BERT text '
                        f'encoder and tokenizer ({", ".join(parts["components"])})')
    autoencoder = parts['autoencoder']
    if vae:
        autoencoder = load_vae(vae, 'cpu')
    elif parts['autoencoder_kind'] == 'vq':
        autoencoder = VQLatents(autoencoder, autoencoder.scaling_factor if cond == 'text' else 1.0)
    spec = dict(arch=parts['pipeline'], cond=cond, num_classes=num_classes, shape=(network.in_channels, side, side),
                class_dropout_prob=float(has_null), vae=vae or source, scaling_factor=autoencoder.scaling_factor,
                betas=nets.diffusers_betas(scheduler).tolist(), timestep_spacing=scheduler.get('timestep_spacing'),
                steps_offset=scheduler.get('steps_offset', 0), id2label=parts['id2label'],
                # DDIMScheduler.from_config keeps these (diffusers' defaults: clip_sample True, range 1, alpha 1)
                clip_sample=scheduler.get('clip_sample_range', 1.0) if scheduler.get('clip_sample', True) else 0.0,
                set_alpha_to_one=scheduler.get('set_alpha_to_one', True))
    net.to(device)
    return net.eval().requires_grad_(False), spec, autoencoder.to(device).eval()

# ----------------------------------------------------------------------------------------------------------------------
# Sampling entry point shared by the grids, `generate`, `eval` and `walk`.


@torch.no_grad()
def sample_images(net, spec, vae, noise, y, cfg, randn_like=torch.randn_like):
    """Noise (B, C, h, w) and conditions -> uint8 images (B, 3, H, W), with the sampler chosen by cfg."""
    if 'betas' in spec:  # a released pipeline's scheduler config
        alphas_cumprod = torch.cumprod(1 - torch.tensor(spec['betas'], dtype=torch.float64), dim=0)
    else:
        alphas_cumprod = make_alphas_cumprod(spec['beta_schedule'], spec['linear_start'], spec['linear_end'])
    # Timestep spacing: the flag, else the pipeline's scheduler config, else diffusers' default for the scheduler.
    spacing = cfg.timestep_spacing or spec.get('timestep_spacing') or {'dpm': 'linspace', 'ddim': 'leading'}.get(
        cfg.scheduler)
    if cfg.scheduler != 'ddpm' and spacing not in ('linspace', 'leading'):
        raise UserError(f'timestep_spacing {spacing!r} of the scheduler config is not supported; pass '
                        '--timestep_spacing=linspace|leading')
    offset = spec.get('steps_offset', 1)
    # Guidance needs the null condition (Eq. 2); scale 1 is plain conditional sampling, one forward pass a step.
    y_null = torch.as_tensor(net.null, device=noise.device).expand_as(y) if cfg.scale != 1 else None
    with torch.autocast(noise.device.type, torch.bfloat16, enabled=cfg.precision == 'bf16'):
        if cfg.scheduler == 'dpm':
            x = dpm_solver_sample(net, noise, y, alphas_cumprod, cfg.ddim_steps, cfg.scale, y_null, spacing,
                                  cfg.cfg_channels, offset)
        elif cfg.scheduler == 'ddim':
            x = ddim_sample(net, noise, y, alphas_cumprod, cfg.ddim_steps, cfg.scale, y_null, cfg.ddim_eta, spacing,
                            randn_like, cfg.cfg_channels, offset, spec.get('clip_sample', 0.0),
                            1.0 if spec.get('set_alpha_to_one', True) else alphas_cumprod[0].item())
        else:
            x = ddpm_sample(net, noise, y, alphas_cumprod, cfg.ddim_steps, cfg.scale, y_null, cfg.cfg_channels,
                            randn_like)
        if vae is not None:
            x = vae.decode(x.float())
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def seeded_noise(seeds, shape, device):
    """Image k's noise depends on seed k only, whatever the batch or GPU count."""
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    stack = lambda shape_: torch.stack([torch.randn(shape_, generator=g, device=device) for g in generators])
    return stack(shape), lambda x: stack(x.shape[1:])


def save_grid(images, path, columns):
    """uint8 (B, 3, H, W) -> one PNG, images row by row."""
    b, c, h, w = images.shape
    rows = -(-b // columns)
    images = torch.cat([images, images.new_zeros(rows * columns - b, c, h, w)])
    grid = images.view(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)
    PIL.Image.fromarray(grid.cpu().numpy()).save(path)

# ----------------------------------------------------------------------------------------------------------------------
# Training loop.


def load_conditions(cfg, dataset):
    """Check the labels or captions -> (num_classes, clean conditions: int64 (N,) labels or (N, 77) tokens)."""
    n, text = len(dataset), cfg.cond == 'text'
    given = dataset.captions if text else dataset.labels
    if given is None or len(given) != n:
        where = 'captions.txt or --captions' if text else 'dataset.json, class folders or y in the .npz'
        raise UserError(f'--cond={cfg.cond} needs one {"caption" if text else "label"} per image ({n}) in {where}; '
                        f'found {0 if given is None else len(given)}')
    if text:
        return 0, tokenize(dataset.captions)
    # Labels must fit the embedding table (num_classes rows plus the null class): the count comes from the flag,
    # the class folders or the .npz's `classes`, else 1 + the largest label, which may not exceed the image count.
    num_classes = cfg.num_classes or dataset.num_classes or int(dataset.labels.max()) + 1
    where = '--num_classes' if cfg.num_classes else 'the data' if dataset.num_classes else '1 + the largest label'
    bad = (dataset.labels < 0) | (dataset.labels >= num_classes)
    if bad.any():
        raise UserError(f'label {dataset.labels[bad][0]} of image #{bad.argmax()} in {cfg.data} is outside '
                        f'[0, {num_classes}) ({num_classes} classes from {where})')
    if not cfg.num_classes and num_classes > n:
        raise UserError(f'the labels of {cfg.data} reach {num_classes - 1}, more classes than its {n} images: '
                        f'pass --num_classes if that is meant')
    if cfg.corruption_classes and max(map(int, cfg.corruption_classes.split(','))) >= num_classes:
        raise FlagError(f'--corruption_classes must lie in [0, {num_classes})')
    return num_classes, torch.from_numpy(dataset.labels)


def corrupt_conditions(cfg, clean):
    """Sec. 3.1: the training conditions, corrupted once from --seed. Returns (label array (N,) or caption source
    indices (N,), corrupted indices)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.cond == 'text':
        return swap_captions(len(clean), cfg.corruption_ratio, generator)
    classes = torch.tensor([int(c) for c in cfg.corruption_classes.split(',')]) if cfg.corruption_classes else None
    try:
        return corrupt_labels(clean, cfg.corruption_ratio, generator, classes)
    except ValueError as error:
        raise UserError(str(error))


def training_rows(cfg, dataset, vae, cache_dir, batch_gpu, rank, world_size, device):
    """What the steps read: uint8 images (N, 3, H, W), or the VAE posterior moments (N, views, 2C, h, w) cached
    once per data set, VAE and flags. Returns (rows, the (C, H, W) shape the network sees)."""
    if vae is None:
        rows = dataset.read_many(range(len(dataset)), cfg.workers)          # (N, 3, H, W) uint8
        shape = rows.shape[1:]
    else:
        key = json.dumps([os.path.abspath(cfg.data), len(dataset), getattr(dataset, 'names', None), cfg.resolution,
                          cfg.vae, cfg.xflip])
        path = os.path.join(cache_dir, f'latents-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy')
        if rank == 0:
            print(f'Latent cache: {path}', flush=True)
        rows = cache_latents(dataset, vae, path, cfg.xflip, batch_gpu, device, rank, world_size, cfg.workers)
        shape = (rows.shape[2] // 2,) + rows.shape[3:]                      # (C, h, w) of the latents
    if shape[1] != shape[2]:
        raise UserError(f'images must be square, got {shape[2]}x{shape[1]}; set --resolution')
    return rows, tuple(shape)


STATE_NAME = re.compile(r'training-state-\d+\.pt')


def open_run_dir(cfg, desc):
    """(run folder, training state to resume or None). --resume=auto takes the newest matching run: its newest state,
    or, when it has none (killed during its very first write), the folder itself to start over in. Partial *.tmp
    files of a killed or failed write are removed from the folder that is resumed or reused."""
    if cfg.resume and cfg.resume != 'auto':
        run_dir, state = os.path.dirname(os.path.abspath(cfg.resume)), cfg.resume
    else:
        runs = sorted(d for d in os.listdir(cfg.outdir) if re.fullmatch(rf'\d{{5}}-{re.escape(desc)}', d)) \
            if cfg.resume and os.path.isdir(cfg.outdir) else []
        if not runs:
            os.makedirs(cfg.outdir, exist_ok=True)
            ids = [int(d[:5]) for d in os.listdir(cfg.outdir) if re.match(r'\d{5}-', d)]
            run_dir = os.path.join(cfg.outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')
            os.makedirs(run_dir)
            return run_dir, None
        run_dir = os.path.join(cfg.outdir, runs[-1])
        states = sorted(f for f in os.listdir(run_dir) if STATE_NAME.fullmatch(f))
        state = os.path.join(run_dir, states[-1]) if states else None
        if state is None and os.path.exists(os.path.join(run_dir, 'stats.jsonl')):
            os.remove(os.path.join(run_dir, 'stats.jsonl'))  # progress of a start that left no state
    for name in os.listdir(run_dir):
        if '.tmp' in name:
            os.remove(os.path.join(run_dir, name))
    return run_dir, state


def record_run(cfg, run_dir, resumed_nimg, **facts):
    """config.json with the provenance; on resume, drop the progress lines written after the state we resume from
    (a run killed between a tick and its snapshot)."""
    stats_path = os.path.join(run_dir, 'stats.jsonl')
    if resumed_nimg is not None and os.path.isfile(stats_path):
        with open(stats_path) as file:
            kept = [line for line in file if json.loads(line)['kimg'] <= resumed_nimg / 1000 + 1e-9]
        with open(stats_path + '.tmp', 'w') as file:
            file.writelines(kept)
        os.replace(stats_path + '.tmp', stats_path)
    with open(os.path.join(run_dir, 'config.json'), 'w') as file:
        json.dump(dict(config=dataclasses.asdict(cfg), command=sys.argv, torch=torch.__version__, **facts), file,
                  indent=2)


def tick_record(s, cur_nimg, total_nimg, tick_nimg, tick_seconds, total_seconds, lr, gpumem):
    """The tick's summed stats s (loss sum, count, 4 t-bins (sum, count), corrupted, dropped; see the loop) ->
    (the stats.jsonl record, the progress line)."""
    kimg = tick_nimg / 1000
    record = dict(kimg=round(cur_nimg / 1000, 3), time=round(total_seconds, 1),
                  sec_per_kimg=round(tick_seconds / kimg, 3), img_per_sec=round(tick_nimg / tick_seconds, 1),
                  gpumem_gb=round(gpumem, 2), loss=s[0] / s[1], lr=lr,
                  loss_by_t=[s[2 + k] / max(s[6 + k], 1) for k in range(4)],  # t in [0, 250), ..., [750, 1000)
                  corrupted_rate=s[10] / max(s[1] - s[11], 1), null_rate=s[11] / s[1])
    eta_seconds = tick_seconds / kimg * max(total_nimg - cur_nimg, 0) / 1000
    line = (f'kimg {record["kimg"]:.1f} | time {format_time(total_seconds)} | sec/kimg {tick_seconds / kimg:.2f} | '
            f'ETA {format_time(eta_seconds)} | loss {record["loss"]:.4f} | lr {lr:.1e} | img/s '
            f'{record["img_per_sec"]:.0f} | gpumem {gpumem:.1f}G | corrupted {record["corrupted_rate"]:.3f} | '
            f'null {record["null_rate"]:.3f} | loss by t ' + ' '.join(f'{v:.3f}' for v in record['loss_by_t']))
    return record, line


def gather_rng_states(device, world_size):
    """The (CPU, CUDA) generator states of every rank, for the training state."""
    rng = [(torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == 'cuda' else None)] * world_size
    if dist.is_initialized():
        dist.all_gather_object(rng, rng[0])
    return rng


STATE_KEYS = ('net', 'ema', 'optimizer', 'cur_nimg', 'rng')


def restore_training_state(state, net, ema, optimizer, rank, world_size, device):
    """Weights, optimizer and this rank's RNG states (dropout draws from them) from a training state -> cur_nimg.
    The data order and the step noise need no state: they follow from (--seed, cur_nimg)."""
    net.load_state_dict(state['net'])
    ema.load_state_dict(state['ema'])
    optimizer.load_state_dict(state['optimizer'])
    if len(state['rng']) == world_size:  # another GPU count continues with fresh global generators
        torch.set_rng_state(state['rng'][rank][0])
        if device.type == 'cuda':
            torch.cuda.set_rng_state(state['rng'][rank][1], device)
    return state['cur_nimg']


def save_training_state(run_dir, tag, state):
    """training-state-<tag>.pt, then remove the older ones: resuming needs only the newest."""
    name = f'training-state-{tag}.pt'
    old_states = {f for f in os.listdir(run_dir) if STATE_NAME.fullmatch(f)} - {name}
    atomic_save(state, os.path.join(run_dir, name))
    for old in old_states:
        os.remove(os.path.join(run_dir, old))


def transfer_weights(net, spec, path):
    """Load the weights of --transfer into the freshly built network; every tensor must match in name and shape."""
    if not os.path.isfile(path):  # a diffusers DiT computes another function (timestep frequencies, norm eps)
        raise UserError(f'--transfer={path}: not a file; --transfer takes a facebookresearch/DiT .pt or a snapshot '
                        'of this script (diffusers pipelines sample through generate / eval / walk only)')
    source, source_spec = load_network(path, 'cpu')
    mine, theirs = net.state_dict(), source.state_dict()
    wrong = [key for key in mine if key not in theirs or theirs[key].shape != mine[key].shape]
    if wrong or len(theirs) != len(mine):
        where = wrong[0] if wrong else 'an extra tensor'
        raise UserError(f'--transfer={path} ({source_spec["arch"]}, {source_spec["num_classes"]} classes, latents '
                        f'{tuple(source_spec["shape"])}) does not fit --arch={spec["arch"]} with {spec["num_classes"]} '
                        f'classes on {tuple(spec["shape"])} data: {where} differs')
    net.load_state_dict(theirs)


def training_loop(cfg, rank, world_size, device):
    def print0(*args):
        if rank == 0:
            print(*args, flush=True)
            with open(os.path.join(run_dir, 'log.txt'), 'a') as log:
                print(*args, file=log)

    # Performance settings.
    torch.backends.cuda.matmul.allow_tf32 = True                          # TF32 matmuls: free speed on Ampere+
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True                                 # fixed shapes: pick the fastest kernels
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision == 'bf16')
    channels_last = device.type == 'cuda' and not is_dit(cfg.arch)        # NHWC convolutions on tensor cores
    batch_gpu = cfg.batch_gpu or cfg.batch // world_size
    rounds = cfg.batch // (batch_gpu * world_size)
    cache_dir = cfg.cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'ldm_labelnoise')

    # Load and check the resume file, the data, its conditions and the network before anything is written.
    state = load_checkpoint(cfg.resume, '--resume', STATE_KEYS) if cfg.resume not in ('', 'auto') else None
    if rank == 0 and cfg.data == 'cifar10':
        download_cifar10(cache_dir)
    barrier()
    dataset = ImageDataset(cfg.data, cfg.resolution, cache_dir, cfg.captions)
    n = len(dataset)
    num_classes, clean = load_conditions(cfg, dataset)
    vae = None if cfg.vae == 'none' else load_vae(cfg.vae, device, cache_dir)
    rows, shape = training_rows(cfg, dataset, vae, cache_dir, batch_gpu, rank, world_size, device)
    source, corrupted = corrupt_conditions(cfg, clean)                    # Sec. 3.1: fixed once, from --seed
    spec = dict(arch=cfg.arch, cond=cfg.cond, num_classes=num_classes, shape=shape, dropout=cfg.dropout,
                text_layers=cfg.text_layers, embedding_dropout=cfg.embedding_dropout, class_dropout_prob=
                cfg.class_dropout_prob, vae=cfg.vae if vae else None, scaling_factor=vae.scaling_factor if vae else 1,
                beta_schedule=cfg.beta_schedule, linear_start=cfg.linear_start, linear_end=cfg.linear_end,
                cep_perturb_null=cfg.cep_perturb_null)
    torch.manual_seed(cfg.seed)
    try:
        net = build_network(spec)
    except ValueError as error:  # e.g. a DiT patch size that does not divide the image
        raise FlagError(str(error))
    if cfg.transfer:  # start from released or earlier weights (a facebookresearch/DiT .pt or our snapshot)
        transfer_weights(net, spec, cfg.transfer)
    net = net.to(device, memory_format=torch.channels_last if channels_last else None).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == 'cuda')             # one kernel for all parameters

    # Open the run folder; restore a training state and the conditions saved with it.
    name = os.path.splitext(os.path.basename(cfg.data.rstrip('/')))[0]
    desc = f'{name}-{cfg.arch.replace("/", "")}-{cfg.cond}-eta{cfg.corruption_ratio:g}-cep{cfg.cep}-batch{cfg.batch}'
    run_dir, resume_path = broadcast_object(open_run_dir(cfg, desc) if rank == 0 else None)
    if resume_path and state is None:  # --resume=auto found this one
        state = load_checkpoint(resume_path, '--resume', STATE_KEYS)
    cur_nimg = restore_training_state(state, net, ema, optimizer, rank, world_size, device) if resume_path else 0
    del state  # the host copy of the weights and optimizer moments is no longer needed
    conditions_path = os.path.join(run_dir, 'conditions.npz')
    if resume_path and os.path.isfile(conditions_path):  # a resumed run keeps its own corrupted conditions
        with np.load(conditions_path) as saved:
            source, corrupted = torch.from_numpy(saved['source']), torch.from_numpy(saved['corrupted'])
    elif rank == 0:
        np.savez(conditions_path + '.tmp.npz', source=source.numpy(), corrupted=corrupted.numpy())
        os.replace(conditions_path + '.tmp.npz', conditions_path)
    conditions = source if cfg.cond == 'class' else clean[source].short()  # (N,) labels or (N, 77) tokens
    conditions = conditions.to(device)
    is_corrupted = torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, corrupted.to(device), True)
    server = RowServer(rows, device)
    ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None) \
        if world_size > 1 else net
    model = torch.compile(ddp) if cfg.compile else ddp                    # fused kernels behind --compile
    alphas_cumprod = make_alphas_cumprod(cfg.beta_schedule, cfg.linear_start, cfg.linear_end).to(device)
    y_null = torch.as_tensor(net.null, device=device)                  # the class id num_classes, or tokens of ''
    if rank == 0:
        record_run(cfg, run_dir, cur_nimg if resume_path else None, spec=spec, world_size=world_size, images=n,
                   corrupted=len(corrupted), device=torch.cuda.get_device_name(device) if device.type == 'cuda'
                   else 'cpu')
    print0(json.dumps(dataclasses.asdict(cfg), indent=2))
    print0(f'{"Resuming" if resume_path else "Starting"} {run_dir}: {n} images, {len(corrupted)} corrupted '
           f'conditions, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {world_size} process(es)'
           f' x {rounds} round(s) of {batch_gpu}')

    # Fixed noise and conditions of the sample grids.
    grid_noise = torch.randn((cfg.grid,) + shape, generator=torch.Generator().manual_seed(0)).to(device)
    grid_y = torch.arange(cfg.grid, device=device) % num_classes if cfg.cond == 'class' else \
        clean[torch.arange(cfg.grid) % n].to(device)

    # Training.
    shares = [torch.arange(r * batch_gpu, (r + 1) * batch_gpu) * world_size + rank for r in range(rounds)]
    shares_device = [share.to(device) for share in shares]                # positions of this rank's samples
    stats = torch.zeros(12, device=device)  # loss sum, count, 4 t-bins (sum, count), corrupted, dropped
    order_cache, lr, total_nimg = {}, cfg.lr, round(cfg.kimg * 1000)
    start_time, tick_start_time, tick_start_nimg = time.time(), time.time(), cur_nimg
    while cur_nimg < total_nimg:
        # This step's data and noise for the whole global batch; each rank takes its share.
        index = data_order(cfg.seed, cur_nimg, cfg.batch, n, order_cache)                 # (batch,) numpy
        index_device = to_device(torch.from_numpy(index), device)
        noise = draw_step_noise(cfg, cur_nimg, shape, net.cond_shape, vae is not None, device)

        # Accumulate gradients; DDP synchronises only on the last round.
        for r, (share, mine) in enumerate(zip(shares, shares_device)):
            i = index_device[mine]                                        # (batch_gpu,) dataset indices
            my = {key: None if value is None else value[mine] for key, value in noise.items()}  # this round's share
            x0 = clean_batch(server.get(index[share.numpy()], i), my['flip'], my['z'], spec['scaling_factor'])
            x0 = x0.contiguous(memory_format=torch.channels_last) if channels_last else x0  # (batch_gpu, C, H, W)
            y = drop_conditions(conditions[i].long(), y_null, my['drop'])
            with ddp.no_sync() if world_size > 1 and r + 1 < rounds else contextlib.nullcontext():
                with autocast:
                    loss = diffusion_loss(model, x0, y, my['t'], my['eps'], alphas_cumprod, my['delta'], my['xi'],
                                          cfg.input_perturbation)
                loss.sum().mul(world_size / cfg.batch).backward()         # DDP averages: the global-batch mean
            with torch.no_grad():  # diagnostics, summed on the device and read once per tick
                bins = my['t'] * 4 // len(alphas_cumprod)
                stats[0] += loss.sum()
                stats[1] += len(loss)
                stats[2:6].index_add_(0, bins, loss)
                stats[6:10].index_add_(0, bins, torch.ones_like(loss))
                stats[10] += (is_corrupted[i] & ~my['drop']).sum()
                stats[11] += my['drop'].sum()

        # Update weights: optional warm-up and clipping, AdamW.
        lr = cfg.lr * min(1.0, cur_nimg / (cfg.lr_rampup_kimg * 1000)) if cfg.lr_rampup_kimg else cfg.lr
        for group in optimizer.param_groups:
            group['lr'] = lr
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cur_nimg += cfg.batch

        # Update EMA (DiT: every step with a fixed decay; decay 0 copies the weights).
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - cfg.ema_decay)
            for buffer_ema, buffer in zip(ema.buffers(), net.buffers()):
                buffer_ema.copy_(buffer)

        # Maintenance once per tick: progress line and stats.jsonl.
        done = cur_nimg >= total_nimg
        if not done and cur_nimg < tick_start_nimg + cfg.tick * 1000:
            continue
        if dist.is_initialized():
            dist.all_reduce(stats)
        gpumem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else 0
        record, line = tick_record(stats.tolist(), cur_nimg, total_nimg, cur_nimg - tick_start_nimg,  # host sync
                                   time.time() - tick_start_time, time.time() - start_time, lr, gpumem)
        stats.zero_()
        print0(line)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        if rank == 0:
            with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as file:
                file.write(json.dumps(record) + '\n')

        # Snapshot: sample grid, EMA network, training state with the RNG states of every rank.
        if done or round(cur_nimg / (cfg.tick * 1000)) % cfg.snap == 0:
            rng = gather_rng_states(device, world_size)
            if rank == 0:
                tag = f'{cur_nimg // 1000:06d}'
                save_grid(sample_images(ema, spec, vae, grid_noise, grid_y, cfg),
                          os.path.join(run_dir, f'samples-{tag}.png'), math.ceil(math.sqrt(cfg.grid)))
                atomic_save(dict(ema=ema.state_dict(), spec=spec, kimg=cur_nimg / 1000),
                            os.path.join(run_dir, f'network-snapshot-{tag}.pt'))
                save_training_state(run_dir, tag, dict(net=net.state_dict(), ema=ema.state_dict(), optimizer=
                                                       optimizer.state_dict(), cur_nimg=cur_nimg, rng=rng, spec=spec,
                                                       config=dataclasses.asdict(cfg)))
            barrier()
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
    print0(f'Done: {run_dir}')
    return run_dir

# ----------------------------------------------------------------------------------------------------------------------
# Generation, evaluation and the circular walk.


def parse_seeds(text):
    seeds = []
    for part in text.split(','):
        match = re.fullmatch(r'(\d+)(?:-(\d+))?', part.strip())
        if not match:
            raise FlagError(f'--seeds must look like 0-49999 or 1,5,9, got {text!r}')
        if match[2] and int(match[2]) < int(match[1]):
            raise FlagError(f'--seeds={text}: the range {part.strip()} is reversed (empty)')
        seeds += list(range(int(match[1]), int(match[2] or match[1]) + 1))
    return seeds


def load_prompts(cfg, spec):
    """The prompts of a text model (None for a class model, after checking --class_idx)."""
    if spec['cond'] != 'text':
        if not -1 <= cfg.class_idx < spec['num_classes']:
            raise FlagError(f'--class_idx must be in [0, {spec["num_classes"]}) or -1')
        if cfg.prompts:  # the official DiT README command passes --prompt_data mscoco to a class model
            print(f'note: --prompts={cfg.prompts} is not used by a class-conditional model', file=sys.stderr)
        return None
    if cfg.prompts in ('mscoco', 'parti'):
        raise FlagError(f'--prompt_data={cfg.prompts} (official Hhhhhhao/DiffusionNoise flag) is not supported: it '
                        'reads a Hugging Face `datasets` corpus; use --prompts=FILE with one caption a line')
    if not cfg.prompts or not os.path.isfile(cfg.prompts):
        raise UserError(f'a text model needs --prompts, a file with one prompt a line: {cfg.prompts!r}')
    with open(cfg.prompts, encoding='utf-8') as file:
        prompts = [line for line in file.read().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f'--prompts={cfg.prompts} holds no prompt')
    return prompts


def generation_plan(cfg, spec, prompts):
    """[(file name, seed, condition)] of every image. --seeds: <thousands>/<seed>.png, class seed % num_classes
    (or --class_idx), prompt seed % len(prompts). Otherwise the official scripts' folders: <class>/<k:05>.jpeg,
    n_samples per class in [class_start_idx, class_end_idx) (text: per prompt), the seed of image k of condition c
    drawn from (--seed, c, k): the same images for any batch size or GPU count."""
    if cfg.seeds:
        seeds = parse_seeds(cfg.seeds)
        return [(f'{s - s % 1000:06d}/{s:06d}.png', s, prompts[s % len(prompts)] if prompts else cfg.class_idx
                 if cfg.class_idx >= 0 else s % spec['num_classes']) for s in seeds]
    count = len(prompts) if prompts else spec['num_classes']
    end = count if cfg.class_end_idx == -1 else cfg.class_end_idx
    if end > count:
        raise FlagError(f'--class_end_idx={end} exceeds the {count} {"prompts" if prompts else "classes"}')
    n_samples = cfg.n_samples or (5 if prompts else 100)                  # the official defaults
    plan = []
    for c in range(cfg.class_start_idx, end):
        for k in range(n_samples):
            seed = int(np.random.SeedSequence([cfg.seed, c, k]).generate_state(1, np.uint64)[0] >> 1)
            plan.append((f'{c}/{k:05d}.jpeg' if not prompts else f'{c:05d}/{k:05d}.jpeg', seed,
                         prompts[c] if prompts else c))
    return plan


def sample_plan(net, spec, vae, plan, cfg, device):
    """Yield (plan entries, uint8 images) in batches of --batch; image k depends only on its seed."""
    for start in range(0, len(plan), cfg.batch):
        chunk = plan[start:start + cfg.batch]
        noise, randn_like = seeded_noise([seed for _, seed, _ in chunk], tuple(spec['shape']), device)
        conditions = [condition for _, _, condition in chunk]
        y = net.tokenize(conditions) if spec['cond'] == 'text' else torch.tensor(conditions)
        yield chunk, sample_images(net, spec, vae, noise, y.to(device), cfg, randn_like)


def check_image_size(cfg, spec, vae):
    side = spec['shape'][1] * (vae.vq.downscale_factor if isinstance(vae, VQLatents) else vae.downscale_factor
                               if vae is not None else 1)
    if cfg.image_size and cfg.image_size != side:
        raise FlagError(f'--image_size={cfg.image_size}: this network makes {side}x{side} images')


def generate(cfg, rank, world_size, device):
    """One image per plan entry (generation_plan), plus dataset.json with the labels (class models)."""
    check_writable(cfg.outdir, '--outdir')
    net, spec, vae = load_snapshot(cfg.network, device, cfg.scale, cfg.vae)
    check_image_size(cfg, spec, vae)
    prompts = load_prompts(cfg, spec)
    plan = generation_plan(cfg, spec, prompts)
    if rank == 0 and prompts and not cfg.seeds:  # the official meta.txt of each prompt folder
        for c in sorted({name.split('/')[0] for name, _, _ in plan}):
            os.makedirs(os.path.join(cfg.outdir, c), exist_ok=True)
            with open(os.path.join(cfg.outdir, c, 'meta.txt'), 'w', encoding='utf-8') as file:
                file.write(f'Prompt: {prompts[int(c)]}\n')
    # Images are dealt round-robin to the ranks; JPEGs as the official scripts save them (quality 100, 4:4:4).
    for chunk, images in sample_plan(net, spec, vae, plan[rank::world_size], cfg, device):
        for (name, _, _), image in zip(chunk, images.permute(0, 2, 3, 1).cpu().numpy()):
            path = os.path.join(cfg.outdir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            options = dict(quality=100, subsampling=0) if name.endswith('.jpeg') else {}
            PIL.Image.fromarray(image).save(path + '.tmp', format='JPEG' if options else 'PNG', **options)
            os.replace(path + '.tmp', path)
    barrier()
    if rank == 0:
        if spec['cond'] == 'class':  # the folder is then a labelled dataset (EDM dataset.json)
            with open(os.path.join(cfg.outdir, 'dataset.json'), 'w') as file:
                json.dump({'labels': [[name, label] for name, _, label in plan]}, file)
        print(f'wrote {len(plan)} images to {cfg.outdir}')


def evaluate(cfg, rank, world_size, device):
    """fid.compute_metrics on --num class-balanced samples held in memory; appends to metrics.jsonl beside the
    network (in the working folder for a repo id)."""
    if not os.path.isfile(cfg.ref):
        raise UserError(f'--ref statistics not found: {cfg.ref!r} (make them with `python fid.py ref`)')
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(cfg.network)) if os.path.isfile(cfg.network)
                                else os.getcwd(), 'metrics.jsonl')
    check_writable(os.path.dirname(metrics_path), 'the metrics file')
    net, spec, vae = load_snapshot(cfg.network, device, cfg.scale, cfg.vae, for_fid=True)
    prompts = load_prompts(cfg, spec)
    try:
        detector = fid.load_inception(cfg.fid_weights or None, device=device)
        # Inception Score needs the classifier head, which FID-only weights files lack.
        names = tuple(m for m in cfg.metrics.split(',') if m != 'is' or detector.has_classifier)
        if len(names) < len(cfg.metrics.split(',')):
            print('note: these Inception weights have no classifier, so no Inception Score')
        protocol = fid.resolve_protocol(cfg.protocol or None, ref=cfg.ref, metrics=names, detector=detector,
                                        num=cfg.num)                      # every check before the long pass
    except (OSError, ValueError) as error:
        raise UserError(str(error))
    # Each rank samples its share of the seeds; fid.compute_metrics gathers the features.
    plan = generation_plan(dataclasses.replace(cfg, seeds=f'0-{cfg.num - 1}'), spec, prompts)[rank::world_size]
    batches = (images for _, images in sample_plan(net, spec, vae, plan, cfg, device))
    results = fid.compute_metrics(batches, cfg.ref, metrics=names, detector=detector, device=device,
                                  protocol=protocol)
    if rank == 0:
        sampler = {field.name: getattr(cfg, field.name) for field in dataclasses.fields(SamplerConfig)}
        record = dict(network=os.path.basename(cfg.network), num=cfg.num, **sampler, **results)
        print(json.dumps(record))
        with open(metrics_path, 'a') as file:
            file.write(json.dumps(record) + '\n')
    return results


def walk(cfg, rank, world_size, device):
    """The official circular walk: z_k = cos(theta_k) n_x + sin(theta_k) n_y with theta = pi * linspace(0, 2, K),
    one row per network, one grid per class (or prompt) and walk."""
    if rank != 0:  # a handful of grids: one process does them all
        return
    check_writable(cfg.outdir, '--outdir')
    # Load the networks and check that they share a latent shape and a kind of condition.
    snapshots = [load_snapshot(path, device, cfg.scale, cfg.vae) for path in cfg.network.split(',')]
    spec0 = snapshots[0][1]
    if any((spec['shape'], spec['cond']) != (spec0['shape'], spec0['cond']) for _, spec, _ in snapshots):
        raise UserError('walk compares networks with the same latent shape and kind of condition')
    if spec0['cond'] == 'text' and not cfg.prompt:
        raise FlagError('a walk over a text model needs --prompt')
    if spec0['cond'] == 'class' and not all(c.isdigit() and int(c) < spec0['num_classes']
                                            for c in cfg.classes.split(',')):
        raise FlagError(f'--classes must list class ids in [0, {spec0["num_classes"]})')
    conditions = cfg.prompt.splitlines() if spec0['cond'] == 'text' else [int(c) for c in cfg.classes.split(',')]

    # One generator for all walks, as the official script; the same noise circle for every network.
    generator = torch.Generator().manual_seed(cfg.seed)
    theta = torch.linspace(0, 2, cfg.walk_steps) * math.pi                # the end points repeat, as official
    os.makedirs(cfg.outdir, exist_ok=True)
    for condition in conditions:
        for i in range(cfg.n_samples or 5):  # the official default: 5 walks per class
            noise_x, noise_y = (torch.randn(tuple(spec0['shape']), generator=generator) for _ in range(2))
            noise = (theta.cos().view(-1, 1, 1, 1) * noise_x + theta.sin().view(-1, 1, 1, 1) * noise_y).to(device)
            rows = []
            for net, spec, vae in snapshots:  # stochastic samplers: the same step noise for every network too
                y = (net.tokenize([condition] * cfg.walk_steps) if spec0['cond'] == 'text' else
                     torch.full((cfg.walk_steps,), condition, dtype=torch.int64)).to(device)
                step_noise = torch.Generator(device).manual_seed(cfg.seed + i)
                randn_like = lambda x: torch.randn(x.shape, generator=step_noise, device=x.device)
                rows.append(torch.cat([sample_images(net, spec, vae, noise[j:j + cfg.batch], y[j:j + cfg.batch], cfg,
                                                     randn_like) for j in range(0, cfg.walk_steps, cfg.batch)]))
            tag = re.sub(r'\W+', '_', str(condition))[:40]
            save_grid(torch.cat(rows), os.path.join(cfg.outdir, f'walk-{tag}-{i:03d}.png'), cfg.walk_steps)
    print(f'wrote {len(conditions) * (cfg.n_samples or 5)} walk grids to {cfg.outdir}')

# ----------------------------------------------------------------------------------------------------------------------
# Command line.


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ('-h', '--help'):
        print(TOP_HELP)
        return
    command = argv.pop(0) if argv and argv[0] in ('train', 'generate', 'eval', 'walk') else 'train'
    rank = int(os.environ.get('RANK', 0))
    try:
        # Flags are parsed and checked before a process group starts, so a bad flag writes and waits for nothing.
        cfg = parse_config(TrainConfig if command == 'train' else GenerateConfig, argv, command)
        check_config(cfg, int(os.environ.get('WORLD_SIZE', 1)))
        if command == 'train' and cfg.dry_run:
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            return
        if getattr(cfg, 'hub_token', ''):  # the official --hub_token, for gated repositories
            os.environ['HF_TOKEN'] = cfg.hub_token
        rank, world_size, device = init_distributed(cfg.device)
        cfg = dataclasses.replace(cfg, precision=cfg.precision or ('bf16' if device.type == 'cuda' else 'fp32'))
        run = dict(train=training_loop, generate=generate, eval=evaluate, walk=walk)[command]
        return run(cfg, rank, world_size, device)
    except (UserError, RunError) as error:
        fail(rank, str(error), error.exit_code)
    except nets.WeightsNotFoundError as error:
        fail(rank, str(error), 2)
    except OSError as error:  # while running: a full disk, a folder that became read-only
        where = f' {error.filename}' if error.filename else ''
        fail(rank, f'cannot write{where}: {error.strerror or error}', 1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def fail(rank, message, exit_code):
    """The one error line on stderr, then exit (2: bad flag or input, 1: a failure while running)."""
    if rank == 0:
        print(f'ldm_labelnoise.py: error: {" ".join(message.split())}', file=sys.stderr)
    sys.exit(exit_code)


if __name__ == '__main__':
    main()
