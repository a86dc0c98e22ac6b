"""Input Perturbation Reduces Exposure Bias in Diffusion Models.

Mang Ning, Enver Sangineto, Angelo Porrello, Simone Calderara, Rita Cucchiara. ICML 2023, arXiv:2301.11706.
Official code: forever208/DDPM-IP, which is openai/guided-diffusion (ADM) plus two lines in `training_losses`.

A diffusion model is trained on x_t built from ground-truth data but sampled from its own, slightly wrong,
predictions: the network never saw the errors it meets at test time ("exposure bias"), and they accumulate along
the chain. DDPM-IP simulates those errors during training: x_t is computed from a perturbed noise
eps' = eps + gamma * xi (xi a fresh standard normal draw) while the regression target stays eps. Everything else is
ADM: cosine schedule, learned variances (hybrid loss), loss-second-moment timestep sampling, 100-step respaced
ancestral sampling for FID. gamma = 0 is exactly the ADM baseline. The `exposure` command measures the bias that IP
reduces: the gap delta_t between the spread of sampled x_t around sqrt(alpha_bar_t) x_0 and the training spread
sqrt(1 - alpha_bar_t), for chains started from real images (Ning et al., ICLR 2024, the same authors' metric).

Commands (explicit flags override the preset; the official command lines of forever208/DDPM-IP run as written):
  # CPU smoke run on the embedded 200 CIFAR-10 images: 32 steps, then a 16-image grid
  python ddpm_ip.py --preset=tiny --data=tests/data/cifar10_tiny.npz
  # CIFAR-10 ADM-IP on 1 GPU (official recipe: gamma 0.15, batch 128, dropout 0.3, cosine, learned sigma)
  python ddpm_ip.py --preset=cifar10 --data=cifar10
  # 8 GPUs; the global batch is the preset's (256) unless --batch, or the official per-GPU --batch_size, says otherwise
  torchrun --standalone --nproc_per_node=8 ddpm_ip.py --preset=celeba64 --data=celeba64.zip
  # the official training and sampling commands, as in the DDPM-IP README (image_sample.py's flags mean `sample`)
  torchrun --standalone --nproc_per_node=2 ddpm_ip.py --input_pertub 0.15 --data_dir cifar10 --image_size 32 ...
  python ddpm_ip.py --image_size 32 --timestep_respacing 100 --model_path ADM_IP_015.pt ... --num_samples 50000
  # 50k samples with 100 respaced steps (the paper's FID setting), as PNGs or straight into FID
  torchrun --standalone --nproc_per_node=8 ddpm_ip.py generate --seeds=0-49999 --outdir=out --timestep_respacing=100 \
      --network=runs/00000-cifar10-adm-cifar10-ip0.15-batch128/network-snapshot-058880.pt
  python -c "import ddpm_ip, numpy; numpy.savez('cifar10-train.npz', x=ddpm_ip.load_dataset('cifar10')[0])"
  python fid.py ref --data=cifar10-train.npz --dest=cifar10-train-ref.npz --protocol=adm
  # (with torchrun, `--` before the script name: recent torchrun takes the script's --num for its --numa-binding)
  torchrun --standalone --nproc_per_node=8 -- ddpm_ip.py eval --network=ADM_IP_015.pt --ref=cifar10-train-ref.npz \
      --timestep_respacing=100 --num=50000 --protocol=adm
  # exposure bias of a released or trained model: 20-step chains started from 1000 real images
  python ddpm_ip.py exposure --network=ADM_IP_015.pt --data=cifar10 --timestep_respacing=20 --num=1000
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import glob
import hashlib
import io
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

import fid
import nets

# ----------------------------------------------------------------------------------------------------------------------
# Configuration

@dataclasses.dataclass
class Config:
    # Data and corruption (the forward process, with the input perturbation).
    data: str = ''                                # image folder, EDM zip, .npz (x, y) or cifar10; official --data_dir
    class_cond: bool = False                      # condition on dataset labels; official flag (paper: unconditional)
    num_classes: int = 10                         # label range [0, num_classes); DDPM-IP script_util.py NUM_CLASSES
    random_flip: bool = True                      # horizontal flips, p = 0.5; official image_datasets.py default
    input_perturbation: float = 0.1               # gamma (official --input_pertub, default 0.0); 0 = ADM; README 0.1
    diffusion_steps: int = 1000                   # T; DDPM-IP commands
    noise_schedule: str = 'cosine'                # cosine | linear; DDPM-IP commands (official default linear)
    timestep_respacing: str = ''                  # kept steps: '' = all T, 100, 10,20 or ddim50 (official flag)
    # Network: a nets.UNET_PRESETS entry under the official model flags that are given.
    arch: str = 'adm-cifar10'                     # network preset
    image_size: int = None                        # sets channel_mult as official create_model; checks the data
    num_channels: int = None                      # base width; official flag
    num_res_blocks: int = None                    # residual blocks per resolution; official flag
    channel_mult: str = None                      # width multipliers, e.g. 1,2,2,2; '' = from --image_size
    attention_resolutions: str = None             # resolutions (pixels) with self-attention, e.g. 16,8
    num_heads: int = 4                            # heads where --num_head_channels is -1; official default
    num_heads_upsample: int = -1                  # heads of the upsampling path; -1 = --num_heads (official)
    num_head_channels: int = None                 # channels per attention head, -1 = use --num_heads
    dropout: float = None                         # dropout in every ResBlock (0.3 CIFAR-10, 0.1 64px+)
    use_scale_shift_norm: bool = None             # FiLM time conditioning
    resblock_updown: bool = None                  # resample with ResBlocks
    use_new_attention_order: bool = None          # qkv layout (True for all DDPM-IP models)
    learn_sigma: bool = True                      # eps and variance outputs; DDPM-IP commands (official default False)
    rescale_timesteps: bool = False               # feed t * 1000 / T to the network; official default
    # Optimisation (official train_util.py: AdamW, constant lr, no warm-up, no gradient clipping).
    rescale_learned_sigmas: bool = True           # VLB weight T/1000, else 1; DDPM-IP commands (official default False)
    schedule_sampler: str = 'loss-second-moment'  # or uniform; DDPM-IP commands (official default uniform)
    lr: float = 1e-4                              # learning rate; official default
    lr_anneal_steps: int = 0                      # > 0: lr decays linearly to 0 over this many steps, then stop
    weight_decay: float = 0.0                     # AdamW weight decay; official default
    batch: int = 128                              # train: global batch (CIFAR-10 command: 2 GPUs x 64)
    batch_size: int = None                        # train: official per-GPU batch, sets --batch to batch_size x GPUs
    batch_gpu: int = None                         # microbatch per GPU (accumulation); official --microbatch, -1 = off
    ema_rate: str = '0.9999'                      # EMA decay per step, comma list for several EMAs; official default
    kimg: float = 64000                           # training length in thousands of images (CIFAR-10: 500k steps)
    precision: str = None                         # fp32 | bf16 autocast; default bf16 on CUDA; official --use_fp16
    compile: bool = None                          # torch.compile the network; default on for CUDA
    # Run.
    outdir: str = 'runs'                          # train: parent of the run folders; generate/sample: image folder
    preset: str = ''                              # recipe: cifar10 imagenet32 lsun64 celeba64 ffhq128 tiny (PRESETS)
    seed: int = 0                                 # seeds the weights, the data order and all training noise
    resume: str = ''                              # training-state .pt, auto, or official modelNNNNNN.pt
    tick: float = 50                              # kimg between progress lines
    log_interval: int = None                      # steps between progress lines (sets --tick); official flag
    snap: int = 25                                # ticks between snapshots and sample grids
    save_interval: int = None                     # steps between snapshots (sets --snap); official flag
    dump: int = 10                                # snapshots between kept training states (others are deleted)
    grid: int = 64                                # images per sample grid (seeds 0..grid-1)
    grid_steps: str = '100'                       # respacing of the sample grids
    device: str = None                            # default cuda when available
    dry_run: bool = False                         # print the resolved config and exit
    # Sampling.
    network: str = ''                             # network snapshot or released .pt; official --model_path
    use_ddim: bool = False                        # DDIM instead of ancestral sampling; official flag
    eta: float = 0.0                              # DDIM noise scale (official image_sample.py always uses 0)
    clip_denoised: bool = True                    # clamp predicted x_0 to [-1, 1]; official default
    seeds: str = '0-63'                           # generate: one image per seed, e.g. 0-49999 or 1,5,7-9
    num_samples: int = 10000                      # sample: images (seeds 0..N-1); official default
    # Evaluation.
    ref: str = ''                                 # eval: reference statistics .npz from `python fid.py ref`
    num: int = 50000                              # eval: images for the metrics; exposure: real images
    metrics: str = 'fid'                          # eval: comma-separated fid.py metrics (fid, is, sfid, pr, kid)
    protocol: str = None                          # eval: fid.py protocol (edm, adm, pytorch-fid)
    fid_weights: str = None                       # eval: Inception weights (else $FID_WEIGHTS, cache or download)
    forward_t: int = None                         # exposure: respaced index the chains start from (default: the top)
    deterministic: bool = False                   # exposure: no sampling noise (the paper's reconstruction test)


# The official README commands. kimg: iteration of the best 100-step FID in the official curves x global batch
# (CIFAR-10: the released ADM_IP_015.pt, 460k steps). The ImageNet-32 command leaves out --use_scale_shift_norm,
# whose official default (True) is what every DDPM-IP network uses.
PRESETS = {
    'cifar10':    dict(arch='adm-cifar10', dropout=0.3, input_perturbation=0.15, batch=128, kimg=58880),
    'imagenet32': dict(arch='adm-imagenet32', dropout=0.3, input_perturbation=0.1, batch=512, kimg=2048000),
    'lsun64':     dict(arch='adm-lsun64', dropout=0.1, input_perturbation=0.1, batch=256, kimg=56320),
    'celeba64':   dict(arch='adm-celeba64', dropout=0.1, input_perturbation=0.1, batch=256, kimg=76800),
    'ffhq128':    dict(arch='adm-ffhq128', dropout=0.1, input_perturbation=0.1, batch=128, kimg=23040),
    'tiny':       dict(arch='tiny-adm', dropout=0.0, input_perturbation=0.1, batch=16, kimg=0.5, tick=0.1, snap=5,
                       ema_rate='0.99', lr=2e-4, grid=16, grid_steps='25'),
}

NET_FLAGS = {  # official model flag -> nets.UNet keyword
    'num_channels': 'model_channels', 'num_res_blocks': 'num_blocks', 'channel_mult': 'channel_mult',
    'attention_resolutions': 'attn_resolutions', 'num_heads': 'num_heads', 'num_head_channels': 'num_head_channels',
    'dropout': 'dropout', 'use_scale_shift_norm': 'use_scale_shift_norm', 'resblock_updown': 'resblock_updown',
    'use_new_attention_order': 'use_new_attention_order',
}
CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}  # create_model


COMMANDS = {  # name: what it does (the top-level --help lists them)
    'train': 'train a model (the default command; official scripts/image_train.py)',
    'sample': 'official scripts/image_sample.py: samples_NxHxWx3.npz (arr_0, arr_1 labels) and one PNG per image',
    'generate': 'one PNG per seed, e.g. --seeds=0-49999',
    'eval': 'sample in memory and report fid.py metrics (FID, IS, ...) against a reference',
    'exposure': 'measure the exposure bias delta_t of chains started from real images',
}
MODEL = ('train', 'sample', 'generate', 'eval', 'exposure')  # official model_and_diffusion flags: every command
SAMPLING = ('sample', 'generate', 'eval', 'exposure')
FLAGS = {  # field: (argument group, commands, help); defaults, types and official names come from Config and ALIASES
    'data': ('data and corruption', ('train', 'exposure'), 'image folder, EDM zip, .npz (x, y) or cifar10 (required)'),
    'class_cond': ('data and corruption', MODEL, 'condition on the labels of --data'),
    'num_classes': ('data and corruption', MODEL, 'labels must lie in [0, num_classes) (official NUM_CLASSES)'),
    'random_flip': ('data and corruption', ('train',), 'random horizontal flips'),
    'input_perturbation': ('data and corruption', MODEL, 'gamma of the input perturbation (training only)'),
    'diffusion_steps': ('data and corruption', MODEL, 'T, steps of the diffusion process'),
    'noise_schedule': ('data and corruption', MODEL, 'beta schedule: cosine or linear'),
    'timestep_respacing': ('data and corruption', MODEL, "kept steps: '' = all T, 100, 10,20 (sections) or ddim50"),
    'arch': ('network', MODEL, 'network preset under the official model flags'),
    'image_size': ('network', MODEL, 'resolution; sets channel_mult as official create_model'),
    'num_channels': ('network', MODEL, 'base width (default: the --arch preset)'),
    'num_res_blocks': ('network', MODEL, 'residual blocks per resolution (default: the --arch preset)'),
    'channel_mult': ('network', MODEL, "width multipliers, e.g. 1,2,2,2; '' = from --image_size (default: from "
                                       "--image_size if given, else the --arch preset)"),
    'attention_resolutions': ('network', MODEL, 'resolutions with self-attention, e.g. 16,8 (default: the --arch '
                                                'preset)'),
    'num_heads': ('network', MODEL, 'attention heads where --num_head_channels is -1'),
    'num_heads_upsample': ('network', MODEL, 'heads of the upsampling path, -1 = --num_heads'),
    'num_head_channels': ('network', MODEL, 'channels per attention head, -1 = --num_heads (default: the --arch '
                                            'preset)'),
    'dropout': ('network', MODEL, 'dropout in every residual block (default: the --arch preset)'),
    'use_scale_shift_norm': ('network', MODEL, 'FiLM time conditioning (default: the --arch preset)'),
    'resblock_updown': ('network', MODEL, 'resample with residual blocks (default: the --arch preset)'),
    'use_new_attention_order': ('network', MODEL, 'split qkv before heads (default: the --arch preset)'),
    'learn_sigma': ('network', MODEL, 'learn the variances (2C outputs, hybrid loss)'),
    'rescale_timesteps': ('network', MODEL, 'feed t * 1000 / T to the network'),
    'rescale_learned_sigmas': ('optimisation', MODEL, 'weight the VLB term by T / 1000 (else 1)'),
    'schedule_sampler': ('optimisation', ('train',), 'timestep sampler: uniform or loss-second-moment'),
    'lr': ('optimisation', ('train',), 'AdamW learning rate (constant)'),
    'lr_anneal_steps': ('optimisation', ('train',), '> 0: lr decays linearly to 0 over this many steps and training '
                                                     'stops there'),
    'weight_decay': ('optimisation', ('train',), 'AdamW weight decay'),
    'batch': ('optimisation', ('train',), 'global batch over all GPUs'),
    'batch_size': ('optimisation', ('train',), 'batch per GPU; sets --batch to batch_size x GPUs (default: none)'),
    'batch_gpu': ('optimisation', ('train',), 'microbatch per GPU (gradient accumulation), -1 = none (default: the '
                                              'per-GPU batch)'),
    'ema_rate': ('optimisation', ('train',), 'EMA decay per step; a comma list keeps one EMA per rate'),
    'kimg': ('optimisation', ('train',), 'training length in thousands of images'),
    'precision': ('run', MODEL, 'fp32 or bf16 autocast (default: bf16 on CUDA, else fp32)'),
    'compile': ('run', ('train',), 'torch.compile the network (default: on for CUDA)'),
    'outdir': ('run', ('train', 'sample', 'generate'), 'train: parent of the numbered run folders; sample, generate: '
                                                      'output folder'),
    'preset': ('run', ('train',), 'recipe: ' + ' '.join(PRESETS) + ' (default: none)'),
    'seed': ('run', ('train', 'exposure'), 'seeds the weights, the data order and all training noise; exposure: '
                                           'the choice of real images'),
    'resume': ('run', ('train',), 'training-state .pt, auto (the latest run with this description), or an official '
                                  'modelNNNNNN.pt with optNNNNNN.pt and ema_RATE_NNNNNN.pt beside it'),
    'tick': ('run', ('train',), 'kimg between progress lines'),
    'log_interval': ('run', ('train',), 'steps between progress lines; sets --tick (default: none)'),
    'snap': ('run', ('train',), 'ticks between network snapshots and sample grids'),
    'save_interval': ('run', ('train',), 'steps between snapshots; a multiple of the steps per tick, sets --snap '
                                         '(default: none)'),
    'dump': ('run', ('train',), 'snapshots between kept training states; the others are deleted'),
    'grid': ('run', ('train',), 'images per sample grid'),
    'grid_steps': ('run', ('train',), 'respacing of the sample grids'),
    'device': ('run', MODEL, 'cpu, cuda, cuda:1 (default: cuda when available)'),
    'dry_run': ('run', MODEL, 'print the resolved config and exit'),
    'network': ('sampling', SAMPLING, 'our network-snapshot-*.pt or a released guided-diffusion / DDPM-IP .pt '
                                      '(required)'),
    'use_ddim': ('sampling', SAMPLING, 'DDIM instead of ancestral sampling'),
    'eta': ('sampling', SAMPLING, 'DDIM noise scale'),
    'clip_denoised': ('sampling', SAMPLING, 'clamp the predicted x_0 to [-1, 1]'),
    'seeds': ('sampling', ('generate',), 'one image per seed, e.g. 0-49999 or 1,5,7-9'),
    'num_samples': ('sampling', ('sample',), 'number of images; image k uses seed k'),
    'ref': ('evaluation', ('eval',), 'reference statistics .npz from python fid.py ref (required)'),
    'num': ('evaluation', ('eval', 'exposure'), 'eval: generated images; exposure: real images'),
    'metrics': ('evaluation', ('eval',), 'comma-separated fid.py metrics: ' + ','.join(fid.METRICS)),
    'protocol': ('evaluation', ('eval',), 'fid.py protocol: edm, adm or pytorch-fid (default: from --ref)'),
    'fid_weights': ('evaluation', ('eval',), 'Inception weights (default: $FID_WEIGHTS, the cache or a download)'),
    'forward_t': ('evaluation', ('exposure',), 'respaced index the chains start from (default: the top)'),
    'deterministic': ('evaluation', ('exposure',), 'no sampling noise (the reconstruction test)'),
}
SAMPLING_BATCH = dict(sample=16, generate=64, eval=64, exposure=64)  # per GPU; sample: official image_sample.py

ALIASES = {  # official spellings -> our fields
    'input_pertub': 'input_perturbation', 'data_dir': 'data', 'microbatch': 'batch_gpu',
    'resume_checkpoint': 'resume', 'model_path': 'network',
}
SAMPLE_ONLY = ('--model_path', '--num_samples', '--use_ddim', '--clip_denoised')  # image_sample.py's own flags
REFUSED = {  # official flag: (accepted value, why not, our equivalent)
    'use_checkpoint': ('False', 'gradient checkpointing is not implemented', '--batch_gpu (official --microbatch) '
                                                                          'to save memory'),
    'fp16_scale_growth': (None, 'mixed precision is bf16, which needs no loss scaling', '--precision=bf16'),
    'use_kl': ('False', 'the pure variational-bound loss is not used by any DDPM-IP model',
               'the hybrid loss (--learn_sigma True)'),
    'predict_xstart': ('False', 'the input perturbation perturbs an eps-prediction model',
                       'eps prediction (the default)'),
}

class FlagError(Exception):
    """A bad flag or bad input (data, checkpoint, outdir): one line on stderr, exit code 2, nothing written."""


class RunError(Exception):
    """A failure while running (disk full, ...): one line on stderr, exit code 1."""


InputError = FlagError  # bad input files get the exit code of bad flags (one rule for the four scripts)


def str2bool(text):
    if text.lower() not in ('1', 'true', 't', 'yes', 'y', '0', 'false', 'f', 'no', 'n'):
        raise argparse.ArgumentTypeError(f'expected True or False, got {text!r}')
    return text.lower() in ('1', 'true', 't', 'yes', 'y')


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise FlagError(message)


def top_level_help():
    return ('usage: ddpm_ip.py [COMMAND] [--flag=value ...]\n'
            'Input Perturbation Reduces Exposure Bias in Diffusion Models (Ning et al., ICML 2023), DDPM-IP.\n'
            'commands:\n' + ''.join(f'  {name:<9} {text}\n' for name, text in COMMANDS.items()) +
            "Without a command: official image_sample.py flags (--model_path, --num_samples, --use_ddim, "
            "--clip_denoised) mean sample, anything else train.\n"
            "Run 'python ddpm_ip.py COMMAND --help' for the flags of a command.")


def make_parser(command):
    """The flags of one command, in the argument groups of the common command line; help ends with the default."""
    parser = OneLineParser(prog=f'ddpm_ip.py {command}', usage=f'ddpm_ip.py {command} [--flag=value ...]',
                           description=COMMANDS[command], argument_default=argparse.SUPPRESS, allow_abbrev=False)
    groups = {title: parser.add_argument_group(title) for title in
              ('data and corruption', 'network', 'optimisation', 'run', 'sampling', 'evaluation')}
    defaults = Config()
    for f in dataclasses.fields(Config):
        group, commands, text = FLAGS[f.name]
        if f.name == 'batch' and command != 'train':  # sampling commands: images per batch and GPU
            group, commands, text = 'sampling', SAMPLING, 'images per batch and GPU'
        if command not in commands:
            continue
        names = [f'--{f.name}'] + [f'--{alias}' for alias, name in ALIASES.items() if name == f.name]
        if f.name == 'batch' and command != 'train':
            names.append('--batch_size')  # official image_sample.py: per GPU
        default = SAMPLING_BATCH[command] if f.name == 'batch' and command != 'train' else getattr(defaults, f.name)
        given_default = re.search(r' \((default: .*|required)\)$', text)  # a default spelled out in FLAGS
        text = text[:given_default.start()] if given_default else text
        text += f'; official: {", ".join(names[1:])}' if names[1:] else ''
        text += f' ({given_default[1]})' if given_default else \
            f' (default: {"none" if default in (None, "") else default})'
        kind = {bool: str2bool, int: int, float: float}.get(f.type, str)
        bare = dict(nargs='?', const=True) if f.type is bool else {}  # `--dry_run` alone means True
        groups[group].add_argument(*names, dest=f.name, type=kind, metavar=f.type.__name__.upper(), help=text, **bare)
    groups['run'].add_argument('--use_fp16', type=str2bool, metavar='BOOL', help='official flag: True = '
                               '--precision=bf16, False = --precision=fp32 (default: none)')
    for group in groups.values():  # drop the empty groups from the help
        if not group._group_actions:
            parser._action_groups.remove(group)
    return parser


def drop_refused(argv):
    """Removes official flags given with their only supported value; refuses the others with one line."""
    kept, i = [], 0
    while i < len(argv):
        name, has_value, value = argv[i].partition('=')
        flag = name[2:] if name.startswith('--') else None
        if flag not in REFUSED:
            kept.append(argv[i])
            i += 1
            continue
        if has_value:
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith('--'):
            value, i = argv[i + 1], i + 2
        else:
            value, i = 'True', i + 1
        accepted, why, ours = REFUSED[flag]
        try:
            same = accepted is not None and str2bool(value) == str2bool(accepted)
        except argparse.ArgumentTypeError:
            same = False
        if not same:
            raise FlagError(f'--{flag} (official DDPM-IP flag) is not supported: {why}; use {ours}')
    return kept


def parse_args(argv):
    """Returns (command, Config): PRESETS[--preset] under the flags given. Without a command word, the official
    image_sample.py flags select `sample` (its command line runs as written), anything else `train`."""
    argv = list(argv)
    if argv and argv[0] in COMMANDS:
        command = argv.pop(0)
    else:
        command = 'sample' if any(a.split('=')[0] in SAMPLE_ONLY for a in argv) else 'train'
    given = vars(make_parser(command).parse_args(drop_refused(argv)))
    if 'use_fp16' in given:  # official mixed precision (fp16 with loss scaling) is bf16 autocast here
        given.setdefault('precision', 'bf16' if given.pop('use_fp16') else 'fp32')
    if command != 'train':
        given.setdefault('batch', SAMPLING_BATCH[command])
    preset = given.get('preset', '')
    if preset and preset not in PRESETS:
        raise FlagError(f'--preset must be one of {", ".join(PRESETS)}, got {preset!r}')
    return command, Config(**{**PRESETS.get(preset, {}), **given})


def check_config(c, command, world_size):
    """Range checks for every flag; resolves the batch split and the official step-counted intervals. Raises
    FlagError before anything is written."""
    def need(ok, message):
        if not ok:
            raise FlagError(message)
    need(c.input_perturbation >= 0 and math.isfinite(c.input_perturbation), '--input_perturbation must be >= 0')
    need(c.noise_schedule in ('linear', 'cosine'), '--noise_schedule must be linear or cosine')
    need(c.diffusion_steps >= 2, '--diffusion_steps must be >= 2')
    need(c.precision in (None, 'fp32', 'bf16'), '--precision must be fp32 or bf16')
    need(c.eta >= 0, '--eta must be >= 0')
    need(c.dropout is None or 0 <= c.dropout < 1, '--dropout must be in [0, 1)')
    need(c.num_classes >= 1, '--num_classes must be >= 1')
    need(c.num_heads >= 1, '--num_heads must be >= 1')
    need(c.image_size is None or c.image_size >= 1, '--image_size must be >= 1')
    if c.channel_mult == '' or (c.channel_mult is None and c.image_size):  # official create_model
        need(c.image_size in CHANNEL_MULT or c.image_size is None,
             f'--image_size {c.image_size}: no official channel_mult for it; give --channel_mult')
    try:
        resolved = net_overrides(c, c.image_size or 32)
    except ValueError:
        raise FlagError(f'--channel_mult and --attention_resolutions must be comma lists of integers, got '
                        f'{c.channel_mult!r} and {c.attention_resolutions!r}') from None
    heads_used = resolved.get('num_head_channels', nets.UNET_PRESETS[c.arch].get('num_head_channels', -1)) \
        if c.arch in nets.UNET_PRESETS else -1
    need(c.num_heads_upsample in (-1, c.num_heads) or heads_used > 0,
         '--num_heads_upsample (official DDPM-IP flag) is not supported: a head count of the upsampling path other '
         'than --num_heads; use --num_heads')
    try:
        space_timesteps(c.diffusion_steps, c.timestep_respacing or str(c.diffusion_steps))
    except ValueError as e:
        raise FlagError(f'--timestep_respacing: {e}') from None
    if command == 'train':
        need(bool(c.data), '--data is required')
        adm = [name for name, preset in nets.UNET_PRESETS.items() if preset['arch'] == 'adm']  # guided-diffusion's UNet
        need(c.arch in adm, f'--arch must be one of {", ".join(adm)}')
        need(c.schedule_sampler in ('uniform', 'loss-second-moment'),
             '--schedule_sampler must be uniform or loss-second-moment')
        need(c.lr > 0 and c.weight_decay >= 0, '--lr must be > 0 and --weight_decay >= 0')
        try:
            rates = [float(rate) for rate in c.ema_rate.split(',')]
        except ValueError:
            rates = [-1.0]
        need(all(0 <= rate < 1 for rate in rates), f'--ema_rate must be a comma list of values in [0, 1), got '
                                                    f'{c.ema_rate!r}')
        need(c.kimg > 0 and c.tick > 0 and c.lr_anneal_steps >= 0, '--kimg and --tick must be > 0, '
                                                                   '--lr_anneal_steps >= 0')
        need(min(c.snap, c.dump, c.grid) >= 1, '--snap, --dump and --grid must be >= 1')
        try:
            space_timesteps(c.diffusion_steps, c.grid_steps)
        except ValueError as e:
            raise FlagError(f'--grid_steps: {e}') from None
        if c.batch_size is not None:  # official semantics: per GPU
            need(c.batch_size >= 1, '--batch_size must be >= 1')
            c.batch = c.batch_size * world_size
        need(c.batch >= 1 and c.batch % world_size == 0, f'--batch must be a positive multiple of {world_size} (GPUs)')
        c.batch_gpu = c.batch // world_size if c.batch_gpu in (None, -1, 0) else c.batch_gpu  # official -1 = off
        need(c.batch_gpu >= 1 and (c.batch // world_size) % c.batch_gpu == 0,
             f'--batch_gpu must divide the per-GPU batch {c.batch // world_size}')
        # Official intervals count optimizer steps; ours count images.
        if c.lr_anneal_steps:  # official run_loop stops when the lr reaches 0
            c.kimg = c.lr_anneal_steps * c.batch / 1000
        if c.log_interval is not None:
            need(c.log_interval >= 1, '--log_interval must be >= 1')
            c.tick = c.log_interval * c.batch / 1000
        if c.save_interval is not None:
            steps_per_tick = round(c.tick * 1000) / c.batch
            need(c.save_interval >= 1 and c.save_interval % steps_per_tick == 0,
                 f'--save_interval must be a multiple of the {steps_per_tick:g} steps per tick (--tick or '
                 f'--log_interval)')
            c.snap = int(c.save_interval // steps_per_tick)
        need(c.resume in ('', 'auto') or os.path.isfile(c.resume), f'--resume: no file {c.resume}')
    else:
        need(bool(c.network), '--network is required (official --model_path)')
        need(c.batch >= 1 and c.num >= 1 and c.num_samples >= 1, '--batch, --num and --num_samples must be >= 1')
        need(command != 'eval' or bool(c.ref), '--ref is required for eval')
        need(set(c.metrics.split(',')) <= set(fid.METRICS), f'--metrics must be among {",".join(fid.METRICS)}')
        need(command != 'exposure' or bool(c.data), '--data is required for exposure')
        if command == 'generate':
            parse_seeds(c.seeds)
    return c


def parse_seeds(text):
    """'0-3,7' -> [0, 1, 2, 3, 7]; an empty or reversed range is an error."""
    seeds = []
    for part in text.split(','):
        match = re.fullmatch(r'(\d+)(?:-(\d+))?', part.strip())
        if not match:
            raise FlagError(f'--seeds: cannot parse {part!r} (expected e.g. 0-49999 or 1,5,7-9)')
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            raise FlagError(f'--seeds: the range {part.strip()} is empty (reversed)')
        seeds += range(lo, hi + 1)
    return seeds


# ----------------------------------------------------------------------------------------------------------------------
# Data: image folder (class subfolders or dataset.json), EDM zip, .npz, or the word cifar10, as a uint8 array

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.gif', '.bmp', '.webp')
CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'


def load_dataset(path):
    """Returns (x uint8 (N, H, W, C), y int64 (N,) or None). Raises InputError with one clear line."""
    if path == 'cifar10':
        return load_cifar10(os.path.join(os.path.expanduser(os.environ.get('XDG_CACHE_HOME', '~/.cache')), 'ddpm_ip'))
    if not os.path.exists(path):
        raise InputError(f'--data: {path} does not exist')
    if path.endswith('.npz'):
        try:
            with np.load(path) as npz:
                x, y = npz['x'], npz['y'] if 'y' in npz else None
        except Exception as e:  # not a zip, truncated, pickled objects, no x
            raise InputError(f'--data: cannot read x (N,H,W,C) uint8 and optional y from {path}: {e}') from None
        if x.ndim == 3:
            x = x[..., None]  # (N, H, W) grayscale -> (N, H, W, 1)
        if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[2] == x.shape[3] != x.shape[1]:
            raise InputError(f'--data: x in {path} has shape {x.shape}, channels first (N, C, H, W); '
                             f'expected (N, H, W, C): transpose it with x.transpose(0, 2, 3, 1)')
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != x.shape[2] or len(x) == 0:
            raise InputError(f'--data: x in {path} must be non-empty square uint8 (N, H, W, C), '
                             f'got {x.dtype} {x.shape}')
    elif os.path.isdir(path) or zipfile.is_zipfile(path):
        x, y = load_images(path)
    else:
        raise InputError(f'--data: {path} is not an image folder, zip or .npz')
    if y is not None:
        y = np.asarray(y)
        if y.shape != (len(x),) or y.dtype.kind not in 'iu' or y.min() < 0:
            raise InputError(f'--data: labels must be {len(x)} non-negative integers, got {y.dtype} {y.shape}')
        y = y.astype(np.int64)
    return x, y


def load_images(path):
    """Decodes every image of a folder or zip (official: converted to RGB). Labels from dataset.json (EDM), class
    subfolders, or the official '<class>_<n>.png' file-name prefix (guided-diffusion image_datasets.py)."""
    if os.path.isdir(path):
        names = sorted(os.path.relpath(os.path.join(root, f), path).replace(os.sep, '/')
                       for root, _, files in os.walk(path) for f in files)
        read = lambda name: pathlib.Path(path, name).read_bytes()
    else:
        archive = zipfile.ZipFile(path)
        names, read = sorted(archive.namelist()), archive.read
    images = [name for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise InputError(f'--data: no images in {path}')
    arrays = []
    for name in images:
        try:
            arrays.append(np.asarray(PIL.Image.open(io.BytesIO(read(name))).convert('RGB')))
        except Exception as e:
            raise InputError(f'--data: cannot read image {name} in {path}: {e}') from None
        (h, w, _), (h0, w0, _) = arrays[-1].shape, arrays[0].shape
        if (h, w) != (h0, w0) or h0 != w0:
            raise InputError(f'--data: image {name} is {w}x{h}, but all images must be square and of one size '
                             f'(the first is {w0}x{h0})')
    x = np.stack(arrays)                                              # (N, H, W, 3)
    files = [name.rsplit('/', 1)[-1] for name in images]
    if 'dataset.json' in names:
        table = dict(json.loads(read('dataset.json')).get('labels') or [])
        if any(name not in table for name in images):
            raise InputError(f'--data: dataset.json in {path} lacks labels for some images')
        return x, np.array([table[name] for name in images])
    if all('/' in name for name in images):  # class subfolders, numbered in sorted order
        return x, np.unique([name.rsplit('/', 1)[0] for name in images], return_inverse=True)[1]
    if all('_' in file for file in files):  # official '<class>_<n>.png'
        return x, np.unique([file.split('_')[0] for file in files], return_inverse=True)[1]
    return x, None


def load_cifar10(cache_dir):
    """CIFAR-10 training set from the official tarball: downloaded once, checksum verified, written atomically."""
    path = os.path.join(cache_dir, 'cifar-10-python.tar.gz')
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        try:
            response = requests.get(CIFAR10_URL, stream=True, timeout=60)
            response.raise_for_status()
            data = b''.join(response.iter_content(1 << 20))
        except requests.RequestException as e:
            raise InputError(f'--data cifar10: cannot download {CIFAR10_URL} ({e}); put the file at {path}') from None
        if hashlib.md5(data).hexdigest() != CIFAR10_MD5:
            raise InputError(f'--data cifar10: checksum mismatch for {CIFAR10_URL}')
        atomic_write(path, data)
    with open(path, 'rb') as f:
        if hashlib.md5(f.read()).hexdigest() != CIFAR10_MD5:
            raise InputError(f'--data cifar10: {path} is corrupt (checksum mismatch); delete it to download again')
    with tarfile.open(path) as tar:
        batches = [pickle.load(tar.extractfile(f'cifar-10-batches-py/data_batch_{i}'), encoding='bytes')
                   for i in range(1, 6)]
    x = np.concatenate([batch[b'data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for batch in batches])
    return x, np.concatenate([batch[b'labels'] for batch in batches]).astype(np.int64)  # (N, 32, 32, 3), (N,)


@functools.lru_cache(maxsize=2)
def epoch_order(num_images, seed, epoch, device):
    """The dataset order of one epoch: a permutation seeded by (seed, epoch), so a resumed run replays it."""
    generator = torch.Generator(device).manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_images, generator=generator, device=device)


def batch_indices(step, batch, num_images, seed, device):
    """Dataset indices (B,) of global batch number `step`, which may straddle two epochs."""
    start, stop = step * batch, (step + 1) * batch
    first = start // num_images
    orders = [epoch_order(num_images, seed, epoch, device) for epoch in range(first, (stop - 1) // num_images + 1)]
    return torch.cat(orders)[start - first * num_images:stop - first * num_images]


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian diffusion (guided-diffusion gaussian_diffusion.py + respace.py; Ho et al. 2020, Nichol & Dhariwal 2021)

def get_named_beta_schedule(name, steps):
    """Betas (steps,) float64. linear: Ho et al. 1e-4..0.02 rescaled to `steps`; cosine: Nichol & Dhariwal Eq. 17,
    beta_i = 1 - f((i+1)/T) / f(i/T) clipped at 0.999 (official betas_for_alpha_bar)."""
    if name == 'linear':
        scale = 1000 / steps
        return torch.from_numpy(np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64))
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)], dtype=torch.float64)


def space_timesteps(steps, section_counts):
    """Original timesteps kept by respacing (Nichol & Dhariwal Sec. 4; official respace.py). 'ddimN': the smallest
    integer stride giving exactly N steps from 0. Otherwise comma-separated counts for `steps` split into equal
    sections (the first steps % sections ones one step longer); each section is walked with the fractional stride
    (size - 1) / (count - 1), accumulated by repeated addition and rounded at every step, as the official loop
    does (a count of 0 keeps nothing of its section). Returns a sorted list; raises ValueError if impossible."""
    if section_counts.startswith('ddim'):
        count = int(section_counts[4:])
        for stride in range(1, steps):
            if len(range(0, steps, stride)) == count:
                return list(range(0, steps, stride))
        raise ValueError(f'cannot create exactly {count} steps with an integer stride')
    counts = [int(n) for n in section_counts.split(',')]
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = steps // len(counts) + (1 if i < steps % len(counts) else 0)
        if not 0 <= count <= size:
            raise ValueError(f'cannot divide a section of {size} steps into {count}')
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))  # Python rounds half to even, as official
            position += stride  # a running sum, not j * stride: the two round differently (e.g. '21' keeps 499)
        start += size
    if not kept:
        raise ValueError(f'{section_counts!r} keeps no step')
    return sorted(set(kept))


class GaussianDiffusion:
    """The schedule arrays of guided-diffusion's GaussianDiffusion, float64 on `device`, for the process that keeps
    the original timesteps `use_timesteps` (respacing: betas recomputed from alpha_bar, not re-clipped).
    Values are gathered per sample and cast to float32, as the official _extract_into_tensor."""

    def __init__(self, betas, use_timesteps=None, device='cpu', rescale_timesteps=False):
        betas = betas.to(torch.float64)
        original_steps = len(betas)
        if use_timesteps is not None:
            alphas_cumprod = torch.cumprod(1 - betas, 0)[use_timesteps]
            betas = 1 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        self.timestep_map = torch.tensor(use_timesteps or range(len(betas)), device=device)  # net sees original t
        # --rescale_timesteps: the network sees t * 1000 / T in float32 (official _WrappedModel).
        self.model_time = self.timestep_map.float() * (1000.0 / original_steps) if rescale_timesteps \
            else self.timestep_map
        self.num_timesteps = len(betas)
        ab = torch.cumprod(1 - betas, 0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        posterior_variance = betas * (1 - ab_prev) / (1 - ab)
        arrays = dict(
            betas=betas, alphas_cumprod=ab, alphas_cumprod_prev=ab_prev,
            sqrt_alphas_cumprod=ab.sqrt(), sqrt_one_minus_alphas_cumprod=(1 - ab).sqrt(),
            sqrt_recip_alphas_cumprod=(1 / ab).sqrt(), sqrt_recipm1_alphas_cumprod=(1 / ab - 1).sqrt(),
            posterior_variance=posterior_variance,
            # Clipped because beta_tilde_0 = 0: entry 0 is replaced by beta_tilde_1 (official).
            posterior_log_variance_clipped=torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
            posterior_mean_coef1=betas * ab_prev.sqrt() / (1 - ab),
            posterior_mean_coef2=(1 - ab_prev) * (1 - betas).sqrt() / (1 - ab),
            log_betas=betas.log(),
            # learn_sigma=False: FIXED_LARGE variances, with beta_tilde_1 at t = 0 for a better decoder likelihood.
            fixed_large_log_variance=torch.cat([posterior_variance[1:2], betas[1:]]).log(),
        )
        for name, value in arrays.items():
            setattr(self, name, value.to(device))

    def at(self, array, t):
        """Per-sample values array[t] (B,) as float32 (B, 1, 1, 1)."""
        return array[t].float()[:, None, None, None]

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0) (Ho et al. Eq. 4)."""
        return self.at(self.sqrt_alphas_cumprod, t) * x0 + self.at(self.sqrt_one_minus_alphas_cumprod, t) * noise

    def q_posterior(self, x0, x_t, t):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. Eq. 6-7)."""
        mean = self.at(self.posterior_mean_coef1, t) * x0 + self.at(self.posterior_mean_coef2, t) * x_t
        return mean, self.at(self.posterior_log_variance_clipped, t)

    def p_mean_variance(self, out, x_t, t, clip_denoised):
        """Mean, log-variance and x_0 prediction of p(x_{t-1} | x_t) from the raw network output `out` (B, C or 2C,
        H, W): eps prediction (Ho et al. Eq. 11) and, for 2C channels, the learned interpolation
        log sigma^2 = v' log beta_t + (1 - v') log beta_tilde_t, v' = (v + 1) / 2 (Nichol & Dhariwal Eq. 15)."""
        eps, v = out.split(x_t.shape[1], dim=1) if out.shape[1] == 2 * x_t.shape[1] else (out, None)
        if v is None:
            log_variance = self.at(self.fixed_large_log_variance, t).expand_as(x_t)
        else:
            frac = (v + 1) / 2
            min_log, max_log = self.at(self.posterior_log_variance_clipped, t), self.at(self.log_betas, t)
            log_variance = frac * max_log + (1 - frac) * min_log
        x0_hat = self.at(self.sqrt_recip_alphas_cumprod, t) * x_t - self.at(self.sqrt_recipm1_alphas_cumprod, t) * eps
        if clip_denoised:
            x0_hat = x0_hat.clamp(-1, 1)
        mean, _ = self.q_posterior(x0_hat, x_t, t)
        return mean, log_variance, x0_hat


