"""Ambient Diffusion: Learning Clean Distributions from Corrupted Data.

Giannis Daras, Kulin Shah, Yuval Dagan, Aravind Gollakota, Alexandros G. Dimakis, Adam Klivans.
NeurIPS 2023, arXiv:2305.19256. Official code (EDM-based): github.com/giannisdaras/ambient-diffusion

Every training image is seen only through a fixed random inpainting mask A (each pixel erased with
probability p). Ambient Diffusion erases more with a second mask B (probability delta),
A_tilde = B A, shows the network only A_tilde x_t and A_tilde, and asks it to predict the image on
every pixel that A keeps. The network cannot tell which of its hidden pixels A kept, so the
minimiser is E[x0 | A_tilde x_t, A_tilde] on every pixel: a clean-data denoiser, learned without a
clean image. Sampling runs EDM's Heun sampler with that denoiser under one fixed mask. The rest is
EDM (Karras et al. 2022). Commands, presets, official flags and the official code's quirks:
docs/ambient.md.

CPU smoke run (1-2 minutes); eight GPUs on CIFAR-10 (drop `torchrun ... 8` for one GPU); then FID:
    python ambient.py --preset=tiny --data=tests/data/cifar10_tiny.npz --corruption_probability=0.6 --kimg=2
    torchrun --standalone --nproc_per_node=8 ambient.py --preset=cifar10 --data=cifar10 --corruption_probability=0.6
    python fid.py ref --protocol=edm --data=cifar10 --dest=fid-refs/cifar10.npz
    torchrun --standalone --nproc_per_node=8 -- ambient.py eval --network=NET.pt --ref=fid-refs/cifar10.npz
The official train.py, eval.py and find_dataset_neighbors.py command lines run as written with
`ambient.py train`, `eval` and `neighbors` in their place.

Read in this order: corruption_masks, ambient_loss, Precond, ambient_sampler, training_loop, main.
"""

import argparse
import atexit
import contextlib
import copy
import dataclasses
import errno
import glob
import inspect
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import threading
import time

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

import fid
import nets

# --------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class Config:
    # Data and corruption.
    data: str = ''                        # image folder, EDM zip, .npz (x, y) or cifar10 (required)
    cond: bool = False                    # class-conditional on dataset labels
    num_classes: int = 0                  # labels lie in [0, num_classes); 0 = largest label + 1
    max_size: int = 0                     # keep this many images (official RandomState(0) subset)
    xflip: bool = False                   # add x-flipped copies of every image (twice as long)
    corruption_probability: float = 0.4   # p: chance that A erases a pixel (dust), or the box size
    delta_probability: float = 0.1        # delta: chance that B erases a pixel A kept
    mask_full_rgb: bool = False           # erase a pixel's channels together (dust)
    corruption_pattern: str = 'dust'      # dust, box, fixed_box or keep_patch (official patterns)
    mask_seed: int = 0                    # 0 = the official masks (seeded by image index)
    resample_delta: bool = False          # draw B afresh every step (paper); official: per image
    augment: float = 0.12                 # EDM augmentation probability
    augment_mode: str = 'official'        # official: augment, then mask; joint: image and masks
    workers: int = 1                      # threads decoding images (official: DataLoader processes)
    cache_dir: str = ''                   # downloads: cifar10 and --transfer URLs
    # Network.
    arch: str = 'ddpmpp'                  # ddpmpp (EDM DDPM++) or a preset of nets.UNET_PRESETS
    cbase: int = 0                        # model_channels, 0 = the arch's (128)
    cres: str = ''                        # channel_mult such as 1,2,2,2; empty = the arch's (2,2,2)
    dropout: float = 0.13                 # dropout probability
    gated: bool = True                    # gated convolutions, gate = sigmoid(sigmoid(conv))
    precond: str = 'ambient'              # ambient: input and mask channels; edm: naive baseline
    sigma_data: float = 0.5               # EDM preconditioning (training/networks.py constant)
    transfer: str = ''                    # start from a snapshot (.pkl / .pt, path or URL)
    # Optimisation.
    norm: int = 2                         # 2 = squared error, 1 = absolute error (times lambda)
    P_mean: float = -1.2                  # mean of ln(sigma) during training (EDM constant)
    P_std: float = 1.2                    # std of ln(sigma) during training (EDM constant)
    batch: int = 512                      # global batch
    batch_gpu: int = 0                    # per-GPU microbatch, 0 = batch / GPUs (accumulate)
    lr: float = 1e-3                      # learning rate (official 10e-4)
    lr_rampup_kimg: float = 10000         # linear warm-up (training_loop.py constant)
    weight_decay: float = 0.0             # > 0 switches Adam to AdamW
    max_grad_norm: float = 0.0            # gradient clipping, 0 = off (official None)
    ema: float = 0.5                      # EMA half-life in Mimg
    ema_rampup_ratio: float = 0.05        # half-life <= ratio x images seen, 0 = off (EDM constant)
    kimg: float = 200000                  # training length in kimg
    ls: float = 1.0                       # loss scaling
    # Run.
    outdir: str = 'runs'                  # run folders go here
    desc: str = ''                        # extra words for the run folder name
    nosubdir: bool = False                # write into --outdir itself, not a numbered run folder
    tick: float = 50                      # kimg between progress lines
    snap: int = 50                        # ticks between snapshots
    dump: int = 500                       # ticks between kept training states (others replaced)
    seed: int = 0                         # training seed (data order, noise, augmentation, dropout)
    resume: str = ''                      # training-state-*.pt path, or auto
    precision: str = ''                   # bf16 or fp32 (default: bf16 on CUDA, fp32 on CPU)
    bench: bool = True                    # cuDNN benchmarking
    compile: bool = False                 # torch.compile the network
    device: str = ''                      # cuda or cpu (default: cuda when available)
    experiment_name: str = ''             # a name kept in config.json (official: wandb run name)
    dry_run: bool = False                 # print the resolved config and network, then exit
    # Sampling: the progress grids (generate, eval and neighbors have their own flags).
    steps: int = 18                       # Heun steps (35 network evaluations)
    grid: int = 64                        # images in the progress grid


# Official recipes (docs/ambient.md#presets). celeba64 is the README command; cifar10 and afhq64
# have none, so they take train.py's defaults (= EDM CIFAR-10) and EDM's AFHQv2-64 settings.
PRESETS = {
    'cifar10': dict(arch='ddpmpp-cifar10', batch=512, lr=1e-3, dropout=0.13, augment=0.12,
                    mask_full_rgb=True, max_grad_norm=1.0, cond=True),
    'celeba64': dict(arch='ddpmpp-64', batch=256, lr=2e-4, dropout=0.1, augment=0.15,
                     mask_full_rgb=True, max_grad_norm=1.0, max_size=30000),
    'afhq64': dict(arch='ddpmpp-64', batch=256, lr=2e-4, dropout=0.25, augment=0.15,
                   mask_full_rgb=True, max_grad_norm=1.0),
    'tiny': dict(arch='tiny', cbase=16, cres='1,2,2', batch=16, lr=2e-3, lr_rampup_kimg=0.1,
                 dropout=0.0, augment=0.12, ema=0.0005, kimg=2, tick=0.5, snap=2, dump=4, grid=16,
                 steps=10, mask_full_rgb=True, workers=4),
}
PATTERNS = ('dust', 'box', 'fixed_box', 'keep_patch')


# --------------------------------------------------------------------------------------------------
# Corruption: fixed masks A and A_tilde = B A per image


def corruption_masks(raw_indices, image_shape, corruption_probability, delta_probability,
                     mask_full_rgb, mask_seed=0, pattern='dust'):
    """The corruption A (what the dataset keeps) and its further corruption A_tilde = B A (what the
    network is shown), fixed per image. dust: A_ij ~ Bernoulli(1 - p), B_ij ~ Bernoulli(1 - delta);
    box, fixed_box, keep_patch: boxes (docs/ambient.md#masks). Image i draws from generators seeded
    by its raw index i, so mask_seed=0 gives the official dataset; other values redraw it.

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
            seed = int(index) if mask_seed == 0 else derive_seed(mask_seed, index)
            A[row], A_tilde[row] = box_masks(pattern, height, width, p, delta,
                                             torch.Generator().manual_seed(seed))
    if size == (height, width):
        A, A_tilde = A[:, None], A_tilde[:, None]
    return torch.from_numpy(A), torch.from_numpy(A_tilde)


def box_masks(pattern, height, width, p, delta, generator):
    """One image's (A, A_tilde) of the box patterns, (H, W) bool each, with the official sizes and
    order of draws (corner row, then column; A first). Official quirks: docs/ambient.md#masks."""
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    draw = lambda high: int(torch.randint(0, high, (1,), generator=generator))  # noqa: E731

    def square(size_h, size_w, high_row, high_col):  # True inside a box with a random corner
        top, left = draw(high_row), draw(high_col)
        return (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)
    # box: A erases a box of ceil(p H) x ceil(p W), A_tilde a second one of the same size.
    if pattern == 'box':
        # Official quirk: sizes through a float32 tensor, B sized by p (docs/ambient.md#masks).
        box_h, box_w = (int(torch.tensor((1 - (1 - p)) * n).ceil()) for n in (height, width))
        A = ~square(box_h, box_w, height, width)
        return A, A & ~square(box_h, box_w, height, width)
    # fixed_box: int(p H) squares inside the image; B only when delta > 0.
    if pattern == 'fixed_box':
        patch = int(p * height)
        A = ~square(patch, patch, width - patch, height - patch)  # official: W for rows, H for cols
        return A, A & ~square(patch, patch, width - patch, height - patch) if delta > 0 else A
    # keep_patch: the kept int((1 - p) H) square, and an int((1 - delta) size) square inside it.
    patch = int((1 - p) * height)
    hat = int((1 - delta) * patch)
    A = square(patch, patch, width - patch, height - patch)
    top, left = draw(patch - hat), draw(patch - hat)
    inside = (rows >= top) & (rows < top + hat) & (cols >= left) & (cols < left + hat)
    A_tilde = np.zeros_like(A)
    A_tilde[A] = inside[:patch, :patch].reshape(-1)
    return A, A_tilde


