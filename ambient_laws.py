"""How much is a noisy image worth? Data Scaling Laws for Ambient Diffusion.

Giannis Daras, Yeshwanth Cherapanamjeri, Constantinos Daskalakis. ICLR 2025, arXiv:2411.02780.
As giannisdaras/ambient-laws (0d6c349): EDM's networks and sampler. Notes: docs/ambient_laws.md.

The training set mixes clean images with images that carry Gaussian noise of known level sigma_n,
y = x0 + sigma_n eps, drawn once per image. Clean images train with EDM's loss. A noisy image is
used only at levels sigma >= sigma_n: it is noised further to x_t = y + sqrt(sigma^2 - sigma_n^2)
eps', and Tweedie's formula maps the network's clean estimate D(x_t, sigma) to an estimate of the
noisy image, (1 - sigma_n^2/sigma^2) D + (sigma_n^2/sigma^2) x_t, regressed onto y ("ambient score
matching"). Its minimiser is still the clean-data denoiser, so the model samples clean images; an
optional consistency loss teaches the levels below sigma_n. Sampling is plain EDM. The finding:
10% clean + 90% noisy images nearly match 100% clean data (Table 1).

Commands (the official train.py, generate.py and eval_fid.py command lines also run as written):
    python ambient_laws.py --preset=tiny --data=tests/data/cifar10_tiny.npz \
        --sigma=0.2 --corruption_probability=0.9
    # 8 GPUs: CIFAR-10, each image noisy with probability 0.9 at sigma_n = 0.2 (Table 1)
    torchrun --standalone --nproc_per_node=8 ambient_laws.py --data=cifar10 --outdir=runs \
        --sigma=0.2 --corruption_probability=0.9 --resume=auto
    # 50,000 samples of a released model, then FID and IS of the folder as eval_fid.py does
    torchrun --standalone --nproc_per_node=8 ambient_laws.py generate --seeds=0-49999 --outdir=out \
        --network=giannisdaras/ambient_laws_celeba_sigma_0.05_corruption_0.1_keep_1.0
    torchrun --standalone --nproc_per_node=8 ambient_laws.py eval --gen_path=out \
        --ref_stats=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

Read in this order: observe, official_draws, ambient_loss, consistency_loss, edm_sampler,
training_loop, main.
"""

import argparse
import atexit
import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
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

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist

import fid
import nets

# --------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class Config:
    # Data and corruption (ambient-laws train.py; ambient_utils dataset_utils.py).
    data: str = ''                        # image folder, EDM-style zip, .npz (x, y) or cifar10
    cond: bool = False                    # class-conditional model (labels from the data)
    num_classes: int = 0                  # class count; 0 = from the labels (dense 0..K-1)
    xflip: bool = False                   # add x-flipped copies (a copy keeps its image's noise)
    sigma: float = 0.0                    # noise std sigma_n of the noisy images, pixels in [-1, 1]
    corruption_probability: float = 0.0   # probability that an image is noisy
    dataset_keep_percentage: float = 1.0  # fraction of the data set used (seeded; x2 with --xflip)
    noisy_count: str = 'random'           # random: noisy w.p. p by image index (official); exact
    noise_rng: str = 'numpy'              # numpy: seeded by the image index (official); device
    corruption_seed: int = 0              # seeds --noisy_count=exact and --noise_rng=device
    sigma_per_image: str = ''             # .npy of one sigma_n per image (0 = clean)
    already_noisy: bool = False           # the images already carry that noise: add none
    augment: float = 0.12                 # EDM augmentation probability, 0 = off
    # Network (ambient-laws train.py = EDM train.py).
    preset: str = 'cifar10'               # recipe, see PRESETS (cifar10 = the official defaults)
    arch: str = 'ddpmpp'                  # ddpmpp or adm (official), or a nets.UNET_PRESETS name
    cbase: int = 0                        # model_channels override, 0 = the arch's
    cres: str = ''                        # channel_mult override, e.g. 1,2,2,2
    dropout: float = 0.13                 # dropout probability
    transfer: str = ''                    # start from these weights (fresh optimizer, no EMA ramp)
    # Optimisation (ambient-laws training/loss.py EDMLoss, training_loop.py).
    P_mean: float = -1.2                  # mean of ln(sigma) in training; EDM
    P_std: float = 1.2                    # std of ln(sigma) in training; EDM
    sigma_data: float = 0.5               # EDM preconditioning constant
    consistency_coeff: float = 0.0        # weight of the consistency loss, 0 = off
    consistency_batch_size: int = 32      # rows that get the consistency term per step
    consistency_rows: str = 'per_gpu'     # per_gpu: per microbatch (official); global: first rows
    num_consistency_steps: int = 6        # grid points of the reverse SDE (5 steps)
    num_primes: int = 6                   # reverse-SDE runs averaged per row
    with_weight: bool = False             # multiply the consistency term by lambda(sigma)
    with_grad: bool = True                # backpropagate through the reverse SDE
    kimg: float = 200_000                 # training length in thousands of images
    batch: int = 512                      # global batch
    batch_gpu: int = 0                    # per-GPU microbatch, 0 = batch / GPUs
    lr: float = 1e-3                      # learning rate (Adam)
    lr_rampup_kimg: float = 10_000        # linear warm-up; EDM training_loop default
    weight_decay: float = 0.0             # Adam's L2 weight decay
    ema_halflife_kimg: float = 500        # EMA half-life
    ema_rampup_ratio: float = 0.05        # half-life <= this x images seen; EDM default
    ls: float = 1.0                       # loss scaling: the loss is multiplied by it
    # Run.
    outdir: str = 'runs'                  # run folders go here (generate: the PNG folder)
    desc: str = ''                        # extra words for the run folder name
    expr_id: str = 'test'                 # experiment name (official wandb name); in config.json
    nosubdir: bool = False                # write into --outdir itself, not a numbered folder
    tick: float = 50                      # kimg between progress lines
    snap: int = 50                        # ticks between network snapshots and sample grids
    dump: int = 500                       # ticks between training states (and at the end)
    grid: int = 64                        # images in the sample grid of each snapshot
    seed: int = -1                        # training randomness; -1 = random, drawn once and saved
    resume: str = ''                      # training-state-*.pt to continue from, or auto
    precision: str = ''                   # fp32 or bf16; '' = bf16 on CUDA, fp32 on CPU
    bench: bool = True                    # cuDNN benchmarking
    compile: bool = False                 # torch.compile the network
    workers: int = 4                      # threads that decode images and draw the NumPy noise
    dry_run: bool = False                 # print the resolved config and network, and exit
    device: str = ''                      # cpu or cuda; '' = cuda when available
    # Sampling (EDM Algorithms 1-2; ambient-laws generate.py): generate, eval, training grids.
    steps: int = 18                       # Heun steps (2 x steps - 1 network calls)
    sigma_min: float = 0.002              # lowest noise level (at least the network's own)
    sigma_max: float = 80.0               # highest noise level (at most the network's own)
    rho: float = 7.0                      # time-step exponent
    S_churn: float = 0.0                  # stochasticity; 0 = deterministic
    S_min: float = 0.0                    # churn only for sigma in [S_min, S_max]
    S_max: float = float('inf')           # see S_min
    S_noise: float = 1.0                  # noise inflation
    stop_variance: float = 0.0            # return D early once sigma_next^2 < this
    # Network to sample from (generate, eval).
    network: str = ''                     # our .pt, an EDM .pkl (path or URL), a Hugging Face repo
    # Run (generate).
    seeds: str = '0-63'                   # image k uses seed k, e.g. 0-49999 or 1,5,10-20
    class_idx: int = -1                   # generate only this class, -1 = a random class per seed
    subdirs: bool = False                 # one folder per 1000 seeds
    # Evaluation (eval; the official eval_fid.py).
    gen_path: str = ''                    # a folder of images to evaluate instead of sampling
    ref: str = ''                         # FID reference statistics (.npz or URL)
    ref_path: str = ''                    # reference images instead of --ref
    num: int = 50_000                     # number of samples drawn from --network
    metrics: str = ''                     # comma list of fid.METRICS; '' = fid (+ is)
    protocol: str = ''                    # edm, adm or pytorch-fid; '' = the reference's
    preprocess: str = ''                  # Inception preprocessing, '' = the protocol's
    fid_weights: str = ''                 # Inception weights, '' = $FID_WEIGHTS or the cache
    out_path: str = ''                    # results JSON; '' = metrics.jsonl or fid_out.json