def make_diffusion(noise_schedule, diffusion_steps, timestep_respacing='', device='cpu', rescale_timesteps=False):
    """The process of official create_gaussian_diffusion: all T steps, or those kept by timestep_respacing."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    # Official: even the full process is a SpacedDiffusion, whose betas are re-derived from alpha_bar.
    kept = space_timesteps(diffusion_steps, timestep_respacing or str(diffusion_steps))
    return GaussianDiffusion(betas, kept, device, rescale_timesteps)

# ----------------------------------------------------------------------------------------------------------------------
# Loss: input perturbation + ADM hybrid loss, and the loss-second-moment timestep sampler

def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)), elementwise, in nats."""
    return 0.5 * (-1 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) for 8-bit data in [-1, 1] under N(mean, e^(2 log_scale)) integrated over the pixel's bin of half-width
    1/255, open-ended at the extremes (Ho et al. Eq. 13); tanh approximation of the normal CDF as official."""
    cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    inv_std = torch.exp(-log_scale)
    cdf_plus, cdf_minus = cdf(inv_std * (x - mean + 1 / 255)), cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_minus = (1 - cdf_minus).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


def vb_terms_bpd(diffusion, out, x0, x_t, t):
    """One term of the variational bound in bits/dim, (B,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and
    the decoder NLL at t = 0 (Ho et al. Eq. 5; Nichol & Dhariwal Sec. 3.1)."""
    true_mean, true_log_variance = diffusion.q_posterior(x0, x_t, t)
    mean, log_variance, _ = diffusion.p_mean_variance(out, x_t, t, clip_denoised=False)
    kl = normal_kl(true_mean, true_log_variance, mean, log_variance).flatten(1).mean(1) / math.log(2)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance).flatten(1).mean(1) / math.log(2)
    return torch.where(t == 0, nll, kl)


def ip_loss(net, diffusion, x0, t, eps, xi, gamma, rescale_learned_sigmas=True, class_labels=None):
    """The DDPM-IP hybrid loss per sample: (loss, mse, vb), each (B,); loss = mse + w vb is what training weights
    and averages, mse and vb are its parts for the logs (vb before the weight w; official logs it after).

    x0 (B, C, H, W) in [-1, 1]; t (B,) int64 indices of `diffusion`; eps, xi (B, C, H, W) independent N(0, I).
    The network sees the perturbed y_t but regresses the unperturbed eps (official gaussian_diffusion.py
    training_losses). The VLB term (learned sigma only) uses the same y_t and a stop-gradient on the eps channels,
    so it trains the variance alone (Nichol & Dhariwal Eq. 16); its weight w is T / 1000 with
    rescale_learned_sigmas (official RESCALED_MSE), else 1 (MSE). Fixed variances: loss = mse, vb = 0."""
    # Ning et al. 2023 (arXiv:2301.11706), DDPM-IP training: y_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) (eps + gamma xi).
    y_t = diffusion.q_sample(x0, t, eps + gamma * xi)                     # (B, C, H, W)
    out = net(y_t, diffusion.model_time[t], class_labels).float()         # (B, C or 2C, H, W)
    eps_hat = out[:, :x0.shape[1]]
    # Same algorithm: the loss || eps - eps_theta(y_t, t) ||^2, whose target is eps, not eps + gamma xi.
    mse = (eps - eps_hat).square().flatten(1).mean(1)                     # (B,) L_simple
    if out.shape[1] == x0.shape[1]:  # fixed variances: nothing for the VLB to train
        return mse, mse, torch.zeros_like(mse)
    # L_vlb through a copy of the output whose eps half is detached: its gradient reaches v only.
    frozen = torch.cat([eps_hat.detach(), out[:, x0.shape[1]:]], dim=1)
    vb = vb_terms_bpd(diffusion, frozen, x0, y_t, t)                      # (B,) bits/dim
    weight = diffusion.num_timesteps / 1000 if rescale_learned_sigmas else 1.0
    return mse + weight * vb, mse, vb


class TimestepSampler:
    """Importance sampling of t (Nichol & Dhariwal Sec. 3.3; official resample.py LossSecondMomentResampler):
    p_t proportional to sqrt(E[L_t^2]) over the last 10 losses of each t, mixed with 0.001 uniform, and uniform
    until every t has 10 losses. Training weights 1 / (T p_t) keep the objective unbiased. kind='uniform' always
    samples uniformly. The state lives on the device and nothing here waits for the GPU (no host sync)."""

    def __init__(self, num_timesteps, kind, device, history_per_term=10, uniform_prob=0.001):
        self.kind, self.history_per_term, self.uniform_prob = kind, history_per_term, uniform_prob
        # Per t a first-in first-out queue of its last losses, oldest in column 0, as the official array.
        self.history = torch.zeros(num_timesteps, history_per_term, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_timesteps, dtype=torch.int64, device=device)  # filled entries per t

    def probabilities(self):
        T = len(self.counts)
        uniform = torch.full((T,), 1 / T, dtype=torch.float64, device=self.counts.device)
        if self.kind == 'uniform':
            return uniform
        w = self.history.square().mean(1).sqrt()
        w = w / w.sum() * (1 - self.uniform_prob) + self.uniform_prob / T
        return torch.where((self.counts == self.history_per_term).all(), w, uniform)

    def sample(self, batch, generator):
        """(t, weights), each (batch,), by inverse-CDF sampling (the official code uses np.random.choice)."""
        p = self.probabilities()
        u = torch.rand(batch, dtype=torch.float64, generator=generator, device=p.device)
        t = torch.searchsorted(p.cumsum(0), u * p.sum(), right=True).clamp(max=len(p) - 1)
        return t, (1 / (len(p) * p[t])).float()

    def update(self, t, losses):
        """Pushes the losses (N,) of timesteps t (N,), in order, onto the queues of their timesteps: a full queue
        drops its oldest entry (official update_with_all_losses, for all N at once)."""
        if self.kind == 'uniform':
            return
        T, H = self.history.shape
        new = torch.zeros_like(self.counts).index_add_(0, t, torch.ones_like(t))       # (T,) losses arriving per t
        dropped = (self.counts + new - H).clamp(min=0)                                 # (T,) entries pushed out
        # Old entries move left by the number pushed out; new ones follow them in arrival order.
        column = torch.arange(H, device=t.device)
        source = column + dropped[:, None]                                             # (T, H) old column or beyond
        shifted = self.history.gather(1, source.clamp(max=H - 1))
        self.history = torch.where(source < self.counts[:, None], shifted, self.history)
        t_sorted, order = torch.sort(t, stable=True)
        arrival = torch.arange(len(t), device=t.device) - torch.searchsorted(t_sorted, t_sorted)  # k-th of its t
        slot = self.counts[t_sorted] + arrival - dropped[t_sorted]                     # < 0: pushed out at once
        keep = slot >= 0
        # Losses pushed out within this batch go to a throw-away row, so that no index depends on the data.
        spare = torch.cat([self.history, self.history.new_zeros(1, H)])
        spare[torch.where(keep, t_sorted, T), slot.clamp(min=0)] = losses[order].double()
        self.history = spare[:T]
        self.counts = (self.counts + new).clamp(max=H)


# ----------------------------------------------------------------------------------------------------------------------
# Samplers: ancestral (learned variance) and DDIM, on the full or a respaced process

@torch.no_grad()
def sample_chain(net, diffusion, x, start=None, clip_denoised=True, eta=None, class_labels=None,
                 randn_like=torch.randn_like):
    """Runs the reverse process from respaced index `start` (default T'-1) down to 0, yielding (i, x_{i-1}, x0_hat)
    after each step; x (B, C, H, W) is x_start. eta=None: ancestral sampling with the model's variance (Ho et al.
    Alg. 2, no noise at the last step); eta >= 0: DDIM (Song et al. 2021 Eq. 12, sigma from Eq. 16), with eps
    re-derived from the clipped x0_hat as official. `net(x, t_original, class_labels)` returns float32."""
    start = diffusion.num_timesteps - 1 if start is None else start
    for i in range(start, -1, -1):
        t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
        out = net(x, diffusion.model_time[t], class_labels)                # the net sees the original timestep
        mean, log_variance, x0_hat = diffusion.p_mean_variance(out, x, t, clip_denoised)
        noise = randn_like(x) * (i > 0)                                    # drawn at every step, as official
        if eta is None:
            x = mean + torch.exp(0.5 * log_variance) * noise
        else:  # DDIM ignores the learned variance
            ab, ab_prev = diffusion.at(diffusion.alphas_cumprod, t), diffusion.at(diffusion.alphas_cumprod_prev, t)
            eps = (diffusion.at(diffusion.sqrt_recip_alphas_cumprod, t) * x - x0_hat) / \
                diffusion.at(diffusion.sqrt_recipm1_alphas_cumprod, t)
            sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
            x = x0_hat * ab_prev.sqrt() + torch.sqrt(1 - ab_prev - sigma ** 2) * eps + sigma * noise
        yield i, x, x0_hat


def sample(net, diffusion, x_T, **kwargs):
    """x_0 from x_T ~ N(0, I) (B, C, H, W): the last state of sample_chain."""
    for _, x, _ in sample_chain(net, diffusion, x_T, **kwargs):
        pass
    return x

# ----------------------------------------------------------------------------------------------------------------------
# Plumbing: distributed setup, networks, checkpoints, images

def init_distributed(device):
    """Single process unless launched by torchrun (RANK/WORLD_SIZE set); nccl on CUDA, gloo on CPU."""
    rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world_size, device


def net_config(c, resolution, channels, label_dim):
    """nets.UNet keywords: the --arch preset for this data, under the official model flags that were given."""
    kwargs = dict(nets.UNET_PRESETS[c.arch], img_resolution=resolution, in_channels=channels,
                  out_channels=channels * (2 if c.learn_sigma else 1), label_dim=label_dim)
    return kwargs | net_overrides(c, resolution)


def net_overrides(c, resolution, from_image_size=True):
    """nets.UNet keywords given by official model flags; without --channel_mult, --image_size picks the multipliers
    as official create_model does (--channel_mult '' too, from the data's resolution when --image_size is absent).
    Released checkpoints pass from_image_size=False: their shapes tell the multipliers."""
    given = {name: getattr(c, flag) for flag, name in NET_FLAGS.items() if getattr(c, flag) not in (None, '')}
    kwargs = {name: tuple(int(v) for v in value.split(',')) if isinstance(value, str) else value  # e.g. '1,2,2,2'
              for name, value in given.items()}
    if from_image_size and (c.channel_mult == '' or (c.channel_mult is None and c.image_size)):
        size = c.image_size or resolution
        if size not in CHANNEL_MULT:
            raise FlagError(f'--image_size {size}: no official channel_mult for it; give --channel_mult')
        kwargs['channel_mult'] = CHANNEL_MULT[size]
    return kwargs


def load_torch_file(path, what):
    """torch.load of a checkpoint file (tensors only) with one clear line for what makes it unusable."""
    if not os.path.isfile(path):
        raise InputError(f'{what}: no file {path}')
    if os.path.getsize(path) == 0:
        raise InputError(f'{what}: {path} is empty (0 bytes), e.g. from an interrupted copy')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, not a torch file, pickled code
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f'{what}: cannot load {path} (not a complete torch checkpoint): {reason}') from None


def load_network(path, c, device):
    """Returns (net in eval mode, GaussianDiffusion for sampling) from our network snapshot or from a released
    guided-diffusion / DDPM-IP state dict (whose diffusion settings come from the flags, as in the official scripts)."""
    snapshot = load_torch_file(path, '--network')
    if isinstance(snapshot, dict) and 'cur_nimg' in snapshot:
        raise InputError(f'--network: {path} is a training state; give a network-snapshot-*.pt (or the state to '
                         f'train --resume)')
    if isinstance(snapshot, dict) and 'net_kwargs' in snapshot:
        given = net_overrides(c, snapshot['net_kwargs']['img_resolution'], from_image_size=False)
        for flag, name in NET_FLAGS.items():  # model flags must agree with the snapshot, which defines the network
            if name in given and name in snapshot['net_kwargs'] and \
                    given[name] != type(given[name])(snapshot['net_kwargs'][name]):
                raise InputError(f'--{flag} {getattr(c, flag)} contradicts {path} ({snapshot["net_kwargs"][name]}); '
                                 f'leave it out for our snapshots')
        if c.image_size and c.image_size != snapshot['net_kwargs']['img_resolution']:
            raise InputError(f'--image_size {c.image_size} contradicts {path} '
                             f'({snapshot["net_kwargs"]["img_resolution"]}); leave it out for our snapshots')
        net = nets.UNet(**snapshot['net_kwargs'])
        net.load_state_dict(snapshot['ema'])
        steps, schedule = snapshot['diffusion_steps'], snapshot['noise_schedule']
        rescale_timesteps = snapshot['config'].get('rescale_timesteps', False)
    else:  # architecture from the state dict's shapes; what shapes cannot tell comes from the official flags
        overrides = net_overrides(c, c.image_size, from_image_size=False) | \
            ({'img_resolution': c.image_size} if c.image_size else {})
        try:
            net = nets.load_network(path, **overrides)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f'--network: cannot build a network for {path}: {reason}') from None
        steps, schedule, rescale_timesteps = c.diffusion_steps, c.noise_schedule, c.rescale_timesteps
    diffusion = make_diffusion(schedule, steps, c.timestep_respacing, device, rescale_timesteps)
    cuda = torch.device(device).type == 'cuda'  # NHWC convolutions on tensor cores, as in training
    net.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    return net.eval().requires_grad_(False), diffusion


def make_denoiser(net, precision):
    """net(x, t, class_labels) under autocast, returning float32."""
    def denoiser(x, t, class_labels=None):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
            return net(x, t, class_labels).float()
    return denoiser


class StackedRandomGenerator:
    """One generator per image, so image k depends only on seed k, whatever the batch or GPU count (EDM idea)."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn_like(self, x):
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                            for g in self.generators])


