"""Input Perturbation Reduces Exposure Bias in Diffusion Models (DDPM-IP).

Mang Ning, Enver Sangineto, Angelo Porrello, Simone Calderara, Rita Cucchiara. ICML 2023,
arXiv:2301.11706. Official code: forever208/DDPM-IP (openai/guided-diffusion's ADM + two lines).

A diffusion model is trained on x_t made from real data but sampled from its own, slightly wrong,
predictions: at test time it meets inputs it never saw ("exposure bias") and the errors accumulate.
DDPM-IP simulates those errors in training: the network input is y_t = sqrt(ab_t) x0 +
sqrt(1 - ab_t) (eps + gamma xi), xi a fresh standard normal draw, while the target stays eps. The
rest is ADM: cosine schedule, learned variances (hybrid loss), loss-second-moment timestep sampling,
respaced ancestral sampling; gamma = 0 is the ADM baseline. `exposure` measures the bias delta_t
(Ning et al., ICLR 2024). Commands, presets, official flags, faithfulness notes: docs/ddpm_ip.md.

Commands (the official command lines of forever208/DDPM-IP run as written, too):
  # CPU smoke run on the embedded 200 CIFAR-10 images: 32 steps, then a 16-image grid
  python ddpm_ip.py --preset=tiny --data=tests/data/cifar10_tiny.npz
  # CIFAR-10 ADM-IP (official recipe: gamma 0.15, global batch 128, dropout 0.3)
  torchrun --standalone --nproc_per_node=8 ddpm_ip.py --preset=cifar10 --data=cifar10
  # 50k images with 100 respaced steps (the paper's FID setting), one PNG per seed
  torchrun --standalone --nproc_per_node=8 ddpm_ip.py generate --network=NET.pt \
      --seeds=0-49999 --timestep_respacing=100 --outdir=out
  # exposure bias of a trained model: 20-step chains started from 1000 real images
  python ddpm_ip.py exposure --network=NET.pt --data=cifar10 --timestep_respacing=20 --num=1000

Read in this order: ip_loss, vb_terms_bpd, GaussianDiffusion, space_timesteps, make_diffusion,
TimestepSampler, sample_chain, sample, training_loop, main.
"""

import argparse
import atexit
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
# Configuration. Each field's trailing comment is its --help text; group comments are help groups.

@dataclasses.dataclass
class Config:
    # data and corruption (the forward process with the input perturbation)
    data: str = ''                                # image folder, EDM zip, npz or cifar10 (required)
    class_cond: bool = False                      # condition on the labels (paper: unconditional)
    num_classes: int = 10                         # labels in [0, num_classes); DDPM-IP NUM_CLASSES
    random_flip: bool = True                      # horizontal flips, p = 0.5; official default
    input_perturbation: float = 0.1               # gamma, training only; README 0.1 (code: 0)
    diffusion_steps: int = 1000                   # T, steps of the diffusion process
    noise_schedule: str = 'cosine'                # cosine or linear; DDPM-IP (code: linear)
    timestep_respacing: str = ''                  # kept steps: '' = all, 100, 10,20 or ddim50
    # network (an --arch preset under the official model flags given; none = the preset's value)
    arch: str = 'adm-cifar10'                     # network preset: adm-* or tiny-adm
    image_size: int = None                        # resolution; sets channel_mult as create_model
    num_channels: int = None                      # base width
    num_res_blocks: int = None                    # residual blocks per resolution
    channel_mult: str = None                      # e.g. 1,2,2,2; '' = from --image_size
    attention_resolutions: str = None             # resolutions with self-attention, e.g. 16,8
    num_heads: int = 4                            # heads where --num_head_channels is -1
    num_head_channels: int = None                 # channels per attention head, -1 = --num_heads
    num_heads_upsample: int = -1                  # upsampling heads, -1 = --num_heads (only)
    dropout: float = None                         # in every residual block (0.3 CIFAR-10, else 0.1)
    use_scale_shift_norm: bool = None             # FiLM time conditioning
    resblock_updown: bool = None                  # resample with residual blocks
    use_new_attention_order: bool = None          # split qkv before the heads (all DDPM-IP models)
    learn_sigma: bool = True                      # learned variances (2C outputs, hybrid loss)
    rescale_timesteps: bool = False               # feed t * 1000 / T to the network; official
    # optimisation (official train_util.py: AdamW, constant lr, no warm-up, no clipping)
    rescale_learned_sigmas: bool = True           # weight the VLB term by T / 1000 (else 1)
    schedule_sampler: str = 'loss-second-moment'  # timestep sampler: uniform or loss-second-moment
    lr: float = 1e-4                              # AdamW learning rate; official default
    lr_anneal_steps: int = 0                      # > 0: lr decays to 0 over this many steps, stop
    weight_decay: float = 0.0                     # AdamW weight decay; official default
    batch: int = 128                              # train: global batch; sampling: per GPU
    batch_gpu: int = None                         # microbatch per GPU; -1 or none = no split
    ema_rate: str = '0.9999'                      # EMA decay per step; a comma list = one EMA each
    kimg: float = 64000                           # training length, thousands of images
    precision: str = None                         # fp32 or bf16 autocast; none = bf16 on CUDA
    compile: bool = None                          # torch.compile the network; none = on CUDA
    # run
    outdir: str = 'runs'                          # train: parent of run folders; else image folder
    preset: str = ''                              # recipe: see PRESETS (cifar10, ..., tiny)
    seed: int = 0                                 # weights, data order, noise; exposure: images
    resume: str = ''                              # training state, auto, or official modelN.pt
    tick: float = 50                              # kimg between progress lines
    log_interval: int = None                      # steps between progress lines (sets --tick)
    snap: int = 25                                # ticks between snapshots and sample grids
    save_interval: int = None                     # steps between snapshots (sets --snap)
    dump: int = 10                                # snapshots between kept training states
    grid: int = 64                                # images per sample grid (seeds 0..grid-1)
    grid_steps: str = '100'                       # respacing of the sample grids
    device: str = ''                              # cpu or cuda; '' = cuda when available
    dry_run: bool = False                         # print the resolved config and network, exit
    # sampling
    network: str = ''                             # network-snapshot-*.pt or released .pt (required)
    use_ddim: bool = False                        # DDIM instead of ancestral sampling
    eta: float = 0.0                              # DDIM noise scale (image_sample.py: always 0)
    clip_denoised: bool = True                    # clamp the predicted x_0 to [-1, 1]; official
    seeds: str = '0-63'                           # one image per seed, e.g. 0-49999 or 1,5,7-9
    # evaluation
    ref: str = ''                                 # statistics from python fid.py ref (required)
    num: int = 50000                              # eval: generated images; exposure: real images
    metrics: str = 'fid'                          # fid.py metrics, comma list: fid,is,sfid,pr,kid
    protocol: str = None                          # edm, adm or pytorch-fid; none = from --ref
    fid_weights: str = None                       # Inception weights; none = $FID_WEIGHTS or cache
    forward_t: int = None                         # respaced index chains start from; none = top
    deterministic: bool = False                   # no sampling noise (the reconstruction test)


# The official README commands. kimg: iteration of the best 100-step FID in the official curves x
# global batch (CIFAR-10: the released ADM_IP_015.pt, 460k steps). docs/ddpm_ip.md#presets
PRESETS = {
    'cifar10':    dict(arch='adm-cifar10', dropout=0.3, input_perturbation=0.15, batch=128,
                       kimg=58880),
    'imagenet32': dict(arch='adm-imagenet32', dropout=0.3, input_perturbation=0.1, batch=512,
                       kimg=2048000),
    'lsun64':     dict(arch='adm-lsun64', dropout=0.1, input_perturbation=0.1, batch=256,
                       kimg=56320),
    'celeba64':   dict(arch='adm-celeba64', dropout=0.1, input_perturbation=0.1, batch=256,
                       kimg=76800),
    'ffhq128':    dict(arch='adm-ffhq128', dropout=0.1, input_perturbation=0.1, batch=128,
                       kimg=23040),
    'tiny':       dict(arch='tiny-adm', dropout=0.0, input_perturbation=0.1, batch=16, kimg=0.5,
                       tick=0.1, snap=5, ema_rate='0.99', lr=2e-4, grid=16, grid_steps='25'),
}

# --------------------------------------------------------------------------------------------------
# The method: the input-perturbed forward process inside ADM's hybrid loss

