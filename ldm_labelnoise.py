"""Slight Corruption in Pre-training Data Makes Better Diffusion Models: condition corruption, CEP.

Hao Chen, Yujin Han, Diganta Misra, Xiang Li, Kai Hu, Difan Zou, Masashi Sugiyama, Jindong Wang,
Bhiksha Raj. NeurIPS 2024 (spotlight), arXiv 2405.20494. Guide: docs/ldm_labelnoise.md.

Plain conditional diffusion training changes in one of two ways. Condition corruption (Sec. 3.1):
before training, a fraction eta of the samples get a wrong condition, fixed for the whole run (a
label flipped to another class drawn by the class prior, or captions swapped in pairs); slight
corruption (eta <= 7.5%) improves FID, IS and diversity. CEP (Sec. 5, Eq. 8): fresh noise delta is
added to the condition embedding c(y) at every training step, uniform on [-gamma/sqrt(d),
gamma/sqrt(d)] (CEP-U) or Gaussian with std gamma/sqrt(d) (CEP-G); sampling is unchanged. The rest
is a standard DDPM (T = 1000, eps-prediction, classifier-free guidance) on a DiT or an LDM UNet, in
pixel space or on VQ-f4 / KL-f8 latents. Table 1 FID: DiT-XL/2 6.76 -> 5.51, LDM-4 9.44 -> 6.91.

CPU quick start; DiT-XL/2 on 8 GPUs (Table 1); 50k images; FID, IS, sFID, precision/recall:
  python ldm_labelnoise.py --preset=tiny --data=tests/data/cifar10_tiny.npz \\
      --corruption_ratio=0.05 --cep=uniform
  torchrun --standalone --nproc_per_node=8 ldm_labelnoise.py --preset=in1k-dit \\
      --data=imagenet/train --cep=uniform
  torchrun --standalone --nproc_per_node=8 ldm_labelnoise.py generate --network=NET.pt \\
      --seeds=0-49999 --outdir=out --scheduler=dpm --scale=1.75
  torchrun --standalone --nproc_per_node=8 -- ldm_labelnoise.py eval --network=NET.pt \\
      --ref=in1k_val.npz --protocol=adm --num=50000 --scheduler=dpm --scale=1.75

Read in this order: corrupt_labels, swap_captions, cep_noise, perturb_condition, diffusion_loss,
dpm_solver_sample, ddim_sample, ddpm_sample, training_loop, main.
"""

import argparse
import atexit
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
import re
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fid
import nets


# --------------------------------------------------------------------------------------------------
# Configuration: the data, the network, the optimisation and the run; then the paper recipes.

NUM_TIMESTEPS = 1000  # DDPM steps T (paper App. B.3, B.4)
TEXT_LENGTH = 77  # BERT max_length in the official text pipeline


@dataclasses.dataclass
class SamplerConfig:
    # Sampling (every command; train: the sample grids).
    scheduler:          str   = 'ddim'       # ddim | dpm (DPM-Solver++ 2M, paper) | ddpm (DiT)
    ddim_steps:         int   = 50           # sampling steps (DiT's FID protocol: ddpm, 250)
    ddim_eta:           float = 0.0          # DDIM stochasticity; 0 = deterministic
    scale:              float = 7.5          # guidance scale s of Eq. 2; 1 = no guidance
    cfg_channels:       str   = 'all'        # guided eps channels: all (diffusers) | dit (first 3)
    timestep_spacing:   str   = ''           # linspace | leading; '' = diffusers' default


@dataclasses.dataclass
class TrainConfig(SamplerConfig):
    # Data and corruption: images and their conditions.
    data:               str   = ''           # image folder, EDM zip, .npz (x, y) or cifar10
    cond:               str   = 'class'      # class labels | text captions (CC3M; LDM only)
    captions:           str   = ''           # captions, one a line; '' = captions.txt beside
    resolution:         int   = 0            # ADM center crop (DiT: 256); 0 = keep the size
    num_classes:        int   = 0            # labels in [0, num_classes); 0 = from the data
    xflip:              bool  = False        # random flips (DiT train.py: on; LDM: off)
    # Condition corruption, fixed once before training (Sec. 3.1, App. B.1).
    corruption_ratio:   float = 0.0          # eta: fraction with a wrong label / swapped caption
    corruption_classes: str   = ''           # asymmetric (Sec. 3.3): only within ids, e.g. 1,5,9
    # Training-time perturbations (Sec. 5) and classifier-free guidance.
    cep:                str   = 'none'       # CEP (Eq. 8): none | uniform | gaussian
    cep_gamma:          float = 1.0          # gamma of Eq. 8; the paper uses 1 for all models
    cep_perturb_null:   bool  = True         # CEP also on the null condition (paper: silent)
    input_perturbation: float = 0.0          # IP baseline: gamma of eps + gamma xi (DDPM-IP 0.1)
    embedding_dropout:  float = 0.0          # on the condition embedding (App. E.3: 0.1); LDM
    class_dropout_prob: float = 0.1          # null condition rate (DiT; LDM: SD2's 0.1)
    # Network and diffusion.
    arch:               str   = 'DiT-XL/2'   # DiT-XL/2, DiT-B/2, ..., ldm-cin256, ldm-cc3m
    vae:                str   = 'none'       # ema | mse (KL-f8) | vq-f4 | file or URL | none
    transfer:           str   = ''           # start from a facebookresearch/DiT .pt or snapshot
    dropout:            float = 0.0          # UNet dropout (LDM cin256-v2: 0)
    text_layers:        int   = 4            # depth of the text encoder standing in for BERT
    beta_schedule:      str   = 'linear'     # linear (DiT) | scaled_linear (LDM's "linear")
    linear_start:       float = 1e-4         # beta_1 (DiT 1e-4; LDM cin256-v2 0.0015)
    linear_end:         float = 0.02         # beta_T (DiT 0.02; LDM cin256-v2 0.0195)
    # Optimisation (DiT train.py defaults; paper App. B.4).
    batch:              int   = 256          # global batch (DiT: 256; LDM: 8 GPUs x 64)
    batch_gpu:          int   = 0            # per-GPU microbatch (accumulation); 0 = batch / GPUs
    lr:                 float = 1e-4         # AdamW learning rate, constant (paper App. B.3, B.4)
    weight_decay:       float = 0.0          # AdamW weight decay (DiT: 0; LDM: torch default 0.01)
    lr_rampup_kimg:     float = 0.0          # linear warm-up in kimg (neither recipe has one)
    grad_clip:          float = 0.0          # max gradient norm; 0 = off (DiT and LDM do not clip)
    ema_decay:          float = 0.9999       # per-step EMA (DiT); 0 = raw weights (LDM)
    kimg:               float = 102400       # training length (DiT-XL/2: 400K x 256 images)
    # Run: bookkeeping.
    outdir:             str   = 'runs'       # run folders go here
    tick:               float = 10.0         # kimg between progress lines
    snap:               int   = 50           # ticks between snapshots, grids, states
    grid:               int   = 64           # images in the sample grids
    seed:               int   = 0            # corruption, data order and all training noise
    resume:             str   = ''           # training-state-*.pt, or auto (same config)
    precision:          str   = ''           # fp32 | bf16 autocast; '' = bf16 on CUDA, fp32 on CPU
    compile:            bool  = False        # torch.compile the network
    workers:            int   = 4            # threads decoding images
    cache_dir:          str   = ''           # CIFAR-10 / latents; '' = ~/.cache/ldm_labelnoise
    device:             str   = ''           # cpu | cuda; '' = cuda when available
    dry_run:            bool  = False        # print the resolved config and exit


@dataclasses.dataclass
class GenerateConfig(SamplerConfig):
    # Network.
    network:            str   = ''           # snapshot, DiT .pt, diffusers folder or repo id
    vae:                str   = ''           # of a DiT .pt: ema | mse | file; '' = DiT's choice
    hub_token:          str   = ''           # Hugging Face token (also HF_TOKEN)
    # Sampling: which images, where.
    seeds:              str   = ''           # e.g. 0-49999; '' = the official per-class layout
    n_samples:          int   = 0            # per class / prompt / walk; 0 = official 100/5/5
    class_start_idx:    int   = 0            # first class (or prompt) of the official layout
    class_end_idx:      int   = -1           # end of the class (prompt) range; -1 = all
    image_size:         int   = 0            # output side, checked; 0 = the network's
    outdir:             str   = 'tmp'        # generate: image folder; walk: grid folder
    batch:              int   = 50           # images per forward pass and GPU
    class_idx:          int   = -1           # --seeds: class of all; -1 = seed % num_classes
    prompts:            str   = ''           # text models: a file, one prompt a line
    classes:            str   = '0'          # walk: class ids (text models: use --prompt)
    prompt:             str   = ''           # walk: captions of a text model (one walk each)
    walk_steps:         int   = 20           # walk: points on the circle
    seed:               int   = 42           # base seed of the official layout and walks
    # Evaluation.
    num:                int   = 50000        # eval: number of samples (class-balanced)
    ref:                str   = ''           # eval: statistics .npz from `python fid.py ref`
    protocol:           str   = ''           # eval: edm | adm | pytorch-fid; '' = the ref's
    metrics:            str   = 'fid,is,sfid,pr'  # eval: fid.compute_metrics names
    fid_weights:        str   = ''           # eval: Inception weights; '' = FID_WEIGHTS/download
    # Run.
    precision:          str   = ''           # fp32 | bf16 (or full | autocast); '' = bf16 on CUDA
    device:             str   = ''           # cpu | cuda; '' = cuda when available


# The LDM presets train on VQ-f4 latents (64x64x3 at 256 px, the paper's LDM-4); --vae=ema: KL-f8.
_LDM_IN1K = dict(arch='ldm-cin256', cond='class', vae='vq-f4', resolution=256,
                 beta_schedule='scaled_linear', linear_start=0.0015, linear_end=0.0195, batch=512,
                 weight_decay=0.01, ema_decay=0.0)


PRESETS = {
    # LDM-4 class-conditional ImageNet, 178K iterations of 8 x 64 (App. B.3); s = 2.0 in Table 1.
    'in1k-ldm': dict(_LDM_IN1K, kimg=91136, scale=2.0, scheduler='dpm'),
    # LDM-4 text-conditional CC3M, 396K iterations of 8 x 64 (App. B.3); s = 3.0 in Table 1.
    'cc3m-ldm': dict(_LDM_IN1K, arch='ldm-cc3m', cond='text', kimg=202752, scale=3.0,
                     scheduler='dpm'),
    # DiT-XL/2 ImageNet: DiT train.py, 400K iterations of 256 (App. B.4); s = 1.75 in Table 1.
    # Paper slip (its autoencoder): docs/ldm_labelnoise.md#dit-autoencoder
    'in1k-dit': dict(arch='DiT-XL/2', vae='ema', resolution=256, xflip=True, kimg=102400,
                     scale=1.75, scheduler='dpm'),
    # CIFAR-10 in pixel space: our recipe for small experiments (not in the paper).
    'cifar10': dict(arch='DiT-B/2', xflip=True, batch=128, kimg=100000, tick=50, scale=1.5,
                    scheduler='dpm'),
    # Seconds on a CPU: a tiny LDM UNet in pixel space.
    'tiny': dict(arch='tiny-ldm', batch=16, lr=2e-4, ema_decay=0.99, kimg=0.5, tick=0.1, snap=5,
                 grid=16, ddim_steps=10, scale=1.5, scheduler='dpm', workers=1),
}


# --------------------------------------------------------------------------------------------------
# Condition corruption (Sec. 3.1, 3.3, App. B.1): fixed once before training.

def corrupted_count(eta, n):
    """floor(eta * n), robust to eta * n landing a hair below an integer in floating point."""
    return math.floor(round(eta * n, 6))