def generate_images(denoiser, diffusion, seeds, shape, label_dim, device, c, return_labels=False):
    """uint8 (B, C, H, W) images for `seeds`, official conversion: clamp((x + 1) * 127.5) truncated to uint8;
    class-conditional networks get a label per seed, uniform in [0, label_dim) (returned with return_labels)."""
    rnd = StackedRandomGenerator(device, seeds)
    x_T = rnd.randn_like(torch.empty(len(seeds), *shape, device=device))
    labels = torch.stack([torch.randint(label_dim, (), generator=g, device=device) for g in rnd.generators]) \
        if label_dim else None
    x = sample(denoiser, diffusion, x_T, clip_denoised=c.clip_denoised, eta=c.eta if c.use_ddim else None,
               class_labels=labels, randn_like=rnd.randn_like)
    images = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return (images, labels) if return_labels else images


def rank_batches(seeds, batch, rank, world_size):
    """This rank's share of `seeds`, in batches of at most `batch`."""
    mine = seeds[rank::world_size]
    return [mine[i:i + batch] for i in range(0, len(mine), batch)]


def atomic_write(path, data):
    """Writes bytes to a temporary name, then renames: an interrupted write never destroys the previous file. A
    failed write (full disk, read-only folder) removes the partial file and raises RunError naming the file."""
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise RunError(f'cannot write {path}: {e.strerror or e}') from None