# Recipes (docs/ambient_laws.md#presets). cifar10 = ambient-laws' train.py defaults; celeba64 and
# imagenet64 are EDM's 64x64 DDPM++ and ImageNet-64 ADM recipes. Samplers draw training grids only.
PRESETS = {
    'cifar10': dict(arch='ddpmpp', cond=False, batch=512, lr=1e-3, dropout=0.13, augment=0.12,
                    kimg=200_000, ema_halflife_kimg=500),
    'celeba64': dict(arch='ddpmpp-64', cond=False, batch=256, lr=2e-4, dropout=0.05, augment=0.15,
                     cres='1,2,2,2', kimg=200_000, ema_halflife_kimg=500, steps=40),
    'imagenet64': dict(arch='adm', cond=True, batch=4096, lr=1e-4, dropout=0.10, augment=0.0,
                       kimg=2_500_000, ema_halflife_kimg=50_000, tick=200, steps=256,
                       S_churn=40, S_min=0.05, S_max=50, S_noise=1.003),
    'tiny': dict(arch='tiny', cond=False, batch=16, lr=1e-3, dropout=0.0, augment=0.12, kimg=0.5,
                 lr_rampup_kimg=0.25, ema_halflife_kimg=0.1, tick=0.1, snap=5, dump=5, grid=16,
                 steps=8, workers=1),
}
# Official --arch values as nets.UNet kwargs: EDM's SongUNet DDPM++ and DhariwalUNet (ADM as EDM
# re-implements it, docs/ambient_laws.md#presets).
ARCHES = {'ddpmpp': nets.UNET_PRESETS['ddpmpp-cifar10'],
          'adm': dict(arch='adm', model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
                      attn_resolutions=(32, 16, 8), num_head_channels=64,
                      use_scale_shift_norm=True, resblock_updown=True,
                      use_new_attention_order=False, norm_min_group_size=4)}


# --------------------------------------------------------------------------------------------------
# The data model: a fixed mixture of clean and noisy images


def observe(images, sigma_n, eps=None):
    """The observed training images y = x0 + sigma_n eps (arXiv:2411.02780 Sec. 2; VE, no clip).

    images uint8 (B, C, H, W) -> x0 in [-1, 1]; sigma_n (B,), 0 = clean; eps (B, C, H, W) or None.
    The sum is taken in float64 and rounded once, as the official NumPy code does, so the images
    equal the official ones bit for bit (docs/ambient_laws.md#data-set).
    """
    x0 = images.float() / 127.5 - 1                                            # (B, C, H, W)
    if eps is None:
        return x0
    return (x0.double() + sigma_n.double().view(-1, 1, 1, 1) * eps.double()).float()


def keep_subset(num_images, keep):
    """Indices of the images used at all: the first int(keep N) of a RandomState(0) permutation,
    sorted (official max_size), so subsets are nested across keep fractions."""
    order = np.random.RandomState(0).permutation(num_images)          # = shuffle(arange(N))
    return np.sort(order[:int(num_images * keep)])


def official_draws(raw_idx, shape, with_noise=True):
    """The random draws of one image in the official data set, bit for bit: NumPy seeded with the
    image's raw index draws an unused Bernoulli(1) mask, then u ~ U[0, 1) (the image is noisy iff
    u <= p), then eps ~ N(0, I) in float64. Returns (u, eps (C, H, W) or None).
    Official quirk: docs/ambient_laws.md#data-set."""
    rng = np.random.RandomState(int(raw_idx))
    rng.binomial(1, 1.0, size=shape)
    u = rng.rand()
    return u, (rng.normal(size=shape) if with_noise else None)


def official_noisy(raw_index, shape, corruption_probability, pool):
    """bool (n,): which kept images are noisy, each with probability p, seeded by its raw index
    (independent of the keep fraction, the seed and the GPU count)."""
    u = np.array(list(pool.map(lambda i: official_draws(i, shape, with_noise=False)[0], raw_index)))
    return u <= corruption_probability


def exact_noisy(raw_index, num_images, corruption_probability, seed):
    """bool (n,) for --noisy_count=exact: exactly round(p n) images are noisy, those of lowest
    seeded priority, so noisy sets are nested across p (official: Binomial(n, p))."""
    generator = torch.Generator().manual_seed(seed)
    priority = torch.rand(num_images, generator=generator)[torch.as_tensor(raw_index)]
    noisy = np.zeros(len(raw_index), bool)
    noisy[priority.argsort()[:int(corruption_probability * len(raw_index) + 0.5)].numpy()] = True
    return noisy


def numpy_noise(raw_index, sigma_n, shape, pool):
    """float64 (n, C, H, W): the official noise eps of each image with sigma_n > 0 (official_draws),
    zeros for the clean ones. Drawn on the host by the worker threads."""
    noise = np.zeros((len(raw_index), *shape))
    noisy = np.flatnonzero(sigma_n > 0)
    for k, eps in zip(noisy, pool.map(lambda i: official_draws(i, shape)[1], raw_index[noisy])):
        noise[k] = eps
    return torch.from_numpy(noise)


def _hash32(x):
    """lowbias32 integer hash (C. Wellons) of int64 tensors holding 32-bit values, with products
    split in 16-bit halves so that no int64 product overflows."""
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = x ^ (x >> shift)
        low, high = multiplier & 0xFFFF, multiplier >> 16
        x = (x * low + (((x * high) & 0xFFFF) << 16)) & 0xFFFFFFFF
    return x ^ (x >> 16)


def image_noise(raw_index, shape, seed):
    """eps ~ N(0, I) (B, *shape) as a pure function of (seed, image index), for --noise_rng=device:
    counter-based (hash + Box-Muller), drawn on the GPU. Same law as numpy_noise, other numbers."""
    half = (math.prod(shape) + 1) // 2
    seed_key = int(_hash32(torch.tensor(seed % 2 ** 32)))                       # on the host
    key = _hash32((raw_index.long() + seed_key) & 0xFFFFFFFF)                   # (B,)
    counter = _hash32(torch.arange(2 * half, device=raw_index.device))
    bits = _hash32(key[:, None] ^ counter)                                      # (B, 2 half)
    u = ((bits >> 8).float() + 0.5) / 2 ** 24                                   # in (0, 1)
    radius, angle = (-2 * u[:, :half].log()).sqrt(), 2 * math.pi * u[:, half:]
    eps = torch.cat([radius * angle.cos(), radius * angle.sin()], dim=1)[:, :math.prod(shape)]
    return eps.reshape(-1, *shape)                                              # (B, *shape)


# --------------------------------------------------------------------------------------------------
# Preconditioning and loss (the paper core)


class EDMPrecond(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), EDM Table 1: D estimates E[x0 | x_t = x]
    at total noise level sigma."""

    def __init__(self, unet, sigma_data=0.5, sigma_min=0.0, sigma_max=float('inf')):
        super().__init__()
        self.unet, self.sigma_data = unet, sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max  # the levels the sampler may use

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        x = x.float()                                                           # (B, C, H, W)
        sigma = sigma.float() if torch.is_tensor(sigma) else x.new_full([1], sigma)  # no copy
        sigma = sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)          # (B, 1, 1, 1)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        F_x = self.unet(c_in * x, sigma.log().flatten() / 4, class_labels, augment_labels)
        return c_skip * x + c_out * F_x.float()


def edm_weight(sigma, sigma_data=0.5):
    """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def ambient_loss(net, y, sigma_n, rnd_normal, eps, class_labels=None, P_mean=-1.2, P_std=1.2,
                 sigma_data=0.5):
    """Ambient score matching (arXiv:2411.02780 Sec. 2), per pixel, for clean (sigma_n = 0) and
    noisy images y: lambda(sigma) || (1 - r) D(x_t, sigma) + r x_t - y ||^2, r = sigma_n^2/sigma^2,
    sigma = max(exp(P_mean + P_std n), sigma_n); minimised by D = E[x0 | x_t].
    net(x, sigma, labels); y, eps (B, C, H, W); sigma_n, rnd_normal (B,). Returns the loss, x_t
    (B, C, H, W), sigma (B, 1, 1, 1) and D(x_t, sigma). Quirks: docs/ambient_laws.md#loss."""
    sigma_n = sigma_n.reshape(-1, 1, 1, 1)                                      # (B, 1, 1, 1)
    sigma = (rnd_normal.reshape(-1, 1, 1, 1) * P_std + P_mean).exp().maximum(sigma_n)
    # Add just enough noise to bring the observed image from sigma_n to sigma.
    x_t = y + (sigma ** 2 - sigma_n ** 2).sqrt() * eps                          # (B, C, H, W)
    x0_pred = net(x_t, sigma, class_labels)
    # Tweedie, VE to VE: E[y | x_t] = (1 - r) E[x0 | x_t] + r x_t (docs/ambient_laws.md#tweedie).
    ratio = sigma_n ** 2 / sigma ** 2
    y_pred = (1 - ratio) * x0_pred + ratio * x_t
    return edm_weight(sigma, sigma_data) * (y_pred - y) ** 2, x_t, sigma, x0_pred