def check_pattern(pattern, resolution, p, delta):
    """keep_patch sizes that the official draws cannot handle (an empty randint range): one line."""
    if pattern == 'keep_patch':
        patch = int((1 - p) * resolution)
        if not 0 < patch < resolution or int((1 - delta) * patch) >= patch:
            raise UserError(f'--corruption_pattern=keep_patch at {resolution}x{resolution} needs a '
                            f'kept square of 0 < int((1 - p) x {resolution}) < {resolution} pixels '
                            f'and a smaller one inside it (int((1 - delta) x size)), got {patch} '
                            f'and {int((1 - delta) * patch)}')


# --------------------------------------------------------------------------------------------------
# Loss: predict the image on every pixel A keeps from its further corrupted version


def ambient_loss(net, y, A, A_tilde, labels=None, augment_labels=None, norm=2, P_mean=-1.2,
                 P_std=1.2, sigma_data=0.5, rnd_normal=None, eps=None):
    """The Ambient Diffusion objective with EDM's noise levels and weighting, per image:
        J = lambda(sigma) sum_pixels A |D([A_tilde x_t, A_tilde], sigma)[:C] - y|^norm,
        x_t = y + sigma eps, ln sigma ~ N(P_mean, P_std^2), lambda = 1 / c_out^2.
    Its minimiser is E[x0 | A_tilde x_t, A_tilde] on every pixel (docs/ambient.md#loss).
    y: (B, C, H, W) in [-1, 1]; A, A_tilde: (B, C or 1, H, W) in {0, 1}; rnd_normal: (B,) and
    eps: (B, C, H, W) standard normal draws (drawn when None). Returns (B,), summed over pixels."""
    if rnd_normal is None:
        rnd_normal = torch.randn(y.shape[0], device=y.device)
    if eps is None:
        eps = torch.randn_like(y)
    sigma = (rnd_normal * P_std + P_mean).exp().reshape(-1, 1, 1, 1)          # (B, 1, 1, 1)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    # Noise, then the mask (official order); D reads [A_tilde x_t, A_tilde] (keyword arguments, as
    # EDM's preconditioners take them: docs/ambient.md#loss).
    A_tilde = A_tilde.expand_as(y)
    x_t = A_tilde * (y + sigma * eps)                                         # (B, C, H, W)
    D = net(torch.cat([x_t, A_tilde], dim=1), sigma.flatten(), class_labels=labels,
            augment_labels=augment_labels)                                    # (B, 2C, H, W)
    # Score every pixel A keeps, including those B hid; pixels A erased never enter.
    error = D[:, :y.shape[1]] - y                                             # (B, C, H, W)
    return (weight * A * (error.square() if norm == 2 else error.abs())).flatten(1).sum(1)  # (B,)


def edm_loss(net, y, labels=None, augment_labels=None, P_mean=-1.2, P_std=1.2, sigma_data=0.5,
             rnd_normal=None, eps=None):
    """EDM's loss (Karras et al. 2022, Eq. 2, Table 1 weighting), the paper's naive baseline: on
    masked images A x0 it learns E[A x0 | x_t], which fills erased pixels with zeros.
    y: (B, C, H, W); other arguments as ambient_loss. Returns (B,), summed over pixels."""
    if rnd_normal is None:
        rnd_normal = torch.randn(y.shape[0], device=y.device)
    if eps is None:
        eps = torch.randn_like(y)
    sigma = (rnd_normal * P_std + P_mean).exp().reshape(-1, 1, 1, 1)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    D = net(y + sigma * eps, sigma.flatten(), class_labels=labels, augment_labels=augment_labels)
    return (weight * (D - y).square()).flatten(1).sum(1)


# --------------------------------------------------------------------------------------------------
# Preconditioning: EDM's, around nets.UNet (DDPM++ with the official gated convolutions)


class Precond(torch.nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1): D(x, sigma) = c_skip x + c_out
    F(c_in x, c_noise). For Ambient Diffusion x = [A_tilde x_t, A_tilde] has 2C channels; the
    scalings act on all of them (official) and the caller keeps the first C outputs."""

    def __init__(self, unet, sigma_data=0.5):
        super().__init__()
        self.unet, self.sigma_data = unet, sigma_data

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        x = x.to(torch.float32)                                               # (B, 2C, H, W)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)                  # (B, 1, 1, 1)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4
        memory_format = torch.channels_last if x.is_cuda else torch.contiguous_format
        F_x = self.unet((c_in * x).contiguous(memory_format=memory_format), c_noise,
                        class_labels=class_labels, augment_labels=augment_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)


# --------------------------------------------------------------------------------------------------
# Sampler: EDM's Heun with the fixed-mask denoiser, optional reconstruction guidance


def ambient_sampler(net, latents, masks=None, class_labels=None, num_steps=18, sigma_min=0.002,
                    sigma_max=80, rho=7, guidance_scale=0.0, clip=True, S_churn=0, S_min=0,
                    S_max=float('inf'), S_noise=1, randn_like=torch.randn_like):
    """The paper's fixed-mask sampler: EDM's Heun sampler (Karras et al. 2022, Algorithm 2) with
    D_hat(x, t) = clip(D([M x, M], t)[:C]) under one sampling mask M for all steps. With K > 1
    masks and guidance_scale w, each step also moves by -w grad_x R(x),
    R = K/2 sum_k ||D_hat_1(x) - D_hat_k(x)||^2. masks=None: plain EDM Heun (precond=edm).
    Official-code details (clip, churn, guidance): docs/ambient.md#sampler.
    latents: (B, C, H, W); masks: (K, B, C, H, W) in {0, 1} or None. Returns (B, C, H, W)
    float64."""
    channels = latents.shape[1]
    use_guidance = masks is not None and len(masks) > 1 and guidance_scale != 0

    def denoise(x, t, mask):
        inputs = x if mask is None else torch.cat([mask * x, mask], dim=1)
        sigma = t.to(torch.float32).expand(x.shape[0])                        # (B,), no host sync
        D = net(inputs.to(torch.float32), sigma, class_labels=class_labels)
        D = D.to(torch.float64)[:, :channels]                                 # (B, C, H, W)
        if not clip:
            return D
        # Official clip: s = max(0.99th percentile of |D|, 1) per image (docs/ambient.md#clip).
        s = D.detach().abs().flatten(1).quantile(0.0099, dim=1).clamp(min=1).reshape(-1, 1, 1, 1)
        return torch.minimum(torch.maximum(D, -s), s) / s

    def step(x, t, h):
        """h * dx/dt at (x, t), minus the guidance gradient."""
        if not use_guidance:
            with torch.no_grad():
                return h * (x - denoise(x, t, None if masks is None else masks[0])) / t
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            D = torch.stack([denoise(x, t, mask) for mask in masks])          # (K, B, C, H, W)
            # K/2, not 1/2: each difference counts K times (docs/ambient.md#guidance).
            R = 0.5 * len(masks) * (D[0] - D[1:]).square().sum()
            grad = torch.autograd.grad(R, x)[0]
        return h * (x.detach() - D[0].detach()) / t - guidance_scale * grad

    # EDM time steps (Karras et al. 2022, Eq. 5), t_N = 0; the churn per step is decided on the CPU.
    step_index = torch.arange(num_steps, dtype=torch.float64)
    t_max, t_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    t_steps = (t_max + step_index / (num_steps - 1) * (t_min - t_max)) ** rho
    t_steps = torch.cat([t_steps, torch.zeros(1).double()])
    gammas = [min(S_churn / num_steps, math.sqrt(2) - 1) if S_churn > 0 and S_min <= t <= S_max
              else 0.0 for t in t_steps[:-1].tolist()]
    t_steps = t_steps.to(latents.device)

    x = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        # Increase the noise temporarily (S_churn > 0; official: noise drawn at every step then).
        t_hat, x_hat = t_cur, x
        if S_churn > 0:
            t_hat = t_cur * (1 + gammas[i])
            x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x)
        # Euler step; official quirk: from x, not from the noised x_hat (docs/ambient.md#churn).
        euler = step(x_hat, t_hat, t_next - t_hat)
        x_next = x + euler
        # Heun correction, except on the last step to t = 0.
        if i < num_steps - 1:
            x_next = x_hat + 0.5 * (euler + step(x_next, t_next, t_next - t_hat))
        else:
            x_next = x_hat + euler
        x = x_next
    return x


# --------------------------------------------------------------------------------------------------
# Training


def network_config(cfg, resolution, channels, label_dim):
    """Everything a snapshot needs to rebuild the network and sample from it."""
    preset = 'ddpmpp-cifar10' if cfg.arch == 'ddpmpp' else cfg.arch
    # The official network reads [A_tilde x_t, A_tilde] and writes 2C channels; EDM gives it
    # augment labels only when it augments.
    img_channels = channels * (2 if cfg.precond == 'ambient' else 1)
    unet = dict(nets.UNET_PRESETS[preset], img_resolution=resolution, dropout=cfg.dropout,
                label_dim=label_dim, gated=cfg.gated, augment_dim=9 if cfg.augment > 0 else 0,
                in_channels=img_channels, out_channels=img_channels)
    if cfg.cbase:
        unet['model_channels'] = cfg.cbase
    if cfg.cres:
        unet['channel_mult'] = [int(c) for c in cfg.cres.split(',')]
    return dict(unet=unet, precond=cfg.precond, sigma_data=cfg.sigma_data, channels=channels,
                corruption_probability=cfg.corruption_probability,
                delta_probability=cfg.delta_probability, mask_full_rgb=cfg.mask_full_rgb,
                corruption_pattern=cfg.corruption_pattern)


def build_network(net_config):
    """Rebuilds the denoiser from a snapshot's network config (made by network_config)."""
    return Precond(nets.UNet(**net_config['unet']), sigma_data=net_config['sigma_data'])