def torch_bytes(obj):
    """torch.save into memory, so that a full disk shows up as one OSError of the file write."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def append_jsonl(path, record):
    """One JSON object per line: stats.jsonl and the metrics files, readable while a run goes on."""
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def save_png(images, path):
    """uint8 (C, H, W) image or (N, C, H, W) batch (saved as a square-ish grid) -> PNG, atomically."""
    if images.ndim == 4:
        n, channels, h, w = images.shape
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        images = torch.cat([images, images.new_zeros(rows * cols - n, channels, h, w)])  # black cells at the end
        images = images.view(rows, cols, channels, h, w).permute(2, 0, 3, 1, 4).reshape(channels, rows * h, cols * w)
    array = images.cpu().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    PIL.Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, format='PNG')
    atomic_write(path, buffer.getvalue())

# ----------------------------------------------------------------------------------------------------------------------
# Training loop

def find_run_dir(c):
    """Resolves the run folder without writing: (run_dir, training-state path or None, whether it exists yet).
    --resume=auto continues the latest run of this description (the process count is not part of it), or reuses it
    when it holds no training state yet (killed during its first write)."""
    desc = f'{os.path.basename(os.path.normpath(c.data)).split(".")[0]}-{c.arch}-ip{c.input_perturbation:g}' \
           f'-batch{c.batch}'
    names = os.listdir(c.outdir) if os.path.isdir(c.outdir) else []
    runs = sorted(d for d in names if re.fullmatch(r'\d{5}-' + re.escape(desc), d))
    if c.resume == 'auto' and runs:
        run_dir = os.path.join(c.outdir, runs[-1])
        states = sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))
        return run_dir, (states[-1] if states else None), True
    previous = [int(d[:5]) for d in names if re.match(r'\d{5}-', d)]
    run_dir = os.path.join(c.outdir, f'{max(previous, default=-1) + 1:05d}-{desc}')
    return run_dir, (None if c.resume in ('', 'auto') else c.resume), False


def official_resume_step(path):
    """NNNNNN of an official .../modelNNNNNN.pt, 0 if the name has none (official parse_resume_step_from_filename)."""
    tail = path.split('model')[-1].split('.')[0] if 'model' in path else ''
    return int(tail) if tail.isdigit() else 0


def read_resume(path, c, net_kwargs):
    """Loads and checks what --resume names, before any run folder exists. Our training-state-*.pt, or an official
    modelNNNNNN.pt with optNNNNNN.pt and ema_RATE_NNNNNN.pt beside it (guided-diffusion train_util.py; missing ones
    start from the model and a fresh optimizer, as there). Returns a dict for training_loop."""
    state = load_torch_file(path, '--resume')
    with torch.device('meta'):
        shapes = {k: v.shape for k, v in nets.UNet(**net_kwargs).state_dict().items()}
    rates = [float(rate) for rate in c.ema_rate.split(',')]

    def check(weights, name):
        if not isinstance(weights, dict) or {k: getattr(v, 'shape', None) for k, v in weights.items()} != shapes:
            raise InputError(f'--resume: {name} does not hold the weights of this network ({len(shapes)} tensors, '
                             f'{json.dumps(net_kwargs)}); check the model flags')
        return weights

    if isinstance(state, dict) and 'net_kwargs' in state and 'cur_nimg' not in state:
        raise InputError(f'--resume: {path} is a network snapshot (EMA weights only); give a training-state-*.pt')
    if isinstance(state, dict) and 'cur_nimg' in state:  # ours
        missing = {'model', 'emas', 'optimizer', 'sampler_history', 'sampler_counts', 'cpu_rng'} - set(state)
        if missing:
            raise InputError(f'--resume: {path} lacks {", ".join(sorted(missing))}; not a complete training state')
        if len(state['emas']) != len(rates):
            raise InputError(f'--resume: {path} holds {len(state["emas"])} EMA networks, --ema_rate gives '
                             f'{len(rates)}')
        check(state['model'], path)
        [check(ema, path) for ema in state['emas']]
        return dict(state, path=path)

    # Official files: the step comes from the file name, the rest from the files beside it.
    step, folder = official_resume_step(path), os.path.dirname(path)
    check(state, path)
    emas = []
    for rate in rates:
        ema_path = os.path.join(folder, f'ema_{rate}_{step:06d}.pt')
        emas.append(check(load_torch_file(ema_path, '--resume'), ema_path) if os.path.isfile(ema_path) else state)
    opt_path = os.path.join(folder, f'opt{step:06d}.pt')
    optimizer = official_optimizer_state(load_torch_file(opt_path, '--resume'), list(state), net_kwargs, opt_path) \
        if os.path.isfile(opt_path) else None
    return dict(model=state, emas=emas, optimizer=optimizer, cur_nimg=step * c.batch, official=path)


def official_optimizer_state(opt, names, net_kwargs, path):
    """An official optNNNNNN.pt (torch AdamW over the parameters in model-file order; with --use_fp16, over two flat
    master tensors: the vectors, then the matrices, as fp16_util.py groups them) as the state dict of our AdamW."""
    with torch.device('meta'):
        params = dict(nets.UNet(**net_kwargs).named_parameters())
    try:
        state, group = opt['state'], opt['param_groups'][0]
        if len(state) == len(names):
            per_name = {name: state[i] for i, name in enumerate(names)}
        elif len(state) == 2:  # fp16 master parameters, flattened
            per_name = {}
            for flat, members in zip((state[0], state[1]), ([n for n in names if params[n].ndim <= 1],
                                                            [n for n in names if params[n].ndim > 1])):
                sizes = [params[n].numel() for n in members]
                pieces = {k: flat[k].reshape(-1).split(sizes) for k in ('exp_avg', 'exp_avg_sq')}  # (1, n) for matrices
                for i, n in enumerate(members):
                    per_name[n] = {'step': torch.tensor(float(flat['step'])),  # one counter each: AdamW adds in place
                                   **{k: v[i].view(params[n].shape) for k, v in pieces.items()}}
        else:
            raise ValueError(f'{len(state)} parameter states for {len(names)} parameters')
        ours = list(params)
        return {'state': {i: per_name[n] for i, n in enumerate(ours)},
                'param_groups': [{**group, 'params': list(range(len(ours)))}]}
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise InputError(f'--resume: {path} is not the AdamW state of this network: {e}') from None


def training_loop(c, x_data, y_data, net_kwargs, run_dir, resumed, rank, world_size, device, log):
    """Official train_util.py run_loop, counted in images: AdamW at a constant lr, EMAs every step, the IP hybrid
    loss under importance-sampled t; a progress line, stats.jsonl record, snapshot and sample grid per tick."""
    # Performance settings.
    torch.backends.cuda.matmul.allow_tf32 = True                  # TF32 matmuls: free speed on Ampere+
    torch.backends.cudnn.allow_tf32 = True                        # same for convolutions
    torch.backends.cudnn.benchmark = True                         # fixed shapes: let cuDNN pick the fastest kernels
    cuda = device.type == 'cuda'
    memory_format = torch.channels_last if cuda else torch.contiguous_format  # NHWC convolutions on tensor cores

    # Data as a uint8 tensor on the device when it fits (flips and scaling happen there).
    data = torch.from_numpy(x_data)                                # (N, H, W, C) uint8
    if cuda and data.nbytes < 0.2 * torch.cuda.get_device_properties(device).total_memory:
        data = data.to(device)
    elif cuda:
        data = data.pin_memory()
    labels = torch.from_numpy(y_data).to(data.device) if c.class_cond else None
    num_images, resolution, channels = data.shape[0], data.shape[1], data.shape[3]

    # Network, EMAs (one per --ema_rate), optimizer, timestep sampler.
    torch.manual_seed(c.seed)                                      # the same initial weights for any GPU count
    model = nets.UNet(**net_kwargs).to(device).train().to(memory_format=memory_format)
    torch.manual_seed(c.seed * world_size + rank)                 # dropout streams; all else is seeded per step
    rates = [float(rate) for rate in c.ema_rate.split(',')]
    emas = [copy.deepcopy(model).eval().requires_grad_(False) for _ in rates]
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay, fused=cuda)
    diffusion = make_diffusion(c.noise_schedule, c.diffusion_steps, c.timestep_respacing, device, c.rescale_timesteps)
    sampler = TimestepSampler(diffusion.num_timesteps, c.schedule_sampler, device)
    log(f'network: {sum(p.numel() for p in model.parameters()):,} parameters, {json.dumps(net_kwargs)}')
    cur_nimg = apply_resume(resumed, model, emas, optimizer, sampler, run_dir, rank, world_size, log) if resumed else 0

    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None) \
        if world_size > 1 else model
    net = torch.compile(ddp) if c.compile else ddp                 # --compile: fused kernels, default on CUDA
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.precision == 'bf16')  # bf16 matmul/conv
    grid_diffusion = make_diffusion(c.noise_schedule, c.diffusion_steps, c.grid_steps, device, c.rescale_timesteps)

    # Statistics summed on the device, read once per tick: loss, grad norm, steps, then per quartile of t: mse, vb, n.
    stats = torch.zeros(3 + 3 * 4, dtype=torch.float64, device=device)
    local_batch, rounds = c.batch // world_size, c.batch // world_size // c.batch_gpu  # per GPU; accumulation rounds
    total_nimg, tick_nimg = round(c.kimg * 1000), round(c.tick * 1000)
    tick_start_nimg, tick_start_time, start_time = cur_nimg, time.time(), time.time()
    # Every state replaces the previous one, except the first state past each multiple of --dump snapshots.
    dump_nimg, previous_nimg = tick_nimg * c.snap * c.dump, cur_nimg
    previous_state = resumed['path'] if resumed and not resumed.get('official') and not resumed.get('kept', True) and \
        os.path.dirname(os.path.abspath(resumed['path'])) == os.path.abspath(run_dir) else None
    ticks_done = 0
    while cur_nimg < total_nimg:  # a resumed run that is already done trains no further
        # Draw this step's randomness for the whole global batch, then take this rank's strided share:
        # the result does not depend on the GPU count, and resuming at any step replays it exactly.
        step = cur_nimg // c.batch                                                    # seeds the step
        gen = torch.Generator(device).manual_seed(c.seed * (1 << 32) + step)
        # Official code samples t per microbatch, after the previous one's update: the same with one round (default).
        t_all, w_all = sampler.sample(c.batch, gen)                                   # (B,) timesteps, weights
        eps_all = torch.randn(c.batch, channels, resolution, resolution, generator=gen, device=device)
        xi_all = torch.randn(c.batch, channels, resolution, resolution, generator=gen, device=device)
        flip_all = torch.rand(c.batch, generator=gen, device=device) < 0.5            # official random_flip
        index_all = batch_indices(step, c.batch, num_images, c.seed, data.device)     # (B,) dataset indices

        # Accumulate gradients.
        losses = []
        for r in range(rounds):
            # This rank's r-th microbatch: global samples rank, rank + world_size, ...
            mb = slice(rank + r * c.batch_gpu * world_size, rank + (r + 1) * c.batch_gpu * world_size, world_size)
            x0 = data[index_all[mb]].to(device, non_blocking=True).permute(0, 3, 1, 2)      # (b, C, H, W) uint8
            if c.random_flip:
                x0 = torch.where(flip_all[mb, None, None, None], x0.flip(3), x0)
            x0 = (x0.float() / 127.5 - 1).contiguous(memory_format=memory_format)
            t, w = t_all[mb], w_all[mb]
            sync = r == rounds - 1 or world_size == 1  # DDP all-reduces the gradients in the last round only
            with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast:
                loss, mse, vb = ip_loss(net, diffusion, x0, t, eps_all[mb], xi_all[mb], c.input_perturbation,
                                        c.rescale_learned_sigmas,
                                        labels[index_all[mb]].to(device) if labels is not None else None)
                # Mean over the per-GPU batch; DDP then averages over GPUs. (Official --microbatch sums the
                # microbatch means, which scales the step by the number of rounds; here --batch_gpu saves memory only.)
                (loss * w).sum().div(local_batch).backward()
            losses.append(loss.detach())
            # Bins of the official loss_q0..q3 logs; mse and vb enter unweighted (official: importance-weighted).
            quartile = t * 4 // diffusion.num_timesteps                # (b,)
            stats[0] += (loss * w).detach().sum() / c.batch            # importance-weighted, as the official log
            stats[3:].view(3, 4).index_add_(1, quartile, torch.stack([mse, vb, torch.ones_like(mse)]).detach().double())
        # Every rank records all losses, so the samplers stay identical. Global sample j = rank + world_size * p sits
        # at local position p of its rank: interleaving the ranks' lists restores the global order. (Official pushes
        # rank 0's losses first, then rank 1's: the order only matters when over 10 losses of one t arrive at once.)
        losses = torch.cat(losses)                                                          # (local_batch,)
        if world_size > 1:
            gathered = [torch.empty_like(losses) for _ in range(world_size)]
            dist.all_gather(gathered, losses)
            losses = torch.stack(gathered, dim=1).flatten()                                 # (B,)
        sampler.update(t_all, losses)

        # Update weights (official: constant lr, or linear decay to 0 with --lr_anneal_steps; no clipping).
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        stats[1] += torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).double()
        stats[2] += 1
        if c.lr_anneal_steps:
            for group in optimizer.param_groups:
                group['lr'] = c.lr * (1 - step / c.lr_anneal_steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Update EMAs (official: per step, no warm-up).
        for ema, rate in zip(emas, rates):
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - rate)
        cur_nimg += c.batch
        done = cur_nimg >= total_nimg
        if not done and cur_nimg < tick_start_nimg + tick_nimg:
            continue

        # Maintenance once per tick. The single host sync of the tick is here.
        if world_size > 1:
            dist.all_reduce(stats)
        values = stats.tolist()
        stats.zero_()
        now = time.time()
        seconds_per_kimg = (now - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1000
        steps = values[2] / world_size                                       # each rank counted every step
        mse_q = [values[3 + q] / max(values[11 + q], 1) for q in range(4)]  # quartiles of t, as the official log
        gpumem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else 0.0
        lr = optimizer.param_groups[0]['lr']
        record = dict(kimg=cur_nimg / 1000, nimg=cur_nimg, time=now - start_time, sec_per_kimg=seconds_per_kimg,
                      loss=values[0] / steps, lr=lr, img_per_sec=1000 / seconds_per_kimg, gpumem_gb=gpumem,
                      **{f'mse_q{q}': mse_q[q] for q in range(4)}, vb=sum(values[7:11]) / sum(values[11:15]),
                      grad_norm=values[1] / values[2])
        eta_seconds = max(total_nimg - cur_nimg, 0) / 1000 * seconds_per_kimg
        log(f'kimg {record["kimg"]:.1f} | time {format_time(record["time"])} | sec/kimg {seconds_per_kimg:.2f} | '
            f'ETA {format_time(eta_seconds)} | loss {record["loss"]:.4f} | lr {lr:.1e} | '
            f'img/s {record["img_per_sec"]:.0f} | gpumem {gpumem:.1f}G | mse q0-q3 '
            f'{" ".join(f"{v:.4f}" for v in mse_q)} | vb {record["vb"]:.4f} | grad norm {record["grad_norm"]:.3f}')
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        if rank == 0:
            append_jsonl(os.path.join(run_dir, 'stats.jsonl'), record)
        ticks_done += 1
        if done or ticks_done % c.snap == 0:  # training state, snapshot and sample grid
            kept = cur_nimg // dump_nimg > previous_nimg // dump_nimg
            state = save_snapshot(c, model, emas, optimizer, sampler, net_kwargs, cur_nimg, kept, run_dir, rank,
                                  world_size, device)
            if rank == 0 and previous_state and previous_state != state:
                os.remove(previous_state)
            previous_state, previous_nimg = (None if kept else state), cur_nimg
            if rank == 0:  # fixed-seed grid from the (first) EMA network
                images = generate_images(make_denoiser(emas[0], c.precision), grid_diffusion, list(range(c.grid)),
                                         (channels, resolution, resolution), net_kwargs['label_dim'], device, c)
                save_png(images, os.path.join(run_dir, f'samples-{cur_nimg // 1000:06d}.png'))
            if world_size > 1:
                dist.barrier()
        tick_start_nimg, tick_start_time = cur_nimg, time.time()


def save_snapshot(c, model, emas, optimizer, sampler, net_kwargs, cur_nimg, kept, run_dir, rank, world_size, device):
    """training-state (everything resume needs), then network-snapshot (EMA weights + what generate/eval need; one
    per further --ema_rate): a failure never leaves a snapshot newer than the last state. Returns the state's path."""
    mine = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == 'cuda' else torch.zeros(0)
    rng = [mine] if world_size == 1 else [None] * world_size  # (CPU, CUDA) generator states per rank, on the CPU
    if world_size > 1:  # every rank's dropout stream, so a resumed DDP run continues each of them
        dist.all_gather_object(rng, mine)
    kimg = f'{cur_nimg // 1000:06d}'
    path = os.path.join(run_dir, f'training-state-{kimg}.pt')
    if rank != 0:
        return path
    as_cpu = lambda module: {k: v.detach().cpu() for k, v in module.state_dict().items()}
    ema_states = [as_cpu(ema) for ema in emas]
    state = dict(model=as_cpu(model), emas=ema_states, optimizer=optimizer.state_dict(), net_kwargs=net_kwargs,
                 sampler_history=sampler.history.cpu(), sampler_counts=sampler.counts.cpu(), cur_nimg=cur_nimg,
                 kept=kept, cpu_rng=[r[0] for r in rng], cuda_rng=[r[1] for r in rng], config=dataclasses.asdict(c))
    atomic_write(path, torch_bytes(state))
    for i, (rate, ema) in enumerate(zip(c.ema_rate.split(','), ema_states)):
        snapshot = dict(net_kwargs=net_kwargs, ema=ema, ema_rate=float(rate), diffusion_steps=c.diffusion_steps,
                        noise_schedule=c.noise_schedule, config=dataclasses.asdict(c))
        suffix = '' if i == 0 else f'-ema{float(rate)}'
        atomic_write(os.path.join(run_dir, f'network-snapshot-{kimg}{suffix}.pt'), torch_bytes(snapshot))
    return path