def reverse_sde(net, x, sigma_start, sigma_end, z, class_labels=None, rho=7.0):
    """Euler-Maruyama on the VE reverse SDE from sigma_start to sigma_end (N, 1, 1, 1) on the Karras
    grid t_j: x += 2 (t_{j+1} - t_j)(x - D(x, t_j)) / t_j + sqrt(2 |dt| t_j) z_j. x (N, C, H, W);
    z (steps - 1, N, C, H, W). No Heun correction, no step to 0 (official training/sampler.py)."""
    fraction = torch.linspace(0, 1, z.shape[0] + 1, device=x.device).view(-1, 1, 1, 1, 1)
    start, end = sigma_start ** (1 / rho), sigma_end ** (1 / rho)
    t = (start + fraction * (end - start)) ** rho                          # (steps, N, 1, 1, 1)
    for j in range(z.shape[0]):
        d = (x - net(x, t[j], class_labels)) / t[j]
        x = x + 2 * (t[j + 1] - t[j]) * d + (2 * (t[j] - t[j + 1]).abs() * t[j]).sqrt() * z[j]
    return x


def consistency_loss(net, x_t, sigma, x0_pred, rnd_normal, z, num_rows, class_labels=None,
                     P_mean=-1.2, P_std=1.2, sigma_data=0.5, with_weight=False, with_grad=True):
    """Consistency term (Daras et al., ICML 2024; arXiv:2411.02780 Sec. 2), per pixel:
    || mean_K D(x_t', sigma') - D(x_t, sigma) ||^2 on the first num_rows rows, where x_t' are K
    reverse-SDE samples from x_t down to sigma' = min(exp(P_mean + P_std n), sigma); 0 elsewhere.
    x_t, x0_pred (B, C, H, W), sigma (B, 1, 1, 1), rnd_normal (B,) from ambient_loss;
    z (steps - 1, num_rows K, C, H, W). Returns (B, C, H, W). docs/ambient_laws.md#consistency."""
    B, m = x_t.shape[0], num_rows
    K = z.shape[1] // max(m, 1)
    # The raw draw before ambient_loss's clamp: only rows drawn below sigma_n move.
    sigma_prime = (rnd_normal[:m].reshape(-1, 1, 1, 1) * P_std + P_mean).exp().minimum(sigma[:m])
    repeat = lambda v: None if v is None else v[:m].repeat_interleave(K, dim=0)  # noqa: E731
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        x_prime = reverse_sde(net, repeat(x_t), repeat(sigma), repeat(sigma_prime), z,
                              repeat(class_labels))                             # (m K, C, H, W)
    x0_prime = net(x_prime, repeat(sigma_prime), repeat(class_labels))          # (m K, C, H, W)
    term = (x0_prime.reshape(m, K, *x_t.shape[1:]).mean(dim=1) - x0_pred[:m]) ** 2  # (m, C, H, W)
    if with_weight:
        term = term * edm_weight(sigma[:m], sigma_data)
    return torch.cat([term, term.new_zeros(B - m, *term.shape[1:])])            # (B, C, H, W)


# --------------------------------------------------------------------------------------------------
# Sampler