class Data:
    """The corrupted training set, on the GPU when it fits: uint8 images, bool masks A and A_tilde,
    labels. With --xflip, items N..2N-1 are the x-flipped images (official dataset.py)."""

    def __init__(self, cfg, device):
        images, labels = load_images(cfg.data, cfg.cache_dir, cfg.workers)
        require(labels is not None or not cfg.cond,
                '--cond needs labels (dataset.json, class sub-folders or y in the .npz)')
        raw_indices = official_subset(len(images), cfg.max_size)
        images = images[raw_indices]                                          # (N, C, H, W) uint8
        check_pattern(cfg.corruption_pattern, images.shape[2], cfg.corruption_probability,
                      cfg.delta_probability)
        # Each image's masks come from its raw index (official).
        A, A_tilde = corruption_masks(raw_indices, images.shape[1:], cfg.corruption_probability,
                                      cfg.delta_probability, cfg.mask_full_rgb, cfg.mask_seed,
                                      cfg.corruption_pattern)
        # The fixed corrupted dataset: what A erased is gone for good. Only the official order
        # (augment or x-flip the clean image, then apply the un-moved masks) reads clean pixels, so
        # only it keeps them (docs/ambient.md#augmentation).
        if not (cfg.augment_mode == 'official' and (cfg.augment > 0 or cfg.xflip)):
            images = images * A
        self.num_raw, self.channels, self.resolution = images.shape[:3]
        self.num_images = self.num_raw * (2 if cfg.xflip else 1)
        self.label_dim = check_labels(labels, cfg.num_classes) if cfg.cond else 0
        labels = torch.from_numpy(labels[raw_indices]) if cfg.cond else None
        # On the GPU when images and masks take under a quarter of its free memory, else pinned.
        fits = device.type != 'cuda' or 3 * images.numel() < torch.cuda.mem_get_info(device)[0] // 4
        self.device = device if fits else torch.device('cpu')
        place = lambda t: t.to(self.device) if fits else t.pin_memory()  # noqa: E731
        self.images, self.A, self.A_tilde = map(place, (images, A, A_tilde))
        self.labels = None if labels is None else place(labels)
        self.seed, self.flip_masks, self._orders = cfg.seed, cfg.augment_mode == 'joint', {}

    def indices(self, positions):
        """Dataset indices at positions (int64, CPU) of the endless stream of per-epoch
        permutations, each seeded by (seed, epoch): the data order is a function of the image count
        alone, so a resumed run needs no state."""
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
        """Images in [-1, 1] (B, C, H, W), A and A_tilde (B, 1 or C, H, W) as float, labels (B,) or
        None. An x-flipped item flips the image; its masks are the raw image's, flipped too only
        with --augment_mode=joint (official: un-flipped masks, which show other pixels of it)."""
        index = index.to(self.device)
        rows = index % self.num_raw
        get = lambda t: None if t is None else t[rows].to(device, non_blocking=True)  # noqa: E731
        y = get(self.images).to(torch.float32) / 127.5 - 1
        A, A_tilde = get(self.A), get(self.A_tilde)
        if self.num_images > self.num_raw:  # --xflip
            flipped = (index >= self.num_raw)[:, None, None, None].to(device)
            y = torch.where(flipped, y.flip(3), y)
            if self.flip_masks:
                A = torch.where(flipped, A.flip(3), A)
                A_tilde = torch.where(flipped, A_tilde.flip(3), A_tilde)
        return y, A.to(torch.float32), A_tilde.to(torch.float32), get(self.labels)


def check_labels(labels, num_classes):
    """The number of classes (--num_classes, else the largest label + 1). Labels index an embedding
    table: one outside [0, classes), or more classes than images, is one error line."""
    classes = num_classes or int(labels.max()) + 1
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        raise UserError(f'--data: label {labels[bad][0]} of image #{bad.argmax()} is outside '
                        f'[0, {classes}) (--num_classes={num_classes})')
    require(num_classes or classes <= len(labels),
            f'--data: the largest label, {classes - 1}, implies {classes} classes for '
            f'{len(labels)} images; pass --num_classes if that is right')
    return classes


def draw_step(cfg, data, cur_nimg, device):
    """All randomness of one global batch, a function of (seed, cur_nimg). Every rank draws it whole
    and takes its rows, so any number of GPUs and any --batch_gpu follow the same trajectory, and
    resuming needs no RNG state."""
    generator = torch.Generator(device).manual_seed(derive_seed(cfg.seed, 1, cur_nimg))
    size = (cfg.batch, data.channels, data.resolution, data.resolution)
    step = dict(index=data.indices(torch.arange(cur_nimg, cur_nimg + cfg.batch)),
                normal=torch.randn(cfg.batch, generator=generator, device=device),  # ln(sigma)
                eps=torch.randn(size, generator=generator, device=device))          # noise
    if cfg.augment > 0:
        step['flips'], step['G_inv'], step['augment_labels'] = nets.draw_augmentation(
            cfg.augment, cfg.batch, data.resolution, data.resolution, generator)
    if cfg.resample_delta:
        size = (cfg.batch, 1 if cfg.mask_full_rgb else data.channels) + size[2:]
        step['B'] = (torch.rand(size, generator=generator, device=device)
                     >= cfg.delta_probability).float()
    return step


def microbatch(cfg, data, step, rows, device):
    """Rows of the global batch: corrupted images, masks and labels, augmented; augment labels."""
    y, A, A_tilde, labels = data.batch(step['index'][rows], device)
    rows = rows.to(device)
    if cfg.resample_delta:
        A_tilde = A * step['B'][rows]  # a fresh B every step instead of the fixed one per image
    augment_labels = None
    if cfg.augment > 0:
        augment_labels = step['augment_labels'][rows]
        flips, G_inv = step['flips'][rows], step['G_inv'][rows]
        if cfg.augment_mode == 'joint':               # the masks travel with the image
            stacked = nets.augment(torch.cat([y, A, A_tilde], dim=1), flips, G_inv, 'joint')
            y, A, A_tilde = stacked.split([y.shape[1], A.shape[1], A_tilde.shape[1]], dim=1)
        else:  # official: augment the clean image, keep the masks as they are
            y = nets.augment(y, flips, G_inv, 'official')
    return y, A, A_tilde, labels, augment_labels