def ip_loss(net, diffusion, x0, t, eps, xi, gamma, rescale_learned_sigmas=True, class_labels=None):
    """DDPM-IP loss per sample (Ning et al. 2023, Alg. 1):
        y_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) (eps + gamma xi),
        L = || eps - eps_theta(y_t, t) ||^2 + w L_vlb(y_t).
    x0 (B, C, H, W) in [-1, 1]; t (B,) int64 indices of `diffusion`; eps, xi (B, C, H, W)
    independent N(0, I). Returns (loss, mse, vb), each (B,); vb before its weight w = T/1000
    (rescale_learned_sigmas) or 1, zero for fixed variances. docs/ddpm_ip.md#the-perturbation"""
    # The perturbed input: the target below stays eps, not eps + gamma xi.
    y_t = diffusion.q_sample(x0, t, eps + gamma * xi)                     # (B, C, H, W)
    out = net(y_t, diffusion.model_time[t], class_labels).float()         # (B, C or 2C, H, W)
    eps_hat = out[:, :x0.shape[1]]
    mse = (eps - eps_hat).square().flatten(1).mean(1)                     # (B,) L_simple
    if out.shape[1] == x0.shape[1]:  # fixed variances: nothing for the VLB to train
        return mse, mse, torch.zeros_like(mse)
    # L_vlb through a copy of the output whose eps half is detached: it trains the variance only
    # (Nichol & Dhariwal Eq. 16), on the same perturbed y_t.
    frozen = torch.cat([eps_hat.detach(), out[:, x0.shape[1]:]], dim=1)
    vb = vb_terms_bpd(diffusion, frozen, x0, y_t, t)                      # (B,) bits/dim
    weight = diffusion.num_timesteps / 1000 if rescale_learned_sigmas else 1.0
    return mse + weight * vb, mse, vb


def vb_terms_bpd(diffusion, out, x0, x_t, t):
    """One term of the variational bound in bits/dim, (B,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
    for t > 0 and the decoder NLL at t = 0 (Ho et al. Eq. 5; Nichol & Dhariwal Sec. 3.1)."""
    true_mean, true_log_variance = diffusion.q_posterior(x0, x_t, t)
    mean, log_variance, _ = diffusion.p_mean_variance(out, x_t, t, clip_denoised=False)
    kl = normal_kl(true_mean, true_log_variance, mean, log_variance)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)
    return torch.where(t == 0, nll.flatten(1).mean(1), kl.flatten(1).mean(1)) / math.log(2)


def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)), elementwise, in nats."""
    return 0.5 * (-1 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) of 8-bit data in [-1, 1] under N(mean, e^(2 log_scale)) integrated over the pixel's
    bin of half-width 1/255, open-ended at the extremes (Ho et al. Eq. 13).
    docs/ddpm_ip.md#diffusion-math"""
    # official tanh form
    cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    inv_std = torch.exp(-log_scale)
    cdf_plus, cdf_minus = cdf(inv_std * (x - mean + 1 / 255)), cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_minus = (1 - cdf_minus).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))

# --------------------------------------------------------------------------------------------------
# Gaussian diffusion: schedules, respacing, posterior (Ho et al. 2020; Nichol & Dhariwal 2021)

def get_named_beta_schedule(name, steps):
    """Betas (steps,) float64. linear: 1e-4..0.02 rescaled to `steps` (Ho et al.); cosine: Nichol &
    Dhariwal Eq. 17, beta_i = 1 - f((i+1)/T) / f(i/T) clipped at 0.999."""
    if name == 'linear':
        scale = 1000 / steps
        return torch.from_numpy(np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64))
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)],
                        dtype=torch.float64)


def space_timesteps(steps, section_counts):
    """Original timesteps kept by respacing (Nichol & Dhariwal Sec. 4). 'ddimN': the smallest
    integer stride giving exactly N steps from 0. Else comma-separated counts for `steps` split into
    equal sections, each walked with the stride (size - 1) / (count - 1). Returns a sorted list;
    ValueError if impossible. docs/ddpm_ip.md#respacing"""
    if section_counts.startswith('ddim'):
        count = int(section_counts[4:])
        for stride in range(1, steps):
            if len(range(0, steps, stride)) == count:
                return list(range(0, steps, stride))
        raise ValueError(f'cannot create exactly {count} steps with an integer stride')
    counts = [int(n) for n in section_counts.split(',')]
    kept, start = [], 0
    for i, count in enumerate(counts):
        # the first sections one step longer
        size = steps // len(counts) + (1 if i < steps % len(counts) else 0)
        if not 0 <= count <= size:
            raise ValueError(f'cannot divide a section of {size} steps into {count}')
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))  # Python rounds half to even, as official
            # A running sum, not j * stride: the two round differently (e.g. '21' keeps 499).
            position += stride
        start += size
    if not kept:
        raise ValueError(f'{section_counts!r} keeps no step')
    return sorted(set(kept))


class GaussianDiffusion:
    """The schedule arrays, float64 on `device`, of the process that keeps the original timesteps
    `use_timesteps` (respacing: betas recomputed from alpha_bar). Gathered per sample as float32.
    docs/ddpm_ip.md#diffusion-math"""

    def __init__(self, betas, use_timesteps=None, device='cpu', rescale_timesteps=False):
        betas = betas.to(torch.float64)
        original_steps = len(betas)
        if use_timesteps is not None:
            alphas_cumprod = torch.cumprod(1 - betas, 0)[use_timesteps]
            previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
            betas = 1 - alphas_cumprod / previous
        # The network sees the original t (--rescale_timesteps: t * 1000 / T in float32).
        self.timestep_map = torch.tensor(use_timesteps or range(len(betas)), device=device)
        self.model_time = self.timestep_map.float() * (1000.0 / original_steps) \
            if rescale_timesteps else self.timestep_map
        self.num_timesteps = len(betas)
        ab = torch.cumprod(1 - betas, 0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        posterior_variance = betas * (1 - ab_prev) / (1 - ab)
        arrays = dict(
            betas=betas, alphas_cumprod=ab, alphas_cumprod_prev=ab_prev,
            sqrt_alphas_cumprod=ab.sqrt(), sqrt_one_minus_alphas_cumprod=(1 - ab).sqrt(),
            sqrt_recip_alphas_cumprod=(1 / ab).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1 / ab - 1).sqrt(),
            posterior_variance=posterior_variance,
            # Clipped because beta_tilde_0 = 0: entry 0 is replaced by beta_tilde_1.
            posterior_log_variance_clipped=torch.cat([posterior_variance[1:2],
                                                      posterior_variance[1:]]).log(),
            posterior_mean_coef1=betas * ab_prev.sqrt() / (1 - ab),
            posterior_mean_coef2=(1 - ab_prev) * (1 - betas).sqrt() / (1 - ab),
            log_betas=betas.log(),
            # learn_sigma=False: FIXED_LARGE variances, beta_tilde_1 at t = 0 (better decoder NLL).
            fixed_large_log_variance=torch.cat([posterior_variance[1:2], betas[1:]]).log(),
        )
        for name, value in arrays.items():
            setattr(self, name, value.to(device))

    def at(self, array, t):
        """Per-sample values array[t] (B,) as float32 (B, 1, 1, 1)."""
        return array[t].float()[:, None, None, None]

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0) (Ho et al. Eq. 4)."""
        return (self.at(self.sqrt_alphas_cumprod, t) * x0
                + self.at(self.sqrt_one_minus_alphas_cumprod, t) * noise)

    def q_posterior(self, x0, x_t, t):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. Eq. 6-7)."""
        mean = (self.at(self.posterior_mean_coef1, t) * x0
                + self.at(self.posterior_mean_coef2, t) * x_t)
        return mean, self.at(self.posterior_log_variance_clipped, t)

    def p_mean_variance(self, out, x_t, t, clip_denoised):
        """Mean, log-variance and x_0 prediction of p(x_{t-1} | x_t) from the network output `out`
        (B, C or 2C, H, W): eps prediction (Ho et al. Eq. 11) and, for 2C channels, the learned
        interpolation log sigma^2 = v' log beta_t + (1 - v') log beta_tilde_t, v' = (v + 1) / 2
        (Nichol & Dhariwal Eq. 15)."""
        eps, v = out.split(x_t.shape[1], dim=1) if out.shape[1] == 2 * x_t.shape[1] else (out, None)
        if v is None:
            log_variance = self.at(self.fixed_large_log_variance, t).expand_as(x_t)
        else:
            frac = (v + 1) / 2
            min_log = self.at(self.posterior_log_variance_clipped, t)
            max_log = self.at(self.log_betas, t)
            log_variance = frac * max_log + (1 - frac) * min_log
        x0_hat = (self.at(self.sqrt_recip_alphas_cumprod, t) * x_t
                  - self.at(self.sqrt_recipm1_alphas_cumprod, t) * eps)  # Ho et al. Eq. 15
        if clip_denoised:
            x0_hat = x0_hat.clamp(-1, 1)
        mean, _ = self.q_posterior(x0_hat, x_t, t)
        return mean, log_variance, x0_hat