def edm_sampler(net, latents, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80.0,
                rho=7.0, S_churn=0.0, S_min=0.0, S_max=float('inf'), S_noise=1.0,
                randn_like=torch.randn_like, stop_variance=0.0):
    """EDM Algorithms 1 and 2 (Heun; stochastic with S_churn > 0), as ambient-laws generate.py.
    latents (B, C, H, W) standard normal; returns samples (B, C, H, W) in float64. The schedule
    stays on the host, so the loop has no host syncs."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    t_steps = [(a + i / max(num_steps - 1, 1) * (b - a)) ** rho for i in range(num_steps)] + [0.0]
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Increase the noise temporarily (churn).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if S_churn > 0:
            x_hat = x_cur + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * randn_like(x_cur)
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
    """uint8 (B, C, H, W) samples for a list of seeds, latents and labels as EDM generate.py: one
    generator per seed, so image k depends on seed k only (churn noise drawn in float64, as EDM)."""
    unet = net.unet
    generators = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]
    randn = lambda shape, dtype=torch.float32: torch.stack(  # noqa: E731
        [torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators])
    latents = randn([unet.in_channels, unet.img_resolution, unet.img_resolution])  # (B, C, H, W)
    labels = None
    if unet.label_dim:                                                          # (B,) class ids
        labels = torch.stack([torch.randint(unet.label_dim, [], generator=g, device=device)
                              for g in generators])
        if cfg.class_idx >= 0:
            labels.fill_(cfg.class_idx)
    sigma_min = max(cfg.sigma_min, getattr(net, 'sigma_min', 0.0))
    sigma_max = min(cfg.sigma_max, getattr(net, 'sigma_max', float('inf')))
    with torch.no_grad(), autocast:
        x = edm_sampler(net, latents, labels, cfg.steps, sigma_min, sigma_max, cfg.rho,
                        cfg.S_churn, cfg.S_min, cfg.S_max, cfg.S_noise,
                        lambda x: randn(x.shape[1:], x.dtype), cfg.stop_variance)
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# Training loop

STATS = ['loss', 'count', 'clean_loss', 'clean', 'noisy_loss', 'noisy', 'noisy_used', 'consistency',
         'consistency_rows', 'bin0_loss', 'bin1_loss', 'bin2_loss', 'bin3_loss',
         'bin0', 'bin1', 'bin2', 'bin3']
SIGMA_BINS = (0.134, 0.301, 0.675)  # quartiles of EDM's training distribution exp(N(-1.2, 1.2^2))


def step_randomness(cfg, step, shape, num_cons, device):
    """Every random draw of one step for the whole global batch, from a generator seeded by
    (seed, step); each rank takes its rows, so the draws do not depend on the GPU count and a
    resume needs no RNG state. Returns rnd_normal (B,), eps (B, C, H, W), aug_u (B, 11),
    aug_g (B, 4) and the consistency noise z (steps - 1, num_cons, K, C, H, W)."""
    gen = torch.Generator(device).manual_seed(derive_seed(cfg.seed, 2, step))
    draw = lambda *size: torch.randn(*size, generator=gen, device=device)  # noqa: E731
    rnd_normal, eps = draw(cfg.batch), draw(cfg.batch, *shape)
    aug_u, aug_g = torch.rand(cfg.batch, 11, generator=gen, device=device), draw(cfg.batch, 4)
    z = draw(cfg.num_consistency_steps - 1, num_cons, cfg.num_primes, *shape)
    return rnd_normal, eps, aug_u, aug_g, z


def consistency_rows(cfg, world, rounds, batch_gpu):
    """Global row ids (sorted) of the rows that get the consistency term, and per rank and round
    how many leading rows of its microbatch they are. per_gpu (official): the first
    consistency_batch_size // GPUs rows of every microbatch; global: the first rows of the batch."""
    if cfg.consistency_coeff == 0:
        return torch.zeros(0, dtype=torch.long), [[0] * rounds for _ in range(world)]
    rows = [torch.arange(cfg.batch)[k::world].view(rounds, batch_gpu) for k in range(world)]
    if cfg.consistency_rows == 'per_gpu':
        counts = [[min(cfg.consistency_batch_size // world, batch_gpu)] * rounds
                  for _ in range(world)]
    else:  # a prefix of each microbatch
        counts = [(r < cfg.consistency_batch_size).sum(1).tolist() for r in rows]
    ids = torch.cat([rows[k][r, :m] for k in range(world) for r, m in enumerate(counts[k])])
    return ids.sort().values, counts


def tally(stats, loss, sigma, sigma_n, bins):
    """Add one microbatch's diagnostics to the on-device sums named by STATS (no host sync): the
    loss per sample, of clean and noisy samples, the noisy samples that trained (sigma > sigma_n)
    and the loss per quartile of sigma. loss (b, C, H, W); sigma (b, 1, 1, 1); sigma_n (b,)."""
    per_sample = loss.detach().mean(dim=(1, 2, 3))                              # (b,)
    noisy = (sigma_n > 0).float()
    used = noisy * (sigma.view(-1) > sigma_n).float()
    stats[:7] += torch.stack([per_sample.sum(), noisy.new_full([], len(noisy)),
                              (per_sample * (1 - noisy)).sum(), (1 - noisy).sum(),
                              (per_sample * noisy).sum(), noisy.sum(), used.sum()])
    sigma_bin = torch.bucketize(sigma.view(-1), bins)
    stats[9:13].index_add_(0, sigma_bin, per_sample)
    stats[13:17].index_add_(0, sigma_bin, torch.ones_like(per_sample))


def training_loop(cfg):
    """EDM's training loop with ambient_loss (+ consistency_loss) on the fixed noisy data set."""
    rank, world, device = init_distributed(cfg.device)
    log = Logger()
    cuda = device.type == 'cuda'
    batch_gpu, rounds = split_batch(cfg, world)
    if cfg.dry_run:  # touches neither the network nor the disk
        return dry_run(cfg, log, world, batch_gpu, rounds)
    cfg, state, transfer, resumable = check_start(cfg, world, device)

    # Performance settings.
    bf16 = (cfg.precision or ('bf16' if cuda else 'fp32')) == 'bf16'
    torch.backends.cuda.matmul.allow_tf32 = bf16  # TF32 with bf16; fp32 = the official numerics
    torch.backends.cudnn.allow_tf32 = bf16
    torch.backends.cudnn.benchmark = cfg.bench    # fixed shapes: cuDNN picks its fastest kernels
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)  # bf16 convs, fp32 loss
    pool = concurrent.futures.ThreadPoolExecutor(cfg.workers)  # NumPy noise (releases the GIL)

    # Data with its fixed clean/noisy split, as uint8 on the GPU when it fits.
    data = TrainingData(cfg, log, pool, device, rank, world)
    C, H, W = data.images.shape[1:]

    # Network, EMA, optimizer (Adam, official).
    torch.manual_seed(derive_seed(cfg.seed, 0))  # the same initial weights on every rank
    net, net_kwargs = build_network(cfg, H, C, data.label_dim)
    net.train().requires_grad_(True)
    net.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    ema = copy.deepcopy(net).eval().requires_grad_(False)  # same weights and memory layout
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=cfg.weight_decay, fused=cuda)
    log(f'Network: {sum(p.numel() for p in net.parameters()):,} parameters ({cfg.arch}), '
        f'{"bf16" if bf16 else "fp32"}, {world} process(es), '
        f'batch {cfg.batch} = {world} x {rounds} x {batch_gpu}')

    # Run folder (created exclusively and locked; --resume=auto continues a run of this config).
    run = open_run(cfg.outdir, run_desc(cfg), dataclasses.asdict(cfg), cfg.resume, log,
                   cfg.nosubdir, resumable)
    cfg, state, cur_nimg, cur_tick, transferred = load_start(cfg, run, state, transfer, resumable,
                                                             net, ema, optimizer)
    log.open(os.path.join(run.dir, 'log.txt'))
    if state is not None:
        trim_stats(run.dir, cur_nimg)
        log(resumed_line(run.state, cur_nimg))
    log(f'Run folder {run.dir}, kimg {cur_nimg / 1000:g}, seed {cfg.seed}')
    write_run_files(run.dir, dataclasses.asdict(cfg), data.preview() if rank == 0 else None,
                    world_size=world, net_kwargs=net_kwargs)

    # DDP (several forward calls per backward, as the consistency loss makes, are fine) and compile.
    ddp = net
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None)
    model = torch.compile(ddp) if cfg.compile else ddp
    # This rank's rows of the global batch (rounds, batch_gpu); its consistency rows (a prefix of
    # each microbatch) and their slots in the step's consistency noise.
    my_rows = torch.arange(cfg.batch)[rank::world].view(rounds, batch_gpu)
    rows_device = my_rows.to(device)
    cons_ids, cons_counts = consistency_rows(cfg, world, rounds, batch_gpu)
    cons_slots = [torch.searchsorted(cons_ids, r[:m]).to(device)
                  for r, m in zip(my_rows, cons_counts[rank])]
    data.start_noise(my_rows, cur_nimg)

    stats = torch.zeros(len(STATS), device=device)
    bins = torch.tensor(SIGMA_BINS, device=device)
    total_nimg, start_nimg = int(cfg.kimg * 1000), cur_nimg
    ticks = Ticks(log, run.dir, rank, cfg, device, cur_nimg, total_nimg)
    with StopSignal() as stop, run.lock or contextlib.nullcontext():
        while True:
            step = cur_nimg // cfg.batch
            rnd_normal, eps, aug_u, aug_g, z = step_randomness(cfg, step, (C, H, W),
                                                               len(cons_ids), device)
            torch.manual_seed(derive_seed(cfg.seed, 3, step, rank))  # dropout masks
            index = data.step_index(cur_nimg)

            # Accumulate gradients.
            optimizer.zero_grad(set_to_none=True)
            for round_idx, rows in enumerate(rows_device):
                # The observed images (clean, or noisy with their fixed noise), augmented in fp32.
                y, y_sigma_n, y_labels = data.observed(index, round_idx)
                aug_labels = None
                if cfg.augment > 0:
                    y, aug_labels = nets.edm_augment(y, cfg.augment, aug_u[rows], aug_g[rows])
                last = round_idx == rounds - 1 or world == 1
                with (contextlib.nullcontext() if last else ddp.no_sync()), autocast:
                    loss, x_t, sigma, x0_pred = ambient_loss(
                        functools.partial(model, augment_labels=aug_labels), y, y_sigma_n,
                        rnd_normal[rows], eps[rows], y_labels, cfg.P_mean, cfg.P_std,
                        cfg.sigma_data)
                    total = loss
                    m = cons_counts[rank][round_idx]
                    if m:  # like the official code: no augmentation labels in these calls
                        cons = consistency_loss(
                            model, x_t, sigma, x0_pred, rnd_normal[rows],
                            z[:, cons_slots[round_idx]].flatten(1, 2), m, y_labels, cfg.P_mean,
                            cfg.P_std, cfg.sigma_data, cfg.with_weight, cfg.with_grad)
                        total = loss + cfg.consistency_coeff * cons
                        stats[7:9] += torch.stack([cons[:m].detach().mean(dim=(1, 2, 3)).sum(),
                                                   cons.new_full([], m)])
                    # Sum over pixels, mean over the global batch (DDP averages over GPUs), x --ls.
                    total.sum().mul(cfg.ls / (rounds * batch_gpu)).backward()
                tally(stats, loss, sigma, y_sigma_n, bins)  # nothing in it needs gradients

            # Update weights: EDM's linear lr warm-up; non-finite gradients zeroed (no clipping).
            lr = cfg.lr * min(cur_nimg / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1)
            for group in optimizer.param_groups:
                group['lr'] = lr
            for param in net.parameters():
                if param.grad is not None:
                    torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
            optimizer.step()

            # Update EMA: half-life in images, at most ema_rampup_ratio x the images seen (EDM);
            # no ramp-up after --transfer (official).
            ema_halflife_nimg = cfg.ema_halflife_kimg * 1000
            if not transferred:
                ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * cfg.ema_rampup_ratio)
            ema_beta = 0.5 ** (cfg.batch / max(ema_halflife_nimg, 1e-8))
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - ema_beta)

            # A stop signal: a training state now, one line, exit.
            cur_nimg += cfg.batch
            done = cur_nimg >= total_nimg
            save = functools.partial(save_state, run.dir, net, ema, optimizer, net_kwargs, cfg,
                                     cur_nimg, transferred)
            if stop.check() and not done:
                stop.exit(log, save(cur_tick), cur_nimg)

            # Maintenance once per tick: progress line, snapshot + grid every --snap ticks,
            # training state every --dump ticks (not at tick 0, official) and at the end.
            if not (done or cur_tick == 0 or ticks.due(cur_nimg)):
                continue
            if world > 1:
                dist.all_reduce(stats)
            ticks.report(dict(zip(STATS, stats.tolist())), cur_nimg, cur_tick, lr)  # host sync
            stats.zero_()
            if rank == 0 and (done or cur_tick % cfg.snap == 0):
                save_snapshot(run.dir, ema, net_kwargs, cfg, cur_nimg, device, autocast)
            if rank == 0 and (done or (cur_tick % cfg.dump == 0 and cur_tick != 0)):
                save(cur_tick + 1)
            cur_tick += 1
            ticks.start(cur_nimg)
            if done:
                break
    data.close()
    pool.shutdown(wait=True)
    if world > 1:
        dist.barrier()
    log(done_line(cur_nimg - start_nimg, time.time() - ticks.start_time))


# --------------------------------------------------------------------------------------------------
# Generation and evaluation