def corrupt_labels(y, eta, generator=None, classes=None):
    """Symmetric label noise: floor(eta * N) samples, drawn without replacement, get another class
    y' != y with P(y') proportional to the class prior n_y' (App. B.1). With `classes` (asymmetric,
    Sec. 3.3), only samples of those classes are eligible, eta is relative to them, and labels flip
    within `classes`.

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
    # rejection sampling: the prior restricted to the other classes, without an (M, K) table
    while todo.any():
        new[todo] = torch.multinomial(prior, int(todo.sum()), replacement=True, generator=generator)
        todo = new == y[index]
    y_noisy = y.clone()
    y_noisy[index] = new
    return y_noisy, index


def swap_captions(n, eta, generator=None):
    """Text swapping (App. B.1): floor(eta * N / 2) disjoint random pairs of samples exchange
    captions, so 2 * floor(eta * N / 2) samples are corrupted. Returns (source (N,): sample i trains
    on caption source[i], the corrupted indices)."""
    pairs = corrupted_count(eta, n) // 2
    index = torch.randperm(n, generator=generator)[:2 * pairs]
    source = torch.arange(n)
    source[index[:pairs]], source[index[pairs:]] = index[pairs:], index[:pairs]
    return source, index


# --------------------------------------------------------------------------------------------------
# The loss: L_simple with conditional embedding perturbation (Eq. 1, 8) and the IP baseline.

def make_alphas_cumprod(schedule='linear', start=1e-4, end=0.02, num_timesteps=NUM_TIMESTEPS):
    """alpha_bar_t, float64 (T,). 'linear': DiT; 'scaled_linear': LDM's "linear",
    beta = linspace(sqrt(start), sqrt(end))^2."""
    if schedule == 'linear':
        betas = torch.linspace(start, end, num_timesteps, dtype=torch.float64)
    else:
        betas = torch.linspace(start ** 0.5, end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def cep_noise(shape, cep, gamma, generator=None, device=None):
    """CEP perturbation delta of Eq. 8, fresh for every sample: (B, ..., d), d = shape[-1] the width
    of c(y). 'uniform' (CEP-U): U(-gamma/sqrt(d), gamma/sqrt(d)) per element;
    'gaussian' (CEP-G): N(0, (gamma/sqrt(d))^2 I).
    """
    # Paper slip: CEP-G's gamma/sqrt(d) read as a std; d per token. docs/ldm_labelnoise.md#cep-where
    scale = gamma / math.sqrt(shape[-1])
    if cep == 'uniform':
        return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * scale
    if cep == 'gaussian':
        return torch.randn(shape, generator=generator, device=device) * scale
    raise ValueError(f'unknown CEP kind {cep!r}')


def perturb_condition(embedding, delta, is_null, perturb_null=True):
    """CEP (Eq. 8): the condition embedding c(y) + delta, formed where the network forms c(y).

    embedding: (B, D) DiT label embedding or (B, L, D) LDM context; delta: the same shape
    (cep_noise) or None; is_null: (B,) bool, the samples whose condition was dropped to the null one
    for classifier-free guidance. perturb_null: whether those get delta too (paper: silent;
    docs/ldm_labelnoise.md#cep-where).
    """
    if delta is None:
        return embedding
    if not perturb_null:
        delta = delta * (~is_null).view(-1, *[1] * (delta.ndim - 1))
    return embedding + delta


def drop_conditions(y, y_null, drop):
    """Classifier-free guidance training: the null condition where drop (B,) is True."""
    return torch.where(drop.view(-1, *[1] * (y.ndim - 1)), y_null, y)


def diffusion_loss(net, x0, y, t, eps, alphas_cumprod, delta=None, xi=None, gamma_ip=0.0):
    """Per-sample L_simple (Eq. 1) with the perturbed condition of Eq. 8:
    ||eps - eps_theta(x_t, t, c(y) + delta)||^2 with x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,
    a_t = alpha_bar_t.

    x0, eps, xi: (B, C, H, W); y: (B,) class ids or (B, L) tokens; t: int64 (B,);
    delta: (B, *cond_shape) or None. IP baseline: x_t from eps + gamma_ip * xi, target eps (Ning et
    al., Eq. 9). An output with v (2C channels, DiT's learned sigma) adds DiT's VB term.
    Returns (B,).
    """
    # float64 tables, rounded to float32 last (DiT's q_sample): docs/ldm_labelnoise.md#noise-tables
    a = alphas_cumprod[t].view(-1, 1, 1, 1)                              # (B, 1, 1, 1) float64
    noise = eps if xi is None else eps + gamma_ip * xi
    x_t = a.sqrt().float() * x0 + (1 - a).sqrt().float() * noise
    out = net(x_t, t, y, delta).float()                                   # (B, C or 2C, H, W)
    channels = x0.shape[1]
    loss = (eps - out[:, :channels]).square().mean(dim=(1, 2, 3))
    if out.shape[1] == 2 * channels:  # only v gets the VB gradient (DiT's frozen mean)
        loss = loss + vb_terms(x0, x_t, t, out[:, :channels].detach(), out[:, channels:],
                               alphas_cumprod)
    return loss


def vb_terms(x0, x_t, t, eps_hat, v, alphas_cumprod):
    """Improved-DDPM variational bound in bits per dim for the learned-range variance, as DiT trains
    it: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the discretised decoder NLL at
    t = 0. Returns (B,)."""
    # Posterior q(x_{t-1} | x_t, x0), the model's mean (from eps_hat) and variance (from v).
    a, a_prev = alphas_cumprod, F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
    beta = 1 - a / a_prev
    var_post = beta * (1 - a_prev) / (1 - a)
    # "clipped": beta_tilde_0 := beta_tilde_1
    logvar_post = torch.cat([var_post[1:2], var_post[1:]]).log()

    def at(v_):
        return v_[t].float().view(-1, 1, 1, 1)

    coef_x0 = at(beta * a_prev.sqrt() / (1 - a))
    coef_xt = at((1 - a_prev) * (1 - beta).sqrt() / (1 - a))
    x0_hat = at((1 / a).sqrt()) * x_t - at((1 / a - 1).sqrt()) * eps_hat
    mean, mean_hat = coef_x0 * x0 + coef_xt * x_t, coef_x0 * x0_hat + coef_xt * x_t
    frac = (v + 1) / 2
    logvar, logvar_hat = at(logvar_post), frac * at(beta.log()) + (1 - frac) * at(logvar_post)
    kl = 0.5 * (-1 + logvar_hat - logvar + (logvar - logvar_hat).exp()
                + (mean - mean_hat).square() / logvar_hat.exp())

    # Decoder NLL of x0 on 256 bins of [-1, 1], with the tanh approximation of the normal CDF.
    def cdf(z):
        return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    inv_std = (-0.5 * logvar_hat).exp()
    upper = cdf(inv_std * (x0 - mean_hat + 1 / 255))
    lower = cdf(inv_std * (x0 - mean_hat - 1 / 255))
    log_probs = torch.where(x0 < -0.999, upper.clamp(min=1e-12).log(), torch.where(
        x0 > 0.999, (1 - lower).clamp(min=1e-12).log(), (upper - lower).clamp(min=1e-12).log()))
    return torch.where(t == 0, -log_probs.mean(dim=(1, 2, 3)), kl.mean(dim=(1, 2, 3))) / math.log(2)


# --------------------------------------------------------------------------------------------------
# Samplers: DPM-Solver++(2M), DDIM and DiT's ancestral sampler; classifier-free guidance (Eq. 2).

def sampling_timesteps(num_timesteps, steps, spacing='linspace', solver='dpm', offset=1):
    """Descending timesteps, spaced as diffusers' schedulers do: DPM-Solver places steps + 1 points
    and drops the last (it then steps to sigma = 0), DDIM places steps points. 'leading' adds
    steps_offset (LDM's DDIM: 1)."""
    points = steps + 1 if solver == 'dpm' else steps
    if spacing == 'linspace':
        timesteps = np.linspace(0, num_timesteps - 1, points).round()
    else:
        timesteps = np.arange(points) * (num_timesteps // points) + offset
    return timesteps[::-1][:steps].astype(np.int64).tolist()


def guided_output(net, x, t, y, y_null=None, scale=1.0, cfg_channels='all'):
    """Eq. 2, eps_u + s (eps_c - eps_u), from one batched forward pass; y_null=None is plain
    conditional sampling. Returns the network output (B, C or 2C, H, W) with guided eps and, for a
    learned sigma, the conditional v. cfg_channels 'all' guides every eps channel; 'dit' the first
    three only (docs/ldm_labelnoise.md#sampling)."""
    t = torch.full((len(x),), t, dtype=torch.int64, device=x.device)
    if y_null is None:
        return net(x, t, y).float()
    out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).float()
    out_c, out_u = out.chunk(2)
    guided = 3 if cfg_channels == 'dit' else x.shape[1]
    eps = out_u[:, :guided] + scale * (out_c[:, :guided] - out_u[:, :guided])
    return torch.cat([eps, out_c[:, guided:]], dim=1)


def guided_eps(net, x, t, y, y_null=None, scale=1.0, cfg_channels='all'):
    return guided_output(net, x, t, y, y_null, scale, cfg_channels)[:, :x.shape[1]]


def respaced_timesteps(num_timesteps, steps):
    """The kept timesteps of improved DDPM's (and DiT's) space_timesteps(T, str(steps)), ascending:
    a running sum of the stride (T - 1) / (steps - 1), rounded (Python's round, as the official
    code)."""
    stride, position, kept = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1, 0.0, []
    for _ in range(steps):
        kept.append(round(position))
        position += stride
    return kept


def ddpm_sample(net, noise, y, alphas_cumprod, steps=250, scale=1.0, y_null=None,
                cfg_channels='all', randn_like=torch.randn_like):
    """Ancestral sampling (Ho et al. Alg. 2) on the chain respaced to `steps` timesteps, with the
    learned-range variance of improved DDPM (Nichol & Dhariwal Eq. 15) when the network outputs v
    (2C channels), else the fixed large variance beta_t. noise: x_T (B, C, H, W); alphas_cumprod:
    float64 (T,) on the CPU. DiT's p_sample_loop: docs/ldm_labelnoise.md#dit-protocol."""
    # Respaced chain, float64 as guided-diffusion's: beta_i = 1 - alpha_bar_i / alpha_bar_{i-1}.
    kept = respaced_timesteps(len(alphas_cumprod), steps)
    beta = 1 - alphas_cumprod[kept] / F.pad(alphas_cumprod[kept][:-1], (1, 0), value=1.0)
    a = torch.cumprod(1 - beta, dim=0)
    a_prev = F.pad(a[:-1], (1, 0), value=1.0)
    var_post = beta * (1 - a_prev) / (1 - a)                            # beta_tilde
    # "clipped": beta_tilde_0 := beta_tilde_1
    logvar_min = torch.cat([var_post[1:2], var_post[1:]]).log()
    logvar_fixed = torch.cat([var_post[1:2], beta[1:]]).log()  # fixed large, for networks without v
    coef_x0, coef_xt = beta * a_prev.sqrt() / (1 - a), (1 - a_prev) * (1 - beta).sqrt() / (1 - a)
    x, channels = noise, noise.shape[1]
    for i in reversed(range(steps)):
        # x0 from the guided eps, the posterior mean, the variance interpolated by v between
        # beta_tilde and beta.
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


def ddim_sample(net, noise, y, alphas_cumprod, steps=50, scale=1.0, y_null=None, eta=0.0,
                spacing='leading', randn_like=torch.randn_like, cfg_channels='all', offset=1,
                clip=0.0, final_alpha_bar=1.0):
    """DDIM (Song et al., Eq. 12) from x_T = noise (B, C, H, W), as diffusers' DDIMScheduler: the
    last step lands on final_alpha_bar (1: set_alpha_to_one), x0 is clipped to [-clip, clip] when
    clip > 0 (clip_sample); each step goes to the next listed timestep
    (docs/ldm_labelnoise.md#sampling). alphas_cumprod: float64 (T,) on the CPU."""
    timesteps = sampling_timesteps(len(alphas_cumprod), steps, spacing, 'ddim', offset)
    x = noise
    for i, t in enumerate(timesteps):
        # Predict x0, then move it to the next noise level with the DDIM eps share and sigma of
        # fresh noise.
        a = alphas_cumprod[t].item()
        last = i + 1 == len(timesteps)
        a_prev = final_alpha_bar if last else alphas_cumprod[timesteps[i + 1]].item()
        eps = guided_eps(net, x, t, y, y_null, scale, cfg_channels)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x0 = x0.clamp(-clip, clip) if clip else x0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
        if sigma > 0:
            x = x + sigma * randn_like(x)
    return x


def dpm_solver_sample(net, noise, y, alphas_cumprod, steps=50, scale=1.0, y_null=None,
                      spacing='linspace', cfg_channels='all', offset=1):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint form) on the data prediction, as
    diffusers' DPMSolverMultistepScheduler with its defaults (first step first order; the final step
    to sigma = 0 is first order, i.e. returns the x0 prediction). lambda = log(alpha / sigma)."""
    timesteps = sampling_timesteps(len(alphas_cumprod), steps, spacing, 'dpm', offset)
    alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    lam = (alpha / sigma).log()
    x, x0_prev, h_prev = noise, None, None
    for i, t in enumerate(timesteps):
        # Data prediction at t; the last step returns it (a first-order step to sigma = 0).
        eps = guided_eps(net, x, t, y, y_null, scale, cfg_channels)
        x0 = (x - sigma[t].item() * eps) / alpha[t].item()
        if i + 1 == len(timesteps):
            return x0
        # Second-order multistep update from the last two data predictions (first step: 1st order).
        s = timesteps[i + 1]
        h = (lam[s] - lam[t]).item()
        # D0 + D1 / 2 with r0 = h_prev / h
        d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)
        x = (sigma[s] / sigma[t]).item() * x - alpha[s].item() * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


# --------------------------------------------------------------------------------------------------
# Training loop.

def draw_step_noise(cfg, cur_nimg, shape, cond_shape, latent, device):
    """All per-sample randomness of the training step that starts at image cur_nimg, for the whole
    global batch, from a generator seeded by (seed, cur_nimg): identical for every GPU count and
    restored exactly on resume; each rank takes its own samples. t (B,), eps (B, C, H, W), z:
    posterior noise of the cached latents, flip (B,), drop (B,): null condition for CFG, delta (B,
    *cond_shape): CEP, xi (B, C, H, W): IP."""
    state = np.random.SeedSequence([cfg.seed, cur_nimg]).generate_state(1, np.uint64)
    g = torch.Generator(device).manual_seed(int(state[0] >> 1))
    b, full = cfg.batch, (cfg.batch,) + tuple(shape)
    return dict(
        t=torch.randint(0, NUM_TIMESTEPS, (b,), generator=g, device=device),
        eps=torch.randn(full, generator=g, device=device),
        z=torch.randn(full, generator=g, device=device) if latent else None,
        flip=torch.rand(b, generator=g, device=device) < (0.5 if cfg.xflip else 0),
        drop=torch.rand(b, generator=g, device=device) < cfg.class_dropout_prob,
        delta=None if cfg.cep == 'none' else cep_noise((b,) + cond_shape, cfg.cep, cfg.cep_gamma, g,
                                                      device),
        xi=torch.randn(full, generator=g, device=device) if cfg.input_perturbation else None)


def clean_batch(rows, flip, z=None, scaling_factor=1.0):
    """x0 of a batch. Pixels: uint8 rows (B, 3, H, W) -> [-1, 1], mirrored where flip (B,). Latents:
    cached moments (B, views, 2C, h, w) -> a fresh sample mean + exp(logvar / 2) z of the image's
    (or, flipped, its mirror's) posterior, times the VAE scaling factor, as DiT's
    latent_dist.sample() * 0.18215. Returns (B, C, H, W)."""
    if z is None:
        x0 = rows.float() / 127.5 - 1
        return torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
    views = rows[torch.arange(len(rows), device=rows.device), flip.long()].float()
    mean, logvar = views.chunk(2, dim=1)
    return (mean + (0.5 * logvar).exp() * z) * scaling_factor


def training_loop(cfg, rank, world_size, device):
    """Corrupt the conditions once (Sec. 3.1), then minimise diffusion_loss with CEP noise (Eq. 1,
    8) on the global batch, with EMA, progress ticks, snapshots and training states. Returns the run
    folder."""
    # TF32 matmuls, and the fastest kernels for the fixed shapes
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision == 'bf16')
    # NHWC convolutions on tensor cores
    channels_last = device.type == 'cuda' and not is_dit(cfg.arch)
    batch_gpu = cfg.batch_gpu or cfg.batch // world_size
    rounds = cfg.batch // (batch_gpu * world_size)
    cache_dir = cfg.cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'ldm_labelnoise')
    log, start_time = Logger(), time.time()

    # Load and check the resume file, the data, its conditions and the network before any write.
    state = load_checkpoint(cfg.resume, '--resume', STATE_KEYS) \
        if cfg.resume not in ('', 'auto') else None
    dataset = ImageDataset(cfg.data, cfg.resolution, cache_dir, cfg.captions)
    n = len(dataset)
    num_classes, clean = load_conditions(cfg, dataset)
    vae = None if cfg.vae == 'none' else load_vae(cfg.vae, device, cache_dir)
    rows, shape = training_rows(cfg, dataset, vae, cache_dir, batch_gpu, rank, world_size, device)
    source, corrupted = corrupt_conditions(cfg, clean)                    # Sec. 3.1: from --seed
    spec = training_spec(cfg, num_classes, shape, vae)
    net = new_network(cfg, spec)
    net = net.to(device, memory_format=torch.channels_last if channels_last else None).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == 'cuda')  # one kernel for all parameters

    # The run folder (--resume=auto continues only a run with the same config), state, conditions.
    run = open_training_run(cfg, log)                                     # folder, lock, log.txt
    state = state or (load_checkpoint(run.state, '--resume', STATE_KEYS) if run.state else None)
    cur_nimg = start_nimg = 0 if state is None else \
        restore_training_state(state, net, ema, optimizer, rank, world_size, device)
    saved_config = state.get('config') if state else None
    del state  # the host copy of the weights and optimizer moments is no longer needed
    if cur_nimg:
        log(resumed_line(run.state, cur_nimg))
    trim_stats(run.dir, cur_nimg)
    source, corrupted = keep_conditions(run, source, corrupted, cfg, saved_config, n, log)
    # (N,) labels or (N, 77) tokens
    conditions = (source if cfg.cond == 'class' else clean[source].short()).to(device)
    is_corrupted = torch.zeros(n, dtype=torch.bool, device=device)
    is_corrupted[corrupted.to(device)] = True
    write_run_files(run.dir, dataclasses.asdict(cfg),
                    dataset.read_many(range(min(n, cfg.grid)), cfg.workers), spec=spec,
                    world_size=world_size, images=n, corrupted=len(corrupted))
    read_rows = row_reader(rows, device)
    device_ids = [device] if device.type == 'cuda' else None
    ddp = net if world_size == 1 else nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
    model = torch.compile(ddp) if cfg.compile else ddp
    alphas_cumprod = make_alphas_cumprod(cfg.beta_schedule, cfg.linear_start,
                                         cfg.linear_end).to(device)
    y_null = torch.as_tensor(net.null, device=device)  # the class id num_classes, or tokens of ''
    log(json.dumps(dataclasses.asdict(cfg), indent=2))
    log(f'{"Resuming" if cur_nimg else "Starting"} {run.dir}: {n} images, {len(corrupted)} '
        f'corrupted conditions, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, '
        f'{world_size} process(es) x {rounds} round(s) of {batch_gpu}')

    # Fixed noise and conditions of the sample grids.
    grid_noise = torch.randn((cfg.grid,) + shape,
                             generator=torch.Generator().manual_seed(0)).to(device)
    grid_y = torch.arange(cfg.grid, device=device) % num_classes if cfg.cond == 'class' else \
        clean[torch.arange(cfg.grid) % n].to(device)

    # Training. shares: the positions of this rank's samples in each accumulation round.
    shares = [torch.arange(r * batch_gpu, (r + 1) * batch_gpu) * world_size + rank
              for r in range(rounds)]
    shares_device = [share.to(device) for share in shares]
    # loss sum, count, 4 t-bins (sum, count), corrupted, dropped
    stats = torch.zeros(12, device=device)
    order_cache, lr, total_nimg = {}, cfg.lr, round(cfg.kimg * 1000)
    tick_start_time, tick_start_nimg = time.time(), cur_nimg
    stop = StopSignal()
    while cur_nimg < total_nimg:
        # This step's data and noise for the whole global batch; each rank takes its share.
        index = data_order(cfg.seed, cur_nimg, cfg.batch, n, order_cache)  # (batch,) numpy
        index_device = to_device(torch.from_numpy(index), device)
        noise = draw_step_noise(cfg, cur_nimg, shape, net.cond_shape, vae is not None, device)

        # Accumulate gradients; DDP synchronises only on the last round.
        for r, (share, mine) in enumerate(zip(shares, shares_device)):
            i = index_device[mine]                                        # (batch_gpu,) indices
            my = {key: None if value is None else value[mine] for key, value in noise.items()}
            x0 = clean_batch(read_rows(index[share.numpy()], i), my['flip'], my['z'],
                             spec['scaling_factor'])                      # (batch_gpu, C, H, W)
            x0 = x0.contiguous(memory_format=torch.channels_last) if channels_last else x0
            y = drop_conditions(conditions[i].long(), y_null, my['drop'])
            with ddp.no_sync() if world_size > 1 and r + 1 < rounds else contextlib.nullcontext():
                with autocast:
                    loss = diffusion_loss(model, x0, y, my['t'], my['eps'], alphas_cumprod,
                                          my['delta'], my['xi'], cfg.input_perturbation)
                # DDP averages: the global-batch mean
                loss.sum().mul(world_size / cfg.batch).backward()
            with torch.no_grad():  # diagnostics, summed on the device and read once per tick
                bins = my['t'] * 4 // len(alphas_cumprod)
                stats[0] += loss.sum()
                stats[1] += len(loss)
                stats[2:6].index_add_(0, bins, loss)
                stats[6:10].index_add_(0, bins, torch.ones_like(loss))
                stats[10] += (is_corrupted[i] & ~my['drop']).sum()
                stats[11] += my['drop'].sum()

        # Update weights: optional warm-up and clipping, AdamW.
        ramp = min(1.0, cur_nimg / (cfg.lr_rampup_kimg * 1000)) if cfg.lr_rampup_kimg else 1.0
        lr = cfg.lr * ramp
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

        # Ctrl-C / SIGTERM: a training state now, one line, exit. Once per tick: the progress line
        # and stats.jsonl; every --snap ticks: the sample grid, the EMA network, a training state.
        if stop.check():
            path = save_state(run.dir, cur_nimg, net, ema, optimizer, spec, cfg, world_size, device)
            stop.exit(log, path, cur_nimg)
        done = cur_nimg >= total_nimg
        if not done and cur_nimg < tick_start_nimg + cfg.tick * 1000:
            continue
        report_tick(run.dir, log, stats, cur_nimg, total_nimg, cur_nimg - tick_start_nimg,
                    time.time() - tick_start_time, time.time() - start_time, lr, device)
        if done or round(cur_nimg / (cfg.tick * 1000)) % cfg.snap == 0:
            save_snapshot(run.dir, cur_nimg, ema, spec, vae, grid_noise, grid_y, cfg)
            save_state(run.dir, cur_nimg, net, ema, optimizer, spec, cfg, world_size, device)
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
    stop.close()
    log(done_line(cur_nimg - start_nimg, time.time() - start_time))
    return run.dir


# --------------------------------------------------------------------------------------------------
# Networks: the condition c(y) (nets.ClassEmbedder, nets.ByteTextEncoder) around nets.DiT / nets.UNet.

TINY_DITS = {'DiT-tiny': dict(depth=2, hidden_size=64, patch_size=2, num_heads=2),  # CPU tests
             'DiT-S-tiny': dict(depth=1, hidden_size=384, patch_size=4, num_heads=6)}  # DiT-S width


def is_dit(arch):
    return arch in nets.DiT_models or arch in TINY_DITS


class Denoiser(nn.Module):
    """eps_theta(x_t, t, c(y) + delta): y is int64 (B,) class ids or (B, 77) tokens; delta (B,
    *cond_shape). null: the null condition (a class id, or the tokens of ''); tokenize: captions ->
    the token ids the encoder reads."""

    def __init__(self, backbone, encoder=None, cond_shape=(), embedding_dropout=0.0, null=None,
                 perturb_null=True, tokenize=nets.byte_tokens):
        super().__init__()
        self.backbone, self.encoder, self.cond_shape = backbone, encoder, tuple(cond_shape)
        self.embedding_dropout = nn.Dropout(embedding_dropout)
        self.null, self.perturb_null, self.tokenize = null, perturb_null, tokenize

    def is_null(self, y):
        if torch.is_tensor(self.null) and self.null.device != y.device:  # tokens of '': moved once
            self.null = self.null.to(y.device)
        return (y == self.null).view(len(y), -1).all(dim=1)               # (B,)

    def forward(self, x, t, y, delta=None):
        is_null = self.is_null(y) if delta is not None and not self.perturb_null else None
        # DiT: c = t_emb + (y_emb + delta) inside adaLN (the paper does not say where)
        if self.encoder is None:
            return self.backbone(x, t, y, embedding_hook=lambda embedding: perturb_condition(
                embedding, delta, is_null, perturb_null=self.perturb_null))
        context = self.embedding_dropout(self.encoder(y))                 # (B, L, context_dim)
        context = perturb_condition(context, delta, is_null, perturb_null=self.perturb_null)
        return self.backbone(x, t, context=context)


def build_network(spec):
    """The Denoiser from the spec saved in every snapshot (arch, cond, num_classes, latent shape,
    ...)."""
    channels, resolution = spec['shape'][0], spec['shape'][1]
    if is_dit(spec['arch']):
        kwargs = dict(input_size=resolution, in_channels=channels, num_classes=spec['num_classes'],
                      learn_sigma=True, class_dropout_prob=spec['class_dropout_prob'])
        make = functools.partial(nets.DiT, **TINY_DITS[spec['arch']]) \
            if spec['arch'] in TINY_DITS else nets.DiT_models[spec['arch']]
        backbone = make(**kwargs)
        return Denoiser(backbone, None, (backbone.hidden_size,), null=spec['num_classes'],
                        perturb_null=spec.get('cep_perturb_null', True))
    # LDM places attention by downsampling factor: keep the factors when the latents are not the
    # preset's size.
    preset = nets.UNET_PRESETS[spec['arch']]
    attn = tuple(r * resolution // preset['img_resolution'] for r in preset['attn_resolutions'])
    kwargs = {**preset, 'img_resolution': resolution, 'in_channels': channels,
              'out_channels': channels, 'attn_resolutions': attn, 'label_dim': 0,
              'dropout': spec['dropout']}
    width = kwargs['context_dim']
    if spec['cond'] == 'class':
        encoder, cond_shape = nets.ClassEmbedder(spec['num_classes'], width), (1, width)
    else:  # our stand-in for BERT; the null condition is the empty caption
        encoder = nets.ByteTextEncoder(width, spec['text_layers'], TEXT_LENGTH)
        cond_shape = (TEXT_LENGTH, width)
    with torch.device('cpu'):  # the null tokens are data, also when built on the meta device
        null = spec['num_classes'] if spec['cond'] == 'class' else nets.byte_tokens([''])[0]
    return Denoiser(nets.UNet(**kwargs), encoder, cond_shape, spec['embedding_dropout'], null,
                    spec.get('cep_perturb_null', True))


def load_network(path, device, vae='', for_fid=False):
    """(Denoiser in eval mode on device, spec, the model's own autoencoder or None) from our network
    snapshot, a facebookresearch/DiT checkpoint (DiT-XL-2-256x256.pt, or train.py's {model, ema,
    opt, args}: its EMA), or a diffusers pipeline, bare DiT folder or Hub repo id
    (nets.read_diffusers_model; `vae` replaces its autoencoder). A DiT .pt's autoencoder is `vae`,
    default 'mse' (DiT's sample.py), 'ema' for_fid (sample_ddp.py). Our files are built on the meta
    device and checked against the file before any allocation."""
    is_file = os.path.exists(path) or path.endswith(('.pt', '.pth', '.pkl', '.ckpt'))
    if os.path.isdir(path) or not is_file:  # a diffusers folder or a Hub repo id
        try:
            model = nets.read_diffusers_model(path, load_vae(vae, 'cpu') if vae else None, vae,
                                              NUM_TIMESTEPS)
        except (ValueError, OSError) as error:
            raise UserError(f'--network={path}: {error}')
        net = Denoiser(model['network'], model['encoder'], model['cond_shape'], null=model['null'],
                       tokenize=model['tokenize'] or nets.byte_tokens)
        net = net.to(device).eval().requires_grad_(False)
        return net, model['spec'], model['autoencoder'].to(device).eval()
    try:
        kind, spec, found = nets.read_ldm_checkpoint(path, vae, for_fid)
        net = Denoiser(found, None, (found.hidden_size,), null=found.num_classes) if kind == 'dit' \
            else nets.build_checked(lambda: build_network(spec), found, f'--network={path}')
    except (TypeError, KeyError):
        raise UserError(f'--network={path}: damaged spec') from None
    except ValueError as error:
        raise UserError(str(error)) from None
    channels_last = torch.device(device).type == 'cuda' and not spec['arch'].startswith('DiT')
    net.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    return net.eval().requires_grad_(False), spec, None


def load_snapshot(path, device, scale, vae='', for_fid=False):
    """A network for sampling -> (EMA Denoiser in eval mode, spec, autoencoder or None)."""
    net, spec, autoencoder = load_network(path, device, vae, for_fid)
    if autoencoder is None and spec['vae']:
        autoencoder = load_vae(spec['vae'], device)
    require(scale == 1 or spec['class_dropout_prob'], f'{path} was trained without null '
            'conditions (--class_dropout_prob=0): use --scale=1')
    return net, spec, autoencoder


# --------------------------------------------------------------------------------------------------
# Generation, evaluation and the circular walk.

@torch.no_grad()
def sample_images(net, spec, vae, noise, y, cfg, randn_like=torch.randn_like):
    """Noise (B, C, h, w) and conditions -> uint8 images (B, 3, H, W), with the sampler of cfg and
    the timestep spacing of the flag, else the pipeline's scheduler config, else diffusers'."""
    if 'betas' in spec:  # a released pipeline's scheduler config
        alphas_cumprod = torch.cumprod(1 - torch.tensor(spec['betas'], dtype=torch.float64), dim=0)
    else:
        alphas_cumprod = make_alphas_cumprod(spec['beta_schedule'], spec['linear_start'],
                                             spec['linear_end'])
    default = {'dpm': 'linspace', 'ddim': 'leading'}.get(cfg.scheduler)
    spacing = cfg.timestep_spacing or spec.get('timestep_spacing') or default
    require(cfg.scheduler == 'ddpm' or spacing in ('linspace', 'leading'), f'timestep_spacing '
            f'{spacing!r} of the scheduler config is not supported; pass '
            '--timestep_spacing=linspace|leading')
    offset = spec.get('steps_offset', 1)
    # Guidance needs the null condition (Eq. 2); scale 1 is plain conditional sampling, one forward
    # pass a step.
    y_null = torch.as_tensor(net.null, device=noise.device).expand_as(y) if cfg.scale != 1 else None
    with torch.autocast(noise.device.type, torch.bfloat16, enabled=cfg.precision == 'bf16'):
        if cfg.scheduler == 'dpm':
            x = dpm_solver_sample(net, noise, y, alphas_cumprod, cfg.ddim_steps, cfg.scale, y_null,
                                  spacing, cfg.cfg_channels, offset)
        elif cfg.scheduler == 'ddim':
            x = ddim_sample(net, noise, y, alphas_cumprod, cfg.ddim_steps, cfg.scale, y_null,
                            cfg.ddim_eta, spacing, randn_like, cfg.cfg_channels, offset,
                            spec.get('clip_sample', 0.0),
                            1.0 if spec.get('set_alpha_to_one', True) else alphas_cumprod[0].item())
        else:
            x = ddpm_sample(net, noise, y, alphas_cumprod, cfg.ddim_steps, cfg.scale, y_null,
                            cfg.cfg_channels, randn_like)
        if vae is not None:
            x = vae.decode(x.float())
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def seeded_noise(seeds, shape, device):
    """Image k's noise depends on seed k only, whatever the batch or GPU count."""
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    def stack(shape_):
        return torch.stack([torch.randn(shape_, generator=g, device=device) for g in generators])
    return stack(shape), lambda x: stack(x.shape[1:])


def sampling_setup(cfg, device, for_fid=False):
    """(net, spec, autoencoder, prompts or None) of generate / eval, --class_idx and --prompts
    checked; the official DiT README passes --prompt_data mscoco to a class model (a note)."""
    net, spec, vae = load_snapshot(cfg.network, device, cfg.scale, cfg.vae, for_fid)
    if spec['cond'] != 'text':
        require(-1 <= cfg.class_idx < spec['num_classes'],
                f'--class_idx must be in [0, {spec["num_classes"]}) or -1')
        if cfg.prompts:
            print(f'note: --prompts={cfg.prompts} is not used by a class-conditional model',
                  file=sys.stderr)
        return net, spec, vae, None
    require(cfg.prompts not in ('mscoco', 'parti'), f'--prompt_data={cfg.prompts} (official flag) '
            'is not supported: it reads a Hugging Face `datasets` corpus; use --prompts=FILE, one '
            'caption a line')
    require(cfg.prompts and os.path.isfile(cfg.prompts), f'a text model needs --prompts, a file '
            f'with one prompt a line: {cfg.prompts!r}')
    with open(cfg.prompts, encoding='utf-8') as file:
        prompts = [line for line in file.read().splitlines() if line.strip()]
    require(prompts, f'--prompts={cfg.prompts} holds no prompt')
    return net, spec, vae, prompts


def generation_plan(cfg, spec, prompts):
    """[(file name, seed, condition)] of every image. --seeds: <thousands>/<seed>.png, class seed %
    num_classes (or --class_idx), prompt seed % len(prompts). Otherwise the official scripts'
    folders: <class>/<k:05>.jpeg, n_samples per class in [class_start_idx, class_end_idx) (text: per
    prompt), the seed of image k of condition c drawn from (--seed, c, k): the same images for any
    batch size or GPU count."""
    if cfg.seeds:
        def condition(s):
            if prompts:
                return prompts[s % len(prompts)]
            return cfg.class_idx if cfg.class_idx >= 0 else s % spec['num_classes']
        return [(f'{s - s % 1000:06d}/{s:06d}.png', s, condition(s)) for s in parse_seeds(cfg.seeds)]
    count = len(prompts) if prompts else spec['num_classes']
    end = count if cfg.class_end_idx == -1 else cfg.class_end_idx
    require(end <= count, f'--class_end_idx={end} exceeds the {count} '
            f'{"prompts" if prompts else "classes"}')
    plan = []
    for c in range(cfg.class_start_idx, end):
        for k in range(cfg.n_samples or (5 if prompts else 100)):  # the official defaults
            seed = int(np.random.SeedSequence([cfg.seed, c, k]).generate_state(1, np.uint64)[0] >> 1)
            plan.append((f'{c}/{k:05d}.jpeg' if not prompts else f'{c:05d}/{k:05d}.jpeg', seed,
                         prompts[c] if prompts else c))
    return plan


def sample_plan(net, spec, vae, plan, cfg, device):
    """Yield (plan entries, uint8 images) in batches of --batch; image k depends only on its seed.
    """
    for start in range(0, len(plan), cfg.batch):
        chunk = plan[start:start + cfg.batch]
        noise, randn_like = seeded_noise([seed for _, seed, _ in chunk], tuple(spec['shape']),
                                         device)
        conditions = [condition for _, _, condition in chunk]
        y = net.tokenize(conditions) if spec['cond'] == 'text' else torch.tensor(conditions)
        yield chunk, sample_images(net, spec, vae, noise, y.to(device), cfg, randn_like)


def generate(cfg, rank, world_size, device):
    """One image per plan entry (generation_plan), dealt round-robin to the ranks, plus dataset.json
    with the labels (class models); JPEGs as the official scripts save them (quality 100, 4:4:4).
    """
    check_writable(cfg.outdir, '--outdir')
    net, spec, vae, prompts = sampling_setup(cfg, device)
    side = spec['shape'][1] * (vae.downscale_factor if vae is not None else 1)
    require(cfg.image_size in (0, side),
            f'--image_size={cfg.image_size}: this network makes {side}x{side} images')
    plan = generation_plan(cfg, spec, prompts)
    if rank == 0 and prompts and not cfg.seeds:  # the official meta.txt of each prompt folder
        for c in sorted({name.split('/')[0] for name, _, _ in plan}):
            nets.write_atomic(os.path.join(cfg.outdir, c, 'meta.txt'),
                              f'Prompt: {prompts[int(c)]}\n'.encode())
    for chunk, images in sample_plan(net, spec, vae, plan[rank::world_size], cfg, device):
        for (name, _, _), image in zip(chunk, images.permute(0, 2, 3, 1).cpu().numpy()):
            path, buffer = os.path.join(cfg.outdir, name), io.BytesIO()
            options = dict(quality=100, subsampling=0) if name.endswith('.jpeg') else {}
            PIL.Image.fromarray(image).save(buffer, format='JPEG' if options else 'PNG', **options)
            nets.write_atomic(path, buffer.getvalue())
    barrier()
    if rank == 0:
        if spec['cond'] == 'class':  # the folder is then a labelled dataset (EDM dataset.json)
            labels = {'labels': [[name, label] for name, _, label in plan]}
            nets.write_atomic(os.path.join(cfg.outdir, 'dataset.json'), json.dumps(labels).encode())
        print(f'wrote {len(plan)} images to {cfg.outdir}')


def evaluate(cfg, rank, world_size, device):
    """fid.compute_metrics on --num class-balanced samples held in memory (each rank samples its
    share of the seeds); appends to metrics.jsonl beside the network (in the working folder for a
    repo id)."""
    require(os.path.isfile(cfg.ref), f'--ref statistics not found: {cfg.ref!r} (make them with '
            '`python fid.py ref`)')
    folder = os.path.dirname(os.path.abspath(cfg.network)) if os.path.isfile(cfg.network) else '.'
    metrics_path = os.path.join(folder, 'metrics.jsonl')
    check_writable(folder, 'the metrics file')
    net, spec, vae, prompts = sampling_setup(cfg, device, for_fid=True)
    try:
        detector = fid.load_inception(cfg.fid_weights or None, device=device)
        # Inception Score needs the classifier head, which FID-only weights files lack.
        names = tuple(m for m in cfg.metrics.split(',') if m != 'is' or detector.has_classifier)
        if len(names) < len(cfg.metrics.split(',')):
            print('note: these Inception weights have no classifier, so no Inception Score')
        protocol = fid.resolve_protocol(cfg.protocol or None, ref=cfg.ref, metrics=names,
                                        detector=detector, num=cfg.num)  # checks before the pass
    except (OSError, ValueError) as error:
        raise UserError(str(error))
    plan = generation_plan(dataclasses.replace(cfg, seeds=f'0-{cfg.num - 1}'), spec, prompts)
    batches = (images for _, images in sample_plan(net, spec, vae, plan[rank::world_size], cfg,
                                                   device))
    results = fid.compute_metrics(batches, cfg.ref, metrics=names, detector=detector, device=device,
                                  protocol=protocol)
    if rank == 0:
        sampler = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SamplerConfig)}
        record = dict(network=os.path.basename(cfg.network), num=cfg.num, **sampler, **results)
        print(json.dumps(record))
        with open(metrics_path, 'a') as file:
            file.write(json.dumps(record) + '\n')
    return results


def walk(cfg, rank, world_size, device):
    """The official circular walk: z_k = cos(theta_k) n_x + sin(theta_k) n_y with theta = pi *
    linspace(0, 2, K) (the end points repeat), one row per network, one grid per class (or prompt)
    and walk; one generator for all walks, and the same noise (step noise too) for every network.
    """
    if rank != 0:  # a handful of grids: one process does them all
        return
    check_writable(cfg.outdir, '--outdir')
    snapshots = [load_snapshot(path, device, cfg.scale, cfg.vae) for path in cfg.network.split(',')]
    spec0 = snapshots[0][1]
    require(len({(tuple(spec['shape']), spec['cond']) for _, spec, _ in snapshots}) == 1,
            'walk compares networks with the same latent shape and kind of condition')
    text = spec0['cond'] == 'text'
    require(not text or cfg.prompt, 'a walk over a text model needs --prompt')
    require(text or all(c.isdigit() and int(c) < spec0['num_classes']
                        for c in cfg.classes.split(',')),
            f'--classes must list class ids in [0, {spec0["num_classes"]})')
    conditions = cfg.prompt.splitlines() if text else [int(c) for c in cfg.classes.split(',')]
    generator = torch.Generator().manual_seed(cfg.seed)
    theta = (torch.linspace(0, 2, cfg.walk_steps) * math.pi).view(-1, 1, 1, 1)
    for condition in conditions:
        for i in range(cfg.n_samples or 5):  # the official default: 5 walks per class
            noise_x, noise_y = (torch.randn(tuple(spec0['shape']), generator=generator)
                                for _ in range(2))
            noise = (theta.cos() * noise_x + theta.sin() * noise_y).to(device)
            rows = []
            for net, spec, vae in snapshots:
                y = (net.tokenize([condition] * cfg.walk_steps) if text else
                     torch.full((cfg.walk_steps,), condition, dtype=torch.int64)).to(device)
                step_noise = torch.Generator(device).manual_seed(cfg.seed + i)
                randn_like = lambda x: torch.randn(x.shape, generator=step_noise, device=x.device)
                rows.append(torch.cat([
                    sample_images(net, spec, vae, noise[j:j + cfg.batch], y[j:j + cfg.batch], cfg,
                                  randn_like) for j in range(0, cfg.walk_steps, cfg.batch)]))
            tag = re.sub(r'\W+', '_', str(condition))[:40]
            save_grid(torch.cat(rows), os.path.join(cfg.outdir, f'walk-{tag}-{i:03d}.png'),
                      cfg.walk_steps)
    print(f'wrote {len(conditions) * (cfg.n_samples or 5)} walk grids to {cfg.outdir}')


# --------------------------------------------------------------------------------------------------
# Command line.

def main(argv=None):
    """`python ldm_labelnoise.py [train|generate|eval|walk] --flag=value ...`; --help lists the
    flags."""
    return run_main({name: (functools.partial(command, name), text) for name, text in {
        'train': 'train a DiT or LDM with condition corruption and CEP (default)',
        'generate': 'one image per seed, or the official per-class folders of JPEGs',
        'eval': 'FID, IS, sFID, precision/recall of samples in memory',
        'walk': 'the official circular walk between two noises, one row per network',
    }.items()}, argv, TITLE)


# ---- Below: plumbing (files, flags, processes); not needed to understand the method

# ==== BEGIN canonical block v3 (paste unchanged below the banner) =================================
# Errors and main

class UserError(Exception):
    """Bad input (a flag, data, a checkpoint, a folder), raised before anything is written."""

def require(ok, message):
    """The one-line check of check_config: `require(cfg.lr > 0, '--lr must be > 0')`."""
    if not ok:
        raise UserError(message)

def run_main(commands, argv=None, title='', note=''):
    """The body of every `main`; commands = {name: (function(argv), one-line text)}, the first is
    the default. A failure is one line from rank 0 and the same exit code on every rank: 2 bad
    input (UserError), 1 a failure while running (OSError: a full disk), 130 an interrupt outside
    StopSignal."""
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    script = os.path.basename(__file__)
    if argv[:1] in (['-h'], ['--help']):  # usage, paper, one line per command, where the flags are
        lines = [f'usage: {script} [COMMAND] [--flag=value ...]', title, 'commands:',
                 *(f'  {name:<10} {text}' for name, (_, text) in commands.items()),
                 note, f"Run 'python {script} COMMAND --help' for the flags of a command."]
        return print('\n'.join(line for line in lines if line))
    name = argv.pop(0) if argv and argv[0] in commands else next(iter(commands))
    try:
        return commands[name][0](argv)
    except UserError as error:
        message, code = str(error), 2
    except OSError as error:
        where = f' {error.filename}' if error.filename else ''
        message, code = f'cannot write or read{where}: {error.strerror or error}', 1
    except KeyboardInterrupt:
        message, code = 'interrupted (nothing was saved since the last training state)', 130
    finally:  # also when a test calls main() twice in one process, not only at exit
        for held in RunLock.held[:] + Logger.opened[:]:
            held.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if get_rank() == 0:  # one line, even for a multi-line library message
        print(f'{script}: error: {" ".join(message.split())}', file=sys.stderr)
    sys.exit(code)


# --------------------------------------------------------------------------------------------------
# Flags: the parser from a Config dataclass, and the official-flag table

GROUP_TITLES = ('data and corruption', 'network', 'optimisation', 'run', 'sampling', 'evaluation')

def parse_bool(text):
    """True/False, 1/0, yes/no, y/n, t/f, on/off, any case (click's BOOL, the official str2bool)."""
    value = str(text).lower()
    if value not in ('true', '1', 'yes', 'y', 't', 'on', 'false', '0', 'no', 'n', 'f', 'off'):
        raise argparse.ArgumentTypeError(f'expected True or False, got {text!r}')
    return value in ('true', '1', 'yes', 'y', 't', 'on')

def parse_seeds(text, flag='--seeds'):
    """'0-49999' or '1,2,5-10' -> a list of ints (EDM's parse_int_list); no reversed range."""
    seeds = []
    for part in str(text).split(','):
        match = re.fullmatch(r'\s*(\d+)(?:-(\d+))?\s*', part)
        if not match:
            raise UserError(f'{flag}: cannot parse {part!r} (expected e.g. 0-49999 or 1,2,5-10)')
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise UserError(f'{flag}: the range {part.strip()} is empty (reversed)')
        seeds.extend(range(first, last + 1))
    return seeds

@dataclasses.dataclass(frozen=True)
class Official:
    """A row of OFFICIAL_FLAGS (made by ours, refused or ignored): what an official flag does."""
    field: str = ''         # our Config field that it sets; '' = none (refused or ignored)
    convert: object = None  # official value -> ours: a function, a {value: ours} dict, None = same
    how: str = ''           # the conversion or the reason in words, for --help and docs/<paper>.md
    refuse: object = None   # {official value: why not, naming ours}, or one reason for every value
    type: object = None     # reads the official value; None = our field's type
    group: str = 'run'      # the --help group of a flag that sets no field

def ours(field, convert=None, how='', refuse=None, type=None):
    """An official flag that sets our `field`: ours('lr') (the same flag), ours('kimg', to_kimg,
    'Mimg -> kimg', type=float), ours('arch', refuse={'ncsnpp': 'no NCSN++; use --arch=ddpmpp'})."""
    return Official(field, convert, how, refuse, type)

def refused(reason, group='run'):
    """An official flag refused whatever its value; the reason names ours ('...; use --x')."""
    return Official(how=reason, refuse=reason, group=group)

def ignored(how='logging only', refuse=None, type=None, group='run'):
    """An official flag accepted and dropped (wandb ids, ...), but for the values in `refuse`."""
    return Official(how=how, refuse=refuse, type=type, group=group)

def format_official(flag, official):
    """What an official flag does here, in one phrase (--help and the docs)."""
    field, how = official.field, official.how
    if isinstance(official.refuse, str):
        return f'refused: {official.refuse}'
    if field and flag == f'--{field}':
        text = 'the same flag' + (f' ({how})' if how else '')
    else:
        text = (f'--{field}' + (f': {how}' if how else '')) if field else f'ignored ({how})'
    return text + _refusals(flag, official)

def _refusals(flag, official):
    refuse = official.refuse or {}
    return ''.join(f'; {flag}={value} refused: {why}' for value, why in refuse.items())

class OfficialAction(argparse.Action):
    """Refuses the value of an official flag, or converts it into our field where the flag appears
    (so of --duration and --kimg the later wins)."""

    def __init__(self, option_strings, dest, official=None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.official = official

    def __call__(self, parser, namespace, value, option_string=None):
        row = self.official
        reason = row.refuse if isinstance(row.refuse, str) else (row.refuse or {}).get(value)
        if reason:
            bare = value is None or value is True and isinstance(row.refuse, str)  # `--flag` alone
            given = option_string if bare else f'{option_string}={value}'
            raise UserError(f'{given} (official flag) is not supported: {reason}')
        if not row.field:
            return  # ignored
        if isinstance(row.convert, dict) and value not in row.convert:
            raise UserError(f'{option_string}={value}: the official values taken: '
                            + ', '.join(map(str, row.convert)))
        convert = row.convert.get if isinstance(row.convert, dict) else row.convert
        setattr(namespace, row.field, convert(value) if convert else value)

def field_docs(config_class):
    """{field: (help group, help text)} from the Config source: a field's trailing comment is its
    help; a comment line starting with a group title (`# Network (EDM).`) starts that group."""
    docs, group = {}, 'run'
    for cls in reversed(config_class.__mro__[:-1]):  # base classes first, like their fields
        for line in inspect.getsource(cls).splitlines():
            section = re.match(r'\s+#\s*(.*)', line)
            if section:
                group = next((t for t in GROUP_TITLES if section[1].lower().startswith(t)), group)
            field = re.match(r'\s+(\w+)\s*:\s*[\w\[\], .]+=.*?#\s*(.*)$', line)
            if field:
                docs[field[1]] = (group, field[2])
    return docs

def add_flag(group, names, type, help, default=None, shown=None, **kwargs):
    """One `--name VALUE` flag (INT, FLOAT, BOOL, STR) whose help ends in `(default: ...)` or
    `(required)`. Booleans take --flag, --flag=True, --flag=0."""
    shown = default if shown is None else shown
    if not re.search(r'\((default: .*|required)\)$', help):
        help += f' (default: {"none" if shown in ("", None) else shown})'
    if type is parse_bool:
        kwargs = dict(nargs='?', const=True) | kwargs
    kwargs.setdefault('metavar', {int: 'INT', float: 'FLOAT', parse_bool: 'BOOL'}.get(type, 'STR'))
    return group.add_argument(*names, type=type, help=help.replace('%', '%%'), **kwargs)

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (via run_main), instead of usage + message
        raise UserError(message)

def make_parser(command, config_class, official_flags=None, fields=None, defaults=None,
                presets=None, description=''):
    """The parser of one command: a flag per Config field (or per name in `fields`), grouped and
    helped by field_docs, each official flag beside the field it sets. Flags not given stay out of
    the namespace (SUPPRESS), so presets can fill them in; `defaults` overrides the dataclass's."""
    script = os.path.basename(__file__)
    parser = _Parser(prog=f'{script} {command}', usage=f'{script} {command} [--flag=value ...]',
                     description=description, allow_abbrev=False, add_help=False,
                     argument_default=argparse.SUPPRESS,
                     formatter_class=lambda prog: argparse.HelpFormatter(prog, width=78))
    groups = {title: parser.add_argument_group(title) for title in GROUP_TITLES}
    docs, rows = field_docs(config_class), dict(official_flags or {})
    all_fields = {f.name: f for f in dataclasses.fields(config_class)}
    defaults = {name: f.default for name, f in all_fields.items()} | dict(defaults or {})

    def flag_type(field):  # from the annotation, or its text (`from __future__ import annotations`)
        kind = all_fields[field].type
        kind = getattr(kind, '__name__', str(kind)).split('|')[0].replace('Optional[', '')
        return {'bool': parse_bool, 'int': int, 'float': float}.get(kind.strip(' ]'), str)

    def add_official(group, flag, kind, default, **kwargs):
        add_flag(groups[group], [flag], kind, f'official: {format_official(flag, rows[flag])} '
                 f'(default: {default})', dest=f'official{flag}', action=OfficialAction,
                 official=rows.pop(flag), **kwargs)

    for name in fields or all_fields:
        group, text = docs.get(name, ('run', name.replace('_', ' ')))
        # Our flag (its own official row, if any, refuses values) and the plain official aliases.
        own = rows.pop(f'--{name}', None)
        aliases = [flag for flag, row in rows.items() if row == Official(name, group=row.group)]
        text += f'; official: {", ".join(aliases)}' if aliases else ''
        text += _refusals(f'--{name}', own) if own else ''
        action = dict(action=OfficialAction, official=own) if own else {}
        add_flag(groups[group], [f'--{name}', *aliases], flag_type(name), text, defaults[name],
                 dest=name, **action)
        for flag in aliases:
            del rows[flag]
        for flag in [flag for flag, row in rows.items() if row.field == name]:
            add_official(group, flag, rows[flag].type or flag_type(name), f'see --{name}')
    for flag, row in list(rows.items()):  # refused, ignored, or setting a field not shown here
        if row.field and row.field not in all_fields:
            raise ValueError(f'OFFICIAL_FLAGS: {flag} sets {row.field}, which Config lacks')
        kind = row.type or (flag_type(row.field) if row.field else str)
        group = docs.get(row.field, (row.group,))[0]
        add_official(group if group in groups else 'run', flag, kind, 'none', nargs='?',
                     const=True if kind is parse_bool else None)
    if presets and 'preset' not in all_fields:
        add_flag(groups['run'], ['--preset'], str, 'a recipe that sets defaults: '
                 + ', '.join(presets), '', choices=list(presets), dest='preset')
    groups['run'].add_argument('-h', '--help', action='help', help='show this help and exit')
    return parser

def parse_config(command, config_class, argv, official_flags=None, presets=None, fields=None,
                 defaults=None, description=''):
    """Config from the command line: the flags given over --preset's values over `defaults` over
    the dataclass defaults. Any bad flag raises UserError."""
    parser = make_parser(command, config_class, official_flags, fields, defaults, presets,
                         description)
    given = vars(parser.parse_args(argv))
    given = {k: v for k, v in given.items() if not k.startswith('official')}
    fields = {f.name: f.default for f in dataclasses.fields(config_class)} | dict(defaults or {})
    preset = given.get('preset', fields['preset']) if 'preset' in fields \
        else given.pop('preset', '')
    if preset and preset not in (presets or {}):
        raise UserError(f'--preset must be one of {", ".join(presets or {})}, got {preset!r}')
    preset_values = {k: v for k, v in (presets or {}).get(preset, {}).items() if k in fields}
    return config_class(**{**dict(defaults or {}), **preset_values, **given})

def official_flags_markdown(official_flags):
    """OFFICIAL_FLAGS as the table of docs/<paper>.md, between `<!-- official-flags:start -->` and
    `<!-- official-flags:end -->` (a test compares the two)."""
    lines = ['| command | official flag | here |', '|---|---|---|']
    lines += [f'| {command} | `{flag}` | {format_official(flag, row).replace("|", "/")} |'
              for command, rows in official_flags.items() for flag, row in rows.items()]
    return '\n'.join(lines) + '\n'


# --------------------------------------------------------------------------------------------------
# Processes: torchrun, printing, logging, time

def init_distributed(device=''):
    """(rank, world_size, torch.device) from torchrun's RANK, WORLD_SIZE, LOCAL_RANK (else one
    process): the GPU of LOCAL_RANK, and a process group on nccl (CUDA) or gloo (CPU)."""
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    world = int(os.environ.get('WORLD_SIZE', '1'))
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device not in ('cpu', 'cuda') or (device == 'cuda' and not torch.cuda.is_available()):
        raise UserError(f'--device must be cpu or cuda (with a GPU torch sees), not {device!r}')
    device = torch.device('cuda', local_rank) if device == 'cuda' else torch.device('cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device

def get_rank():
    """This process's rank, also before the process group exists (torchrun's RANK, else 0)."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get('RANK', '0'))

def print0(*args, **kwargs):
    """print() on rank 0 only, flushed, so a torchrun log shows each line once and at once."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)

def broadcast_object(value):
    """Rank 0's value on every rank (the run folder rank 0 chose, say)."""
    box = [value]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]

class Logger:
    """`log(message)`: print0, and after `log.open(path)` also append to the run's log.txt (earlier
    lines first). Appending keeps a resumed run's log; line buffering survives a kill."""
    opened = []  # the loggers with an open file (run_main closes them)

    def __init__(self):
        self.file, self.pending = None, []

    def open(self, path):
        if get_rank() == 0:
            self.file = open(path, 'a', buffering=1)
            self.file.writelines(self.pending)
            Logger.opened.append(self)
        self.pending = []

    def __call__(self, message):
        if get_rank() == 0:
            print(message, flush=True)
            (self.file.write if self.file else self.pending.append)(f'{message}\n')

    def close(self):
        if self in Logger.opened:
            Logger.opened.remove(self)
            self.file.close()
            self.file = None

def format_time(seconds):
    """42s, 4m05s, 1h02m: the clock of EDM's status line."""
    s = int(seconds)
    if s < 60:
        return f'{s}s'
    return f'{s // 60}m{s % 60:02d}s' if s < 3600 else f'{s // 3600}h{s // 60 % 60:02d}m'

def done_line(nimg, seconds):
    """The last line of a training run: `done: 2.0 kimg in 1m05s` (what this process trained)."""
    return f'done: {nimg / 1000:.1f} kimg in {format_time(seconds)}'


# --------------------------------------------------------------------------------------------------
# Run folder: exclusive creation, lock, resume, the files every run folder holds

# Fields that may differ between a run and the one --resume=auto continues: its length, how often
# it reports, saves and draws grids, where and how fast it runs (batch_gpu: the same global batch
# in other microbatches), names for logging. All else (data, method flags, seed, batch, lr, and
# precision, as bf16 and fp32 train differently) defines the experiment: a new folder.
RESUMABLE_FIELDS = frozenset({
    'kimg', 'tick', 'snap', 'dump', 'log_interval', 'save_interval', 'grid', 'grid_steps', 'steps',
    'outdir', 'device', 'workers', 'cache_dir', 'compile', 'bench', 'batch_gpu',
    'experiment_name', 'expr_id', 'dry_run', 'resume'})
RUN_NAME = re.compile(r'(\d{5})-.*')
STATE_NAME = re.compile(r'training-state-(\d+(?:\.\d+)?)\.pt')

def check_writable(path, flag):
    """UserError unless the nearest existing folder of `path` is writable; creates nothing."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f'{flag}={path}: {existing} is a file, not a folder')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'{flag}={path}: {existing} is not writable')

def open_run_dir(outdir, description):
    """Creates a new `outdir/NNNNN-description`. os.mkdir fails on an existing name, so two runs
    started at once never share a folder: the later one takes the next number."""
    os.makedirs(outdir, exist_ok=True)
    number = max([int(m[1]) for m in map(RUN_NAME.fullmatch, os.listdir(outdir)) if m], default=-1)
    while True:
        number += 1
        run_dir = os.path.join(outdir, f'{number:05d}-{description}')
        try:
            os.mkdir(run_dir)
            return run_dir
        except FileExistsError:
            pass

class RunLock:
    """`run.lock` (O_CREAT | O_EXCL, holding `pid host`): a second process refuses the folder in
    one line naming the holder, or takes over a dead holder's lock (same host, pid gone: a kill
    -9). Released when run_main ends, else at exit."""
    held = []  # the locks this process holds

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, 'run.lock')
        self.owner = f'{os.getpid()} {socket.gethostname()}'
        for _ in range(2):  # a second try after removing a dead process's lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                holder = self.holder()
                if not holder or not self.dead(holder):
                    raise UserError(f'{run_dir} is in use by process {holder or "?"} ({self.path});'
                                    ' wait for it, or delete that file if it is gone') from None
                os.remove(self.path)
        else:
            raise UserError(f'cannot take {self.path}: another process took it at the same time')
        with os.fdopen(fd, 'w') as file:
            file.write(self.owner + '\n')
        RunLock.held.append(self)
        atexit.register(self.release)

    def holder(self):
        try:
            with open(self.path) as file:
                return file.read().strip()
        except FileNotFoundError:
            return ''

    @staticmethod
    def dead(holder):
        """True only when the holder ran on this host and its pid is gone (never another host's)."""
        pid, _, host = holder.partition(' ')
        if host != socket.gethostname() or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
            return False
        except OSError as error:  # PermissionError: alive, owned by another user
            return isinstance(error, ProcessLookupError)

    def release(self):
        if self in RunLock.held:
            RunLock.held.remove(self)
            if self.holder() == self.owner:
                os.remove(self.path)

    close = release

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

def latest_training_state(run_dir):
    """The training-state-<kimg>.pt of run_dir with the most kimg, or None (*.tmp never counts)."""
    found = [(float(m[1]), m[0]) for m in map(STATE_NAME.fullmatch, os.listdir(run_dir)) if m]
    return os.path.join(run_dir, max(found)[1]) if found else None

def kimg_tag(cur_nimg):
    """<kimg> of file names: 000700 (whole kimg, as EDM) or 000000.700 (CPU runs); both sort."""
    return f'{cur_nimg // 1000:06d}' if cur_nimg % 1000 == 0 else f'{cur_nimg / 1000:010.3f}'

def config_differences(saved, cfg_dict, resumable=RESUMABLE_FIELDS):
    """'--data=a.npz there, b.npz now, ...' outside the resumable fields ('' = none), compared as
    config.json holds them (JSON: a tuple is a list); a field one of them lacks differs."""
    saved, new = (json.loads(json.dumps(c)) for c in (saved, cfg_dict))
    keys = sorted(k for k in saved.keys() | new.keys() if k not in resumable
                  and saved.get(k, '(absent)') != new.get(k, '(absent)'))
    text = ', '.join(f'--{k}={saved.get(k, "(absent)")} there, {new.get(k, "(absent)")} now'
                     for k in keys[:3])
    return text + (', ...' if len(keys) > 3 else '')

def _saved_config(run_dir):
    """The "config" of run_dir/config.json, or None (no such file, or one cut short by a kill)."""
    try:
        with open(os.path.join(run_dir, 'config.json')) as file:
            config = json.load(file).get('config')
    except (OSError, ValueError, AttributeError):
        return None
    return config if isinstance(config, dict) else None

def find_resume(outdir, cfg_dict, resumable=RESUMABLE_FIELDS):
    """--resume=auto: (folder, latest training state, reason) of the newest run in outdir whose
    config equals cfg_dict outside `resumable` (state None if it has none yet: it starts over), or
    (None, None, reason). The reason is one line for the log."""
    runs = sorted(m[0] for m in map(RUN_NAME.fullmatch, os.listdir(outdir)) if m) \
        if os.path.isdir(outdir) else []
    nearest = ''
    for name in reversed(runs):
        saved = _saved_config(os.path.join(outdir, name))
        if saved is None:
            continue
        differences = config_differences(saved, cfg_dict, resumable)
        if not differences:
            state = latest_training_state(os.path.join(outdir, name))
            return os.path.join(outdir, name), state, f'--resume=auto: continuing {state}' \
                if state else f'--resume=auto: {name} has no training state yet; starting it over'
        nearest = nearest or f'the newest run {name} differs: {differences}'
    return None, None, f'--resume=auto: nothing to continue ({nearest or "no run yet"}); ' \
        'starting a new run folder'

@dataclasses.dataclass
class Run:
    dir: str              # the run folder
    state: str = None     # the training state to continue from, or None
    reason: str = ''      # one line for the log: why this folder
    lock: RunLock = None  # the folder's lock (rank 0; None on the other ranks)

def open_run(outdir, description, cfg_dict, resume='', log=print0, nosubdir=False,
             resumable=RESUMABLE_FIELDS):
    """The Run of a training run, on every rank. Rank 0 chooses: resume='auto': find_resume's run,
    else a new folder; resume=PATH: a new folder continuing PATH; '': a new folder; nosubdir:
    outdir itself, refused if it holds a run --resume=auto may not continue. Rank 0 locks it
    (refused in one line if in use) and removes the *.tmp of an interrupted write."""
    chosen, lock = None, None
    if get_rank() == 0:
        try:
            chosen = _choose_run(outdir, description, cfg_dict, resume, nosubdir, resumable)
            lock = RunLock(chosen[0])
        except UserError as error:
            chosen = str(error)  # every rank raises it, not only rank 0
    chosen = broadcast_object(chosen)
    if isinstance(chosen, str):
        raise UserError(chosen)
    run = Run(*chosen, lock=lock)
    for name in os.listdir(run.dir) if lock else []:
        if name.endswith('.tmp'):
            os.remove(os.path.join(run.dir, name))
    if run.reason:
        log(run.reason)
    return run

def _choose_run(outdir, description, cfg_dict, resume, nosubdir, resumable):
    explicit = resume if resume not in ('', 'auto') else None
    if nosubdir:
        saved = _saved_config(outdir)
        if saved is not None and resume != 'auto':
            raise UserError(f'--nosubdir: {outdir} holds a run already; continue it with '
                            '--resume=auto, or choose another --outdir')
        differences = config_differences(saved, cfg_dict, resumable) if saved else ''
        if differences:
            raise UserError(f'--nosubdir --resume=auto: {outdir} holds another run '
                            f'({differences}); choose another --outdir')
        os.makedirs(outdir, exist_ok=True)
        state = latest_training_state(outdir) if saved else explicit
        return outdir, state, f'--resume=auto: continuing {state}' if saved and state else ''
    if resume == 'auto':
        run_dir, state, reason = find_resume(outdir, cfg_dict, resumable)
        return run_dir or open_run_dir(outdir, description), state, reason
    reason = f'--resume: continuing {explicit} in a new run folder' if explicit else ''
    return open_run_dir(outdir, description), explicit, reason

def trim_stats(run_dir, cur_nimg):
    """On resume, drops the stats.jsonl lines after the state (to be trained again) and a line
    cut short by a kill, so that the file reads as one uninterrupted run."""
    path = os.path.join(run_dir, 'stats.jsonl')
    if get_rank() == 0 and os.path.exists(path):
        with open(path) as file:
            lines = [line for line in file if line.endswith('\n')]
        kept = [li for li in lines if json.loads(li).get('kimg', 0) <= cur_nimg / 1000 + 1e-9]
        nets.write_atomic(path, ''.join(kept).encode())

def resumed_line(state_path, cur_nimg):
    """The separator in log.txt where a resumed run continues."""
    return f'---- resumed from {os.path.basename(state_path)} at kimg {cur_nimg / 1000:g} ----'

def save_grid(images, path, columns=None):
    """(N, C, H, W) uint8 images (tensor or array) -> one PNG grid, written atomically."""
    images = np.asarray(torch.as_tensor(images).cpu(), dtype=np.uint8)
    n, channels, height, width = images.shape
    columns = columns or max(1, int(np.ceil(np.sqrt(n))))
    rows = -(-n // columns)
    grid = np.concatenate([images, np.zeros((rows * columns - n, *images.shape[1:]), np.uint8)])
    grid = grid.reshape(rows, columns, channels, height, width).transpose(0, 3, 1, 4, 2)
    grid = grid.reshape(rows * height, columns * width, channels)
    buffer = io.BytesIO()
    PIL.Image.fromarray(grid[:, :, 0] if channels == 1 else grid).save(buffer, format='png')
    nets.write_atomic(path, buffer.getvalue())

def write_run_files(run_dir, cfg_dict, preview_images=None, **facts):
    """Rank 0: config.json (the config under "config", the command line, versions, `facts`),
    source.py (this script as it ran), data-preview.png (training images as the net sees them)."""
    if get_rank() != 0:
        return
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    record = dict(config=cfg_dict, command=[os.path.basename(__file__)] + sys.argv[1:],
                  torch=torch.__version__, gpu=gpu, host=socket.gethostname(), **facts)
    nets.write_atomic(os.path.join(run_dir, 'config.json'), json.dumps(record, indent=2).encode())
    with open(os.path.abspath(__file__), 'rb') as source:
        nets.write_atomic(os.path.join(run_dir, 'source.py'), source.read())
    if preview_images is not None:
        save_grid(preview_images, os.path.join(run_dir, 'data-preview.png'))

def save_training_state(path, state):
    """A dict of tensors and plain values -> path, atomically (a kill keeps the old file)."""
    nets.write_atomic(path, lambda file: torch.save(state, file))

def load_training_state(path, flag='--resume'):
    """A save_training_state file, read with weights_only=True (no code runs); UserError if bad."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UserError(f'{flag}: no file {path}') from None
    except Exception as error:  # truncated, not a torch file, a pickle of objects: one line
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f'{flag}: cannot read {path} ({reason})') from None
    if not isinstance(state, dict) or 'cur_nimg' not in state:
        raise UserError(f'{flag}: {path} is not a training state of {os.path.basename(__file__)}')
    return state


# --------------------------------------------------------------------------------------------------
# Stopping: SIGINT / SIGTERM -> a training state at the next step boundary

class StopSignal:
    """Ctrl-C (SIGINT) or SIGTERM (preemption, torchrun's shutdown) -> at the next step boundary:
    save a training state, one line, exit 128 + signal (130 / 143: the shell's codes for a stopped
    process, so `train && eval` does not evaluate an unfinished run). A second signal over a second
    later exits at once without saving (within it, it is the Ctrl-C that torchrun forwards again).
    All ranks must stop at the same step or the others hang in their next all_reduce: check()
    all_reduces the flag every `every` steps on every rank (a host sync, so not every step).
    torchrun kills its workers 30 s after a signal: `every` steps and the save must fit in 30 s."""

    def __init__(self, every=10):
        self.every, self.calls, self.signum, self.first_time, self.previous = every, 0, None, 0, {}
        if threading.current_thread() is threading.main_thread():  # else signal() fails
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        # No print() here: the signal may arrive while print() runs, and print is not reentrant.
        if self.signum is None:
            self.signum, self.first_time = signum, time.time()
        elif time.time() - self.first_time > 1:
            if get_rank() == 0:
                name = signal.Signals(signum).name
                os.write(2, f'{name} again: stopped without saving\n'.encode())
            os._exit(128 + signum)

    @property
    def requested(self):
        """A signal arrived in this process (no communication)."""
        return self.signum is not None

    def check(self):
        """Once per step on every rank: True when the run should stop now (all ranks agree)."""
        self.calls += 1
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return self.requested
        if self.calls % self.every:
            return False
        backend = torch.distributed.get_backend()
        flag = torch.tensor([self.signum or 0], device='cuda' if backend == 'nccl' else 'cpu')
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # the host sync
        self.signum = int(flag.item()) or None
        return self.requested

    def exit(self, log, state_path, cur_nimg):
        """The one line, then exit 128 + signal (run_main or atexit releases the lock)."""
        log(f'stopped by {signal.Signals(self.signum).name} at kimg {cur_nimg / 1000:g}: state '
            f'saved to {state_path}; continue with --resume=auto')
        self.close()
        sys.exit(128 + self.signum)

    def close(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

# ==== END canonical block v3 ======================================================================


# --------------------------------------------------------------------------------------------------
# Data: images, labels, captions; the training rows and the latent cache.

def center_crop_arr(image, size):
    """ADM / DiT center crop: halve with BOX while large, resize the short side (BICUBIC), crop."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=PIL.Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=PIL.Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


class ImageDataset:
    """uint8 images of fid.ImageSource (folder, EDM zip, .npz, cifar10) with its labels, and one
    caption per image (sorted image order): --captions, else captions.txt in the folder / zip, else
    `captions` of the .npz. --resolution applies the ADM center crop."""

    def __init__(self, path, resolution, cache_dir, captions_path=''):
        try:
            self.source = source = fid.ImageSource(path, cache_dir=cache_dir or None)
            self.captions = None
            if captions_path:
                require(os.path.isfile(captions_path), f'--captions file not found: {captions_path}')
                with open(captions_path, encoding='utf-8') as file:
                    self.captions = file.read().splitlines()
            elif path.endswith('.npz') and os.path.isfile(path):
                found = fid.read_npz(path, ['captions'], optional=('captions',)).get('captions')
                self.captions = None if found is None else [str(c) for c in found.tolist()]
            elif source.zip is not None or os.path.isdir(path):
                with contextlib.suppress(KeyError, FileNotFoundError):
                    self.captions = source.read_file('captions.txt').decode('utf-8').splitlines()
        except FileNotFoundError as error:
            raise UserError(f'--data not found: {error}') from None
        except ValueError as error:
            raise UserError(f'--data={path}: {error}') from None
        self.resolution, self.labels, self.names = resolution, source.labels, source.names
        self.num_classes = len(source.class_names) if source.class_names else None

    def __len__(self):
        return len(self.source)

    def read(self, index):
        """One image as uint8 (H, W, 3)."""
        try:
            image = self.source[index].transpose(1, 2, 0)
        except ValueError as error:
            raise UserError(str(error)) from None
        return center_crop_arr(PIL.Image.fromarray(image), self.resolution) \
            if self.resolution else image

    def read_many(self, indices, workers):
        """uint8 (n, 3, H, W), decoded by threads (PIL releases the GIL); one size for all."""
        with ThreadPoolExecutor(workers) as pool:
            images = list(pool.map(self.read, indices))
        for index, image in zip(indices, images):
            if image.shape != images[0].shape:
                raise UserError(f'image {self.names[index]} is {image.shape[1]}x{image.shape[0]}, '
                                f'not {images[0].shape[1]}x{images[0].shape[0]}; set --resolution '
                                'to crop all images')
        return np.stack(images).transpose(0, 3, 1, 2)


def load_conditions(cfg, dataset):
    """Check the labels or captions -> (num_classes, clean conditions: int64 (N,) labels or (N, 77)
    tokens). The class count: --num_classes, the class folders or `classes` of the .npz, else 1 +
    the largest label (at most the image count); every label must fit the embedding table."""
    n, text = len(dataset), cfg.cond == 'text'
    given = dataset.captions if text else dataset.labels
    where = 'captions.txt or --captions' if text else 'dataset.json, class folders or y in the .npz'
    require(given is not None and len(given) == n,
            f'--cond={cfg.cond} needs one {"caption" if text else "label"} per image ({n}) in '
            f'{where}; found {0 if given is None else len(given)}')
    if text:
        return 0, nets.byte_tokens(dataset.captions, TEXT_LENGTH)
    labels = dataset.labels
    num_classes = cfg.num_classes or dataset.num_classes or int(labels.max()) + 1
    where = '--num_classes' if cfg.num_classes else \
        'the data' if dataset.num_classes else '1 + the largest label'
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise UserError(f'label {labels[bad][0]} of image #{bad.argmax()} in {cfg.data} is outside '
                        f'[0, {num_classes}) ({num_classes} classes from {where})')
    require(cfg.num_classes or num_classes <= n, f'the labels of {cfg.data} reach {num_classes - 1}'
            f', more classes than its {n} images: pass --num_classes if that is meant')
    require(not cfg.corruption_classes or max(map(int, cfg.corruption_classes.split(',')))
            < num_classes, f'--corruption_classes must lie in [0, {num_classes})')
    return num_classes, torch.from_numpy(labels)


def corrupt_conditions(cfg, clean):
    """Sec. 3.1: the training conditions, corrupted once from --seed. Returns (label array (N,) or
    caption source indices (N,), corrupted indices)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.cond == 'text':
        return swap_captions(len(clean), cfg.corruption_ratio, generator)
    classes = torch.tensor([int(c) for c in cfg.corruption_classes.split(',')]) \
        if cfg.corruption_classes else None
    try:
        return corrupt_labels(clean, cfg.corruption_ratio, generator, classes)
    except ValueError as error:
        raise UserError(str(error))


@torch.no_grad()
def training_rows(cfg, dataset, vae, cache_dir, batch, rank, world_size, device):
    """What the steps read: uint8 images (N, 3, H, W), or the VAE posterior moments (mean, logvar)
    of every image (and of its mirror when xflip) as float16 (N, 1 or 2, 2C, h, w), cached once per
    data set, VAE and flags in an .npy file: sampling z = mean + exp(logvar / 2) n afresh at every
    step keeps DiT's latent_dist.sample() while epochs after the first skip the encoder. Returns
    (rows, the (C, H, W) shape the network sees)."""
    if vae is None:
        rows = dataset.read_many(range(len(dataset)), cfg.workers)
        require(rows.shape[2] == rows.shape[3],
                f'images must be square, got {rows.shape[3]}x{rows.shape[2]}; set --resolution')
        return rows, tuple(rows.shape[1:])
    names = dataset.names if isinstance(dataset.names, list) else None  # arrays: a range
    key = json.dumps([os.path.abspath(cfg.data), len(dataset), names, cfg.resolution, cfg.vae,
                      cfg.xflip])
    path = os.path.join(cache_dir, f'latents-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy')
    print0(f'Latent cache: {path}')
    rows = cache_latents(dataset, vae, path, cfg.xflip, batch, device, rank, world_size,
                         cfg.workers)
    require(rows.shape[3] == rows.shape[4],
            f'images must be square, got {rows.shape[4]}x{rows.shape[3]}; set --resolution')
    return rows, (rows.shape[2] // 2,) + rows.shape[3:]


@torch.no_grad()
def cache_latents(dataset, vae, path, xflip, batch, device, rank, world_size, workers):
    """The latent cache of training_rows: rank 0 creates the file, every rank encodes its strided
    share of chunks, rank 0 publishes it under its final name."""
    if os.path.isfile(path):
        return np.load(path, mmap_mode='r')
    views, temp = 2 if xflip else 1, f'{path}.tmp'
    probe = torch.from_numpy(dataset.read_many([0], workers)).to(device)
    channels, height, width = vae.encode_moments(probe.float() / 127.5 - 1)[0].shape[1:]
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.lib.format.open_memmap(temp, 'w+', np.float16,
                                  (len(dataset), views, 2 * channels, height, width)).flush()
    barrier()
    store = np.load(temp, mmap_mode='r+')
    for start in range(rank * batch, len(dataset), world_size * batch):
        indices = list(range(start, min(start + batch, len(dataset))))
        x = torch.from_numpy(dataset.read_many(indices, workers)).to(device).float() / 127.5 - 1
        for view in range(views):
            mean, logvar = vae.encode_moments(x.flip(3) if view else x)
            store[start:indices[-1] + 1, view] = torch.cat([mean, logvar], 1).half().cpu().numpy()
    store.flush()
    barrier()
    if rank == 0:
        os.replace(temp, path)
    barrier()
    return np.load(path, mmap_mode='r')


def row_reader(array, device):
    """read(index: int64 numpy (B,), the same on the device) -> rows of a big array: from a device
    tensor when it fits in 30% of the GPU (or on a CPU), else from host memory (or the memory-mapped
    cache) via pinned memory."""
    if device.type != 'cuda' or array.nbytes <= 0.3 * torch.cuda.get_device_properties(
            device).total_memory:
        data = torch.from_numpy(np.array(array)).to(device)
        return lambda index, index_device: data[index_device]
    return lambda index, index_device: to_device(torch.from_numpy(array[index]), device)


def data_order(seed, cur_nimg, batch, n, cache):
    """Dataset indices of the global batch from image cur_nimg: a seeded permutation per epoch."""
    position = np.arange(cur_nimg, cur_nimg + batch)
    index = np.empty(batch, dtype=np.int64)
    for epoch in np.unique(position // n):
        if epoch not in cache:
            cache.clear()
            generator = torch.Generator().manual_seed(seed * 1000003 + int(epoch))
            cache[epoch] = torch.randperm(n, generator=generator)
        mask = position // n == epoch
        index[mask] = cache[epoch].numpy()[position[mask] % n]
    return index


def to_device(tensor, device):
    """Host-to-device copy from pinned memory, which does not wait for the GPU."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == 'cuda' else tensor


def barrier():
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# Run folder, network set-up, resume, training states, progress.

STATE_KEYS = ('net', 'ema', 'optimizer', 'cur_nimg', 'rng')


def training_spec(cfg, num_classes, shape, vae):
    """What a snapshot needs to rebuild and sample its network (build_network, sample_images)."""
    return dict(arch=cfg.arch, cond=cfg.cond, num_classes=num_classes, shape=tuple(shape),
                dropout=cfg.dropout, text_layers=cfg.text_layers,
                embedding_dropout=cfg.embedding_dropout, class_dropout_prob=cfg.class_dropout_prob,
                vae=cfg.vae if vae else None, scaling_factor=vae.scaling_factor if vae else 1,
                beta_schedule=cfg.beta_schedule, linear_start=cfg.linear_start,
                linear_end=cfg.linear_end, cep_perturb_null=cfg.cep_perturb_null)


def new_network(cfg, spec):
    """The Denoiser initialised from --seed, or with the weights of --transfer (a facebookresearch/DiT
    .pt or our snapshot; a diffusers DiT computes another function), which must match in every
    tensor name and shape."""
    torch.manual_seed(cfg.seed)
    try:
        net = build_network(spec)
    except ValueError as error:  # e.g. a DiT patch size that does not divide the image
        raise UserError(str(error))
    if not cfg.transfer:
        return net
    require(os.path.isfile(cfg.transfer), f'--transfer={cfg.transfer}: not a file; --transfer takes '
            'a facebookresearch/DiT .pt or a snapshot of this script (diffusers pipelines sample '
            'through generate / eval / walk only)')
    source, theirs_spec, _ = load_network(cfg.transfer, 'cpu')
    mine, theirs = net.state_dict(), source.state_dict()
    wrong = [key for key in mine if key not in theirs or theirs[key].shape != mine[key].shape]
    require(not wrong and len(theirs) == len(mine),
            f'--transfer={cfg.transfer} ({theirs_spec["arch"]}, {theirs_spec["num_classes"]} '
            f'classes, latents {tuple(theirs_spec["shape"])}) does not fit --arch={spec["arch"]} '
            f'with {spec["num_classes"]} classes on {tuple(spec["shape"])} data: '
            f'{wrong[0] if wrong else "an extra tensor"} differs')
    net.load_state_dict(theirs)
    return net


def open_training_run(cfg, log):
    """open_run (folder NNNNN-<data>-<arch>-..., lock, state to resume); log.txt opened."""
    name = os.path.splitext(os.path.basename(cfg.data.rstrip('/')))[0]
    description = f'{name}-{cfg.arch.replace("/", "")}-{cfg.cond}-eta{cfg.corruption_ratio:g}-' \
        f'cep{cfg.cep}-batch{cfg.batch}'
    run = open_run(cfg.outdir, description, dataclasses.asdict(cfg), cfg.resume, log)
    log.open(os.path.join(run.dir, 'log.txt'))
    return run


def restore_training_state(state, net, ema, optimizer, rank, world_size, device):
    """Weights, optimizer and this rank's RNG states (dropout draws from them) -> cur_nimg. The data
    order and the step noise need no state: they follow from (--seed, cur_nimg)."""
    net.load_state_dict(state['net'])
    ema.load_state_dict(state['ema'])
    optimizer.load_state_dict(state['optimizer'])
    if len(state['rng']) == world_size:  # another GPU count continues with fresh generators
        torch.set_rng_state(state['rng'][rank][0])
        if device.type == 'cuda':
            torch.cuda.set_rng_state(state['rng'][rank][1], device)
    return state['cur_nimg']


def keep_conditions(run, source, corrupted, cfg, saved_config, n, log):
    """A resumed run keeps the conditions saved with it (conditions.npz beside its state), so a
    change in the corruption code never changes a run halfway; only from a state of the same data,
    seed and corruption (--resume=PATH may name another run). A new run saves its own. Returns
    (source, corrupted)."""
    saved_path = os.path.join(os.path.dirname(run.state) if run.state else run.dir,
                              'conditions.npz')
    same = isinstance(saved_config, dict) and all(
        saved_config.get(key) == getattr(cfg, key)
        for key in ('data', 'cond', 'captions', 'seed', 'corruption_ratio', 'corruption_classes'))
    if run.state and os.path.isfile(saved_path) and same:
        try:
            saved = fid.read_npz(saved_path, ['source', 'corrupted'])
        except ValueError as error:
            raise UserError(str(error)) from None
        if len(saved['source']) == n:
            source, corrupted = (torch.from_numpy(saved[k]) for k in ('source', 'corrupted'))
        else:
            log(f'note: {saved_path} holds {len(saved["source"])} conditions, not {n}: not used')
    elif run.state:
        log(f'note: {run.state} comes from other data or corruption flags: its conditions are not '
            'used')
    if get_rank() == 0:
        buffer = io.BytesIO()
        np.savez(buffer, source=source.numpy(), corrupted=corrupted.numpy())
        nets.write_atomic(os.path.join(run.dir, 'conditions.npz'), buffer.getvalue())
    return source, corrupted


def report_tick(run_dir, log, s, cur_nimg, total_nimg, tick_nimg, tick_seconds, total_seconds, lr,
                device):
    """The tick's progress line (log.txt) and record (stats.jsonl, rank 0) from the summed stats s
    (loss sum, count, 4 t-bins (sum, count), corrupted, dropped; see the loop), then reset them."""
    if dist.is_initialized():
        dist.all_reduce(s)
    gpumem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else 0
    kimg, v = tick_nimg / 1000, s.tolist()  # host sync
    s.zero_()
    record = dict(kimg=round(cur_nimg / 1000, 3), time=round(total_seconds, 1),
                  sec_per_kimg=round(tick_seconds / kimg, 3),
                  img_per_sec=round(tick_nimg / tick_seconds, 1), gpumem_gb=round(gpumem, 2),
                  loss=v[0] / v[1], lr=lr, loss_by_t=[v[2 + k] / max(v[6 + k], 1) for k in range(4)],
                  corrupted_rate=v[10] / max(v[1] - v[11], 1), null_rate=v[11] / v[1])
    eta_seconds = tick_seconds / kimg * max(total_nimg - cur_nimg, 0) / 1000
    log(f'kimg {record["kimg"]:.1f} | time {format_time(total_seconds)} | sec/kimg '
        f'{tick_seconds / kimg:.2f} | ETA {format_time(eta_seconds)} | loss {record["loss"]:.4f} | '
        f'lr {lr:.1e} | img/s {record["img_per_sec"]:.0f} | gpumem {gpumem:.1f}G | corrupted '
        f'{record["corrupted_rate"]:.3f} | null {record["null_rate"]:.3f} | loss by t '
        + ' '.join(f'{x:.3f}' for x in record['loss_by_t']))
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    if get_rank() == 0:
        with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as file:
            file.write(json.dumps(record) + '\n')


def save_snapshot(run_dir, cur_nimg, ema, spec, vae, grid_noise, grid_y, cfg):
    """samples-<kimg>.png from the EMA network and network-snapshot-<kimg>.pt (rank 0)."""
    if get_rank() == 0:
        tag = kimg_tag(cur_nimg)
        save_grid(sample_images(ema, spec, vae, grid_noise, grid_y, cfg),
                  os.path.join(run_dir, f'samples-{tag}.png'), math.ceil(math.sqrt(cfg.grid)))
        save_pt(dict(ema=ema.state_dict(), spec=spec, kimg=cur_nimg / 1000),
                os.path.join(run_dir, f'network-snapshot-{tag}.pt'))


def save_state(run_dir, cur_nimg, net, ema, optimizer, spec, cfg, world_size, device):
    """training-state-<kimg>.pt with the RNG states of every rank (every rank calls this), then
    remove the older states: resuming needs only the newest. Returns its path."""
    rng = [(torch.get_rng_state(), torch.cuda.get_rng_state(device)
            if device.type == 'cuda' else None)] * world_size
    if dist.is_initialized():
        dist.all_gather_object(rng, rng[0])
    path = os.path.join(run_dir, f'training-state-{kimg_tag(cur_nimg)}.pt')
    if get_rank() == 0:
        old = [name for name in os.listdir(run_dir) if STATE_NAME.fullmatch(name)]
        save_pt(dict(net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                     cur_nimg=cur_nimg, rng=rng, spec=spec, config=dataclasses.asdict(cfg)), path)
        for name in set(old) - {os.path.basename(path)}:
            os.remove(os.path.join(run_dir, name))
    barrier()
    return path


def save_pt(obj, path):
    """torch.save through nets.write_atomic; torch reports a full disk as a RuntimeError: it becomes
    the OSError that main prints as one line (exit 1)."""
    try:
        nets.write_atomic(path, lambda file: torch.save(obj, file))
    except RuntimeError as error:
        raise OSError(28, f'write failed (disk full?): {" ".join(str(error).split())[:100]}',
                      path) from None


# --------------------------------------------------------------------------------------------------
# Files: our checkpoints and the autoencoders.

def load_vae(source, device, cache_dir=None):
    """The autoencoder of --vae (nets.load_latent_autoencoder), frozen, on device."""
    try:
        vae = nets.load_latent_autoencoder(source, cache_dir=cache_dir)
    except (nets.WeightsNotFoundError, ValueError) as error:
        raise UserError(f'--vae={source}: {error}')
    return vae.to(device).eval().requires_grad_(False)


def load_checkpoint(path, flag, keys=()):
    """One of our .pt files as a dict holding `keys`; else one clear error line."""
    try:
        checkpoint = nets.read_checkpoint(path, flag)
    except ValueError as error:
        raise UserError(str(error))
    missing = [key for key in keys if key not in checkpoint]
    require(not missing or 'spec' not in checkpoint or 'optimizer' in checkpoint,
            f'{flag}={path} is a network snapshot, not a training state (training-state-*.pt)')
    require(not missing, f'{flag}={path} was not written by this script (it has no '
            f'{", ".join(missing)})')
    return checkpoint


# --------------------------------------------------------------------------------------------------
# The flags of this script: the commands, the official-flag table, the checks.

TITLE = 'Slight Corruption in Pre-training Data Makes Better Diffusion Models (Chen et al., NeurIPS 2024)'
CHOICES = dict(scheduler=('ddim', 'dpm', 'ddpm'), cfg_channels=('all', 'dit'),
               timestep_spacing=('', 'linspace', 'leading'), cond=('class', 'text'),
               cep=('none', 'uniform', 'gaussian'), beta_schedule=('linear', 'scaled_linear'),
               precision=('', 'fp32', 'bf16'), protocol=('', *fid.PROTOCOLS))
COMMANDS = {  # the flags of each command beyond the sampler's (train: all of TrainConfig)
    'generate': ('network', 'vae', 'seeds', 'n_samples', 'class_start_idx', 'class_end_idx',
                 'image_size', 'outdir', 'batch', 'class_idx', 'prompts', 'seed', 'hub_token',
                 'precision', 'device'),
    'eval': ('network', 'vae', 'num', 'ref', 'protocol', 'metrics', 'fid_weights', 'batch',
             'class_idx', 'prompts', 'hub_token', 'precision', 'device'),
    'walk': ('network', 'vae', 'classes', 'prompt', 'walk_steps', 'n_samples', 'seed', 'outdir',
             'batch', 'hub_token', 'precision', 'device'),
}
COMMAND_DEFAULTS = {  # the official circular-walk script's own defaults
    'walk': dict(scheduler='dpm', ddim_steps=25, n_samples=5, batch=20),
}
_PRECISION = ours('precision',
                  {'full': 'fp32', 'autocast': 'bf16', 'fp32': 'fp32', 'bf16': 'bf16', '': ''},
                  'full -> fp32, autocast -> bf16 (the official scripts run fp16)')
# The flags of Hhhhhhao/DiffusionNoise's scripts/*_cls2img.py, *_text2img.py and *_circular_walk_*.py.
_SAMPLING = {
    '--pretrained_model_name_or_path': ours('network'), '--batch_size': ours('batch'),
    '--outdir': ours('outdir'), '--ddim_steps': ours('ddim_steps'), '--ddim_eta': ours('ddim_eta'),
    '--scheduler': ours('scheduler'), '--scale': ours('scale'), '--seed': ours('seed'),
    '--precision': _PRECISION, '--hub_token': ours('hub_token'),
    '--fixed_code': ignored('our start codes are always a fixed function of the seed',
                            type=parse_bool, group='sampling'),
    '--push_to_hub': refused('uploading to the Hugging Face Hub is not part of sampling; upload '
                             '--outdir afterwards'),
    '--class_synset': refused('WordNet synsets need the ImageNet index; use --classes=ID,ID (the '
                              'official data/index_synset.yaml maps synsets to ids)',
                              group='sampling'),
    '--f': refused("the downsampling factor is the network's own autoencoder's; drop the flag",
                   group='network'),
}
_GENERATE = {
    '--n_samples': ours('n_samples'), '--class_start_idx': ours('class_start_idx'),
    '--class_end_idx': ours('class_end_idx'), '--image_size': ours('image_size'),
    '--prompt_data': ours('prompts', how='a file, one prompt a line (mscoco / parti: refused for '
                          'text models)'),
}
_WALK = {
    '--model_list': ours('network', how='several networks, one row each'),
    '--n_samples': ours('n_samples'), '--walk_steps': ours('walk_steps'), '--prompt': ours('prompt'),
}
OFFICIAL_FLAGS = {
    'train': {'--input_pertub': ours('input_perturbation',
                                     how="DDPM-IP's spelling of the IP baseline's gamma"),
              '--precision': _PRECISION},
    'generate': {**_SAMPLING, **_GENERATE},
    'eval': {flag: row for flag, row in _SAMPLING.items() if flag not in ('--outdir', '--seed')},
    'walk': {**_SAMPLING, **_WALK},
}
MULTI_VALUE_FLAGS = {'--network': ',', '--model_list': ',', '--pretrained_model_name_or_path': ',',
                     '--prompt': '\n'}


def command(name, argv):
    """Parse the flags of `name` (official ones too: several values after --model_list or --prompt
    are joined, as this parser has no positional arguments), check them, then run it."""
    args = []
    for arg in argv:
        if len(args) >= 2 and args[-2] in MULTI_VALUE_FLAGS and not arg.startswith('-'):
            args[-1] += MULTI_VALUE_FLAGS[args[-2]] + arg
        else:
            args.append(arg)
    if name == 'train':
        cfg = parse_config('train', TrainConfig, args, OFFICIAL_FLAGS['train'], PRESETS)
    else:
        fields = [f.name for f in dataclasses.fields(GenerateConfig)
                  if f.name in COMMANDS[name] or f.name in SamplerConfig.__dataclass_fields__]
        cfg = parse_config(name, GenerateConfig, args, OFFICIAL_FLAGS[name], fields=fields,
                           defaults=COMMAND_DEFAULTS.get(name))
    cfg = check_config(cfg, int(os.environ.get('WORLD_SIZE', 1)))
    if getattr(cfg, 'dry_run', False):
        return print_dry_run(cfg)
    if getattr(cfg, 'hub_token', ''):  # the official --hub_token, for gated repositories
        os.environ['HF_TOKEN'] = cfg.hub_token
    rank, world_size, device = init_distributed(cfg.device)
    precision = cfg.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    run = dict(train=training_loop, generate=generate, eval=evaluate, walk=walk)[name]
    try:
        return run(dataclasses.replace(cfg, precision=precision), rank, world_size, device)
    except nets.WeightsNotFoundError as error:
        raise UserError(str(error)) from None


def print_dry_run(cfg):
    """--dry_run: the resolved config and the network (on the meta device); reads no data."""
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    side = cfg.resolution or 32
    channels, side = {'none': (3, side), 'vq-f4': (3, side // 4)}.get(cfg.vae, (4, side // 8))
    num_classes = cfg.num_classes or 1000
    spec = dict(training_spec(cfg, num_classes, (channels, side, side), None), vae=cfg.vae)
    with torch.device('meta'):
        net = build_network(spec)
    channel_mult = None if is_dit(cfg.arch) else \
        getattr(net.backbone, 'config', {}).get('channel_mult')
    conditions = 'text' if cfg.cond == 'text' else \
        f'{num_classes} classes{"" if cfg.num_classes else " (assumed; from the data)"}'
    print(f'network: {cfg.arch}, channel_mult {channel_mult}, '
          f'{sum(p.numel() for p in net.parameters()):,} parameters for {conditions} on '
          f'{channels}x{side}x{side} {"pixels" if cfg.vae == "none" else "latents"}'
          f'{"" if cfg.resolution else " (--resolution=0: the data decides; 32 assumed)"}')


def check_config(cfg, world_size):
    """Every range check in one place, before anything is written."""
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name, allowed[0])
        require(value in allowed, f'--{name}: invalid choice: {value!r} (choose from '
                f'{", ".join(map(repr, allowed))})')
    require(1 <= cfg.ddim_steps <= NUM_TIMESTEPS and cfg.ddim_eta >= 0 and cfg.scale >= 1,
            '--ddim_steps must be in [1, 1000], --ddim_eta >= 0 and --scale >= 1')
    require(cfg.ddim_eta == 0 or cfg.scheduler == 'ddim', '--ddim_eta needs --scheduler=ddim')
    require(cfg.scheduler != 'ddpm' or cfg.ddim_steps >= 2 and not cfg.timestep_spacing,
            "--scheduler=ddpm takes --ddim_steps >= 2 and DiT's own spacing (no --timestep_spacing)")
    spacing = cfg.timestep_spacing or {'dpm': 'linspace', 'ddim': 'leading'}.get(cfg.scheduler)
    require(spacing != 'leading' or cfg.ddim_steps <= NUM_TIMESTEPS // 2,
            f'--timestep_spacing=leading allows at most {NUM_TIMESTEPS // 2} --ddim_steps')
    if isinstance(cfg, GenerateConfig):
        require(cfg.network and min(cfg.batch, cfg.num, cfg.walk_steps) >= 1 and cfg.n_samples >= 0,
                '--network is required; --batch, --num and --walk_steps must be >= 1, '
                '--n_samples >= 0')
        require(not set(cfg.metrics.split(',')) - set(fid.METRICS),
                f'--metrics must be a comma-separated subset of {",".join(fid.METRICS)}')
        end_ok = cfg.class_end_idx == -1 or cfg.class_end_idx > cfg.class_start_idx
        require(cfg.class_start_idx >= 0 and end_ok,
                '--class_start_idx must be >= 0 and below --class_end_idx (or --class_end_idx=-1)')
        require(cfg.image_size >= 0, '--image_size must be >= 0')
        return cfg
    # Training: data, corruption and perturbation rates, network, schedule, batch, optimiser, run.
    require(cfg.data, '--data is required (an image folder, a zip, an .npz or cifar10)')
    for name in ('corruption_ratio', 'class_dropout_prob', 'embedding_dropout', 'dropout'):
        require(0 <= getattr(cfg, name) < 1, f'--{name} must be in [0, 1)')
    require(cfg.cep_gamma >= 0 and cfg.input_perturbation >= 0,
            '--cep_gamma and --input_perturbation must be >= 0')
    require(cfg.class_dropout_prob > 0 or cfg.scale == 1,
            'the sample grids use --scale, which needs null conditions: --class_dropout_prob > 0')
    require(not cfg.corruption_classes or cfg.cond == 'class' and
            re.fullmatch(r'\d+(,\d+)+', cfg.corruption_classes),
            '--corruption_classes must list at least two class ids, e.g. 3,5,9, with --cond=class')
    require(is_dit(cfg.arch) or nets.UNET_PRESETS.get(cfg.arch, {}).get('arch') == 'ldm',
            f'--arch must be a DiT ({", ".join(nets.DiT_models)}) or an LDM UNet preset')
    require(not is_dit(cfg.arch) or cfg.cond != 'text' and cfg.embedding_dropout == 0,
            '--cond=text and --embedding_dropout need an LDM UNet --arch (DiT embeds labels in '
            'adaLN)')
    require(0 < cfg.linear_start < cfg.linear_end < 1,
            '--linear_start and --linear_end must satisfy 0 < linear_start < linear_end < 1')
    batch_gpu = cfg.batch_gpu or cfg.batch // world_size
    require(cfg.batch >= 1 and batch_gpu >= 1 and cfg.batch % (batch_gpu * world_size) == 0,
            f'--batch={cfg.batch} must be divisible by GPUs ({world_size}) x --batch_gpu '
            f'({batch_gpu})')
    require(cfg.lr > 0 and cfg.weight_decay >= 0 and cfg.grad_clip >= 0 and 0 <= cfg.ema_decay < 1,
            '--lr must be > 0, --weight_decay and --grad_clip >= 0, --ema_decay in [0, 1)')
    require(cfg.kimg > 0 and cfg.tick > 0 and
            min(cfg.snap, cfg.grid, cfg.text_layers, cfg.workers) >= 1,
            '--kimg and --tick must be > 0; --snap, --grid, --text_layers and --workers >= 1')
    require(min(cfg.resolution, cfg.num_classes, cfg.lr_rampup_kimg) >= 0,
            '--resolution, --num_classes and --lr_rampup_kimg must be >= 0')
    if not cfg.dry_run:
        check_writable(cfg.outdir, '--outdir')
    return cfg


if __name__ == '__main__':
    main()