def make_diffusion(noise_schedule, diffusion_steps, timestep_respacing='', device='cpu',
                   rescale_timesteps=False):
    """The process of official create_gaussian_diffusion: all T steps, or those kept by
    timestep_respacing."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    # Official: even the full process is respaced, so its betas are re-derived from alpha_bar.
    kept = space_timesteps(diffusion_steps, timestep_respacing or str(diffusion_steps))
    return GaussianDiffusion(betas, kept, device, rescale_timesteps)


class TimestepSampler:
    """Importance sampling of t (Nichol & Dhariwal Sec. 3.3): p_t proportional to sqrt(E[L_t^2])
    over the last 10 losses of each t, mixed with 0.001 uniform; uniform until every t has 10.
    Weights 1 / (T p_t) keep the objective unbiased. kind='uniform' always samples uniformly. State
    on the device, no host sync. docs/ddpm_ip.md#sampler"""

    def __init__(self, num_timesteps, kind, device, history_per_term=10, uniform_prob=0.001):
        self.kind, self.history_per_term, self.uniform_prob = kind, history_per_term, uniform_prob
        # Per t a first-in first-out queue of its last losses, oldest in column 0 (official array).
        self.history = torch.zeros(num_timesteps, history_per_term, dtype=torch.float64,
                                   device=device)
        # filled entries per t
        self.counts = torch.zeros(num_timesteps, dtype=torch.int64, device=device)

    def probabilities(self):
        T = len(self.counts)
        uniform = torch.full((T,), 1 / T, dtype=torch.float64, device=self.counts.device)
        if self.kind == 'uniform':
            return uniform
        w = self.history.square().mean(1).sqrt()
        w = w / w.sum() * (1 - self.uniform_prob) + self.uniform_prob / T
        return torch.where((self.counts == self.history_per_term).all(), w, uniform)

    def sample(self, batch, generator):
        """(t, weights), each (batch,), by inverse-CDF sampling (the official code uses
        np.random.choice)."""
        p = self.probabilities()
        u = torch.rand(batch, dtype=torch.float64, generator=generator, device=p.device)
        t = torch.searchsorted(p.cumsum(0), u * p.sum(), right=True).clamp(max=len(p) - 1)
        return t, (1 / (len(p) * p[t])).float()

    def update(self, t, losses):
        """Pushes the losses (N,) of timesteps t (N,), in order, onto the queues of their timesteps:
        a full queue drops its oldest entry (official update_with_all_losses, for all N at once)."""
        if self.kind == 'uniform':
            return
        T, H = self.history.shape
        # (T,) losses arriving per t
        new = torch.zeros_like(self.counts).index_add_(0, t, torch.ones_like(t))
        # (T,) entries pushed out
        dropped = (self.counts + new - H).clamp(min=0)
        # Old entries move left by the number pushed out; new ones follow them in arrival order.
        column = torch.arange(H, device=t.device)
        # (T, H) old column or beyond
        source = column + dropped[:, None]
        shifted = self.history.gather(1, source.clamp(max=H - 1))
        self.history = torch.where(source < self.counts[:, None], shifted, self.history)
        t_sorted, order = torch.sort(t, stable=True)
        # k-th of its t
        arrival = torch.arange(len(t), device=t.device) - torch.searchsorted(t_sorted, t_sorted)
        # < 0: pushed out at once
        slot = self.counts[t_sorted] + arrival - dropped[t_sorted]
        keep = slot >= 0
        # Losses pushed out within this batch go to a throw-away row: no index depends on the data.
        spare = torch.cat([self.history, self.history.new_zeros(1, H)])
        spare[torch.where(keep, t_sorted, T), slot.clamp(min=0)] = losses[order].double()
        self.history = spare[:T]
        self.counts = (self.counts + new).clamp(max=H)

# --------------------------------------------------------------------------------------------------
# Samplers: ancestral (learned variance) and DDIM, on the full or a respaced process

@torch.no_grad()
def sample_chain(net, diffusion, x, start=None, clip_denoised=True, eta=None, class_labels=None,
                 randn_like=torch.randn_like):
    """Reverse process from respaced index `start` (default T'-1) down to 0 from x = x_start (B, C,
    H, W), yielding (i, x_{i-1}, x0_hat) per step. eta=None: ancestral with the model's variance (Ho
    et al. Alg. 2, no noise at the last step); eta >= 0: DDIM (Song et al. Eq. 12, sigma Eq. 16),
    eps from the clipped x0_hat. `net(x, t, labels)` gets the original timestep and returns float32.
    docs/ddpm_ip.md#samplers"""
    start = diffusion.num_timesteps - 1 if start is None else start
    for i in range(start, -1, -1):
        t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
        # the net sees the original timestep
        out = net(x, diffusion.model_time[t], class_labels)
        mean, log_variance, x0_hat = diffusion.p_mean_variance(out, x, t, clip_denoised)
        # drawn at every step, as official
        noise = randn_like(x) * (i > 0)
        if eta is None:
            x = mean + torch.exp(0.5 * log_variance) * noise
        else:  # DDIM ignores the learned variance
            ab = diffusion.at(diffusion.alphas_cumprod, t)
            ab_prev = diffusion.at(diffusion.alphas_cumprod_prev, t)
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


# --------------------------------------------------------------------------------------------------
# Training loop