def sampled_batches(cfg, seeds):
    """This rank's batches (seeds, uint8 samples (B, C, H, W)) of --network, drawn lazily: EDM
    generate.py's split of the seeds and sampler (18 Heun steps, fp32) unless flags say more."""
    require(cfg.network, '--network is required: network-snapshot-*.pt, an EDM .pkl, or a Hugging '
            'Face repo id or folder')
    rank, world, device = init_distributed(cfg.device)
    net, _ = load_network(cfg.network, device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision == 'bf16')
    label_dim = net.unet.label_dim
    require(cfg.class_idx < label_dim, f'--class must be < {label_dim}' if label_dim else
            '--class needs a class-conditional network; this one has no labels')
    num_batches = max((len(seeds) - 1) // (cfg.batch * world) + 1, 1) * world
    mine = [b.tolist() for b in torch.as_tensor(seeds).tensor_split(num_batches)[rank::world]]
    return ((b, sample_images(net, b, device, cfg, autocast)) for b in mine if b)


def generate(argv):
    """One PNG per seed; image k depends only on seed k (not on --batch or the GPU count)."""
    cfg = command_config('generate', argv)
    require(cfg.outdir, '--outdir is required (the folder that receives the PNGs)')
    seeds = parse_seeds(cfg.seeds)
    if cfg.dry_run:
        return print0(json.dumps(dataclasses.asdict(cfg), indent=2))
    check_writable(cfg.outdir, '--outdir')
    for batch_seeds, images in sampled_batches(cfg, seeds):
        for seed, image in zip(batch_seeds, images.cpu()):
            folder = os.path.join(cfg.outdir, f'{seed - seed % 1000:06d}') if cfg.subdirs else ''
            save_grid(image[None], os.path.join(folder or cfg.outdir, f'{seed:06d}.png'))
    if dist.is_initialized():
        dist.barrier()
    print0(f'Generated {len(seeds)} images in {cfg.outdir}')


def evaluate(argv):
    """Metrics (fid.py, one Inception pass) of --num samples of --network drawn in memory (seeds
    0..num-1), or of the images in --gen_path (official eval_fid.py). Prints them as JSON and
    appends them to metrics.jsonl beside the network, or writes --out_path (with --gen_path:
    fid_out.json, official keys). Every check runs before the long pass."""
    cfg = command_config('eval', argv)
    require(bool(cfg.gen_path) != bool(cfg.network), 'eval needs --network (sample from it) or '
            '--gen_path (a folder of images), not both')
    require(bool(cfg.ref) != bool(cfg.ref_path), 'eval needs --ref (official: --ref_stats; '
            'statistics .npz or URL) or --ref_path (reference images)')
    if cfg.dry_run:
        return print0(json.dumps(dataclasses.asdict(cfg), indent=2))
    metrics = (cfg.metrics or ('fid,is' if cfg.gen_path else 'fid')).split(',')
    out_path = cfg.out_path or ('fid_out.json' if cfg.gen_path else '')
    folder = os.path.dirname(os.path.abspath(cfg.network)) if os.path.isfile(cfg.network) else '.'
    check_writable(out_path or folder,
                   '--out_path' if out_path else 'metrics.jsonl beside --network')
    rank, world, device = init_distributed(cfg.device)
    try:
        ref = fid.load_ref(cfg.ref or cfg.ref_path)
        detector = fid.load_inception(cfg.fid_weights or None, device)
        source = fid.ImageSource(cfg.gen_path) if cfg.gen_path else None
        # eval_fid.py preprocesses as EDM (TF Inception on uint8) and uses the whole folder.
        preprocess = cfg.preprocess or ('tf' if cfg.gen_path and not cfg.protocol else None)
        num_given = any(arg.startswith('--num') for arg in argv)
        num = len(source) if source is not None and not num_given else cfg.num
        protocol = fid.resolve_protocol(cfg.protocol or None, preprocess, ref, metrics, detector,
                                        num=num, available=len(source) if source else None)
    except (ValueError, OSError, RuntimeError) as error:  # WeightsNotFoundError: a RuntimeError
        raise UserError(str(error)) from None
    if source is not None:
        indices = np.array_split(fid.select_images(len(source), protocol), world)[rank]
        batches = fid.image_batches(source, indices, cfg.batch, cfg.workers)
    else:
        seeds = list(range(protocol['num'] or cfg.num))
        batches = (images for _, images in sampled_batches(cfg, seeds))
    try:
        results = fid.compute_metrics(batches, ref, metrics=metrics, detector=detector,
                                      device=device, num_images=protocol['num'], protocol=protocol)
    except ValueError as error:  # found during the pass (an unreadable image)
        raise UserError(str(error)) from None
    if rank == 0:
        result = dict(network=cfg.network, gen_path=cfg.gen_path, num=protocol['num'],
                      steps=cfg.steps, S_churn=cfg.S_churn, ref=cfg.ref or cfg.ref_path, **results)
        if cfg.gen_path:  # the keys of the official fid_out.json
            result.update(fid_score=results.get('fid'), inception_score=results.get('is'))
        print(json.dumps(result))
        if out_path:
            nets.write_atomic(out_path, (json.dumps(result) + '\n').encode())
        else:
            with open(os.path.join(folder, 'metrics.jsonl'), 'a') as f:
                f.write(json.dumps(result) + '\n')


TITLE = ('How much is a noisy image worth? Data scaling laws for Ambient Diffusion (Daras, '
         'Cherapanamjeri, Daskalakis, ICLR 2025, arXiv:2411.02780).')


def train(argv):
    cfg = command_config('train', argv)
    require(cfg.data, '--data is required (image folder, zip, .npz or cifar10)')
    training_loop(cfg)


def main(argv=None):
    functions = {'train': train, 'generate': generate, 'eval': evaluate}
    run_main({name: (functions[name], text) for name, text in COMMANDS.items()}, argv, TITLE)


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
# Data: reading, the clean/noisy split, placement

def read_data(cfg):
    """(images (N, C, H, W) uint8, labels or None) through fid.read_image_set; square images."""
    try:
        # Stored channels, as the official loader: grey digits train a 1-channel network.
        x, y = fid.read_image_set(cfg.data, rgb=False, workers=cfg.workers)
    except (ValueError, OSError) as error:  # fid.InputError is a ValueError
        raise UserError(f'--data: {error}') from None
    require(x.shape[2] == x.shape[3], f'--data: {cfg.data}: images must be square, got height '
            f'{x.shape[2]} x width {x.shape[3]}')
    return x, y


def class_count(cfg, num_images, y):
    """The class count of a --cond run: --num_classes (labels below it), else K of labels 0..K-1."""
    require(y is not None,
            '--cond=true needs labels (dataset.json, class folders or `y` in the .npz)')
    y = np.asarray(y)
    require(y.shape == (num_images,) and y.dtype.kind in 'iu', f'--data: {cfg.data}: labels must '
            f'be {num_images} integer class ids, got {y.dtype} {y.shape}')
    bad = y.min() if y.min() < 0 else y.max()
    require(bad >= 0 and not (cfg.num_classes and bad >= cfg.num_classes), f'--data: {cfg.data}: '
            f'label {bad} is outside [0, {cfg.num_classes or "num_classes"})')
    distinct = len(np.unique(y))
    require(cfg.num_classes or y.max() + 1 == distinct, f'--data: {cfg.data}: labels are not '
            f'0..K-1 (largest {y.max()}, {distinct} distinct classes): pass --num_classes to '
            f'declare the count')
    return cfg.num_classes or int(y.max()) + 1


def peek_data(cfg):
    """(channels, resolution, label_dim, where from) for a dry run: no download, one image read."""
    if cfg.data == 'cifar10':
        return 3, 32, (10 if cfg.cond else 0), 'CIFAR-10'
    if not os.path.exists(cfg.data):
        size, classes = {'celeba64': (64, 0), 'imagenet64': (64, 1000)}.get(cfg.preset, (32, 10))
        return 3, size, (classes if cfg.cond else 0), f'--preset={cfg.preset} (no data here)'
    try:
        source = fid.ImageSource(cfg.data, rgb=False)
        channels, height, _ = source[0].shape
    except (ValueError, OSError) as error:
        raise UserError(f'--data: {error}') from None
    label_dim = class_count(cfg, len(source), source.labels) if cfg.cond else 0
    return channels, height, label_dim, f'{len(source)} images'


def prepare_data(cfg, log, pool):
    """The kept images (n, C, H, W) uint8 (x-flipped copies appended with --xflip), labels (n,),
    sigma_n (n,) float64, raw indices (n,) (the keys of their noise; a flipped copy keeps its
    image's) and the class count. Noisy images as ambient_utils' data set unless --noisy_count."""
    x, y = read_data(cfg)
    label_dim = class_count(cfg, len(x), y) if cfg.cond else 0
    # Official quirk: docs/ambient_laws.md#xflip-keep (max_size counts the flipped copies).
    raw_index = keep_subset(len(x), cfg.dataset_keep_percentage * (2 if cfg.xflip else 1))
    require(len(raw_index), '--dataset_keep_percentage keeps no image')
    p = cfg.corruption_probability
    if cfg.sigma_per_image:
        try:
            levels = np.load(cfg.sigma_per_image).astype(np.float32).reshape(-1)
        except Exception as error:
            raise UserError(f'--sigma_per_image: cannot read {cfg.sigma_per_image} '
                            f'({type(error).__name__}: {error})') from None
        require(len(levels) == len(x) and np.all(np.isfinite(levels) & (levels >= 0)),
                f'--sigma_per_image must hold {len(x)} finite values >= 0 (one per image), got '
                f'{len(levels)}')
        sigma_n = levels[raw_index].astype(np.float64)
    else:
        if cfg.noisy_count == 'exact':
            noisy = exact_noisy(raw_index, len(x), p, cfg.corruption_seed)
        elif cfg.sigma == 0 or p in (0, 1):  # u <= p decides nothing (u = 0 has probability 2^-53)
            noisy = np.full(len(raw_index), p > 0)
        else:  # the official per-pixel draws of shape (C, H, W)
            noisy = official_noisy(raw_index, x.shape[1:], p, pool)
        sigma_n = np.where(noisy, cfg.sigma, 0.0)
    log(f'Data: {len(x)} images of {x.shape[1:]} -> {len(raw_index)} kept, '
        f'{int((sigma_n > 0).sum())} noisy (sigma_n {sigma_n.max():.3g}), labels '
        f'{"used" if cfg.cond else "ignored"}' + (', x-flipped copies added' if cfg.xflip else ''))
    images = torch.from_numpy(x[raw_index])                                    # (n, C, H, W) uint8
    labels = y[raw_index].astype(np.int64) if cfg.cond else np.zeros(len(raw_index), np.int64)
    labels = torch.from_numpy(labels)
    if cfg.xflip:  # official: a flipped copy draws with its raw index: it keeps its noise unflipped
        images, labels = torch.cat([images, images.flip(3)]), labels.repeat(2)
        raw_index, sigma_n = np.tile(raw_index, 2), np.tile(sigma_n, 2)
    return images, labels, sigma_n, raw_index, label_dim


class TrainingData:
    """The kept images (uint8, on the GPU when they fit), their clean/noisy split and noise; the
    official NumPy noise of the next step is drawn by worker threads while this step runs."""

    def __init__(self, cfg, log, pool, device, rank, world):
        first = world > 1 and cfg.data == 'cifar10'  # rank 0 downloads first
        if first and rank != 0:
            dist.barrier()
        images, labels, self.sigma_host, self.raw_host, self.label_dim = prepare_data(cfg, log,
                                                                                      pool)
        if first and rank == 0:
            dist.barrier()
        self.cfg, self.pool, self.device, self.cuda = cfg, pool, device, device.type == 'cuda'
        fits = not self.cuda or images.numel() < 0.25 * torch.cuda.mem_get_info(device)[0]
        self.where = device if fits else torch.device('cpu')
        self.images, self.labels = images.to(self.where), labels.to(self.where)
        self.sigma_n = torch.from_numpy(self.sigma_host).to(self.where)
        self.raw_index = torch.from_numpy(self.raw_host).to(self.where)
        self.shape = tuple(images.shape[1:])
        self.add_noise = not cfg.already_noisy and bool(self.sigma_host.max() > 0)
        self.numpy_rng = self.add_noise and cfg.noise_rng == 'numpy'
        self.prefetch = concurrent.futures.ThreadPoolExecutor(1)
        self.next_noise = self.noise = None

    def start_noise(self, rows, cur_nimg):
        """rows (rounds, batch_gpu): this rank's rows of the global batch."""
        self.rows, self.rows_where = rows, rows.to(self.where)
        if self.numpy_rng:
            self.next_noise = self.prefetch.submit(self._numpy_noise, cur_nimg)

    def _numpy_noise(self, nimg):
        """The official noise of this rank's rows, (rounds, batch_gpu, C, H, W) float64, host."""
        index = batch_indices(nimg, self.cfg.batch, len(self.images), self.cfg.seed)
        positions = index[self.rows].reshape(-1).numpy()
        eps = numpy_noise(self.raw_host[positions], self.sigma_host[positions], self.shape,
                          self.pool)
        return (eps.pin_memory() if self.cuda else eps).view(*self.rows.shape, *self.shape)

    def step_index(self, cur_nimg):
        """Start the step at image cur_nimg: its data order and (official) noise."""
        index = batch_indices(cur_nimg, self.cfg.batch, len(self.images), self.cfg.seed)
        self.index = (index.pin_memory() if self.cuda else index).to(self.where, non_blocking=True)
        if self.numpy_rng:
            self.noise = self.next_noise.result().to(self.device, non_blocking=True)
            self.next_noise = self.prefetch.submit(self._numpy_noise, cur_nimg + self.cfg.batch)
        return self.index

    def observed(self, index, round_idx):
        """The observed images y (b, C, H, W) of one microbatch, their sigma_n (b,) and labels."""
        i = index[self.rows_where[round_idx]]
        sigma_n = self.sigma_n[i].to(self.device)
        labels = self.labels[i].to(self.device) if self.cfg.cond else None
        eps = self.noise[round_idx] if self.numpy_rng else None
        if self.add_noise and not self.numpy_rng:
            eps = image_noise(self.raw_index[i].to(self.device), self.shape,
                              self.cfg.corruption_seed)
        y = observe(self.images[i].to(self.device, non_blocking=True), sigma_n, eps)
        return y, sigma_n.float(), labels

    def preview(self, count=64):
        """uint8 (n, C, H, W): the first kept images as the network sees them, noisy ones noisy."""
        shown = np.arange(min(count, len(self.images)))
        eps = None
        if self.numpy_rng:
            eps = numpy_noise(self.raw_host[shown], self.sigma_host[shown], self.shape, self.pool)
            eps = eps.to(self.where)
        elif self.add_noise:
            eps = image_noise(self.raw_index[shown], self.shape, self.cfg.corruption_seed)
        seen = observe(self.images[shown], self.sigma_n[shown], eps)
        return (seen * 127.5 + 128).clip(0, 255).to(torch.uint8)

    def close(self):
        if self.next_noise is not None:
            self.next_noise.cancel()
        self.prefetch.shutdown(wait=True)


# --------------------------------------------------------------------------------------------------
# Data order, batch split, progress ticks


def derive_seed(*values):
    """A 63-bit seed from a tuple of non-negative ints (SeedSequence mixes them well)."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)
    return int(state[0] >> 1)


@functools.lru_cache(maxsize=2)
def epoch_permutation(num_images, seed, epoch):
    generator = torch.Generator().manual_seed(derive_seed(seed, 1, epoch))
    return torch.randperm(num_images, generator=generator)


def batch_indices(cur_nimg, batch, num_images, seed):
    """Data indices of the global batch at image cur_nimg: a seeded permutation per epoch."""
    epochs = range(cur_nimg // num_images, (cur_nimg + batch - 1) // num_images + 1)
    order = torch.cat([epoch_permutation(num_images, seed, e) for e in epochs])
    return order[torch.arange(cur_nimg, cur_nimg + batch) - epochs[0] * num_images]


def split_batch(cfg, world):
    """(batch_gpu, accumulation rounds) of the global batch over world processes."""
    batch_gpu = cfg.batch_gpu or cfg.batch // world
    require(cfg.batch % (world * batch_gpu) == 0 and batch_gpu <= cfg.batch // world,
            f'--batch={cfg.batch} must be divisible by GPUs x --batch_gpu = {world} x {batch_gpu}')
    return batch_gpu, cfg.batch // world // batch_gpu


class Ticks:
    """The progress line and one stats.jsonl entry once per tick, from the tick's summed stats."""

    def __init__(self, log, run_dir, rank, cfg, device, cur_nimg, total_nimg):
        self.log, self.run_dir, self.rank, self.cfg, self.device = log, run_dir, rank, cfg, device
        self.total_nimg, self.start_time = total_nimg, time.time()
        self.start(cur_nimg)

    def start(self, cur_nimg):
        self.tick_nimg, self.tick_time = cur_nimg, time.time()

    def due(self, cur_nimg):
        return cur_nimg >= self.tick_nimg + self.cfg.tick * 1000

    def report(self, s, cur_nimg, cur_tick, lr):
        now, cuda = time.time(), self.device.type == 'cuda'
        sec_per_kimg = (now - self.tick_time) / max(cur_nimg - self.tick_nimg, 1) * 1000
        mean = lambda key, count: s[key] / max(s[count], 1)  # noqa: E731
        e = dict(kimg=cur_nimg / 1000, tick=cur_tick, time=now - self.start_time,
                 sec_per_kimg=sec_per_kimg, lr=lr, loss=mean('loss', 'count'),
                 clean_loss=mean('clean_loss', 'clean'), noisy_loss=mean('noisy_loss', 'noisy'),
                 noisy_frac=mean('noisy', 'count'), noisy_used=mean('noisy_used', 'noisy'),
                 consistency=mean('consistency', 'consistency_rows'),
                 loss_by_sigma=[mean(f'bin{k}_loss', f'bin{k}') for k in range(4)],
                 gpumem_gb=torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if cuda else 0.0)
        eta = format_time((self.total_nimg - cur_nimg) / 1000 * sec_per_kimg)
        self.log(f'kimg {e["kimg"]:.1f} | time {format_time(e["time"])} | sec/kimg '
                 f'{sec_per_kimg:.2f} | ETA {eta} | loss {e["loss"]:.4f} | lr {lr:.1e} | img/s '
                 f'{1000 / sec_per_kimg:.0f} | gpumem {e["gpumem_gb"]:.1f}G | clean '
                 f'{e["clean_loss"]:.4f} | noisy {e["noisy_loss"]:.4f} | noisy_frac '
                 f'{e["noisy_frac"]:.2f} | noisy_used {e["noisy_used"]:.2f}'
                 + (f' | cons {e["consistency"]:.4f}' if self.cfg.consistency_coeff else '')
                 + ' | loss by sigma ' + '/'.join(f'{v:.3f}' for v in e['loss_by_sigma']))
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.rank == 0:
            with open(os.path.join(self.run_dir, 'stats.jsonl'), 'a') as f:
                f.write(json.dumps(e) + '\n')


# --------------------------------------------------------------------------------------------------
# Networks and checkpoints (the file formats: nets.read_ambient_laws_checkpoint and
# nets.load_ambient_laws_release)


def build_network(cfg, resolution, channels, label_dim):
    """EDMPrecond around a nets.UNet, and the UNet kwargs that rebuild it (saved in snapshots)."""
    kwargs = {**(ARCHES.get(cfg.arch) or nets.UNET_PRESETS[cfg.arch]),
              'img_resolution': resolution, 'in_channels': channels, 'out_channels': channels,
              'label_dim': label_dim, 'dropout': cfg.dropout,
              'augment_dim': 9 if cfg.augment > 0 else 0}  # EDM: the 9 augmentation labels
    if cfg.cbase:
        kwargs['model_channels'] = cfg.cbase
    if cfg.cres:
        kwargs['channel_mult'] = tuple(int(c) for c in cfg.cres.split(','))
    return EDMPrecond(nets.UNet(**kwargs), cfg.sigma_data), kwargs


def read_state(path):
    """A training state of ours (nets.read_ambient_laws_checkpoint), or one line (UserError)."""
    try:
        return nets.read_ambient_laws_checkpoint(path, 'state')
    except (ValueError, OSError) as error:
        raise UserError(f'--resume: {error}') from None


def load_network(source, device, flag='--network'):
    """(EDMPrecond in eval mode, config dict) from our network-snapshot-*.pt (or training state),
    or a released checkpoint: an EDM-style .pkl (path or URL), a Hugging Face repo id or folder."""
    source = os.fspath(source)
    ours = os.path.isfile(source) and not source.endswith('.pkl')
    try:
        if ours:
            data = nets.read_ambient_laws_checkpoint(source)
            config = data['config']
            make = lambda: EDMPrecond(nets.UNet(**data['net_kwargs']),  # noqa: E731
                                      float(config.get('sigma_data', 0.5)))
            net = nets.build_checked(make, data['ema'], source)
        else:
            unet, precond, config = nets.load_ambient_laws_release(source)
            net = EDMPrecond(unet, **precond)
    except (ValueError, OSError, RuntimeError, KeyError) as error:  # incl. WeightsNotFoundError
        raise UserError(f'{flag}: {"" if ours else f"cannot load {source}: "}{error}') from None
    cuda = torch.device(device).type == 'cuda'  # NHWC convolutions on tensor cores
    net.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    return net.eval().requires_grad_(False), config


def dry_run(cfg, log, world, batch_gpu, rounds):
    """Print the config and the network (on the meta device): no download, no file written."""
    channels, resolution, label_dim, source = peek_data(cfg)
    with torch.device('meta'):
        net, kwargs = build_network(cfg, resolution, channels, label_dim)
    log(json.dumps(dataclasses.asdict(cfg), indent=2))
    log(f'Network: arch {kwargs["arch"]} ({cfg.arch}), model_channels {kwargs["model_channels"]}, '
        f'channel_mult {list(kwargs["channel_mult"])}, {resolution}x{resolution}x{channels} '
        f'({source}), label_dim {label_dim}, {sum(p.numel() for p in net.parameters()):,} '
        f'parameters; batch {cfg.batch} = {world} x {rounds} x {batch_gpu}')
    log('Dry run; exiting.')


# --------------------------------------------------------------------------------------------------
# Run folder, resume, saves

def run_desc(cfg):
    """The run folder's description: data, arch and the corruption."""
    data = os.path.splitext(os.path.basename(cfg.data.rstrip('/')))[0]
    return (f'{data}-{cfg.arch}-sigma{cfg.sigma:g}-p{cfg.corruption_probability:g}-'
            f'keep{cfg.dataset_keep_percentage:g}'
            + (f'-cc{cfg.consistency_coeff:g}' if cfg.consistency_coeff else '')
            + (f'-{cfg.desc}' if cfg.desc else ''))


def check_start(cfg, world, device):
    """Checks before any write (--outdir, --resume=PATH, --transfer) and the seed (-1: drawn once).
    Returns (cfg with its seed, state or None, transfer weights or None, the resumable fields)."""
    check_writable(cfg.outdir, '--outdir')
    state = transfer = None
    if cfg.resume and cfg.resume != 'auto':
        name = os.path.basename(cfg.resume)
        require(STATE_NAME.fullmatch(name) or not os.path.isfile(cfg.resume),
                f'--resume must point to training-state-*.pt (or be auto), not {cfg.resume}')
        state = read_state(cfg.resume)
    if cfg.transfer:
        transfer = load_network(cfg.transfer, 'cpu', '--transfer')[0].state_dict()
    resumable = RESUMABLE_FIELDS | {'transfer'} | SAMPLING_FIELDS
    if cfg.seed == -1:  # official default: a random seed; --resume=auto adopts the run's
        resumable |= {'seed'}
        drawn = torch.tensor(int.from_bytes(os.urandom(4), 'little') >> 1, device=device)
        if world > 1:
            dist.broadcast(drawn, 0)
        cfg = dataclasses.replace(cfg, seed=int(drawn))
    return cfg, state, transfer, resumable


def load_start(cfg, run, state, transfer, resumable, net, ema, optimizer):
    """Loads the state to continue (with --seed=-1 adopting its seed) or the --transfer weights.
    Returns (cfg, state, cur_nimg, cur_tick, transferred)."""
    if run.state and state is None:
        state = read_state(run.state)
    if state is not None and 'seed' in resumable:
        cfg = dataclasses.replace(cfg, seed=int(state['config'].get('seed', cfg.seed)))
    try:
        if state is not None:
            net.load_state_dict(state['net'])
            ema.load_state_dict(state['ema'])
            optimizer.load_state_dict(state['optimizer'])
            return (cfg, state, int(state['cur_nimg']), int(state['cur_tick']),
                    bool(state.get('transferred')))
        if transfer is not None:  # official: the matching EMA tensors, into net and EMA
            net.load_state_dict(transfer, strict=False)
            ema.load_state_dict(transfer, strict=False)
    except Exception as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f'{"--resume" if state is not None else "--transfer"}: '
                        f'{cfg.resume or cfg.transfer} does not fit this network ({reason}): pass '
                        f'the flags it was trained with (--arch, --cbase, --cres, --cond, ...)'
                        ) from None
    return cfg, state, 0, 0, transfer is not None