class TickStats:
    """Loss per pixel (official Loss/loss), loss per noise-level bin (ln(sigma) split at -1.5, -0.5,
    0.5, 1.5 standard deviations) and realised erasure rates, summed on the device and read once
    per tick; the clocks of the run and of the tick, as (time, image count)."""

    def __init__(self, cfg, device, cur_nimg):
        self.edges = torch.tensor([-1.5, -0.5, 0.5, 1.5], device=device)
        sigmas = [f'{math.exp(cfg.P_mean + cfg.P_std * z):.3g}' for z in self.edges.tolist()]
        self.bin_names = ([f'<{sigmas[0]}'] + [f'{a}-{b}' for a, b in zip(sigmas, sigmas[1:])]
                          + [f'>{sigmas[-1]}'])
        self.sums = torch.zeros(4 + 2 * len(self.bin_names), device=device)
        self.device, self.total_nimg = device, int(cfg.kimg * 1000)
        self.start = self.tick_start = (time.time(), cur_nimg)

    def add(self, per_image, A, A_tilde, normal):
        self.sums[:4] += torch.stack([per_image.sum(), torch.ones_like(per_image).sum(),
                                      (1 - A).mean() * len(A), (1 - A_tilde).mean() * len(A)])
        bins = torch.bucketize(normal, self.edges)
        self.sums[4:].view(2, -1)[0].index_add_(0, bins, per_image)
        self.sums[4:].view(2, -1)[1].index_add_(0, bins, torch.ones_like(per_image))

    def report(self, log, run_dir, cur_nimg, cur_tick, lr):
        """The progress line and the stats.jsonl entry of one tick."""
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.sums)
        values = self.sums.tolist()  # the one host sync of the tick, first: its time includes all
        self.sums.zero_()            # the tick's GPU work
        (loss, n, erased_A, erased_A_tilde), bins = values[:4], values[4:]
        totals, counts = bins[:len(bins) // 2], bins[len(bins) // 2:]
        tick_time, tick_nimg = time.time() - self.tick_start[0], cur_nimg - self.tick_start[1]
        sec_per_kimg = tick_time / tick_nimg * 1e3
        cuda = self.device.type == 'cuda'
        gpumem = torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if cuda else 0.0
        entry = dict(kimg=cur_nimg / 1e3, tick=cur_tick, time=time.time() - self.start[0],
                     sec_per_kimg=sec_per_kimg, lr=lr, img_per_sec=tick_nimg / tick_time,
                     loss=loss / n, erased_A=erased_A / n, erased_A_tilde=erased_A_tilde / n,
                     loss_by_sigma={k: t / c if c else None
                                    for k, t, c in zip(self.bin_names, totals, counts)},
                     gpumem_gb=gpumem)
        eta = format_time((self.total_nimg - cur_nimg) / 1e3 * sec_per_kimg)
        log(f'kimg {entry["kimg"]:.1f} | time {format_time(entry["time"])} | sec/kimg '
            f'{sec_per_kimg:.3g} | ETA {eta} | loss {entry["loss"]:.4g} | lr {lr:.1e} | img/s '
            f'{entry["img_per_sec"]:.0f} | gpumem {gpumem:.1f}G | erased A '
            f'{entry["erased_A"]:.3f} A~ {entry["erased_A_tilde"]:.3f} | loss by sigma '
            + ' '.join('-' if v is None else f'{v:.3g}' for v in entry['loss_by_sigma'].values()))
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        if get_rank() == 0:
            with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as file:
                file.write(json.dumps(entry) + '\n')


def training_loop(cfg):
    """The EDM training loop with the ambient loss (official training/training_loop.py); returns
    the run folder. One global batch per step, split into rounds of --batch_gpu per process; all
    randomness of a step comes from draw_step(seed, cur_nimg), so resuming and changing the number
    of GPUs keep the trajectory."""
    # Processes, batch split and the flags that need them; the output folder must be writable.
    rank, world, device = init_distributed(cfg.device)
    batch_gpu = cfg.batch_gpu or cfg.batch // world
    require(batch_gpu and cfg.batch % (batch_gpu * world) == 0, f'--batch={cfg.batch} must be '
            f'divisible by GPUs x --batch_gpu = {world} x {batch_gpu}')
    rounds = cfg.batch // (batch_gpu * world)
    check_writable(cfg.outdir, '--outdir')

    # Performance settings.
    precision = cfg.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')
    # TF32 for what stays fp32; fp32 = official numerics (TF32 off, as the official loop sets it).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == 'bf16'
    torch.backends.cudnn.benchmark = cfg.bench        # fixed shapes: cuDNN's autotuning pays off
    memory_format = torch.channels_last if device.type == 'cuda' else torch.contiguous_format

    # Data, corrupted once, the network, and a state to resume (all checked before any write).
    data = Data(cfg, device)
    net_config = network_config(cfg, data.resolution, data.channels, data.label_dim)
    torch.manual_seed(cfg.seed)                       # the same initial weights on every rank
    net = build_network(net_config).to(device, memory_format=memory_format).train()
    if cfg.transfer:  # official --transfer: weights, fresh optimizer
        transfer_weights(net, cfg.transfer, cfg.cache_dir)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = (torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam)(
        net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
        fused=device.type == 'cuda')                  # official: Adam, AdamW with --weight_decay
    torch.manual_seed(cfg.seed * world + rank)        # dropout differs per rank
    resume = dict(net=net, ema=ema, optimizer=optimizer, rank=rank, world=world, device=device)
    cur_nimg, cur_tick = restore_state(cfg.resume, **resume) if cfg.resume != 'auto' else (0, 0)

    # Run folder (exclusive and locked): new, or the run that --resume=auto continues.
    log = Logger()
    run = open_run(cfg.outdir, run_description(cfg), dataclasses.asdict(cfg), cfg.resume, log,
                   cfg.nosubdir)
    with run.lock or contextlib.nullcontext(), StopSignal() as stop:
        if cfg.resume == 'auto' and run.state:
            cur_nimg, cur_tick = restore_state(run.state, **resume)
        start_run_files(cfg, run, log, data, net_config, world, cur_nimg)
        log(f'{run.dir}: {data.num_images} images {data.channels}x{data.resolution}x'
            f'{data.resolution}, {sum(p.numel() for p in net.parameters()):,} parameters, batch '
            f'{cfg.batch} = {world} GPU(s) x {batch_gpu} x {rounds} round(s), {precision}'
            + (f', weights from {cfg.transfer}' if cfg.transfer and not run.state else ''))
        ddp = net if world == 1 else torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == 'cuda' else None)
        forward = torch.compile(ddp) if cfg.compile else ddp

        # Tick bookkeeping: statistics stay on the device, clocks count images.
        stats, total_nimg = TickStats(cfg, device, cur_nimg), int(cfg.kimg * 1000)
        previous_state = None
        while cur_nimg < total_nimg:  # a state resumed at or past --kimg trains no further
            step = draw_step(cfg, data, cur_nimg, device)

            # Accumulate gradients; DDP synchronises on the last round only.
            optimizer.zero_grad(set_to_none=True)
            for round_idx in range(rounds):
                rows = torch.arange(batch_gpu) + (round_idx * world + rank) * batch_gpu
                y, A, A_tilde, labels, augment_labels = microbatch(cfg, data, step, rows, device)
                rows = rows.to(device)
                noise = dict(rnd_normal=step['normal'][rows], eps=step['eps'][rows],
                             P_mean=cfg.P_mean, P_std=cfg.P_std, sigma_data=cfg.sigma_data)
                last = round_idx == rounds - 1
                sync = ddp.no_sync() if world > 1 and not last else contextlib.nullcontext()
                with sync, autocast:
                    if cfg.precond == 'ambient':
                        loss = ambient_loss(forward, y, A, A_tilde, labels, augment_labels,
                                            cfg.norm, **noise)
                    else:  # the naive baseline: EDM on the masked images
                        loss = edm_loss(forward, A * y, labels, augment_labels, **noise)
                    # Official normalisation: per-image sums, mean over the global batch (DDP
                    # averages over GPUs), times the loss scaling --ls.
                    loss.sum().mul(cfg.ls * world / cfg.batch).backward()
                stats.add(loss.detach() / y[0].numel(), A, A_tilde, step['normal'][rows])

            # Update weights: linear warm-up from lr 0, nan/inf cleanup, clipping (all official).
            lr = cfg.lr * min(cur_nimg / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1)
            for group in optimizer.param_groups:
                group['lr'] = lr
            for param in net.parameters():
                if param.grad is not None:
                    torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
            optimizer.step()

            # Update EMA: half-life --ema Mimg, at most --ema_rampup_ratio x images seen (official).
            ema_halflife_nimg = cfg.ema * 1e6
            if cfg.ema_rampup_ratio > 0 and not cfg.transfer:  # official: none with --transfer
                ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * cfg.ema_rampup_ratio)
            ema_beta = 0.5 ** (cfg.batch / max(ema_halflife_nimg, 1e-8))
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - ema_beta)
            cur_nimg += cfg.batch

            # Ctrl-C / SIGTERM: a training state at this step boundary, one line, exit.
            if stop.check():
                stop.exit(log, save_state(cfg, run.dir, cur_nimg, cur_tick, **resume), cur_nimg)

            # Maintenance once per tick (and after the first step).
            done = cur_nimg >= total_nimg
            if not done and cur_tick != 0 and cur_nimg < stats.tick_start[1] + cfg.tick * 1000:
                continue
            stats.report(log, run.dir, cur_nimg, cur_tick, lr)
            if done or (cur_tick % cfg.snap == 0 and cur_tick != 0):
                path = save_state(cfg, run.dir, cur_nimg, cur_tick + 1, net_config=net_config,
                                  precision=precision, **resume)
                if previous_state and previous_state != path:  # keep every --dump-th state only
                    os.remove(previous_state)
                previous_state = None if cur_tick % cfg.dump == 0 else path
            cur_tick += 1
            stats.tick_start = (time.time(), cur_nimg)
        log(done_line(cur_nimg - stats.start[1], time.time() - stats.start[0]))
    return run.dir


# --------------------------------------------------------------------------------------------------
# Evaluation: generate, eval (FID through fid.py), neighbors (memorisation check)


def sampling_masks(net_config, seeds, generators, num_masks, device, sampler='ambient',
                   corruption_probability=None, delta_probability=None, mask_full_rgb=None,
                   corruption_pattern=None):
    """The fixed sampling masks (K, B, C, H, W) float64, or None for a plain EDM network. dust: each
    pixel kept with the training marginal of A_tilde, (1 - p)(1 - delta) (official eval.py); box
    patterns: A_tilde drawn as in training. Unset arguments take the training values. Drawn from the
    per-seed generators (official: NumPy's global RNG; docs/ambient.md#sampler)."""
    if net_config['precond'] != 'ambient':
        return None
    channels, resolution = net_config['channels'], net_config['unet']['img_resolution']
    training = lambda value, key, default: net_config.get(key, default) if value is None else value
    p = training(corruption_probability, 'corruption_probability', 0.4)
    delta = training(delta_probability, 'delta_probability', 0.1)
    full_rgb = training(mask_full_rgb, 'mask_full_rgb', False)
    pattern = training(corruption_pattern, 'corruption_pattern', 'dust')
    if sampler == 'edm':  # all-ones masks: every pixel observed
        return torch.ones(num_masks, len(seeds), channels, resolution, resolution,
                          dtype=torch.float64, device=device)
    if pattern == 'dust':
        mask_channels = 1 if full_rgb else channels
        masks = torch.stack([torch.rand(num_masks, mask_channels, resolution, resolution,
                                        generator=g, device=device) for g in generators],
                            dim=1) < (1 - p) * (1 - delta)                  # (K, B, Cm, H, W)
    else:
        check_pattern(pattern, resolution, p, delta)
        draw = lambda seed, k: torch.from_numpy(box_masks(  # noqa: E731
            pattern, resolution, resolution, p, delta,
            torch.Generator().manual_seed(derive_seed(seed, 2, k)))[1])
        masks = torch.stack([torch.stack([draw(seed, k) for seed in seeds])
                             for k in range(num_masks)])[:, :, None].to(device)  # (K, B, 1, H, W)
    return masks.to(torch.float64).expand(-1, -1, channels, -1, -1)