def apply_resume(resumed, model, emas, optimizer, sampler, run_dir, rank, world_size, log):
    """Loads what read_resume checked into the given objects; returns the cur_nimg to continue from."""
    model.load_state_dict(resumed['model'])
    for ema, weights in zip(emas, resumed['emas']):
        ema.load_state_dict(weights)
    if resumed.get('official'):  # guided-diffusion files: no sampler history, no RNG states (as there)
        if resumed['optimizer'] is not None:
            optimizer.load_state_dict(resumed['optimizer'])
        note = '' if resumed['optimizer'] is not None else ' (no optimizer file beside it: a fresh AdamW, as official)'
        log(f'resumed from the official {resumed["official"]} at kimg {resumed["cur_nimg"] / 1000:.3f}{note}')
        return resumed['cur_nimg']
    optimizer.load_state_dict(resumed['optimizer'])
    sampler.history.copy_(resumed['sampler_history'])
    sampler.counts.copy_(resumed['sampler_counts'])
    if len(resumed['cpu_rng']) == world_size:  # each rank's dropout stream (another process count starts new ones)
        torch.set_rng_state(resumed['cpu_rng'][rank].cpu())
        if sampler.counts.is_cuda:
            torch.cuda.set_rng_state(resumed['cuda_rng'][rank].cpu())
    log(f'resumed at kimg {resumed["cur_nimg"] / 1000:.3f}' + ('' if len(resumed['cpu_rng']) == world_size else
        f' with {world_size} processes instead of {len(resumed["cpu_rng"])}: new dropout streams'))
    if rank == 0:  # forget progress lines written after that state, even one cut short by a kill -9
        stats_path = os.path.join(run_dir, 'stats.jsonl')
        with open(stats_path, 'a+') as f:
            f.seek(0)
            lines = [line for line in f if line.endswith('\n')]
        kept = ''.join(line for line in lines if json.loads(line)['nimg'] <= resumed['cur_nimg'])
        atomic_write(stats_path, kept.encode())
    return resumed['cur_nimg']