def save_state(run_dir, net, ema, optimizer, net_kwargs, cfg, cur_nimg, transferred, cur_tick):
    """training-state-<kimg>.pt (rank 0): model, EMA, optimizer, progress. Returns its path."""
    path = os.path.join(run_dir, f'training-state-{kimg_tag(cur_nimg)}.pt')
    if get_rank() == 0:
        save_training_state(path, dict(
            ema=ema.state_dict(), net_kwargs=net_kwargs, config=dataclasses.asdict(cfg),
            cur_nimg=cur_nimg, net=net.state_dict(), optimizer=optimizer.state_dict(),
            cur_tick=cur_tick, transferred=transferred))
    return path


def save_snapshot(run_dir, ema, net_kwargs, cfg, cur_nimg, device, autocast):
    """network-snapshot-<kimg>.pt (EMA weights + how to rebuild them) and samples-<kimg>.png."""
    tag = kimg_tag(cur_nimg)
    snapshot = dict(ema=ema.state_dict(), net_kwargs=net_kwargs, config=dataclasses.asdict(cfg),
                    cur_nimg=cur_nimg)
    nets.write_atomic(os.path.join(run_dir, f'network-snapshot-{tag}.pt'),
                      lambda file: torch.save(snapshot, file))
    grid = sample_images(ema, list(range(cfg.grid)), device, cfg, autocast)
    save_grid(grid, os.path.join(run_dir, f'samples-{tag}.png'), columns=8)