def generate_images(net, net_config, seeds, device, sampler='ambient', num_masks=1,
                    guidance_scale=0.0, steps=18, corruption_probability=None,
                    delta_probability=None, class_idx=None, precision='fp32', mask_full_rgb=None,
                    corruption_pattern=None, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0,
                    S_min=0, S_max=float('inf'), S_noise=1):
    """uint8 images (B, C, H, W), image k a function of seeds[k] alone: latents, label, sampling
    masks and churn noise come from a generator seeded by it (EDM's StackedRandomGenerator idea)."""
    unet = net_config['unet']
    channels, resolution = net_config['channels'], unet['img_resolution']
    generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]
    latents = torch.stack([torch.randn(channels, resolution, resolution, generator=g, device=device)
                           for g in generators])
    labels = None
    if unet.get('label_dim', 0):
        labels = torch.stack(
            [torch.randint(unet['label_dim'], (), generator=g, device=device) for g in generators])
        if class_idx is not None:
            labels = torch.full_like(labels, class_idx)
    masks = sampling_masks(net_config, seeds, generators, num_masks, device, sampler,
                           corruption_probability, delta_probability, mask_full_rgb,
                           corruption_pattern)
    randn_like = lambda x: torch.stack(  # noqa: E731
        [torch.randn(x.shape[1:], generator=g, device=device, dtype=x.dtype) for g in generators])
    # An official network's noise range clips the schedule (EDMPrecond: 0 to inf).
    sigma_min = max(sigma_min, net_config.get('sigma_min', 0))
    sigma_max = min(sigma_max, net_config.get('sigma_max', float('inf')))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
        images = ambient_sampler(net, latents, masks, labels, num_steps=steps, sigma_min=sigma_min,
                                 sigma_max=sigma_max, rho=rho, guidance_scale=guidance_scale,
                                 clip=masks is not None, S_churn=S_churn, S_min=S_min,
                                 S_max=S_max, S_noise=S_noise, randn_like=randn_like)
    return to_uint8(images)


def prepare_sampling(args, device):
    """Loads --network (with --training_options_loc) and checks the class flags against it."""
    options = None
    if args.training_options_loc:
        try:
            options = nets.read_json_source(args.training_options_loc, args.cache_dir or None)
        except (ValueError, FileNotFoundError) as error:
            raise UserError(f'--training_options_loc: {error}')
    net, net_config = load_network(args.network, device, args.cache_dir, training_options=options)
    if options and net_config.get('source') is None:  # our snapshot: the file sets the masks
        dataset = options.get('dataset_kwargs', {})
        net_config = {**net_config, **{k: dataset[k] for k in nets.AMBIENT_CORRUPTION_KEYS
                                       if k in dataset}}
    label_dim = net_config['unet']['label_dim']
    require(not args.num_classes or args.num_classes == label_dim,
            f'--num_classes={args.num_classes}, but the network has {label_dim} classes')
    require(args.class_idx is None or 0 <= args.class_idx < label_dim,
            f'--class must be in [0, {label_dim})' if label_dim
            else '--class needs a conditional network')
    return net, net_config