def training_loop(c, x_data, y_data, net_kwargs, run_dir, resumed, rank, world_size, device, log):
    """Official train_util.py run_loop counted in images: the IP hybrid loss under importance-
    sampled t, AdamW at a constant lr, EMAs every step; per tick a progress line and stats.jsonl
    record, per --snap ticks a training state, network snapshots and a sample grid.
    x_data uint8 (N, C, H, W), y_data int64 (N,) or None."""
    # Performance settings.
    torch.backends.cuda.matmul.allow_tf32 = True   # TF32 matmuls: free speed on Ampere+
    torch.backends.cudnn.allow_tf32 = True         # same for convolutions
    torch.backends.cudnn.benchmark = True          # fixed shapes: cuDNN picks the fastest kernels
    cuda = device.type == 'cuda'
    memory_format = torch.channels_last if cuda else torch.contiguous_format  # NHWC on tensor cores

    # Data as a uint8 tensor on the device when it fits (flips and scaling happen there).
    data = torch.from_numpy(x_data)                                # (N, C, H, W) uint8
    if cuda and data.nbytes < 0.2 * torch.cuda.get_device_properties(device).total_memory:
        data = data.to(device)
    elif cuda:
        data = data.pin_memory()
    labels = torch.from_numpy(y_data).to(data.device) if c.class_cond else None
    num_images, channels, resolution = data.shape[0], data.shape[1], data.shape[2]

    # Network, EMAs (one per --ema_rate), optimizer, timestep sampler.
    torch.manual_seed(c.seed)                      # the same initial weights for any GPU count
    model = nets.UNet(**net_kwargs).to(device).train().to(memory_format=memory_format)
    torch.manual_seed(c.seed * world_size + rank)  # dropout streams; all else is seeded per step
    rates = [float(rate) for rate in c.ema_rate.split(',')]
    emas = [copy.deepcopy(model).eval().requires_grad_(False) for _ in rates]
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                                  fused=cuda)
    diffusion = make_diffusion(c.noise_schedule, c.diffusion_steps, c.timestep_respacing, device,
                               c.rescale_timesteps)
    sampler = TimestepSampler(diffusion.num_timesteps, c.schedule_sampler, device)
    parameters = sum(p.numel() for p in model.parameters())
    log(f'network: {parameters:,} parameters, {json.dumps(net_kwargs)}')
    cur_nimg = 0 if not resumed else \
        apply_resume(resumed, c, model, emas, optimizer, sampler, run_dir, rank, world_size, log)

    ddp = model if world_size == 1 else \
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    net = torch.compile(ddp) if c.compile else ddp  # --compile: fused kernels, default on CUDA
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.precision == 'bf16')
    grid_diffusion = make_diffusion(c.noise_schedule, c.diffusion_steps, c.grid_steps, device,
                                    c.rescale_timesteps)

    # Statistics summed on the device, read once per tick: loss, grad norm, steps, then per
    # quartile of t: mse, vb, count.
    stats = torch.zeros(3 + 3 * 4, dtype=torch.float64, device=device)
    local_batch = c.batch // world_size                # per GPU
    rounds = local_batch // c.batch_gpu                # gradient accumulation rounds
    total_nimg, tick_nimg = round(c.kimg * 1000), round(c.tick * 1000)
    clock = dict(tick_nimg=cur_nimg, tick_time=time.time(), start_time=time.time())
    kept_states = KeptStates(c, tick_nimg, cur_nimg, resumed, run_dir)  # which states stay on disk
    ticks_done, start_nimg, stop = 0, cur_nimg, StopSignal()
    while cur_nimg < total_nimg:  # a resumed run that is already done trains no further
        # Draw this step's randomness for the whole global batch, then take this rank's strided
        # share: the result does not depend on the GPU count, and a resumed run replays it exactly.
        step = cur_nimg // c.batch
        gen = torch.Generator(device).manual_seed(c.seed * (1 << 32) + step)
        # Official code samples t per microbatch, after the previous one's update: the same with
        # one round (the default).
        t_all, w_all = sampler.sample(c.batch, gen)                      # (B,) timesteps, weights
        shape = (c.batch, channels, resolution, resolution)
        eps_all = torch.randn(shape, generator=gen, device=device)       # (B, C, H, W)
        xi_all = torch.randn(shape, generator=gen, device=device)        # (B, C, H, W)
        flip_all = torch.rand(c.batch, generator=gen, device=device) < 0.5  # official random_flip
        index_all = batch_indices(step, c.batch, num_images, c.seed, data.device)  # (B,)

        # Accumulate gradients.
        losses = []
        for r in range(rounds):
            # This rank's r-th microbatch: global samples rank, rank + world_size, ...
            first = rank + r * c.batch_gpu * world_size
            mb = slice(first, first + c.batch_gpu * world_size, world_size)
            x0 = data[index_all[mb]].to(device, non_blocking=True)     # (b, C, H, W) uint8
            if c.random_flip:
                x0 = torch.where(flip_all[mb, None, None, None], x0.flip(3), x0)
            x0 = (x0.float() / 127.5 - 1).contiguous(memory_format=memory_format)
            t, w = t_all[mb], w_all[mb]
            y = labels[index_all[mb]].to(device) if labels is not None else None
            sync = r == rounds - 1 or world_size == 1  # DDP all-reduces in the last round only
            with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast:
                loss, mse, vb = ip_loss(net, diffusion, x0, t, eps_all[mb], xi_all[mb],
                                        c.input_perturbation, c.rescale_learned_sigmas, y)
                # Mean over the per-GPU batch; DDP then averages over GPUs.
                # docs/ddpm_ip.md#microbatches
                (loss * w).sum().div(local_batch).backward()
            losses.append(loss.detach())
            # Bins of the official loss_q0..q3 logs; mse and vb unweighted (official: weighted).
            quartile = t * 4 // diffusion.num_timesteps                # (b,)
            stats[0] += (loss * w).detach().sum() / c.batch            # weighted, as official
            parts = torch.stack([mse, vb, torch.ones_like(mse)]).detach().double()  # (3, b)
            stats[3:].view(3, 4).index_add_(1, quartile, parts)
        # Every rank records all losses in global order, so the samplers stay identical.
        # docs/ddpm_ip.md#sampler
        losses = torch.cat(losses)                                     # (local_batch,)
        if world_size > 1:
            gathered = [torch.empty_like(losses) for _ in range(world_size)]
            dist.all_gather(gathered, losses)
            losses = torch.stack(gathered, dim=1).flatten()            # (B,) global order
        sampler.update(t_all, losses)

        # Update weights (official: constant lr, or linear decay to 0 with --lr_anneal_steps).
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
        if stop.check():  # Ctrl-C or SIGTERM: a training state now, one line, exit
            state = save_snapshot(c, model, emas, optimizer, sampler, net_kwargs, cur_nimg, False,
                                  run_dir, rank, world_size, device)
            stop.exit(log, state, cur_nimg)
        if not done and cur_nimg < clock['tick_nimg'] + tick_nimg:
            continue

        # Maintenance once per tick: progress line and stats.jsonl (the tick's one host sync).
        report_tick(stats, cur_nimg, total_nimg, clock, optimizer.param_groups[0]['lr'],
                    world_size, rank, device, run_dir, log)
        ticks_done += 1
        if done or ticks_done % c.snap == 0:  # training state, snapshot and sample grid
            state = save_snapshot(c, model, emas, optimizer, sampler, net_kwargs, cur_nimg,
                                  kept_states.kept(cur_nimg), run_dir, rank, world_size, device)
            kept_states.saved(state, cur_nimg, rank)
            if rank == 0:  # fixed-seed grid from the (first) EMA network
                images = generate_images(make_denoiser(emas[0], c.precision), grid_diffusion,
                                         list(range(c.grid)), (channels, resolution, resolution),
                                         net_kwargs['label_dim'], device, c)
                save_grid(images, os.path.join(run_dir, f'samples-{cur_nimg // 1000:06d}.png'))
            if world_size > 1:
                dist.barrier()
        clock.update(tick_nimg=cur_nimg, tick_time=time.time())
    stop.close()
    log(done_line(cur_nimg - start_nimg, time.time() - clock['start_time']))

# --------------------------------------------------------------------------------------------------
# Evaluation: generate, sample, eval (FID through fid.py) and the exposure-bias measurement

class StackedRandomGenerator:
    """One generator per image: image k depends only on seed k, whatever the batch or GPU count."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn_like(self, x):
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                            for g in self.generators])


def generate_images(denoiser, diffusion, seeds, shape, label_dim, device, c, return_labels=False):
    """uint8 (B, C, H, W) images for `seeds`, official conversion: clamp((x + 1) * 127.5) truncated
    to uint8; class-conditional networks get a label per seed, uniform in [0, label_dim) (returned
    with return_labels)."""
    rnd = StackedRandomGenerator(device, seeds)
    x_T = rnd.randn_like(torch.empty(len(seeds), *shape, device=device))
    labels = None if not label_dim else \
        torch.stack([torch.randint(label_dim, (), generator=g, device=device)
                     for g in rnd.generators])
    x = sample(denoiser, diffusion, x_T, clip_denoised=c.clip_denoised,
               eta=c.eta if c.use_ddim else None, class_labels=labels, randn_like=rnd.randn_like)
    images = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return (images, labels) if return_labels else images


def exposure_bias(net, diffusion, x0, start, noise, clip_denoised=True, eta=None, class_labels=None,
                  randn_like=torch.randn_like):
    """Chains from real images x0 (B, C, H, W): x_start = q_sample(x0, start, noise), then the
    sampler down to 0. Training sees x_t - sqrt(ab_t) x0 with std sqrt(1 - ab_t); sampling drifts
    from it. Returns the batch sums of r = x_t - sqrt(ab_t) x0 and r^2 for t = start-1 .. 0, each
    (start, C, H, W) float64, and the batch sum of the per-image mean |x0_hat - x0| of the final
    sample. docs/ddpm_ip.md#exposure-bias"""
    t = torch.full((x0.shape[0],), start, dtype=torch.int64, device=x0.device)
    x = diffusion.q_sample(x0, t, noise)
    sums, squares = [], []
    chain = sample_chain(net, diffusion, x, start, clip_denoised, eta, class_labels, randn_like)
    for i, x, _ in chain:
        if i > 0:
            sqrt_ab = diffusion.at(diffusion.sqrt_alphas_cumprod, torch.full_like(t, i - 1))
            r = (x - sqrt_ab * x0).double()
            sums.append(r.sum(0))
            squares.append(r.square().sum(0))
    return torch.stack(sums), torch.stack(squares), (x - x0).abs().flatten(1).mean(1).double().sum()


def exposure_table(sums, squares, num, diffusion, start):
    """delta_t = (sigma_hat_t - sqrt(1 - ab_t))^2, sigma_hat_t = per-pixel std over the `num` chains
    averaged over pixels (Ning et al. ICLR 2024). Rows from t = start-1 down to 0, original
    timesteps."""
    mean = sums / num
    sigma_hat = (squares / num - mean.square()).clamp(min=0).sqrt().flatten(1).mean(1)
    sigma_train = diffusion.sqrt_one_minus_alphas_cumprod[:start].flip(0)
    delta = (sigma_hat - sigma_train).square()
    return [dict(t=int(t), sigma_hat=float(s), sigma_train=float(g), delta=float(d))
            for t, s, g, d in zip(diffusion.timestep_map[:start].flip(0), sigma_hat, sigma_train,
                                  delta)]