# --------------------------------------------------------------------------------------------------
# The flags of each command, and the official flags (giannisdaras/ambient-laws train.py,
# generate.py, eval_fid.py) with what they do here

SAMPLING_FIELDS = {'steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max',
                   'S_noise', 'stop_variance'}
_ALL = [field.name for field in dataclasses.fields(Config)]
_SAMPLING = [f for f in _ALL if f in SAMPLING_FIELDS]
FIELDS = {
    'train': _ALL[:_ALL.index('device') + 1] + _SAMPLING,
    'generate': ['network', 'outdir', 'seeds', 'subdirs', 'class_idx', 'batch', 'precision',
                 'device', 'dry_run'] + _SAMPLING,
    'eval': ['network', 'batch', 'precision', 'device', 'workers', 'dry_run'] + _SAMPLING
            + _ALL[_ALL.index('gen_path'):],
}
COMMAND_DEFAULTS = {'generate': dict(batch=64, outdir=''), 'eval': dict(batch=64)}  # official
SAME = ['outdir', 'data', 'cond', 'batch', 'cbase', 'cres', 'lr', 'dropout', 'augment', 'xflip',
        'ls', 'bench', 'workers', 'desc', 'nosubdir', 'tick', 'snap', 'dump', 'seed', 'transfer',
        'resume', 'expr_id', 'weight_decay', 'sigma', 'corruption_probability',
        'dataset_keep_percentage', 'consistency_coeff', 'consistency_batch_size', 'with_weight',
        'with_grad', 'num_consistency_steps', 'num_primes']