def sample_batches(net, net_config, args, seeds, device, outdir=''):
    """Yields uint8 images of this rank's share of the seeds (EDM's round-robin batches), with
    outdir also as outdir/<seed>.png (outdir/<thousands>/<seed>.png with --subdirs). Every
    generate_images argument comes from the flag of the same name."""
    rank = get_rank()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    names = list(inspect.signature(generate_images).parameters)[4:]
    options = {name: getattr(args, name) for name in names}
    options['precision'] = args.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    num_batches = max((len(seeds) - 1) // (args.batch * world) + 1, 1) * world
    for batch_seeds in torch.as_tensor(seeds).tensor_split(num_batches)[rank::world]:
        if not len(batch_seeds):
            continue
        images = generate_images(net, net_config, batch_seeds.tolist(), device, **options)
        for seed, image in zip(batch_seeds.tolist(), images.cpu() if outdir else []):
            folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if args.subdirs else outdir
            save_grid(image[None], os.path.join(folder, f'{seed:06d}.png'))
        yield images


def generate(argv):
    """Writes one PNG per seed, outdir/<seed>.png."""
    args = parse_sampling('generate', GenerateConfig, argv)
    require(args.network and args.outdir, '--network and --outdir are required')
    seeds = parse_seeds(args.seeds)
    check_writable(args.outdir, '--outdir')
    rank, _, device = init_distributed(args.device)
    net, net_config = prepare_sampling(args, device)
    for _ in sample_batches(net, net_config, args, seeds, device, args.outdir):
        pass
    print0(f'Wrote {len(seeds)} images to {args.outdir}')


def snapshots_to_evaluate(network, eval_step):
    """--network as the official eval.py reads it: a snapshot, or a folder whose snapshots (*.pkl,
    else our *.pt) are evaluated in name order, every eval_step-th, each once (official: polls)."""
    if os.path.isdir(network):
        found = sorted(glob.glob(os.path.join(network, '*.pkl'))) or \
            sorted(glob.glob(os.path.join(network, 'network-snapshot-*.pt')))
        require(found, f'--network: no network-snapshot-*.pkl or *.pt in {network}')
        return found[::eval_step]
    return [network]


def evaluate(argv):
    """fid.py metrics of --num samples (the first --num of --seeds) held in memory; with --outdir
    also the PNGs, in outdir/<snapshot kimg>/ as official. Prints the numbers and appends a JSON
    line to metrics.jsonl beside the network (or in --outdir)."""
    args = parse_sampling('eval', EvalConfig, argv)
    require(args.network and args.ref, '--network and --ref are required')
    require(args.protocol in fid.PROTOCOLS, f'--protocol must be one of {", ".join(fid.PROTOCOLS)}')
    metrics = args.metrics.split(',')
    require(args.num >= 2 and set(metrics) <= set(fid.METRICS) and args.eval_step >= 1,
            f'--num must be >= 2, --eval_step >= 1 and --metrics a list of {",".join(fid.METRICS)}')
    seeds = parse_seeds(args.seeds)[:args.num] if args.seeds else list(range(args.num))
    require(len(seeds) == args.num, f'--seeds gives {len(seeds)} images, but --num={args.num}')
    require(args.outdir or not args.skip_calculation,
            '--skip_calculation writes PNGs only: give --outdir')
    if args.outdir:
        check_writable(args.outdir, '--outdir')
    require(args.ref.startswith(('http://', 'https://')) or os.path.exists(args.ref),
            f'--ref: {args.ref} does not exist')
    rank, _, device = init_distributed(args.device)
    # Reference, detector, protocol and metric checks all fail here, before minutes of sampling.
    ref = fid_call(fid.load_ref, args.ref)
    detector = fid_call(fid.load_inception, args.fid_weights or None, device=device)
    protocol = fid_call(fid.resolve_protocol, args.protocol, ref=ref, metrics=metrics,
                        detector=detector, num=args.num)
    score = lambda batches: fid_call(  # noqa: E731
        fid.compute_metrics, batches, ref, metrics=metrics, detector=detector, device=device,
        num_images=args.num, protocol=protocol, seed=args.seed)
    if args.skip_generation:  # the official calc() on a folder of images
        images, _ = load_images(args.network, workers=4)
        index = fid_call(fid.select_images, len(images), protocol, seed=args.seed)
        results = score(images[index[i:i + args.batch]] for i in range(0, len(index), args.batch))
        return report_metrics(args, args.network, results, args.outdir or args.network, rank)
    # Every snapshot: sample the seeds (PNGs with --outdir), score them in one streaming pass.
    for network in snapshots_to_evaluate(args.network, args.eval_step):
        folder = os.path.dirname(os.path.abspath(network)) if os.path.isfile(network) else \
            args.outdir or '.'
        if not args.skip_calculation:
            check_writable(folder, 'metrics.jsonl folder')  # before minutes of sampling
        net, net_config = prepare_sampling(dataclasses.replace(args, network=network), device)
        name = re.sub(r'^network-snapshot-|\.(pt|pkl)$', '', os.path.basename(network))
        outdir = args.outdir and os.path.join(args.outdir, name.lstrip('0').split('.')[0] or '0')
        batches = sample_batches(net, net_config, args, seeds, device, outdir)
        if args.skip_calculation:  # only the PNGs
            for _ in batches:
                pass
        else:
            report_metrics(args, network, score(batches), folder, rank)


def report_metrics(args, network, results, folder, rank):
    """Prints the metrics as JSON and appends them to folder/metrics.jsonl (rank 0)."""
    if rank != 0:
        return
    entry = dict(network=os.path.basename(network.rstrip('/')), num=args.num, sampler=args.sampler,
                 steps=args.steps, num_masks=args.num_masks, guidance_scale=args.guidance_scale,
                 ref=args.ref, experiment_name=args.experiment_name,
                 **{k: v if isinstance(v, str) else float(v) for k, v in results.items()},
                 timestamp=time.time())
    print(json.dumps(entry))
    with open(os.path.join(folder, 'metrics.jsonl'), 'a') as file:
        file.write(json.dumps(entry) + '\n')


def neighbors(argv):
    """Memorisation check (official find_dataset_neighbors.py): for every generated image, the
    similarity of its features to those of every clean training image (--features=dinov2: the
    official ViT-g/14 CLS token; inception: fid.py's pool features, offline). Writes the official
    files plus neighbors.npz, neighbors.json and neighbors.png."""
    args = parse_sampling('neighbors', NeighborsConfig, argv)
    require(args.data and args.outdir, '--data and --output_dir are required')
    require(bool(args.network) != bool(args.images), 'give one of --network and --input_dir')
    require(args.features in ('inception', 'dinov2'), '--features must be inception or dinov2')
    require(min(args.num, args.top, args.workers) >= 1 and args.max_size >= 0
            and abs(args.threshold) <= 1,
            '--num, --top and --workers must be >= 1, --max_size >= 0, --threshold in [-1, 1]')
    require(int(os.environ.get('WORLD_SIZE', 1)) == 1, 'neighbors runs as one process')
    check_writable(args.outdir, '--output_dir')
    if args.features_path and not os.path.exists(args.features_path):
        check_writable(os.path.dirname(os.path.abspath(args.features_path)), '--features_path')
    # Generated images (sampled here, or read from --input_dir) and the clean training set.
    _, _, device = init_distributed(args.device)
    if args.network:
        net, net_config = prepare_sampling(args, device)
    train_images = load_images(args.data, args.cache_dir, args.workers)[0]
    if args.features == 'dinov2':
        try:
            detector = nets.load_dinov2(args.dinov2, cache_dir=args.cache_dir or None).to(device)
        except Exception as error:  # offline: one line naming the URL and where to put the file
            raise UserError(f'--dinov2: {" ".join(str(error).split())}')
    else:
        detector = fid_call(fid.load_inception, args.fid_weights or None, device=device)
    if args.images:
        generated = load_images(args.images, workers=args.workers)[0]
        generated = generated[official_subset(len(generated), args.max_size)]
    else:
        generated = torch.cat([x.cpu() for x in sample_batches(
            net, net_config, args, list(range(args.num)), device)])

    # Features of both sets (the training set's cached in --features_path), top 3 per image.
    batch = min(args.batch, args.batch_gpu or args.batch)

    def features(images):
        chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
        if args.features == 'inception':
            return fid.compute_features(iter(chunks), detector, device)['pool'].double().cpu()
        with torch.no_grad():
            return torch.cat([nets.dinov2_features(detector, x.to(device), normalize=False).cpu()
                              for x in chunks]).double()
    if args.features_path and os.path.exists(args.features_path):
        train_features = torch.from_numpy(np.load(args.features_path)).double()
        require(train_features.shape[0] == len(train_images),
                f'--features_path: {args.features_path} holds {train_features.shape[0]} '
                f'features, the data {len(train_images)} images')
    else:
        train_features = features(train_images)
        if args.features_path:
            nets.write_atomic(args.features_path,
                              lambda file: np.save(file, train_features.float().numpy()))
    generated_features = features(generated)
    if args.normalize:
        train_features = F.normalize(train_features, dim=1)
        generated_features = F.normalize(generated_features, dim=1)
    products = [chunk @ train_features.T for chunk in generated_features.split(1024)]
    top = [p.topk(min(3, len(train_images)), dim=1) for p in products]
    similarity = torch.cat([t.values for t in top])                                   # (num, 3)
    neighbor = torch.cat([t.indices for t in top])                                    # (num, 3)
    softmax_max = torch.cat([p.softmax(dim=1).max(dim=1).values for p in products])  # official
    # The official files: each image and its 3 nearest training images, the top-1 similarities and
    # the largest softmax weights (pickled lists of floats).
    for i, image in enumerate(generated):
        save_grid(image[None], os.path.join(args.outdir, f'{i}_dataset_image_{i}.png'))
        for k, j in enumerate(neighbor[i].tolist()):
            save_grid(train_images[j][None], os.path.join(
                args.outdir, f'{i}_nearest_neighbors_{k}_dataset_index_{j}.png'))
    for name, values in (('max_products', similarity[:, 0]), ('softmax_products', softmax_max)):
        nets.write_atomic(os.path.join(args.outdir, f'{name}.pkl'), pickle.dumps(values.tolist()))
    # Ours: a summary with the fraction above --threshold, the arrays, the closest pairs.
    top1 = similarity[:, 0]
    summary = dict(source=args.network or args.images, features=args.features,
                   num_generated=len(generated), num_train=len(train_images),
                   threshold=args.threshold,
                   fraction_above=float((top1 > args.threshold).double().mean()),
                   mean_top1=float(top1.mean()), max_top1=float(top1.max()),
                   quantiles_top1={str(q): float(top1.quantile(q)) for q in (0.5, 0.9, 0.99)})
    nets.write_atomic(os.path.join(args.outdir, 'neighbors.npz'), lambda file: np.savez(
        file, similarity=similarity.numpy(), neighbor=neighbor.numpy()))
    nets.write_atomic(os.path.join(args.outdir, 'neighbors.json'),
                      json.dumps(summary, indent=2).encode())
    rows = [torch.cat([generated[i:i + 1], train_images[neighbor[i]]])
            for i in top1.argsort(descending=True)[:args.top]]
    save_grid(torch.cat(rows), os.path.join(args.outdir, 'neighbors.png'),
              columns=1 + neighbor.shape[1])
    print(json.dumps(summary))


# --------------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    """ambient.py [train|generate|eval|neighbors] --flag=value ...: train is the default."""
    run_main(
        {
            'train': (train, 'train on corrupted images (the default command; official train.py)'),
            'generate': (generate, 'one PNG per seed from a snapshot (.pt or official .pkl)'),
            'eval': (evaluate, 'FID and other fid.py metrics of a snapshot or a folder of them '
                     '(official eval.py)'),
            'neighbors': (neighbors, 'nearest training images of generated ones (official '
                          'find_dataset_neighbors.py)')
        }, argv,
        'Ambient Diffusion: Learning Clean Distributions from Corrupted Data (Daras et al., '
        'NeurIPS 2023, arXiv:2305.19256).')


def train(argv):
    """The train command: flags -> Config -> training_loop, or --dry_run's printout."""
    cfg = parse_train_args(argv)
    if cfg.dry_run:  # the config, the network and the official train.py's options; nothing else
        print_dry_run(cfg)
        return None
    return training_loop(cfg)


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
# The official flags of ambient-diffusion's train.py, eval.py and find_dataset_neighbors.py


class AnyValueBut(dict):
    """Official.refuse for every value but `allowed` (a non-empty --wandb_id)."""

    def __init__(self, allowed, why):
        super().__init__({f'anything but {allowed!r}': why})
        self.allowed, self.why = allowed, why

    def get(self, value, default=None):
        return default if value == self.allowed else self.why

    def __contains__(self, value):
        return value != self.allowed

    def __getitem__(self, value):
        return self.why


NO_WANDB = AnyValueBut('', 'there is no wandb logging; use stats.jsonl, log.txt and metrics.jsonl')
DDPMPP_ONLY = 'only the DDPM++ network (EDM SongUNet, gated) is built; use --arch=ddpmpp'
NOT_AMBIENT = 'not part of Ambient Diffusion; use --precond=ambient (or edm, the naive baseline)'
IN_MEMORY = 'the dataset is always held in memory; use --cache=True'
SAMPLER_ONLY = ("the official ambient_sampler does not take it (eval.py fails with a TypeError); "
                "use the default Heun sampler with EDM's time steps")
TRAIN_SAME = ('outdir data cond cbase cres lr ema dropout augment max_grad_norm weight_decay '
              'corruption_probability delta_probability mask_full_rgb norm gated max_size xflip ls '
              'bench workers desc nosubdir tick snap dump seed transfer resume experiment_name '
              'batch')
EVAL_SAME = ('network training_options_loc outdir seeds subdirs batch corruption_probability '
             'delta_probability num_masks guidance_scale mask_full_rgb experiment_name ref num '
             'seed eval_step skip_generation skip_calculation num_classes steps sigma_min '
             'sigma_max rho '
             'S_churn S_min S_max S_noise')
NO_DOWNSCALE = ('the official dataset.py rejects it too; use --corruption_pattern=dust, box, '
                'fixed_box or keep_patch')
OFFICIAL_FLAGS = {
    'train': {
        **{f'--{name}': ours(name) for name in TRAIN_SAME.split()},
        '--arch': ours('arch', refuse={'ncsnpp': DDPMPP_ONLY, 'adm': DDPMPP_ONLY}),
        '--precond': ours('precond', refuse={'vp': NOT_AMBIENT, 've': NOT_AMBIENT}),
        '--corruption_pattern': ours('corruption_pattern', refuse={'downscale': NO_DOWNSCALE}),
        '--duration': ours('kimg', lambda mimg: float(max(int(mimg * 1000), 1)),
                           'Mimg -> kimg, max(int(1000 x Mimg), 1) as official', type=float),
        '--batch-gpu': ours('batch_gpu'), '--dry-run': ours('dry_run'),
        '-n': ours('dry_run'),
        '--fp16': ours('precision', {False: 'fp32'}, 'False = --precision=fp32', type=parse_bool,
                       refuse={True: 'fp16 training is not offered; use --precision=bf16'}),
        '--cache': ignored('always in memory', type=parse_bool, refuse={False: IN_MEMORY},
                           group='data and corruption'),
        **{f'--{name}': ignored('parsed and unused by the official train.py too', type=float,
                                group='sampling') for name in ('S_churn', 'S_min', 'S_max',
                                                               'S_noise')},
        '--wandb_id': ignored(refuse=NO_WANDB),
    },
    'eval': {
        **{f'--{name}': ours(name) for name in EVAL_SAME.split()},
        '--class': ours('class_idx'),
        '--with_wandb': ignored(type=parse_bool, group='evaluation', refuse={
            True: 'there is no wandb logging; use --with_wandb=False (metrics.jsonl holds them)'}),
        '--wandb_id': ignored(refuse=NO_WANDB, group='evaluation'),
        **{f'--{name}': refused(SAMPLER_ONLY, group='sampling')
           for name in ('solver', 'disc', 'schedule', 'scaling')},
    },
    'neighbors': {
        **{f'--{name}': ours(name)
           for name in 'data features_path max_size workers batch normalize'.split()},
        '--input_dir': ours('images'), '--output_dir': ours('outdir'),
        '--batch-gpu': ours('batch_gpu'),
        '--cache': ignored('always in memory', type=parse_bool, refuse={False: IN_MEMORY},
                           group='evaluation'),
        '--seed': ignored('no effect in the official script either (an unshuffled sampler)',
                          type=int, group='evaluation'),
    },
    'generate': {},  # no official counterpart (the official eval.py also generates: see eval)
}


def parse_train_args(argv):
    """The training Config from the command line: defaults, then --preset, then the flags."""
    return check_config(parse_config('train', Config, argv, OFFICIAL_FLAGS['train'], PRESETS,
                                     description='Train Ambient Diffusion on corrupted images.'))


def check_config(cfg):
    """Range checks of the training flags: the first failure is the one error line. Returns a new
    Config (never changes the one it checks)."""
    P, lrs = PATTERNS, (cfg.lr, cfg.lr_rampup_kimg, cfg.weight_decay, cfg.max_grad_norm, cfg.ema,
                        cfg.ema_rampup_ratio)
    for ok, message in [
            (0 <= cfg.corruption_probability < 1, '--corruption_probability must be in [0, 1)'),
            (0 <= cfg.delta_probability < 1, '--delta_probability must be in [0, 1)'),
            (cfg.corruption_pattern in P, f'--corruption_pattern must be one of {", ".join(P)}'),
            (cfg.norm in (1, 2), '--norm must be 1 or 2'),
            (cfg.precond in ('ambient', 'edm'), '--precond must be ambient or edm'),
            (cfg.augment_mode in ('joint', 'official'), '--augment_mode must be joint or official'),
            (0 <= min(cfg.augment, cfg.dropout) <= max(cfg.augment, cfg.dropout) <= 1,
             '--augment and --dropout must be in [0, 1]'),
            (cfg.batch >= 1 and cfg.batch_gpu >= 0, '--batch must be >= 1 and --batch_gpu >= 0'),
            (min(lrs) >= 0, '--lr, --lr_rampup_kimg, --weight_decay, --max_grad_norm, --ema and '
             '--ema_rampup_ratio must be >= 0'),
            (min(cfg.P_std, cfg.sigma_data, cfg.ls) > 0,
             '--P_std, --sigma_data and --ls must be > 0'),
            (min(cfg.kimg, cfg.tick, cfg.snap, cfg.dump) > 0,
             '--kimg, --tick, --snap and --dump must be > 0'),
            (cfg.steps >= 2 and min(cfg.grid, cfg.max_size, cfg.num_classes) >= 0
             and cfg.workers >= 1,
             '--steps must be >= 2, --workers >= 1, --grid, --max_size and --num_classes >= 0'),
            (cfg.precision in ('', 'fp32', 'bf16'), '--precision must be fp32 or bf16'),
            (re.fullmatch(r'((\d+,)*\d+)?', cfg.cres), '--cres must look like 1,2,2,2'),
            (cfg.arch == 'ddpmpp' or nets.UNET_PRESETS.get(cfg.arch, {}).get('arch') == 'ddpmpp',
             f'--arch must be ddpmpp or a DDPM++ preset of nets.UNET_PRESETS, got {cfg.arch!r}'),
            (not (cfg.transfer and cfg.resume),
             '--transfer and --resume cannot be specified at the same time'),
            (cfg.data, '--data is required')]:
        require(ok, message)
    return dataclasses.replace(cfg)


@dataclasses.dataclass
class SamplingConfig:
    # Sampling (generate, eval and neighbors; official eval.py names).
    network: str = ''                     # a network-snapshot-*.pt or official *.pkl (path or URL)
    training_options_loc: str = ''        # official training_options.json for the sampling masks
    batch: int = 64                       # images per batch and GPU
    steps: int = 18                       # Heun steps (2 x steps - 1 network evaluations)
    sigma_min: float = 0.002              # lowest noise level
    sigma_max: float = 80.0               # highest noise level
    rho: float = 7.0                      # time step exponent
    S_churn: float = 0.0                  # stochasticity strength
    S_min: float = 0.0                    # lowest noise level with churn
    S_max: float = float('inf')           # highest noise level with churn
    S_noise: float = 1.0                  # noise inflation of the churn
    sampler: str = 'ambient'  # ambient (fixed-mask sampler) or edm (all-ones sampling mask)
    num_masks: int = 1                    # sampling masks (reconstruction guidance when > 1)
    guidance_scale: float = 0.0           # reconstruction guidance weight
    corruption_probability: float = None  # p of the sampling masks (default: the training value)
    delta_probability: float = None  # delta of the sampling masks (default: the training value)
    mask_full_rgb: bool = None  # sampling masks per RGB pixel (default: the training value)
    corruption_pattern: str = None  # pattern of the sampling masks (default: the training value)
    class_idx: int = None                 # class of every image (default: random per seed)
    num_classes: int = 0                  # classes of a conditional network, checked against it
    precision: str = ''  # bf16 or fp32 sampling (default: bf16 on CUDA, fp32 on CPU)
    device: str = ''                      # cuda or cpu (default: cuda when available)
    cache_dir: str = ''                   # downloaded snapshots and weights (default: nets' cache)


@dataclasses.dataclass
class GenerateConfig(SamplingConfig):
    # Run.
    seeds: str = '0-63'                   # seeds such as 0-49999 or 1,2,5-10
    outdir: str = ''                      # where the PNGs go (required)
    subdirs: bool = False                 # a sub-folder per 1000 seeds


@dataclasses.dataclass
class EvalConfig(SamplingConfig):
    # Evaluation.
    ref: str = ''                         # reference statistics of fid.py ref (required)
    num: int = 50000                      # images to evaluate
    seeds: str = ''                       # seeds of the images (default: 0 to num - 1)
    seed: int = 0                         # random choice of --num images among more
    metrics: str = 'fid'                  # comma-separated fid.py metrics: fid, is, ...
    protocol: str = 'edm'                 # edm (official: EDM's fid.py), adm or pytorch-fid
    fid_weights: str = ''  # Inception weights file (default: $FID_WEIGHTS or a download)
    outdir: str = ''                      # also write the PNGs to outdir/<snapshot>/ (official)
    subdirs: bool = False                 # a PNG sub-folder per 1000 seeds
    eval_step: int = 1                    # evaluate every eval_step-th snapshot of a folder
    skip_generation: bool = False         # evaluate the PNGs in the --network folder
    skip_calculation: bool = False        # only write the PNGs (needs --outdir)
    experiment_name: str = ''             # a name kept in the metrics JSON (official: wandb's)


@dataclasses.dataclass
class NeighborsConfig(SamplingConfig):
    # Evaluation.
    images: str = ''                      # generated images instead of --network
    data: str = ''                        # the training set, read clean: an audit (required)
    outdir: str = ''                      # where the outputs go (required)
    features_path: str = ''               # .npy of training features: read, or computed and saved
    max_size: int = 0                     # generated images used (RandomState(0) subset); 0 = all
    num: int = 10000                      # images sampled from --network
    features: str = 'inception'           # dinov2 (official) or inception
    dinov2: str = 'dinov2_vitg14'         # DINOv2 weights: a hub name, URL or .pth
    normalize: bool = True                # unit-length features (cosine similarity)
    batch_gpu: int = 0                    # feature batch limit; 0 = --batch
    workers: int = 1                      # threads decoding images
    threshold: float = 0.95               # top-1 similarity counted as a copy in neighbors.json
    top: int = 16                         # pairs in neighbors.png
    fid_weights: str = ''                 # Inception weights (default: $FID_WEIGHTS or a download)


def parse_sampling(command, config_class, argv):
    """generate / eval / neighbors flags, range-checked in one line before anything is read."""
    args = parse_config(command, config_class, argv, OFFICIAL_FLAGS[command])
    for name in ('corruption_probability', 'delta_probability'):
        value = getattr(args, name)
        require(value is None or 0 <= value < 1, f'--{name} must be in [0, 1)')
    require(args.batch >= 1 and args.steps >= 2 and args.num_masks >= 1,
            '--batch and --num_masks must be >= 1, --steps >= 2')
    require(min(args.sigma_min, args.sigma_max, args.rho, args.S_churn, args.S_min, args.S_max,
                args.S_noise) >= 0 and args.sigma_min < args.sigma_max,
            '--sigma_min < --sigma_max, --rho and the --S_* flags must be >= 0')
    require(args.sampler in ('ambient', 'edm'), '--sampler must be ambient or edm')
    require(args.corruption_pattern in PATTERNS + (None,),
            f'--corruption_pattern must be one of {", ".join(PATTERNS)}')
    require(args.precision in ('', 'fp32', 'bf16'), '--precision must be fp32 or bf16')
    return args


def print_dry_run(cfg):
    """--dry_run: the resolved config, the network (built on the meta device; resolution and
    classes from the arch and the preset) and the official train.py's training_options."""
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    resolution = nets.UNET_PRESETS['ddpmpp-cifar10' if cfg.arch == 'ddpmpp' else cfg.arch][
        'img_resolution']
    label_dim = (cfg.num_classes or 10) if cfg.cond else 0
    net_config = network_config(cfg, resolution, 3, label_dim)
    with torch.device('meta'):
        count = sum(p.numel() for p in build_network(net_config).parameters())
    unet = net_config['unet']
    print(f'Network: {unet["arch"]}, channel_mult {list(unet["channel_mult"])}, model_channels '
          f'{unet["model_channels"]}, {count:,} parameters at {resolution}x{resolution}x3'
          + (f', {label_dim} classes' if label_dim else '') + ' (the data decide the size)\n'
          'Official training options (train.py --dry-run; resolution and max_size come with the '
          'data):')
    print(json.dumps(nets.ambient_training_options(cfg), indent=2))


# --------------------------------------------------------------------------------------------------
# Data and network files


def load_images(path, cache_dir='', workers=4):
    """Square images (N, 3, H, W) uint8 tensor and labels (N,) int64 array or None, in file-name
    order (as EDM), through fid.read_image_set: a folder, an EDM zip, an .npz (x, y) or cifar10."""
    require(path == 'cifar10' or os.path.exists(path), f'--data: {path} does not exist')
    try:
        images, labels = fid.read_image_set(path, cache_dir or None, rgb=True, workers=workers)
    except (ValueError, FileNotFoundError) as error:
        raise UserError(f'--data: {" ".join(str(error).split())}')
    require(images.shape[2] == images.shape[3],
            f'--data: images must be square, got {images.shape[2]}x{images.shape[3]}')
    return torch.from_numpy(images), labels


def official_subset(count, max_size):
    """The images the official --max_size keeps: a RandomState(0) shuffle, the first max_size,
    sorted (all when max_size is 0)."""
    indices = np.arange(count)
    if 0 < max_size < count:
        np.random.RandomState(0).shuffle(indices)
        indices = np.sort(indices[:max_size])
    return indices


def load_network(source, device, cache_dir='', flag='--network', training_options=None):
    """A snapshot (our network-snapshot-*.pt or an official *.pkl, path or URL) -> (Precond in eval
    mode, its network config), read by nets.read_ambient_snapshot without running file code."""
    try:
        net, net_config = nets.read_ambient_snapshot(source, build_network, training_options,
                                                     cache_dir or None)
    except (ValueError, FileNotFoundError) as error:
        raise UserError(f'{flag}: {error}')
    if not isinstance(net, Precond):  # an official pickle's UNet
        net = Precond(net, sigma_data=net_config['sigma_data'])
    cuda = torch.device(device).type == 'cuda'  # NHWC convolutions on tensor cores, as in training
    net.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    return net.eval().requires_grad_(False), net_config


def transfer_weights(net, source, cache_dir=''):
    """--transfer: copies the tensors of a snapshot (ours or an official pickle, path or URL) whose
    names match into net, as the official copy_params_and_buffers(require_all=False)."""
    loaded, _ = load_network(source, 'cpu', cache_dir=cache_dir, flag='--transfer')
    own, theirs = net.state_dict(), loaded.state_dict()
    matching = {k: v for k, v in theirs.items() if k in own}
    wrong = [k for k, v in matching.items() if own[k].shape != v.shape]
    require(not wrong, wrong and f'--transfer: {wrong[0]} of {source} has shape '
            f'{tuple(theirs[wrong[0]].shape)}, this network {tuple(own[wrong[0]].shape)} '
            '(another --arch, --cbase, --cres or resolution?)')
    require(matching, f'--transfer: no tensor of {source} fits this network (another --arch, '
            '--cres or size?)')
    net.load_state_dict(matching, strict=False)


# --------------------------------------------------------------------------------------------------
# Run folder, training states, snapshots, progress


def run_description(cfg):
    """The run folder's name after its number, EDM-like: data, precond, p, delta, arch, batch."""
    data_name = 'cifar10' if cfg.data == 'cifar10' else \
        os.path.splitext(os.path.basename(cfg.data.rstrip('/')))[0]
    return (f'{data_name}-{cfg.precond}-p{cfg.corruption_probability:g}-'
            f'd{cfg.delta_probability:g}-{cfg.arch}-batch{cfg.batch}'
            + (f'-{cfg.desc}' if cfg.desc else ''))


def start_run_files(cfg, run, log, data, net_config, world, cur_nimg):
    """log.txt (a separator where a resumed run continues), stats.jsonl trimmed to the state,
    config.json, source.py, data-preview.png (the corrupted training images) and the official
    training_options.json."""
    log.open(os.path.join(run.dir, 'log.txt'))
    if run.state:
        log(resumed_line(run.state, cur_nimg))
    trim_stats(run.dir, cur_nimg)
    if get_rank() == 0:
        y, A = data.batch(torch.arange(min(64, data.num_images)), 'cpu')[:2]
        write_run_files(run.dir, dataclasses.asdict(cfg), to_uint8(A * y), network=net_config,
                        world_size=world)
        options = nets.ambient_training_options(cfg, net_config, data.num_raw, run.dir)
        nets.write_atomic(os.path.join(run.dir, 'training_options.json'),
                          json.dumps(options, indent=2).encode())


def save_state(cfg, run_dir, cur_nimg, cur_tick, net, ema, optimizer, rank, world, device,
               net_config=None, precision='fp32'):
    """training-state-<kimg>.pt (weights, optimizer, counters, every rank's dropout generator;
    call it on every rank); with net_config also samples-<kimg>.png (fixed seeds) and
    network-snapshot-<kimg>.pt (EMA weights and the network config: all that generate and eval
    need). Returns the state's path (None on other ranks)."""
    rng = [(torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == 'cuda' else None)] * world
    if world > 1:
        torch.distributed.all_gather_object(rng, rng[0])
    if rank != 0:
        return None
    kimg = kimg_tag(cur_nimg)
    if net_config and cfg.grid:
        grid = generate_images(ema, net_config, list(range(cfg.grid)), device, steps=cfg.steps,
                               precision=precision)
        save_grid(grid, os.path.join(run_dir, f'samples-{kimg}.png'))
    if net_config:
        save_checked(os.path.join(run_dir, f'network-snapshot-{kimg}.pt'),
                     dict(config=net_config, ema=ema.state_dict()))
    path = os.path.join(run_dir, f'training-state-{kimg}.pt')
    save_checked(path, dict(net=net.state_dict(), ema=ema.state_dict(),
                            optimizer=optimizer.state_dict(), cur_nimg=cur_nimg, cur_tick=cur_tick,
                            rng_cpu=[r[0] for r in rng], rng_cuda=[r[1] for r in rng],
                            config=dataclasses.asdict(cfg)))
    return path


def save_checked(path, obj):
    """save_training_state; a failed write (torch reports a full disk as 'unexpected pos') is an
    OSError naming the file, so that main prints one line and exits 1."""
    try:
        save_training_state(path, obj)
    except (OSError, RuntimeError) as error:
        folder = os.path.dirname(os.path.abspath(path))
        full = os.path.isdir(folder) and shutil.disk_usage(folder).free < 2 ** 20
        cause = 'No space left on device' if full else \
            getattr(error, 'strerror', None) or str(error).splitlines()[0]
        raise OSError(errno.ENOSPC if full else getattr(error, 'errno', None) or errno.EIO,
                      cause, path) from None


def restore_state(path, net, ema, optimizer, rank, world, device):
    """Loads a training state (path; '' = none) into net, ema and optimizer; returns (cur_nimg,
    cur_tick). Dropout generators are restored when the number of processes is unchanged."""
    if not path:
        return 0, 0
    require(os.path.isfile(path) and os.path.getsize(path) > 0, f'--resume: {path} '
            + ('is empty (0 bytes)' if os.path.isfile(path) else 'does not exist'))
    state = load_training_state(path)
    require({'net', 'ema', 'optimizer', 'cur_tick'} <= set(state),
            f'--resume: {path} is not a training state of ambient.py')
    try:
        net.load_state_dict(state['net'])
        ema.load_state_dict(state['ema'])
        optimizer.load_state_dict(state['optimizer'])
    except Exception as error:  # another network
        raise UserError(f'--resume: {path} holds another network ({type(error).__name__}: '
                        f'{str(error).splitlines()[0]})')
    if len(state.get('rng_cpu', [])) == world:
        torch.set_rng_state(state['rng_cpu'][rank])
        if device.type == 'cuda' and state['rng_cuda'][rank] is not None:
            torch.cuda.set_rng_state(state['rng_cuda'][rank], device)
    return state['cur_nimg'], state['cur_tick']


# --------------------------------------------------------------------------------------------------
# Images, seeds, fid.py errors


def to_uint8(images):
    """[-1, 1] floats -> uint8 with EDM's rounding (x * 127.5 + 128, clipped)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def derive_seed(*numbers):
    """A 63-bit seed from a tuple of integers (numpy's SeedSequence), for per-step generators."""
    state = np.random.SeedSequence([int(n) for n in numbers]).generate_state(1, np.uint64)
    return int(state[0] >> 1)


def fid_call(function, *args, **kwargs):
    """Calls a fid.py function; its errors (weights missing offline, a bad reference): one line."""
    try:
        return function(*args, **kwargs)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise UserError(' '.join(str(error).split()))


if __name__ == "__main__":
    main()