def format_time(seconds):
    """4m05s below an hour, else 1h02m."""
    s = int(seconds)
    return f'{s // 60}m{s % 60:02d}s' if s < 3600 else f'{s // 3600}h{s % 3600 // 60:02d}m'

# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: generate, eval (FID through fid.py) and the exposure-bias measurement

def exposure_bias(net, diffusion, x0, start, noise, clip_denoised=True, eta=None, class_labels=None,
                  randn_like=torch.randn_like):
    """Exposure bias of chains started from real images (x0 (B, C, H, W), noise like x0): x_start = q_sample(x0,
    start, noise), then the sampler down to 0 (official ADM-ES branch x_t_distribution_consecutive_sampling).
    During training x_t - sqrt(ab_t) x0 has std sqrt(1 - ab_t); sampling drifts from it. Returns the batch sums of
    r = x_t - sqrt(ab_t) x0 and of r^2 for t = start-1 .. 0, each (start, C, H, W) float64, and the batch sum of
    the per-image mean |x0_hat - x0| of the final sample (the paper's reconstruction error)."""
    t = torch.full((x0.shape[0],), start, dtype=torch.int64, device=x0.device)
    x = diffusion.q_sample(x0, t, noise)
    sums, squares = [], []
    for i, x, _ in sample_chain(net, diffusion, x, start, clip_denoised, eta, class_labels, randn_like):
        if i > 0:
            r = (x - diffusion.at(diffusion.sqrt_alphas_cumprod, torch.full_like(t, i - 1)) * x0).double()
            sums.append(r.sum(0))
            squares.append(r.square().sum(0))
    return torch.stack(sums), torch.stack(squares), (x - x0).abs().flatten(1).mean(1).double().sum()