ABLATION = "EDM's ablation sampler is not implemented; use "
OFFICIAL_FLAGS = {
    'train': {
        **{f'--{name}': ours(name) for name in SAME},
        '--arch': ours('arch', refuse={'ncsnpp': 'nets.UNet has no NCSN++ (Fourier embedding, '
                                                 'residual encoder); use --arch=ddpmpp'}),
        '--precond': ignored('edm, which the official train.py asserts too', type=str,
                             group='network', refuse={v: 'the official train.py asserts edm; use '
                                                      '--precond=edm' for v in ('vp', 've')}),
        # EDM train.py's conversions: max(int(duration * 1000), 1) and int(ema * 1000).
        '--duration': ours('kimg', lambda v: max(int(v * 1000), 1),
                           'Mimg -> kimg, max(int(x 1000), 1)', type=float),
        '--ema': ours('ema_halflife_kimg', lambda v: int(v * 1000), 'Mimg -> kimg, int(x 1000)',
                      type=float),
        '--batch-gpu': ours('batch_gpu'),
        '--fp16': ignored('fp32 networks; bf16 autocast with --precision=bf16', type=parse_bool,
                          refuse={True: 'FP16 networks are not implemented; use --precision=bf16'}),
        '--cache': ignored('the data set is always in memory', type=parse_bool,
                           group='data and corruption',
                           refuse={False: 'the data set is always held in memory (uint8, on the '
                                          'GPU when it fits); use --cache=True'}),
        '-n': ours('dry_run'), '--dry-run': ours('dry_run'),
    },
    'generate': {
        **{f'--{name}': ours(name) for name in ['network', 'outdir', 'subdirs', 'seeds', 'batch']
           + _SAMPLING},
        '--class': ours('class_idx'),
        '--solver': refused(ABLATION + "the default Heun sampler (generate.py's edm_sampler)",
                            group='sampling'),
        '--disc': refused(ABLATION + "--steps, --sigma_min, --sigma_max and --rho (EDM's grid)",
                          group='sampling'),
        '--schedule': refused(ABLATION + "the default sampler (EDM's sigma(t) = t)", 'sampling'),
        '--scaling': refused(ABLATION + "the default sampler (EDM's s(t) = 1)", group='sampling'),
    },
    'eval': {'--gen_path': ours('gen_path'), '--ref_path': ours('ref_path'),
             '--ref_stats': ours('ref'), '--batch_size': ours('batch'),
             '--out_path': ours('out_path')},
}
COMMANDS = {'train': 'train on a mix of clean and noisy images (the default command)',
            'generate': 'one PNG per seed from a network (ours, an EDM .pkl or a Hugging Face '
                        'checkpoint)',
            'eval': "FID (and IS, ...) of a network's samples, drawn in memory, or of a folder of "
                    "images (--gen_path)"}


def command_config(command, argv):
    """The checked Config of one command from its command line (presets: train only)."""
    presets = PRESETS if command == 'train' else dict.fromkeys(PRESETS, {})
    return check_config(parse_config(command, Config, argv, OFFICIAL_FLAGS[command], presets,
                                     FIELDS[command], COMMAND_DEFAULTS.get(command),
                                     COMMANDS[command]))


def check_config(cfg):
    """Every range checked before anything is written; returns a new Config, cfg unchanged."""
    official_seeded = (cfg.noisy_count == 'random' and cfg.noise_rng == 'numpy'
                       and not cfg.sigma_per_image)
    for name, allowed in (('noisy_count', ('random', 'exact')), ('noise_rng', ('numpy', 'device')),
                          ('consistency_rows', ('per_gpu', 'global'))):
        require(getattr(cfg, name) in allowed, f'--{name} must be {" or ".join(allowed)}')
    require(cfg.precision in ('', 'fp32', 'bf16'), '--precision must be fp32 or bf16')
    require(cfg.sigma >= 0, '--sigma must be >= 0')
    require(0 <= cfg.corruption_probability <= 1, '--corruption_probability must be in [0, 1]')
    require(0 < cfg.dataset_keep_percentage <= 1, '--dataset_keep_percentage must be in (0, 1]')
    require(cfg.num_classes >= 0, '--num_classes must be >= 0')
    require(not cfg.sigma_per_image or (cfg.sigma == 0 and cfg.corruption_probability == 0),
            '--sigma_per_image replaces --sigma and --corruption_probability: leave those at 0')
    require(not cfg.already_noisy or cfg.sigma_per_image or cfg.corruption_probability == 1,
            '--already_noisy needs --sigma_per_image or --corruption_probability=1')
    require(not official_seeded or cfg.corruption_seed == 0,
            '--corruption_seed needs --noisy_count=exact or --noise_rng=device (the official '
            'data set is seeded by the image index alone)')
    require(cfg.consistency_coeff >= 0, '--consistency_coeff must be >= 0')
    require(cfg.consistency_batch_size >= 1 and cfg.num_primes >= 1,
            '--consistency_batch_size and --num_primes must be >= 1')
    require(cfg.num_consistency_steps >= 2, '--num_consistency_steps must be >= 2')
    require(cfg.arch in ARCHES or cfg.arch in nets.UNET_PRESETS,
            f'--arch must be ddpmpp or adm (official) or one of {", ".join(nets.UNET_PRESETS)}')
    require(re.fullmatch(r'(\d+,)*\d+|', cfg.cres), '--cres must look like 1,2,2,2')
    require(0 <= cfg.dropout <= 1, '--dropout must be in [0, 1]')
    require(0 <= cfg.augment <= 1, '--augment must be in [0, 1]')
    require(cfg.kimg > 0 and cfg.tick > 0 and min(cfg.snap, cfg.dump, cfg.grid) >= 1,
            '--kimg, --tick must be > 0; --snap, --dump, --grid >= 1')
    require(cfg.batch >= 1 and cfg.batch_gpu >= 0, '--batch must be >= 1 and --batch_gpu >= 0')
    require(cfg.lr > 0 and cfg.lr_rampup_kimg >= 0 and cfg.weight_decay >= 0,
            '--lr must be > 0, --lr_rampup_kimg and --weight_decay >= 0')
    require(cfg.ema_halflife_kimg >= 0 and cfg.ema_rampup_ratio >= 0,
            '--ema_halflife_kimg and --ema_rampup_ratio must be >= 0')
    require(cfg.ls > 0, '--ls must be > 0')
    require(cfg.steps >= 1 and 0 < cfg.sigma_min < cfg.sigma_max and cfg.rho > 0,
            'need --steps >= 1, 0 < --sigma_min < --sigma_max and --rho > 0')
    require(min(cfg.S_churn, cfg.S_min, cfg.S_max, cfg.stop_variance) >= 0,
            '--S_churn, --S_min, --S_max and --stop_variance must be >= 0')
    require(cfg.workers >= 1 and cfg.num >= 2, '--workers must be >= 1 and --num >= 2')
    require(not (cfg.resume and cfg.transfer), '--resume and --transfer cannot be used together')
    require(cfg.seed >= -1, '--seed must be >= 0 (or -1 = random)')
    return dataclasses.replace(cfg)


if __name__ == "__main__":
    main()