def run_sampling_command(command, c, rank, world_size, device, log):
    """sample: samples_NxHxWx3.npz (official image_sample.py) and one PNG per image. generate: one
    PNG per seed. eval: metrics via fid.compute_metrics. exposure: the delta_t table."""
    net, diffusion = load_network(c.network, c, device)
    denoiser = make_denoiser(net, c.precision)
    shape, label_dim = (net.in_channels, net.img_resolution, net.img_resolution), net.label_dim
    eta = c.eta if c.use_ddim else None
    sampler_desc = dict(timestep_respacing=c.timestep_respacing or str(diffusion.num_timesteps),
                        sampler=f'ddim eta={c.eta:g}' if c.use_ddim else 'ancestral',
                        clip_denoised=c.clip_denoised)
    results_dir = os.path.dirname(os.path.abspath(c.network))
    if command in ('sample', 'generate'):
        check_writable(c.outdir, '--outdir')
        if rank == 0:
            os.makedirs(c.outdir, exist_ok=True)
        seeds, labels = parse_seeds(c.seeds), {}
        for batch in rank_batches(seeds, c.batch, rank, world_size):
            images, batch_labels = generate_images(denoiser, diffusion, batch, shape, label_dim,
                                                   device, c, True)
            for i, (seed, image) in enumerate(zip(batch, images)):
                save_grid(image[None], os.path.join(c.outdir, f'{seed:06d}.png'))
                labels[seed] = int(batch_labels[i]) if label_dim else None
        if command == 'sample':
            save_official_samples(c.outdir, seeds, labels, label_dim, rank, world_size, log)
        log(f'generated {len(seeds)} images in {c.outdir}')
        return
    check_writable(results_dir, '--network (its folder takes the results)')
    if command == 'eval':
        # Protocol, weights and reference first: a missing file or a mismatch shows before sampling.
        metrics = tuple(c.metrics.split(','))
        try:
            ref = fid.load_ref(c.ref)
            detector = fid.load_inception(c.fid_weights, device=device)
            protocol = fid.resolve_protocol(protocol=c.protocol, ref=ref, metrics=metrics,
                                            detector=detector, num=c.num)
        except (OSError, ValueError) as e:
            raise UserError(f'eval: {e}') from None
        num = protocol['num'] or c.num
        batches = (generate_images(denoiser, diffusion, seeds, shape, label_dim, device, c)
                   for seeds in rank_batches(list(range(num)), c.batch, rank, world_size))
        record = dict(network=c.network, num=num, ref=c.ref, **sampler_desc,
                      **fid.compute_metrics(batches, ref, metrics=metrics, device=device,
                                            detector=detector, num_images=num, protocol=protocol))
        log(json.dumps(record))
        if rank == 0:
            append_jsonl(os.path.join(results_dir, 'metrics-ddpm_ip.jsonl'), record)
        return

    # exposure: chains from respaced index --forward_t over a fixed random subset of --num images.
    start = diffusion.num_timesteps - 1 if c.forward_t is None else c.forward_t
    require(1 <= start < diffusion.num_timesteps,
            f'--forward_t must be in [1, {diffusion.num_timesteps - 1}]')
    x_data, y_data = load_dataset(c.data, label_dim, shape)
    order = torch.randperm(len(x_data), generator=torch.Generator().manual_seed(c.seed))
    chosen = order[:c.num].tolist()
    totals = [torch.zeros(size, dtype=torch.float64, device=device)  # sums of r, r^2, |x0_hat - x0|
              for size in ((start, *shape), (start, *shape), ())]
    for indices in rank_batches(chosen, c.batch, rank, world_size):
        x0 = torch.from_numpy(x_data[indices]).to(device).float() / 127.5 - 1
        labels = torch.from_numpy(y_data[indices]).to(device) if label_dim else None
        rnd = StackedRandomGenerator(device, indices)  # noise of image k depends on k only
        # --deterministic: x_{t-1} = mu_theta(x_t) (official exposure_bias_deterministic branch).
        parts = exposure_bias(denoiser, diffusion, x0, start, rnd.randn_like(x0), c.clip_denoised,
                              eta, labels, torch.zeros_like if c.deterministic else rnd.randn_like)
        totals = [a + b for a, b in zip(totals, parts)]
    if world_size > 1:
        for tensor in totals:
            dist.all_reduce(tensor)
    num = len(chosen)
    rows = exposure_table(totals[0], totals[1], num, diffusion, start)
    for row in rows:
        log(f't {row["t"]:4d} | std of x_t - sqrt(ab) x0: sampled {row["sigma_hat"]:.4f}, '
            f'training {row["sigma_train"]:.4f} | delta_t {row["delta"]:.3e}')
    record = dict(network=c.network, data=c.data, num=num, forward_t=start,
                  deterministic=c.deterministic, **sampler_desc, x0_l1=float(totals[2]) / num,
                  delta_sum=sum(r['delta'] for r in rows), per_step=rows)
    log(f'exposure bias: sum of delta_t {record["delta_sum"]:.4e} | '
        f'final |x0_hat - x0| {record["x0_l1"]:.4f}')
    if rank == 0:
        append_jsonl(os.path.join(results_dir, 'exposure-ddpm_ip.jsonl'), record)

# --------------------------------------------------------------------------------------------------
# Main

def main(argv=None):
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    official_sample = any(a.split('=')[0] in SAMPLE_ONLY for a in argv)
    if argv[:1] not in [[name] for name in COMMAND_HELP] and official_sample:
        argv = ['sample'] + argv  # image_sample.py's command line, as written
    commands = {name: (functools.partial(run_command, name), text)
                for name, text in COMMAND_HELP.items()}
    run_main(commands, argv, TITLE, NOTE)


def run_command(command, argv):
    """One command: every check first (nothing is written before), then training or sampling."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    c = check_config(parse_args([command, *argv])[1], command, world_size)
    if c.dry_run:  # no file read or written, nothing downloaded
        network = describe_network(c, command)
        print(json.dumps({'command': command, 'resolved_network': network, **dataclasses.asdict(c)},
                         indent=2))
        return
    rank, world_size, device = init_distributed(c.device)
    cuda = device.type == 'cuda'
    c = dataclasses.replace(c, precision=c.precision or ('bf16' if cuda else 'fp32'),
                            compile=cuda if c.compile is None else c.compile)
    if command != 'train':
        run_sampling_command(command, c, rank, world_size, device, Logger())
        return
    x_data, y_data, net_kwargs, resumed = prepare_training(c, rank, world_size)

    # The run folder: new, or the one --resume=auto continues (locked while this process writes).
    data_name = os.path.basename(os.path.normpath(c.data)).split('.')[0]
    desc = f'{data_name}-{c.arch}-ip{c.input_perturbation:g}-batch{c.batch}'
    log = Logger()
    run = open_run(c.outdir, desc, dataclasses.asdict(c), c.resume, log)
    try:
        log.open(os.path.join(run.dir, 'log.txt'))
        write_run_files(run.dir, dataclasses.asdict(c), x_data[:c.grid], network=net_kwargs)
        log(f'torch {torch.__version__}, {world_size} process(es), run folder {run.dir}')
        training_loop(c, x_data, y_data, net_kwargs, run.dir, resumed, rank, world_size, device,
                      log)
    finally:
        log.close()
        if run.lock:
            run.lock.release()


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
# ddpm_ip's commands and flags

COMMAND_HELP = {  # name: what it does (the top-level --help lists them)
    'train': 'train a model (the default command; official scripts/image_train.py)',
    'sample': 'official scripts/image_sample.py: samples_NxHxWx3.npz (arr_0, arr_1 labels) and '
              'one PNG per image',
    'generate': 'one PNG per seed, e.g. --seeds=0-49999',
    'eval': 'sample in memory and report fid.py metrics (FID, IS, ...) against a reference',
    'exposure': 'measure the exposure bias delta_t of chains started from real images',
}
TITLE = ('Input Perturbation Reduces Exposure Bias in Diffusion Models (Ning et al., ICML 2023), '
         'DDPM-IP.')
NOTE = ('Without a command: official image_sample.py flags (--model_path, --num_samples, --use_ddim, '
        '--clip_denoised) mean sample, anything else train.')
SAMPLE_ONLY = ('--model_path', '--num_samples', '--use_ddim', '--clip_denoised')  # image_sample.py's
# the commands that take a flag; every command takes the others (the model and diffusion flags)
FLAG_COMMANDS = {
    ('train',): 'random_flip schedule_sampler lr lr_anneal_steps weight_decay batch_gpu ema_rate kimg '
                'compile preset resume tick log_interval snap save_interval dump grid grid_steps',
    ('train', 'exposure'): 'data seed',
    ('train', 'sample', 'generate'): 'outdir',
    ('sample', 'generate', 'eval', 'exposure'): 'network use_ddim eta clip_denoised',
    ('generate', 'sample'): 'seeds',
    ('eval',): 'ref metrics protocol fid_weights',
    ('eval', 'exposure'): 'num',
    ('exposure',): 'forward_t deterministic',
}
SAMPLING_DEFAULTS = {  # per GPU; sample: official image_sample.py
    'sample': dict(batch=16, seeds='0-9999'), 'generate': dict(batch=64), 'eval': dict(batch=64),
    'exposure': dict(batch=64)}


def per_gpu_to_global(batch_size):
    return batch_size * int(os.environ.get('WORLD_SIZE', '1'))


def num_samples_to_seeds(num_samples):
    require(num_samples >= 1, '--num_samples must be >= 1')
    return f'0-{num_samples - 1}'


# The official flags (forever208/DDPM-IP = guided-diffusion's script_util.py defaults +
# --input_pertub, and the scripts' own flags). A model flag named as ours is the same flag.
# docs/ddpm_ip.md#official-flags
MODEL_FLAGS = {
    '--input_pertub': ours('input_perturbation'),
    **{f'--{name}': ours(name) for name in (
        'image_size num_channels num_res_blocks num_heads num_heads_upsample num_head_channels '
        'attention_resolutions channel_mult dropout class_cond use_scale_shift_norm resblock_updown '
        'use_new_attention_order learn_sigma diffusion_steps noise_schedule timestep_respacing '
        'rescale_timesteps rescale_learned_sigmas').split()},
    '--use_fp16': ours('precision', {True: 'bf16', False: 'fp32'},
                       'True = bf16 autocast (needs no loss scaling), False = fp32', type=parse_bool),
    '--use_checkpoint': ignored(
        'False, the default: no gradient checkpointing', type=parse_bool, group='network',
        refuse={True: 'gradient checkpointing is not implemented; use --batch_gpu (official '
                      '--microbatch) to save memory'}),
    '--use_kl': ignored(
        'False, the default: the hybrid loss', type=parse_bool, group='optimisation',
        refuse={True: 'the pure variational-bound loss is not used by any DDPM-IP model; use the '
                      'hybrid loss (--learn_sigma True)'}),
    '--predict_xstart': ignored(
        'False, the default: eps prediction', type=parse_bool, group='optimisation',
        refuse={True: 'the input perturbation perturbs an eps-prediction model'}),
}
OFFICIAL_FLAGS = {
    'train': {**MODEL_FLAGS, '--data_dir': ours('data'),
              **{f'--{name}': ours(name) for name in 'schedule_sampler lr weight_decay '
                 'lr_anneal_steps ema_rate log_interval save_interval'.split()},
              '--batch_size': ours('batch', per_gpu_to_global, 'per GPU: --batch = batch_size x GPUs',
                                   type=int),
              '--microbatch': ours('batch_gpu'), '--resume_checkpoint': ours('resume'),
              '--fp16_scale_growth': refused('mixed precision is bf16, which needs no loss scaling; '
                                             'use --precision=bf16')},
    'sample': {**MODEL_FLAGS, '--model_path': ours('network'),
               '--clip_denoised': ours('clip_denoised'), '--use_ddim': ours('use_ddim'), '--batch_size': ours('batch'),
               '--num_samples': ours('seeds', num_samples_to_seeds, 'N images: seeds 0 to N-1',
                                     type=int)},
}


def parse_args(argv):
    """(command, Config) from a command line: PRESETS[--preset] under the flags given. Without a
    command word, image_sample.py's flags select `sample`, anything else `train`."""
    argv = [str(a) for a in argv]
    if argv and argv[0] in COMMAND_HELP:
        command = argv.pop(0)
    else:
        command = 'sample' if any(a.split('=')[0] in SAMPLE_ONLY for a in argv) else 'train'
    commands_of = {name: commands for commands, names in FLAG_COMMANDS.items()
                   for name in names.split()}
    fields = [f.name for f in dataclasses.fields(Config)
              if command in commands_of.get(f.name, COMMAND_HELP)]
    official = OFFICIAL_FLAGS.get(command, MODEL_FLAGS)
    return command, parse_config(command, Config, argv, official, PRESETS, fields,
                                 SAMPLING_DEFAULTS.get(command), COMMAND_HELP[command])