def exposure_table(sums, squares, num, diffusion, start):
    """delta_t = (sigma_hat_t - sqrt(1 - ab_t))^2, sigma_hat_t = per-pixel std over the `num` chains averaged over
    pixels (ADM-ES image_sample.py; Ning et al. ICLR 2024). Rows from t = start-1 down to 0, original timesteps."""
    mean = sums / num
    sigma_hat = (squares / num - mean.square()).clamp(min=0).sqrt().flatten(1).mean(1)
    sigma_train = diffusion.sqrt_one_minus_alphas_cumprod[:start].flip(0)
    delta = (sigma_hat - sigma_train).square()
    return [dict(t=int(t), sigma_hat=float(s), sigma_train=float(g), delta=float(d))
            for t, s, g, d in zip(diffusion.timestep_map[:start].flip(0), sigma_hat, sigma_train, delta)]


def exposure_over_data(c, denoiser, diffusion, shape, label_dim, rank, world_size, device):
    """exposure_bias summed over --num real images of --data (each rank its share), chains from respaced index
    --forward_t: returns ([sum r, sum r^2, sum |x0_hat - x0|], number of images, start index)."""
    start = diffusion.num_timesteps - 1 if c.forward_t is None else c.forward_t
    if not 1 <= start < diffusion.num_timesteps:
        raise FlagError(f'--forward_t must be in [1, {diffusion.num_timesteps - 1}]')

    # Real images that fit the network, a fixed random subset of them.
    x_data, y_data = load_dataset(c.data)
    if x_data.shape[1:] != shape[1:] + shape[:1]:  # (H, W, C) against the network's (C, H, W)
        raise InputError(f'--data: images of shape {x_data.shape[1:]} do not fit the network (HWC {shape[::-1]})')
    if label_dim and (y_data is None or y_data.max() >= label_dim):
        raise InputError(f'--data: the network is conditional on {label_dim} classes; {c.data} needs labels below it')
    chosen = torch.randperm(len(x_data), generator=torch.Generator().manual_seed(c.seed))[:c.num].tolist()

    # Sums over this rank's chains, then over all ranks.
    totals = [torch.zeros(size, dtype=torch.float64, device=device)  # sums of r, r^2, |x0_hat - x0|
              for size in ((start, *shape), (start, *shape), ())]
    for indices in rank_batches(chosen, c.batch, rank, world_size):
        x0 = torch.from_numpy(x_data[indices]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        labels = torch.from_numpy(y_data[indices]).to(device) if label_dim else None
        rnd = StackedRandomGenerator(device, indices)  # noise of image k depends on k only
        # --deterministic: x_{t-1} = mu_theta(x_t) (official exposure_bias_deterministic branch).
        parts = exposure_bias(denoiser, diffusion, x0, start, rnd.randn_like(x0), c.clip_denoised,
                              c.eta if c.use_ddim else None, labels,
                              torch.zeros_like if c.deterministic else rnd.randn_like)
        totals = [a + b for a, b in zip(totals, parts)]
    if world_size > 1:
        for tensor in totals:
            dist.all_reduce(tensor)
    return totals, len(chosen), start


def check_writable(folder, flag):
    """Creates `folder` if needed and proves it writable before any long work (InputError otherwise)."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f'.write-test-{os.getpid()}')
        open(probe, 'wb').close()
        os.remove(probe)
    except OSError as e:
        raise InputError(f'{flag}: cannot write to {folder}: {e.strerror or e}') from None


def run_sampling_command(command, c, rank, world_size, device, log):
    """sample: samples_NxHxWx3.npz (official image_sample.py) and one PNG per image. generate: one PNG per seed.
    eval: metrics via fid.compute_metrics. exposure: delta_t table."""
    net, diffusion = load_network(c.network, c, device)
    denoiser = make_denoiser(net, c.precision)
    shape, label_dim = (net.in_channels, net.img_resolution, net.img_resolution), net.label_dim
    sampler_desc = dict(timestep_respacing=c.timestep_respacing or str(diffusion.num_timesteps),
                        sampler=f'ddim eta={c.eta:g}' if c.use_ddim else 'ancestral', clip_denoised=c.clip_denoised)
    results_dir = os.path.dirname(os.path.abspath(c.network))
    check_writable(c.outdir if command in ('sample', 'generate') else results_dir,
                   '--outdir' if command in ('sample', 'generate') else '--network (its folder takes the results)')
    if command in ('sample', 'generate'):
        seeds = list(range(c.num_samples)) if command == 'sample' else parse_seeds(c.seeds)
        labels = {}
        for batch in rank_batches(seeds, c.batch, rank, world_size):
            images, batch_labels = generate_images(denoiser, diffusion, batch, shape, label_dim, device, c, True)
            for i, (seed, image) in enumerate(zip(batch, images)):
                save_png(image, os.path.join(c.outdir, f'{seed:06d}.png'))
                labels[seed] = int(batch_labels[i]) if label_dim else None
        if command == 'sample':  # the official array: (N, H, W, C) uint8 as arr_0, the labels as arr_1
            everyone = [labels] if world_size == 1 else [None] * world_size
            if world_size > 1:
                dist.all_gather_object(everyone, labels)
            if rank == 0:
                labels = {seed: label for part in everyone for seed, label in part.items()}
                arrays = [np.asarray(PIL.Image.open(os.path.join(c.outdir, f'{seed:06d}.png'))) for seed in seeds]
                arr = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
                path = os.path.join(c.outdir, f'samples_{"x".join(str(n) for n in arr.shape)}.npz')
                buffer = io.BytesIO()
                np.savez(buffer, arr, *([np.array([labels[s] for s in seeds], dtype=np.int64)] if label_dim else []))
                atomic_write(path, buffer.getvalue())
                log(f'saved {path}')
        log(f'generated {len(seeds)} images in {c.outdir}')
        return
    if command == 'eval':
        try:  # protocol, weights and reference first, so that a missing file or a mismatch shows before sampling
            ref = fid.load_ref(c.ref)
            detector = fid.load_inception(c.fid_weights, device=device)
            protocol = fid.resolve_protocol(protocol=c.protocol, ref=ref, metrics=tuple(c.metrics.split(',')),
                                            detector=detector, num=c.num)
        except (OSError, ValueError) as e:
            raise InputError(f'eval: {e}') from None
        num = protocol['num'] or c.num
        batches = (generate_images(denoiser, diffusion, seeds, shape, label_dim, device, c)
                   for seeds in rank_batches(list(range(num)), c.batch, rank, world_size))
        metrics = fid.compute_metrics(batches, ref, metrics=tuple(c.metrics.split(',')), device=device,
                                      detector=detector, num_images=num, protocol=protocol)
        record = dict(network=c.network, num=num, ref=c.ref, **sampler_desc, **metrics)
        log(json.dumps(record))
        if rank == 0:
            append_jsonl(os.path.join(results_dir, 'metrics-ddpm_ip.jsonl'), record)
        return

    totals, num, start = exposure_over_data(c, denoiser, diffusion, shape, label_dim, rank, world_size, device)
    rows = exposure_table(totals[0], totals[1], num, diffusion, start)
    for row in rows:
        log(f't {row["t"]:4d} | std of x_t - sqrt(ab) x0: sampled {row["sigma_hat"]:.4f}, '
            f'training {row["sigma_train"]:.4f} | delta_t {row["delta"]:.3e}')
    record = dict(network=c.network, data=c.data, num=num, forward_t=start, deterministic=c.deterministic,
                  **sampler_desc, x0_l1=float(totals[2]) / num, delta_sum=sum(r['delta'] for r in rows),
                  per_step=rows)
    log(f'exposure bias: sum of delta_t {record["delta_sum"]:.4e} | final |x0_hat - x0| {record["x0_l1"]:.4f}')
    if rank == 0:
        append_jsonl(os.path.join(results_dir, 'exposure-ddpm_ip.jsonl'), record)


# ----------------------------------------------------------------------------------------------------------------------
# Main

def make_logger(rank, path=None):
    """print() on rank 0, also appended to `path` (log.txt) when given."""
    file = open(path, 'a', buffering=1) if path and rank == 0 else None  # line-buffered: readable during the run

    def log(message):
        if rank == 0:
            print(message, flush=True)
            if file:
                print(message, file=file)
    return log


def prepare_training(c, rank, world_size):
    """Everything that can fail on bad input, before anything is written: the data, its labels, the network, the run
    folder and what --resume names. Returns (x, y, net_kwargs, run_dir, checked resume dict or None)."""
    if rank == 0 and c.data == 'cifar10':
        load_dataset(c.data)  # download once
    if world_size > 1:
        dist.barrier()
    x_data, y_data = load_dataset(c.data)
    if c.class_cond and y_data is None:
        raise InputError(f'--class_cond needs labels, but {c.data} has none')
    if c.class_cond and y_data.max() >= c.num_classes:
        raise InputError(f'--data: label {y_data.max()} of {c.data} lies outside [0, {c.num_classes}); '
                         f'set --num_classes (official NUM_CLASSES is 10)')
    if c.image_size and c.image_size != x_data.shape[1]:
        raise InputError(f'--image_size {c.image_size}: the images of {c.data} are {x_data.shape[1]} pixels wide')
    net_kwargs = net_config(c, x_data.shape[1], x_data.shape[3], c.num_classes if c.class_cond else 0)
    run = list(find_run_dir(c)) if rank == 0 else [None] * 3  # rank 0 decides
    if world_size > 1:
        dist.broadcast_object_list(run)
    run_dir, resume_path, _ = run
    resumed = read_resume(resume_path, c, net_kwargs) if resume_path else None
    return x_data, y_data, net_kwargs, run_dir, resumed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] in (['-h'], ['--help']):
        print(top_level_help())
        return
    rank = int(os.environ.get('RANK', 0))
    try:
        command, c = parse_args(argv)
        c = check_config(c, command, int(os.environ.get('WORLD_SIZE', 1)))
        if c.dry_run:
            print(json.dumps({'command': command, **dataclasses.asdict(c)}, indent=2))
            return
        rank, world_size, device = init_distributed(c.device)
        c.precision = c.precision or ('bf16' if device.type == 'cuda' else 'fp32')
        c.compile = device.type == 'cuda' if c.compile is None else c.compile
        if command != 'train':
            run_sampling_command(command, c, rank, world_size, device, make_logger(rank))
            return
        x_data, y_data, net_kwargs, run_dir, resumed = prepare_training(c, rank, world_size)

        # The run folder; one reused or resumed loses the partial files of an interrupted write.
        if rank == 0:
            check_writable(c.outdir, '--outdir')
            os.makedirs(run_dir, exist_ok=True)
            for partial in glob.glob(os.path.join(run_dir, '*.tmp*')):
                os.remove(partial)
        if world_size > 1:
            dist.barrier()
        log = make_logger(rank, os.path.join(run_dir, 'log.txt'))
        if rank == 0:
            config_text = json.dumps(dataclasses.asdict(c), indent=2)
            atomic_write(os.path.join(run_dir, 'config.json'), config_text.encode())
            atomic_write(os.path.join(run_dir, 'ddpm_ip.py'), pathlib.Path(__file__).read_bytes())
            gpu = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
            log(f'command: ddpm_ip.py {" ".join(argv)}\ntorch {torch.__version__} on {gpu}, {world_size} process(es), '
                f'run folder {run_dir}\n{config_text}')
        training_loop(c, x_data, y_data, net_kwargs, run_dir, resumed, rank, world_size, device, log)
    except (FlagError, RunError, OSError) as e:
        if isinstance(e, OSError):  # a write that failed while running (full disk, folder removed)
            e = RunError(f'cannot write {e.filename or "a file"}: {e.strerror or e}')
        if rank == 0:
            print(f'ddpm_ip.py: error: {e}', file=sys.stderr)
        sys.exit(2 if isinstance(e, FlagError) else 1)  # 2: bad flag or input, as argparse; 1: failed while running
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