def check_config(c, command, world_size):
    """Range checks for every flag (UserError, before anything is written); returns a new Config
    with the batch split and the official step-counted intervals resolved."""
    require(c.input_perturbation >= 0 and math.isfinite(c.input_perturbation),
            '--input_perturbation must be >= 0')
    require(c.noise_schedule in ('linear', 'cosine'), '--noise_schedule must be linear or cosine')
    require(c.diffusion_steps >= 2, '--diffusion_steps must be >= 2')
    require(c.precision in (None, 'fp32', 'bf16'), '--precision must be fp32 or bf16')
    require(c.eta >= 0, '--eta must be >= 0')
    require(c.dropout is None or 0 <= c.dropout < 1, '--dropout must be in [0, 1)')
    require(c.num_classes >= 1 and c.num_heads >= 1, '--num_classes and --num_heads must be >= 1')
    require(c.image_size is None or c.image_size >= 1, '--image_size must be >= 1')
    try:
        resolved = net_overrides(c, c.image_size or 32)
    except ValueError:
        raise UserError(f'--channel_mult and --attention_resolutions must be comma lists of '
                        f'integers, got {c.channel_mult!r} and {c.attention_resolutions!r}') from None
    heads_used = resolved.get('num_head_channels',
                              nets.UNET_PRESETS.get(c.arch, {}).get('num_head_channels', -1))
    require(c.num_heads_upsample in (-1, c.num_heads) or heads_used > 0,
            '--num_heads_upsample (official DDPM-IP flag) is not supported: a head count of the '
            'upsampling path other than --num_heads; use --num_heads')
    for flag, value in (('--timestep_respacing', c.timestep_respacing or str(c.diffusion_steps)),
                        ('--grid_steps', c.grid_steps if command == 'train' else '1')):
        try:
            space_timesteps(c.diffusion_steps, value)
        except ValueError as e:
            raise UserError(f'{flag}: {e}') from None
    if command != 'train':
        require(bool(c.network), '--network is required (official --model_path)')
        require(c.batch >= 1 and c.num >= 1, '--batch and --num must be >= 1')
        require(command != 'eval' or bool(c.ref), '--ref is required for eval')
        require(set(c.metrics.split(',')) <= set(fid.METRICS),
                f'--metrics must be among {",".join(fid.METRICS)}')
        require(command != 'exposure' or bool(c.data), '--data is required for exposure')
        if command in ('sample', 'generate'):
            parse_seeds(c.seeds)
        return dataclasses.replace(c)

    require(bool(c.data), '--data is required')
    adm = [name for name, preset in nets.UNET_PRESETS.items() if preset['arch'] == 'adm']
    require(c.arch in adm, f'--arch must be one of {", ".join(adm)}')
    require(c.schedule_sampler in ('uniform', 'loss-second-moment'),
            '--schedule_sampler must be uniform or loss-second-moment')
    require(c.lr > 0 and c.weight_decay >= 0, '--lr must be > 0 and --weight_decay >= 0')
    try:
        rates = [float(rate) for rate in c.ema_rate.split(',')]
    except ValueError:
        rates = [-1.0]
    require(all(0 <= rate < 1 for rate in rates),
            f'--ema_rate must be a comma list of values in [0, 1), got {c.ema_rate!r}')
    require(c.kimg > 0 and c.tick > 0 and c.lr_anneal_steps >= 0,
            '--kimg and --tick must be > 0, --lr_anneal_steps >= 0')
    require(min(c.snap, c.dump, c.grid) >= 1, '--snap, --dump and --grid must be >= 1')
    require(c.batch >= 1 and c.batch % world_size == 0,
            f'--batch must be a positive multiple of {world_size} (GPUs)')
    local_batch = c.batch // world_size
    # official -1: no split
    batch_gpu = local_batch if c.batch_gpu in (None, -1, 0) else c.batch_gpu
    require(batch_gpu >= 1 and local_batch % batch_gpu == 0,
            f'--batch_gpu must divide the per-GPU batch {local_batch}')
    new = dict(batch_gpu=batch_gpu, log_interval=None, save_interval=None)
    # Official intervals count optimizer steps; ours count images.
    if c.lr_anneal_steps:  # official run_loop stops when the lr reaches 0
        new['kimg'] = c.lr_anneal_steps * c.batch / 1000
    if c.log_interval is not None:
        require(c.log_interval >= 1, '--log_interval must be >= 1')
        new['tick'] = c.log_interval * c.batch / 1000
    if c.save_interval is not None:
        steps_per_tick = round(new.get('tick', c.tick) * 1000) / c.batch
        require(c.save_interval >= 1 and c.save_interval % steps_per_tick == 0,
                f'--save_interval must be a multiple of the {steps_per_tick:g} steps per tick '
                f'(--tick or --log_interval)')
        new['snap'] = int(c.save_interval // steps_per_tick)
    require(c.resume in ('', 'auto') or c.dry_run or os.path.isfile(c.resume),
            f'--resume: no file {c.resume}')
    return dataclasses.replace(c, **new)


def describe_network(c, command):
    """The network a dry run would build, counted on the meta device: the preset the flags amount
    to, channel_mult and parameters."""
    if command != 'train':
        return f'read from {c.network} at run time'
    resolution = c.image_size or \
        (32 if c.data == 'cifar10' else nets.UNET_PRESETS[c.arch]['img_resolution'])
    kwargs = net_config(c, resolution, 3, c.num_classes if c.class_cond else 0)
    with torch.device('meta'):
        parameters = sum(p.numel() for p in nets.UNet(**kwargs).parameters())
    ignored_keys = ('img_resolution', 'in_channels', 'out_channels', 'label_dim', 'dropout')
    same = [name for name, preset in nets.UNET_PRESETS.items()
            if {k: v for k, v in preset.items() if k not in ignored_keys} ==
            {k: v for k, v in kwargs.items() if k not in ignored_keys and k in preset}]
    arch = c.arch if c.arch in same else \
        ' = '.join(same) or f'{c.arch} changed by the official model flags'
    return {'arch': arch, 'channel_mult': list(kwargs.pop('channel_mult')), 'parameters': parameters,
            **{k: v for k, v in kwargs.items() if k != 'arch'}, 'img_resolution': resolution}

# --------------------------------------------------------------------------------------------------
# Data: fid.read_image_set (folders, EDM zips, npz, cifar10) and the official file-name labels

def load_dataset(path, label_dim=0, shape=None):
    """(x uint8 (N, C, H, W), y int64 (N,) or None) of --data: square images, of `shape` (C, H, W)
    when given, labels in [0, label_dim) when label_dim > 0. Labels as fid.ImageSource reads them,
    else from the official '<class>_<n>.png' file-name prefix (guided-diffusion image_datasets.py)."""
    try:
        # An .npz keeps its stored channels (grey stays 1 channel); image files become RGB as in
        # guided-diffusion's loader.
        x, y = fid.read_image_set(path, rgb=not str(path).lower().endswith('.npz'))
        names = fid.ImageSource(path).names if y is None and os.path.isdir(path) else []
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f'--data: {e}') from None
    require(x.shape[2] == x.shape[3],
            f'--data: the images of {path} are {x.shape[3]}x{x.shape[2]}; they must be square')
    files = [str(name).rsplit('/', 1)[-1] for name in names]
    if files and all('_' in file for file in files):  # official '<class>_<n>.png'
        y = np.unique([file.split('_')[0] for file in files], return_inverse=True)[1]
        y = y.astype(np.int64)
    require(shape is None or x.shape[1:] == shape,
            f'--data: images of shape {x.shape[1:]} do not fit the network ({shape})')
    require(not label_dim or y is not None, f'--data: {path} has no labels; a class-conditional '
            f'network needs them')
    if label_dim:  # (the message reads y.max(), so only with labels)
        require(y.max() < label_dim, f'--data: label {y.max()} of {path} lies outside '
                f'[0, {label_dim}) (--num_classes; official NUM_CLASSES is 10)')
    return x, y


@functools.lru_cache(maxsize=2)
def epoch_order(num_images, seed, epoch, device):
    """One epoch's dataset order, seeded by (seed, epoch): a resumed run replays it."""
    generator = torch.Generator(device).manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_images, generator=generator, device=device)


def batch_indices(step, batch, num_images, seed, device):
    """Dataset indices (B,) of global batch number `step`, which may straddle two epochs."""
    start, stop = step * batch, (step + 1) * batch
    first = start // num_images
    orders = [epoch_order(num_images, seed, epoch, device)
              for epoch in range(first, (stop - 1) // num_images + 1)]
    return torch.cat(orders)[start - first * num_images:stop - first * num_images]

# --------------------------------------------------------------------------------------------------
# Networks: our snapshots and released guided-diffusion / DDPM-IP state dicts

NET_FLAGS = dict(  # official model flag -> nets.UNet keyword
    num_channels='model_channels', num_res_blocks='num_blocks', attention_resolutions='attn_resolutions',
    **{name: name for name in 'channel_mult num_heads num_head_channels dropout use_scale_shift_norm '
       'resblock_updown use_new_attention_order'.split()})
# create_model
CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


def net_config(c, resolution, channels, label_dim):
    """nets.UNet keywords: the --arch preset for this data under the official model flags given."""
    kwargs = dict(nets.UNET_PRESETS[c.arch], img_resolution=resolution, in_channels=channels,
                  out_channels=channels * (2 if c.learn_sigma else 1), label_dim=label_dim)
    return kwargs | net_overrides(c, resolution)


def net_overrides(c, resolution, from_image_size=True):
    """nets.UNet keywords given by official model flags; without --channel_mult, --image_size picks
    the multipliers as official create_model does (--channel_mult '' too, from the data's resolution
    when --image_size is absent). Released checkpoints pass from_image_size=False: their shapes tell
    the multipliers."""
    kwargs = {name: getattr(c, flag) for flag, name in NET_FLAGS.items()
              if getattr(c, flag) not in (None, '')}
    kwargs = {name: tuple(int(v) for v in value.split(',')) if isinstance(value, str) else value
              for name, value in kwargs.items()}  # e.g. '1,2,2,2' -> (1, 2, 2, 2)
    if from_image_size and (c.channel_mult == '' or (c.channel_mult is None and c.image_size)):
        size = c.image_size or resolution
        require(size in CHANNEL_MULT,
                f'--image_size {size}: no official channel_mult for it; give --channel_mult')
        kwargs['channel_mult'] = CHANNEL_MULT[size]
    return kwargs


def load_network(path, c, device):
    """(net in eval mode, GaussianDiffusion for sampling) from our network snapshot or a released
    guided-diffusion / DDPM-IP state dict (diffusion settings from the flags, as official)."""
    try:
        snapshot = nets.load_torch_file(path, '--network')
        require(not (isinstance(snapshot, dict) and 'cur_nimg' in snapshot),
                f'--network: {path} is a training state; give a network-snapshot-*.pt (or the '
                f'state to train --resume)')
        if isinstance(snapshot, dict) and 'net_kwargs' in snapshot:  # ours: it defines the network
            kwargs = dict(snapshot['net_kwargs'])
            given = net_overrides(c, kwargs['img_resolution'], from_image_size=False) | \
                ({'img_resolution': c.image_size} if c.image_size else {})
            for flag, name in [*NET_FLAGS.items(), ('image_size', 'img_resolution')]:
                value = given.get(name)
                require(value is None or name not in kwargs or value == type(value)(kwargs[name]),
                        f'--{flag} {getattr(c, flag)} contradicts {path} ({kwargs.get(name)}); '
                        f'leave it out for our snapshots')
            net = nets.build_checked(lambda: nets.UNet(**kwargs), snapshot['ema'],
                                     f'--network: {path}')
            steps, schedule = snapshot['diffusion_steps'], snapshot['noise_schedule']
            rescale_timesteps = snapshot['config'].get('rescale_timesteps', False)
        else:  # the network from the state dict's shapes, the rest from the official flags
            net = nets.load_network(path, **net_overrides(c, c.image_size, from_image_size=False),
                                    **({'img_resolution': c.image_size} if c.image_size else {}))
            steps, schedule, rescale_timesteps = \
                c.diffusion_steps, c.noise_schedule, c.rescale_timesteps
    except (ValueError, FileNotFoundError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        reason = ' '.join(str(e).split()) or type(e).__name__
        raise UserError(reason if reason.startswith('--network') else
                        f'--network: cannot build a network for {path}: {reason}') from None
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

# --------------------------------------------------------------------------------------------------
# Training state: resume, snapshots, progress lines

def prepare_training(c, rank, world_size):
    """Everything that can fail on bad input, before anything is written: the data, its labels, the
    network and what --resume names. Returns (x, y, net_kwargs, checked resume dict or None)."""
    check_writable(c.outdir, '--outdir')
    if rank == 0 and c.data == 'cifar10':
        load_dataset(c.data)  # download once
    if world_size > 1:
        torch.distributed.barrier()
    label_dim = c.num_classes if c.class_cond else 0
    x_data, y_data = load_dataset(c.data, label_dim)
    require(not c.image_size or c.image_size == x_data.shape[2], f'--image_size {c.image_size}: '
            f'the images of {c.data} are {x_data.shape[2]} pixels wide')
    net_kwargs = net_config(c, x_data.shape[2], x_data.shape[1], label_dim)
    path = c.resume if c.resume != 'auto' else \
        broadcast_object(find_resume(c.outdir, dataclasses.asdict(c))[1] if rank == 0 else None)
    return x_data, y_data, net_kwargs, read_resume(path, c, net_kwargs) if path else None


def read_resume(path, c, net_kwargs):
    """Loads and checks what --resume names, before any run folder exists: our training-state-*.pt,
    or an official modelNNNNNN.pt with optNNNNNN.pt and ema_RATE_NNNNNN.pt beside it."""
    rates = [float(rate) for rate in c.ema_rate.split(',')]
    try:
        state = nets.load_torch_file(path, '--resume')
        if not (isinstance(state, dict) and 'cur_nimg' in state):  # official: step from the name
            require(not (isinstance(state, dict) and 'net_kwargs' in state), f'--resume: {path} is '
                    f'a network snapshot (EMA weights only); give a training-state-*.pt')
            official = nets.read_official_resume(path, state, rates, net_kwargs)
            return dict(official, cur_nimg=official['step'] * c.batch, official=path, path=path)
        needed = {'model', 'emas', 'optimizer', 'sampler_history', 'sampler_counts', 'cpu_rng'}
        require(needed <= set(state), f'--resume: {path} lacks '
                f'{", ".join(sorted(needed - set(state)))}; not a complete training state')
        require(len(state['emas']) == len(rates), f'--resume: {path} holds '
                f'{len(state["emas"])} EMA networks, --ema_rate gives {len(rates)}')
        for weights in (state['model'], *state['emas']):
            try:
                nets.check_adm_weights(weights, net_kwargs)
            except ValueError as e:
                raise UserError(f'--resume: {path} {e}') from None
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e) if str(e).startswith('--resume') else f'--resume: {e}') from None
    return dict(state, path=path)


def apply_resume(resumed, c, model, emas, optimizer, sampler, run_dir, rank, world_size, log):
    """Loads what read_resume checked; returns the cur_nimg to continue from. Our states train at
    the config's --lr and --weight_decay; official files at those in optNNNNNN.pt, as the official
    loop does (docs/ddpm_ip.md#resume)."""
    model.load_state_dict(resumed['model'])
    for ema, weights in zip(emas, resumed['emas']):
        ema.load_state_dict(weights)
    if resumed['optimizer'] is not None:
        optimizer.load_state_dict(resumed['optimizer'])
    trim_stats(run_dir, resumed['cur_nimg'])
    log(resumed_line(resumed['path'], resumed['cur_nimg']))
    kimg = resumed['cur_nimg'] / 1000
    if resumed.get('official'):  # guided-diffusion files: no sampler history, no RNG states
        group = optimizer.param_groups[0]
        note = ' (no optimizer file beside it: a fresh AdamW, as official)' \
            if resumed['optimizer'] is None else f' (lr {group["lr"]:g} and weight decay ' \
            f'{group["weight_decay"]:g} of its optimizer file, as official)'
        log(f'resumed from the official {resumed["official"]} at kimg {kimg:.3f}{note}')
        return resumed['cur_nimg']
    for group in optimizer.param_groups:
        group.update(lr=c.lr, weight_decay=c.weight_decay)
    sampler.history.copy_(resumed['sampler_history'])
    sampler.counts.copy_(resumed['sampler_counts'])
    processes = len(resumed['cpu_rng'])
    if processes == world_size:  # each rank's dropout stream (another count starts new ones)
        torch.set_rng_state(resumed['cpu_rng'][rank].cpu())
        if sampler.counts.is_cuda:
            torch.cuda.set_rng_state(resumed['cuda_rng'][rank].cpu())
    log(f'resumed at kimg {kimg:.3f}' + ('' if processes == world_size else
        f' with {world_size} processes instead of {processes}: new dropout streams'))
    return resumed['cur_nimg']


class KeptStates:
    """Every training state replaces the previous one, except the first state past each multiple of
    --dump snapshots, which stays."""

    def __init__(self, c, tick_nimg, cur_nimg, resumed, run_dir):
        self.dump_nimg, self.previous_nimg = tick_nimg * c.snap * c.dump, cur_nimg
        ours_ = resumed and not resumed.get('official') and not resumed.get('kept', True)
        self.previous = resumed['path'] if ours_ and \
            os.path.dirname(os.path.abspath(resumed['path'])) == os.path.abspath(run_dir) else None

    def kept(self, cur_nimg):
        return cur_nimg // self.dump_nimg > self.previous_nimg // self.dump_nimg

    def saved(self, path, cur_nimg, rank):
        kept = self.kept(cur_nimg)
        if rank == 0 and self.previous and self.previous != path:
            os.remove(self.previous)
        self.previous, self.previous_nimg = (None if kept else path), cur_nimg


def save_snapshot(c, model, emas, optimizer, sampler, net_kwargs, cur_nimg, kept, run_dir, rank,
                  world_size, device):
    """training-state (all that resume needs), then network-snapshot (EMA weights + what generate
    and eval need; one per further --ema_rate): a failure never leaves a snapshot newer than the
    last state. Returns the state's path."""
    mine = torch.get_rng_state(), \
        torch.cuda.get_rng_state(device) if device.type == 'cuda' else torch.zeros(0)
    rng = [mine] * world_size  # (CPU, CUDA) generator states per rank: each dropout stream goes on
    if world_size > 1:
        torch.distributed.all_gather_object(rng, mine)
    kimg = f'{cur_nimg // 1000:06d}'
    path = os.path.join(run_dir, f'training-state-{kimg}.pt')
    if rank != 0:
        return path
    as_cpu = lambda module: {k: v.detach().cpu() for k, v in module.state_dict().items()}
    ema_states, config = [as_cpu(ema) for ema in emas], dataclasses.asdict(c)
    save_training_state(path, dict(
        model=as_cpu(model), emas=ema_states, optimizer=optimizer.state_dict(),
        net_kwargs=net_kwargs, sampler_history=sampler.history.cpu(),
        sampler_counts=sampler.counts.cpu(), cur_nimg=cur_nimg, kept=kept,
        cpu_rng=[r[0] for r in rng], cuda_rng=[r[1] for r in rng], config=config))
    for i, (rate, ema) in enumerate(zip(c.ema_rate.split(','), ema_states)):
        snapshot = dict(net_kwargs=net_kwargs, ema=ema, ema_rate=float(rate), config=config,
                        diffusion_steps=c.diffusion_steps, noise_schedule=c.noise_schedule)
        suffix = '' if i == 0 else f'-ema{float(rate)}'
        nets.write_atomic(os.path.join(run_dir, f'network-snapshot-{kimg}{suffix}.pt'),
                          lambda file, snapshot=snapshot: torch.save(snapshot, file))
    return path


def report_tick(stats, cur_nimg, total_nimg, clock, lr, world_size, rank, device, run_dir, log):
    """The progress line and stats.jsonl record of one tick from the device-side sums in `stats`
    (reset here: the tick's single host sync)."""
    if world_size > 1:
        torch.distributed.all_reduce(stats)
    values = stats.tolist()
    stats.zero_()
    now = time.time()
    sec_per_kimg = (now - clock['tick_time']) / max(cur_nimg - clock['tick_nimg'], 1) * 1000
    steps = values[2] / world_size  # each rank counted every step
    mse_q = [values[3 + q] / max(values[11 + q], 1) for q in range(4)]  # quartiles of t (official)
    gpumem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else 0.0
    record = dict(kimg=cur_nimg / 1000, nimg=cur_nimg, time=now - clock['start_time'],
                  sec_per_kimg=sec_per_kimg, loss=values[0] / steps, lr=lr,
                  img_per_sec=1000 / sec_per_kimg, gpumem_gb=gpumem,
                  **{f'mse_q{q}': mse_q[q] for q in range(4)},
                  vb=sum(values[7:11]) / sum(values[11:15]), grad_norm=values[1] / values[2])
    eta = max(total_nimg - cur_nimg, 0) / 1000 * sec_per_kimg
    log(f'kimg {record["kimg"]:.1f} | time {format_time(record["time"])} | sec/kimg '
        f'{sec_per_kimg:.2f} | ETA {format_time(eta)} | loss {record["loss"]:.4f} | lr {lr:.1e} | '
        f'img/s {record["img_per_sec"]:.0f} | gpumem {gpumem:.1f}G | mse q0-q3 '
        f'{" ".join(f"{v:.4f}" for v in mse_q)} | vb {record["vb"]:.4f} | '
        f'grad norm {record["grad_norm"]:.3f}')
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    if rank == 0:
        append_jsonl(os.path.join(run_dir, 'stats.jsonl'), record)


def save_official_samples(outdir, seeds, labels, label_dim, rank, world_size, log):
    """The official image_sample.py array from the PNGs: (N, H, W, C) uint8 as arr_0, the labels as
    arr_1."""
    everyone = [labels] * world_size
    if world_size > 1:
        torch.distributed.all_gather_object(everyone, labels)
    if rank != 0:
        return
    labels = {seed: label for part in everyone for seed, label in part.items()}
    arrays = [np.asarray(PIL.Image.open(os.path.join(outdir, f'{seed:06d}.png'))) for seed in seeds]
    arr = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
    path = os.path.join(outdir, f'samples_{"x".join(str(n) for n in arr.shape)}.npz')
    buffer = io.BytesIO()
    np.savez(buffer, arr, *([np.array([labels[s] for s in seeds], np.int64)] if label_dim else []))
    nets.write_atomic(path, buffer.getvalue())
    log(f'saved {path}')


def rank_batches(seeds, batch, rank, world_size):
    """This rank's share of `seeds`, in batches of at most `batch`."""
    mine = seeds[rank::world_size]
    return [mine[i:i + batch] for i in range(0, len(mine), batch)]


def append_jsonl(path, record):
    """One JSON object per line: stats.jsonl and the metrics files, readable while a run goes on."""
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


if __name__ == '__main__':
    main()
