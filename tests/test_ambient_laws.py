"""Tests of ambient_laws.py: the clean/noisy data split, the ambient loss's minimiser and the sampler on Gaussian
mixtures with closed-form denoisers, augmentation, the script end to end (train, resume, DDP, generate, eval, bad
input), and the drop-in for giannisdaras/ambient-laws (the official data set bit for bit, every official flag, the
README commands as written, released checkpoint layouts served from 127.0.0.1, failure paths). CPU only; the tiny
network runs a few steps of 8 images."""
import concurrent.futures
import errno
import glob
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

import ambient_laws as al
import fid
from conftest import ROOT, TINY_DATA

def _config(given):
    """A checked Config from field values (preset values under them), as the command line makes it."""
    preset = al.PRESETS[given.get('preset', al.Config.preset)]
    return al.check_config(al.Config(**{**preset, **given}))


def _latest(run_dir, prefix):
    """The newest file of run_dir named prefix-<kimg>.* (kimg tags such as 000000.032)."""
    names = sorted(n for n in os.listdir(run_dir) if n.startswith(prefix + '-') and not n.endswith('.tmp'))
    return os.path.join(run_dir, names[-1])


# A small, fast network for the end-to-end runs: the tiny preset at half width, 8 images a step, 4-step grids.
FAST = ['--preset=tiny', f'--data={TINY_DATA}', '--cbase=16', '--batch=8', '--grid=2', '--steps=3', '--workers=1',
        '--seed=0']


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian mixtures: the exact denoiser E[x0 | x0 + sigma * noise = x]


class GMMDenoiser:
    """x0 ~ sum_k w_k N(mu_k, s_k^2 I) in d dimensions, data shaped (B, d, 1, 1). Called like a network:
    D(x, sigma, labels) with sigma a number or a (B, 1, 1, 1) tensor. extra_std > 0 gives the denoiser of the
    *noisy* data x0 + extra_std * eps (every component widened)."""

    def __init__(self, weights, means, stds, extra_std=0.0):
        self.log_w = torch.tensor(weights, dtype=torch.float64).log()
        self.mu = torch.tensor(means, dtype=torch.float64)                       # (K, d)
        self.var = torch.tensor(stds, dtype=torch.float64) ** 2 + extra_std ** 2  # (K,)

    def responsibilities(self, x, sigma):
        """p(component k | x0 + sigma * noise = x): (B, K)."""
        B, d = x.shape[0], self.mu.shape[1]
        x = x.reshape(B, 1, d).double()
        total = self.var + torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2      # (B or 1, K)
        return (self.log_w - 0.5 * d * total.log() - ((x - self.mu) ** 2).sum(-1) / (2 * total)).softmax(-1)

    def __call__(self, x, sigma, labels=None):
        B, d = x.shape[0], self.mu.shape[1]
        total = self.var + torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2
        posterior_mean = self.mu + (self.var / total)[..., None] * (x.reshape(B, 1, d).double() - self.mu)
        return (self.responsibilities(x, sigma)[..., None] * posterior_mean).sum(1).reshape(B, d, 1, 1)

    def sample(self, n, generator):
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.mu.shape[1], generator=generator, dtype=torch.float64)
        return (self.mu[k] + self.var[k].sqrt()[:, None] * noise).reshape(n, -1, 1, 1), k


MIXTURE = dict(weights=[0.5, 0.3, 0.2], means=[[-2.0, 0.0], [2.0, 1.0], [0.0, 3.0]], stds=[0.4, 0.6, 0.3])


# ----------------------------------------------------------------------------------------------------------------------
# Data: keep fraction, noisy fraction, fixed noise


def test_keep_fraction_is_exact_nested_and_official():
    n = 1000
    for keep in (0.1, 0.25, 0.5, 0.999, 1.0):
        assert len(al.keep_subset(n, keep)) == int(n * keep)
    small, large = set(al.keep_subset(n, 0.1)), set(al.keep_subset(n, 0.5))
    assert small < large  # nested across keep fractions, as the official RandomState(0) shuffle makes them
    # The official subset: RandomState(0) shuffle of all indices, first int(keep * N), sorted.
    index = np.arange(n)
    np.random.RandomState(0).shuffle(index)
    assert np.array_equal(al.keep_subset(n, 0.25), np.sort(index[:250]))


def test_exact_noisy_count_is_exact_nested_and_fixed_per_seed():
    """--noisy_count=exact: exactly round(p n) noisy images, nested across p, fixed for a --corruption_seed."""
    raw = al.keep_subset(1000, 0.5)
    for p in (0.0, 0.1, 0.33, 0.9, 1.0):
        assert int(al.exact_noisy(raw, 1000, p, seed=0).sum()) == int(p * 500 + 0.5)
    noisy = lambda p, seed=0: set(np.flatnonzero(al.exact_noisy(raw, 1000, p, seed)).tolist())  # noqa: E731
    assert noisy(0.3) < noisy(0.9)                 # nested across p
    assert noisy(0.5) == noisy(0.5)                # fixed for a seed
    assert noisy(0.5) != noisy(0.5, seed=1)        # and a different seed picks different images


def test_image_noise_is_fixed_per_image_and_standard_normal():
    index = torch.arange(4000)
    eps = al.image_noise(index, (3, 8, 8), seed=7)                         # (4000, 3, 8, 8)
    # Standard normal: moments, and no correlation between neighbouring pixels or images.
    values = eps.flatten()
    assert abs(values.mean()) < 0.01 and abs(values.std() - 1) < 0.01
    assert abs((values ** 4).mean() - 3) < 0.05                            # Gaussian kurtosis
    assert abs((eps[..., 1:] * eps[..., :-1]).mean()) < 0.01
    assert abs((eps[1:] * eps[:-1]).mean()) < 0.01
    # A function of (seed, image index) only: the same image gets the same noise in any batch.
    assert torch.equal(al.image_noise(torch.tensor([5, 3999, 17]), (3, 8, 8), 7), eps[[5, 3999, 17]])
    assert not torch.allclose(al.image_noise(index[:3], (3, 8, 8), 8), eps[:3])


def test_noise_is_the_same_in_every_epoch():
    """An image drawn in two different epochs (different batches and positions) is observed identically; clean
    images are exactly their pixels."""
    x, _ = fid.read_image_set(TINY_DATA)
    images = torch.from_numpy(x)
    raw = torch.arange(len(images))
    sigma_n = torch.from_numpy(np.where(al.exact_noisy(raw.numpy(), len(images), 0.5, seed=0), 0.2, 0.0))
    first = al.batch_indices(0, 32, len(images), seed=0)
    later = al.batch_indices(len(images) + 64, 32, len(images), seed=0)   # epoch 1, another part of the order
    assert sorted(set(first.tolist()) & set(later.tolist()))
    seen = {}
    for index in (first, later):
        y = al.observe(images[index], sigma_n[index], al.image_noise(raw[index], (3, 32, 32), seed=0))
        for k, i in enumerate(index.tolist()):
            if i in seen:
                assert torch.equal(seen[i], y[k])
            seen[i] = y[k]
    clean = int(torch.nonzero(sigma_n == 0)[0])
    noisy = int(torch.nonzero(sigma_n > 0)[0])
    y = al.observe(images[[clean, noisy]], sigma_n[[clean, noisy]], al.image_noise(raw[[clean, noisy]], (3, 32, 32), 0))
    x0 = images[[clean, noisy]].float() / 127.5 - 1
    assert torch.equal(y[0], x0[0])
    assert abs((y[1] - x0[1]).std() - 0.2) < 0.02


def test_epoch_order_is_a_permutation_of_the_data():
    order = torch.cat([al.batch_indices(start, 50, 200, seed=3) for start in range(0, 400, 50)])
    assert sorted(order[:200].tolist()) == list(range(200)) and sorted(order[200:].tolist()) == list(range(200))
    assert not torch.equal(order[:200], order[200:])  # a new permutation each epoch


# ----------------------------------------------------------------------------------------------------------------------
# Loss


def test_noisy_samples_are_never_used_below_their_noise_level():
    """sigma >= sigma_n always; x_t carries exactly the missing noise; a clamped noisy sample (sigma = sigma_n) has
    loss and gradient exactly 0, so no noisy image ever trains the network at sigma <= sigma_n."""
    g = torch.Generator().manual_seed(0)
    B = 4000
    y = torch.randn(B, 3, 4, 4, generator=g)
    sigma_n = torch.where(torch.arange(B) % 2 == 0, 0.2, 0.0)
    rnd_normal, eps = torch.randn(B, generator=g), torch.randn(B, 3, 4, 4, generator=g)
    scale = torch.ones((), requires_grad=True)
    net = lambda x, sigma, labels=None: scale * x / (1 + sigma ** 2)  # noqa: E731
    loss, x_t, sigma, _ = al.ambient_loss(net, y, sigma_n, rnd_normal, eps)
    sigma, noisy = sigma.view(-1), sigma_n > 0
    assert torch.all(sigma >= sigma_n)
    clamped = noisy & (sigma == sigma_n)
    assert 0.3 < clamped.float().sum() / noisy.sum() < 0.45        # Phi((ln 0.2 + 1.2) / 1.2) = 0.367
    assert torch.all((sigma[~clamped & noisy] > 0.2))
    torch.testing.assert_close(sigma[~noisy], (rnd_normal[~noisy] * 1.2 - 1.2).exp())  # clean: plain EDM
    edm_weight = ((sigma ** 2 + 0.25) / (0.25 * sigma ** 2)).view(-1, 1, 1, 1)          # EDM lambda(sigma)
    torch.testing.assert_close(loss[~noisy], (edm_weight * (net(x_t, sigma.view(-1, 1, 1, 1)) - y) ** 2)[~noisy])
    added = (x_t - y).flatten(1).std(1) / (sigma ** 2 - sigma_n ** 2).clamp(min=1e-12).sqrt()
    assert abs(added[~clamped].mean() - 1) < 0.05
    assert torch.equal(loss[clamped], torch.zeros_like(loss[clamped]))
    grad, = torch.autograd.grad(loss[clamped].sum(), scale)
    assert grad == 0
    assert torch.all(loss[~clamped].flatten(1).sum(1) > 0)


def _mixture_losses(clean, noisy_data, sigma_n, n=200_000):
    """Monte-Carlo ambient and naive losses of D_a = (1 - a) clean + a noisy_data at a = 0, 0.5, 1, with common
    random numbers; both losses are quadratic in a. Returns the minimising a of each."""
    g = torch.Generator().manual_seed(1)
    x0, _ = clean.sample(n, g)
    y = x0 + sigma_n * torch.randn(x0.shape, generator=g, dtype=torch.float64)   # only noisy samples
    rnd_normal, eps = torch.randn(n, generator=g), torch.randn(x0.shape, generator=g, dtype=torch.float64)
    minimisers = {}
    for name, levels in (('ambient', torch.full((n,), sigma_n)), ('naive', torch.zeros(n))):
        values = []
        for a in (0.0, 0.5, 1.0):
            net = lambda x, s, labels=None, a=a: (1 - a) * clean(x, s) + a * noisy_data(x, s)  # noqa: E731
            values.append(al.ambient_loss(net, y, levels.double(), rnd_normal, eps)[0].sum().item() / n)
        curvature = values[0] - 2 * values[1] + values[2]
        assert curvature > 0
        minimisers[name] = 0.5 + (values[0] - values[2]) / (4 * curvature)  # vertex of the parabola
    return minimisers


def test_ambient_loss_is_minimised_by_the_clean_denoiser():
    """Noisy data only (sigma_n = 0.3): along the line from the clean-data denoiser (a = 0) to the noisy-data
    denoiser (a = 1), the ambient loss is minimised at the clean end, the naive loss (noisy images taken as clean)
    at the noisy end. Perturbing the clean denoiser raises the ambient loss."""
    sigma_n = 0.3
    clean = GMMDenoiser(**MIXTURE)
    noisy_data = GMMDenoiser(**MIXTURE, extra_std=sigma_n)
    minimisers = _mixture_losses(clean, noisy_data, sigma_n)
    assert abs(minimisers['ambient']) < 0.05, minimisers
    assert abs(minimisers['naive'] - 1) < 0.05, minimisers
    # Any perturbation of the exact denoiser costs (common random numbers, 100k noisy samples).
    g = torch.Generator().manual_seed(2)
    n = 100_000
    x0, _ = clean.sample(n, g)
    y = x0 + sigma_n * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    rnd_normal, eps = torch.randn(n, generator=g), torch.randn(x0.shape, generator=g, dtype=torch.float64)
    levels = torch.full((n,), sigma_n, dtype=torch.float64)
    loss = lambda net: al.ambient_loss(net, y, levels, rnd_normal, eps)[0].sum().item() / n  # noqa: E731
    best = loss(clean)
    for perturbed in (lambda x, s, l=None: clean(x, s) + 0.05, lambda x, s, l=None: clean(x, s) * 1.05,
                      lambda x, s, l=None: clean(x, s) + 0.05 * torch.tanh(x)):
        assert loss(perturbed) > best


def test_reverse_sde_moves_between_noise_levels_of_a_gaussian():
    """For x0 ~ N(0, s^2), x_sigma' given x_sigma is Gaussian with mean m and variance v in closed form; the
    Euler-Maruyama reverse SDE of the consistency loss reproduces both, and the denoiser is a martingale along it
    (E[D(x_sigma', sigma') | x_sigma] = D(x_sigma, sigma)), which is what the consistency loss enforces."""
    s, sigma, sigma_prime, n = 0.8, 1.5, 0.4, 20_000
    net = lambda x, t, labels=None: s ** 2 / (s ** 2 + t ** 2) * x  # noqa: E731
    x = torch.full((n, 1, 1, 1), 1.2, dtype=torch.float64)
    start = torch.full((n, 1, 1, 1), sigma, dtype=torch.float64)
    end = torch.full((n, 1, 1, 1), sigma_prime, dtype=torch.float64)
    z = torch.randn(200, n, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = al.reverse_sde(net, x, start, end, z)
    mean = 1.2 * (s ** 2 + sigma_prime ** 2) / (s ** 2 + sigma ** 2)
    var = (sigma ** 2 - sigma_prime ** 2) * (s ** 2 + sigma_prime ** 2) / (s ** 2 + sigma ** 2)
    assert abs(out.mean() - mean) < 0.02 and abs(out.var() / var - 1) < 0.05
    assert abs(net(out, sigma_prime).mean() - net(x[:1], sigma).item()) < 0.01


def test_consistency_loss_target_level_rows_weight_and_gradients():
    """The whole method in one call, as the official EDMLoss: sigma' = min(raw draw, sigma), so rows whose draw was
    not clamped (clean rows, noisy rows drawn above sigma_n) make zero-length SDE steps and give exactly 0 with a
    deterministic network; only the first num_rows rows get the term; with_weight multiplies by lambda(sigma);
    with_grad=False stops gradients through the SDE."""
    weight = torch.ones((), requires_grad=True)
    net = lambda x, t, labels=None: weight * x / (1 + t ** 2)  # noqa: E731
    x_t = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    rnd_normal = torch.tensor([0.7, 0.2, 0.7, 0.2]).log()                 # raw draws 0.7, 0.2 (P_mean 0, P_std 1)
    sigma_n = torch.tensor([0.0, 0.5, 0.0, 0.5])
    sigma = rnd_normal.exp().maximum(sigma_n).view(-1, 1, 1, 1)           # ambient_loss's clamp: 0.7, 0.5, 0.7, 0.5
    z = torch.randn(5, 3 * 4, 2, 4, 4, generator=torch.Generator().manual_seed(1))  # 3 rows x K = 4 runs
    common = dict(P_mean=0.0, P_std=1.0)
    term = al.consistency_loss(net, x_t, sigma, net(x_t, sigma), rnd_normal, z, 3, **common).detach()
    assert term.shape == x_t.shape
    per_row = term.flatten(1).sum(1)
    assert per_row[0] == 0 and per_row[2] == 0 and per_row[3] == 0 and per_row[1] > 0
    weighted = al.consistency_loss(net, x_t, sigma, net(x_t, sigma), rnd_normal, z, 3, with_weight=True,
                                   **common).detach()
    torch.testing.assert_close(weighted[1], term[1] * al.edm_weight(sigma[1]))
    loss = lambda grad: al.consistency_loss(net, x_t, sigma, net(x_t, sigma).detach(), rnd_normal, z, 3,  # noqa
                                            with_grad=grad, **common).sum()
    assert torch.autograd.grad(loss(True), weight)[0] != torch.autograd.grad(loss(False), weight)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Sampler


def test_heun_sampler_reproduces_the_mixture():
    """EDM's Heun sampler with the exact denoiser: mode weights, per-mode means and spreads (soft-assigned with the
    mixture's own responsibilities, whose averages are exactly these quantities under the true law). 40 steps, as EDM
    uses at 64x64: at 18 steps this sharp toy mixture still shows an O(0.08) discretisation bias in one mode."""
    mixture = GMMDenoiser(**MIXTURE)
    n = 6000
    latents = torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(3))
    x = al.edm_sampler(mixture, latents, num_steps=40)                            # (n, 2, 1, 1)
    resp = mixture.responsibilities(x, 0.0)                                       # (n, K)
    x = x.reshape(n, 2)
    for k, (w, mu, std) in enumerate(zip(MIXTURE['weights'], MIXTURE['means'], MIXTURE['stds'])):
        r = resp[:, k:k + 1]
        mean = (r * x).sum(0) / r.sum()
        spread = ((r * (x - mean) ** 2).sum(0) / r.sum()).sqrt()
        assert abs(r.mean() - w) < 0.02
        assert torch.allclose(mean, torch.tensor(mu, dtype=torch.float64), atol=0.04)
        assert torch.allclose(spread, torch.tensor([std, std], dtype=torch.float64), rtol=0.06)


def test_sampler_churn_and_early_stop():
    """Churn keeps the mixture (EDM's stochastic sampler); stop_variance returns the denoiser's output early."""
    mixture = GMMDenoiser(weights=[1.0], means=[[1.0, -1.0]], stds=[0.5])
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(4000, 2, 1, 1, generator=g)
    x = al.edm_sampler(mixture, latents, num_steps=32, S_churn=20, S_min=0.05, S_max=50,
                       randn_like=lambda v: torch.randn(v.shape, generator=g, dtype=v.dtype))
    assert torch.allclose(x.mean(0).view(-1), torch.tensor([1.0, -1.0], dtype=torch.float64), atol=0.04)
    assert torch.allclose(x.std(0).view(-1), torch.tensor([0.5, 0.5], dtype=torch.float64), rtol=0.08)
    early = al.edm_sampler(mixture, latents[:10], stop_variance=1e6)
    torch.testing.assert_close(early, mixture(latents[:10].double() * 80, 80.0))


# ----------------------------------------------------------------------------------------------------------------------
# Augmentation


def test_augment_labels_and_pure_transforms():
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.interpolate(torch.randn(4, 3, 8, 8, generator=g), size=32, mode='bicubic')  # smooth
    never = torch.ones(4, 11)                                             # every gate closed
    out, labels = al.nets.edm_augment(x, 0.5, never, torch.zeros(4, 4))
    assert labels.shape == (4, 9) and torch.equal(labels, torch.zeros(4, 9))
    assert (out - x).abs().max() < 0.05                                   # the identity warp only filters lightly
    flip = never.clone()
    flip[:, :2] = 0.0                                                      # x-flip gate and coin
    out_flip, labels = al.nets.edm_augment(x, 0.5, flip, torch.zeros(4, 4))
    assert torch.equal(labels[:, 0], torch.ones(4))
    torch.testing.assert_close(out_flip, out.flip(3))
    shift = never.clone()
    shift[:, 10] = 0.0                                                    # translation by t * W / 8 pixels
    g_shift = torch.tensor([[0, 0, 0.25, 0.0]]).repeat(4, 1)              # one pixel to the right
    out_shift, labels = al.nets.edm_augment(x, 0.5, shift, g_shift)
    assert torch.equal(labels[:, 7], torch.full((4,), 0.25))
    torch.testing.assert_close(out_shift[..., 4:-4, 5:-4], out[..., 4:-4, 4:-5], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# The script: train, resume, DDP, generate, eval, bad input


def _state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _run_dir(outdir):
    runs = sorted(os.listdir(outdir))
    return os.path.join(outdir, runs[-1])


def _losses(run_dir):
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [(e['kimg'], e['loss'], e['clean_loss'], e['noisy_loss']) for e in map(json.loads, f)]


def test_train_generate_eval_end_to_end(tmp_path, monkeypatch, capsys):
    outdir = tmp_path / 'runs'
    al.main(['train', *FAST, '--sigma=0.2', '--corruption_probability=0.9', '--kimg=0.032', '--tick=0.016',
             f'--outdir={outdir}'])
    run_dir = _run_dir(outdir)
    files = set(os.listdir(run_dir))
    assert {'config.json', 'log.txt', 'stats.jsonl', 'data-preview.png', 'source.py'} <= files
    assert {n.split('-0')[0] for n in files if '-0' in n} == {'samples', 'network-snapshot', 'training-state'}
    assert 'run.lock' not in files                                       # released at the end
    assert open(os.path.join(run_dir, 'log.txt')).read().splitlines()[-1].startswith('done: 0.0 kimg in ')
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert stats[-1]['kimg'] == 0.032 and all(np.isfinite(s['loss']) for s in stats)
    assert 0.7 < np.mean([s['noisy_frac'] for s in stats]) <= 1.0
    assert 'noisy_used' in open(os.path.join(run_dir, 'log.txt')).read()
    network = _latest(run_dir, 'network-snapshot')

    # Generate: one PNG per seed; image k is the same whatever the batch size.
    for batch, folder in ((2, 'a'), (3, 'b')):
        al.main(['generate', f'--network={network}', '--seeds=0-3', f'--batch={batch}', '--steps=3',
                 f'--outdir={tmp_path / folder}'])
    names = sorted(os.listdir(tmp_path / 'a'))
    assert names == ['000000.png', '000001.png', '000002.png', '000003.png']
    for name in names:
        a, b = (np.asarray(PIL.Image.open(tmp_path / f / name)) for f in ('a', 'b'))
        assert a.shape == (32, 32, 3)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert not np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'a' / names[0])),
                              np.asarray(PIL.Image.open(tmp_path / 'a' / names[1])))

    # Eval with a random-weights Inception against made-up reference statistics (Inception on CPU is slow; the
    # metric itself is fid.py's to test): the samples go through fid.compute_metrics and land in metrics.jsonl.
    weights = tmp_path / 'inception.pth'
    torch.save(fid.InceptionV3().state_dict(), weights)
    monkeypatch.setenv('FID_WEIGHTS', str(weights))
    fid.save_ref(tmp_path / 'ref.npz', dict(mu=np.zeros(2048), sigma=np.eye(2048), preprocess='pytorch-fid'))
    al.main(['eval', f'--network={network}', f'--ref={tmp_path / "ref.npz"}', '--num=4', '--batch=2', '--steps=3'])
    result = json.loads(open(os.path.join(run_dir, 'metrics.jsonl')).read().splitlines()[-1])
    assert result['num'] == 4 and np.isfinite(result['fid']) and result['fid'] > 0
    assert result == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # An untagged reference (EDM's fid-refs) needs --protocol; the check fails before any sampling.
    np.savez(tmp_path / 'edm_ref.npz', mu=np.zeros(2048), sigma=np.eye(2048))
    _fails(capsys, ['eval', f'--network={network}', f'--ref={tmp_path / "edm_ref.npz"}', '--num=4'], '--protocol=')
    al.main(['eval', f'--network={network}', f'--ref={tmp_path / "edm_ref.npz"}', '--num=4', '--protocol=edm',
             '--steps=2'])
    result = json.loads(open(os.path.join(run_dir, 'metrics.jsonl')).read().splitlines()[-1])
    assert result['protocol'] == 'edm' and result['preprocess'] == 'tf' and result['num'] == 4


def test_class_conditional_train_and_generate(tmp_path, capsys):
    """--cond=true takes the labels of the .npz (10 classes), passes them through the loss and the consistency
    term, and generate --class picks one; a class out of range is an error."""
    al.main([*FAST, '--cond=true', '--sigma=0.1', '--corruption_probability=0.5', '--kimg=0.008',
             '--consistency_coeff=1', '--consistency_batch_size=2', '--num_primes=2', '--num_consistency_steps=2',
             f'--outdir={tmp_path / "runs"}'])
    network = _latest(_run_dir(tmp_path / 'runs'), 'network-snapshot')
    assert _state(network)['net_kwargs']['label_dim'] == 10
    al.main(['generate', f'--network={network}', '--seeds=0-1', '--class=3', '--steps=3',
             f'--outdir={tmp_path / "gen"}'])
    assert sorted(os.listdir(tmp_path / 'gen')) == ['000000.png', '000001.png']
    with pytest.raises(SystemExit):
        al.main(['generate', f'--network={network}', '--seeds=0', '--class=10', f'--outdir={tmp_path / "gen"}'])
    assert capsys.readouterr().err.strip() == 'ambient_laws.py: error: --class must be < 10'


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Both runs start from a --transfer snapshot, so the resumed half must also remember that the EMA ramp-up is off
    (official --transfer); the from-scratch start is covered by the kill -9 test."""
    common = [*FAST, '--sigma=0.2', '--corruption_probability=0.5', '--tick=0.008', '--snap=1', '--augment=0.5',
              '--dropout=0.2']
    net, net_kwargs = al.build_network(_config({'preset': 'tiny', 'cbase': 16}), 32, 3, 0)
    torch.save(dict(ema=net.state_dict(), net_kwargs=net_kwargs), tmp_path / 'start.pt')
    transfer = f'--transfer={tmp_path / "start.pt"}'
    al.main([*common, transfer, '--kimg=0.032', f'--outdir={tmp_path / "straight"}'])
    al.main([*common, transfer, '--kimg=0.016', f'--outdir={tmp_path / "resumed"}'])
    al.main([*common, '--kimg=0.032', f'--outdir={tmp_path / "resumed"}', '--resume=auto'])
    assert len(os.listdir(tmp_path / 'resumed')) == 1                   # continued in the same run folder
    a, b = (_run_dir(tmp_path / d) for d in ('straight', 'resumed'))
    sa, sb = (_state(_latest(d, 'training-state')) for d in (a, b))
    assert sa['cur_nimg'] == sb['cur_nimg'] == 32
    for key in ('net', 'ema'):
        for name, value in sa[key].items():
            assert torch.equal(value, sb[key][name]), name
    assert _losses(a) == _losses(b)


def test_resume_after_kill_9(tmp_path):
    """kill -9 a run once it has written a training state; --resume=auto finishes it exactly like a run that was
    never interrupted (weights bitwise, per-tick losses)."""
    common = [*FAST, '--sigma=0.2', '--corruption_probability=0.5', '--tick=0.008', '--snap=1', '--dump=1',
              '--kimg=0.048']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, 'ambient_laws.py'), *common,
                                f'--outdir={tmp_path / "killed"}'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not glob.glob(str(tmp_path / 'killed' / '*' / 'training-state-*.pt')) and time.time() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    state = _state(glob.glob(str(tmp_path / 'killed' / '*' / 'training-state-*.pt'))[0])
    assert state['cur_nimg'] < 48                                        # killed before the end
    al.main([*common, f'--outdir={tmp_path / "killed"}', '--resume=auto'])
    al.main([*common, f'--outdir={tmp_path / "straight"}'])
    a, b = (_run_dir(tmp_path / d) for d in ('straight', 'killed'))
    sa, sb = (_state(_latest(d, 'training-state')) for d in (a, b))
    for key in ('net', 'ema'):
        for name, value in sa[key].items():
            assert torch.equal(value, sb[key][name]), name
    assert _losses(a) == _losses(b)


def test_two_process_ddp_matches_one_process(tmp_path):
    common = [*FAST, '--sigma=0.2', '--corruption_probability=0.5', '--kimg=0.016', '--tick=1', '--augment=0.5',
              '--lr_rampup_kimg=0', '--consistency_coeff=0.5', '--consistency_batch_size=4', '--num_primes=2',
              '--num_consistency_steps=3', '--consistency_rows=global']  # official per_gpu rows depend on GPUs
    al.main([*common, f'--outdir={tmp_path / "one"}'])
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                    os.path.join(ROOT, 'ambient_laws.py'), *common, '--batch_gpu=2', f'--outdir={tmp_path / "two"}'],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=120)
    one, two = (_state(_latest(_run_dir(tmp_path / d), 'training-state')) for d in ('one', 'two'))
    torch.manual_seed(al.derive_seed(0, 0))
    init = al.build_network(_config({'preset': 'tiny', 'cbase': 16}), 32, 3, 0)[0].state_dict()
    moved = 0
    for name, value in one['net'].items():
        torch.testing.assert_close(two['net'][name], value, atol=2e-6, rtol=1e-4)
        moved += not torch.equal(value, init[name])
    assert moved > len(init) // 2                                        # the weights did train
    for k, state in one['optimizer']['state'].items():                   # Adam's gradient averages agree
        torch.testing.assert_close(two['optimizer']['state'][k]['exp_avg'], state['exp_avg'],
                                   atol=1e-4 * state['exp_avg'].abs().max().item(), rtol=1e-4)
    assert _losses(_run_dir(tmp_path / 'one'))[-1][1:] == pytest.approx(_losses(_run_dir(tmp_path / 'two'))[-1][1:],
                                                                         rel=1e-5)


@pytest.mark.parametrize('flag, message', [
    ('--sigma=-0.1', '--sigma must be >= 0'),
    ('--corruption_probability=1.5', '--corruption_probability must be in [0, 1]'),
    ('--corruption_probability=-0.1', '--corruption_probability must be in [0, 1]'),
    ('--dataset_keep_percentage=0', '--dataset_keep_percentage must be in (0, 1]'),
    ('--dataset_keep_percentage=1.2', '--dataset_keep_percentage must be in (0, 1]'),
    ('--consistency_coeff=-1', '--consistency_coeff must be >= 0'),
    ('--batch_gpu=3', 'must be divisible'),
    ('--sigma=abc', 'invalid float value'),
    ('--device=tpu', '--device must be cpu or cuda'),
])
def test_bad_flags_fail_with_one_line_and_write_nothing(tmp_path, capsys, flag, message):
    with pytest.raises(SystemExit) as exit_info:
        al.main([*FAST, flag, f'--outdir={tmp_path / "runs"}'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith('ambient_laws.py: error: ')
    assert message in err[0]
    assert not (tmp_path / 'runs').exists()


def _expect_data_error(tmp_path, capsys, data, message, *flags):
    with pytest.raises(SystemExit) as exit_info:
        al.main([*FAST, f'--data={data}', *flags, f'--outdir={tmp_path / "runs"}'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code != 0 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / 'runs').exists()


def test_bad_data_fails_with_one_line(tmp_path, capsys):
    _expect_data_error(tmp_path, capsys, tmp_path / 'missing', 'no image folder, zip or .npz at')
    folder = tmp_path / 'images'
    folder.mkdir()
    for k in range(3):
        PIL.Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / f'{k}.png')
    (folder / 'broken.png').write_bytes(b'not a png')
    _expect_data_error(tmp_path, capsys, folder, 'broken.png')
    (folder / 'broken.png').unlink()
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / 'small.png')
    _expect_data_error(tmp_path, capsys, folder, 'resize or convert them first')
    npz = tmp_path / 'bad_labels.npz'
    np.savez(npz, x=np.zeros((8, 32, 32, 3), np.uint8), y=np.array([0, 1, 2, -1, 0, 1, 2, 3]))
    _expect_data_error(tmp_path, capsys, npz, 'labels must be integers in 0..', '--cond=true')  # fid's check
    _expect_data_error(tmp_path, capsys, TINY_DATA, '--sigma_per_image must hold 200', '--sigma_per_image=' +
                       str(_save(tmp_path / 'levels.npy', np.full(10, 0.1))))


def test_grayscale_files_in_a_colour_folder_become_rgb(tmp_path):
    colour = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    PIL.Image.fromarray(colour).save(tmp_path / 'a.png')
    PIL.Image.fromarray(colour[:, :, 0]).save(tmp_path / 'b.png')                   # mode L
    x, labels = al.read_data(_config({'data': str(tmp_path), 'workers': 1}))
    assert x.shape == (2, 3, 32, 32) and labels is None
    x = x.transpose(0, 2, 3, 1)
    assert np.array_equal(x[0], colour) and np.array_equal(x[1], colour[:, :, :1].repeat(3, axis=2))


def _save(path, array):
    np.save(path, array)
    return path


def test_per_image_noise_levels(tmp_path):
    """--sigma_per_image gives every image its own sigma_n (0 = clean); the loss uses each sample's own level."""
    levels = np.zeros(200, np.float32)
    levels[::3], levels[1::3] = 0.1, 0.4
    cfg = _config({'preset': 'tiny', 'data': TINY_DATA, 'sigma_per_image': str(_save(tmp_path / 'l.npy',
                                                                                                 levels)),
                             'dataset_keep_percentage': 0.5})
    images, labels, sigma_n, raw_index, _ = al.prepare_data(cfg, lambda *a: None, None)
    assert len(images) == 100 and np.array_equal(sigma_n, levels[raw_index].astype(np.float64))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        y = al.observe(images, torch.from_numpy(sigma_n), al.numpy_noise(raw_index, sigma_n, (3, 32, 32), pool))
    sigma_n = torch.from_numpy(sigma_n).float()
    residual = (y - (images.float() / 127.5 - 1)).flatten(1).std(1)
    for level in (0.0, 0.1, 0.4):
        assert abs(residual[sigma_n == level].mean() - level) < 0.02
    g = torch.Generator().manual_seed(0)
    _, _, sigma, _ = al.ambient_loss(lambda x, s, l=None: x, y, sigma_n, torch.randn(100, generator=g),
                                     torch.randn(y.shape, generator=g))
    assert torch.all(sigma.view(-1) >= sigma_n)


def test_cifar10_is_read_from_the_md5_checked_cache(tmp_path, monkeypatch):
    """--data=cifar10 goes through fid's reader: an archive in the official layout in the cache is read once its md5
    matches (no download, no pickle.load); a cached file with another md5 is refused in one line."""
    import hashlib
    import io
    import pickle
    import tarfile
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode='w:gz') as tar:
        for k in range(1, 6):
            data = pickle.dumps({b'data': np.full((2, 3072), k, np.uint8), b'labels': [k, k + 1]})
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{k}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / 'cifar-10-python.tar.gz').write_bytes(archive.getvalue())
    monkeypatch.setenv('CORRUPTED_DIFFUSION_CACHE', str(tmp_path))
    monkeypatch.setattr(al.nets, 'download_file', lambda *a, **k: pytest.fail('downloaded'))
    cfg = _config({'data': 'cifar10'})
    with pytest.raises(al.UserError, match='md5'):
        al.read_data(cfg)
    monkeypatch.setattr(fid, 'CIFAR10_MD5', hashlib.md5(archive.getvalue()).hexdigest())
    x, y = al.read_data(cfg)
    assert x.shape == (10, 3, 32, 32) and x[2, 0, 0, 0] == 2 and y.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]


def test_dry_run_writes_nothing(tmp_path, capsys, monkeypatch):
    al.main([*FAST, '--dry_run', f'--outdir={tmp_path / "runs"}', '--sigma=0.2', '--corruption_probability=0.9'])
    assert '"corruption_probability": 0.9' in capsys.readouterr().out
    assert not (tmp_path / 'runs').exists()
    # The documented CIFAR-10 command at scale: no download, no file read or written, and the network it would
    # train (DDPM++, 55.7M parameters, built on the meta device) is printed.
    monkeypatch.setenv('CORRUPTED_DIFFUSION_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(al.nets, 'download_file', lambda *a, **k: pytest.fail('downloaded'))
    al.main(['--data=cifar10', f'--outdir={tmp_path / "runs"}', '--sigma=0.2', '--corruption_probability=0.9',
             '--dry_run', '--transfer=giannisdaras/ambient_laws_celeba_sigma_0.05_corruption_0.1_keep_1.0'])
    out = capsys.readouterr().out
    assert 'arch ddpmpp' in out and 'channel_mult [2, 2, 2]' in out and '55,733,891 parameters' in out
    assert not (tmp_path / 'runs').exists() and not (tmp_path / 'cache').exists()


def _memory_limited(tmp_path, argv, limit_gb=3):
    """Runs al.main(argv) in a child process whose address space may grow by limit_gb after importing torch."""
    code = f"""
import resource, sys
sys.path.insert(0, {ROOT!r})
import ambient_laws
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + {limit_gb} * 2 ** 30, hard))
ambient_laws.main({argv!r})
"""
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_hostile_snapshots_fail_in_one_line_without_allocating(tmp_path):
    """Issue 23 items 4 and 9: a 1 KB .pt whose net_kwargs ask for a huge network is checked on the meta device
    before anything is allocated; a bogus kwarg and an OrderedDict whose BUILD sets attributes (_metadata) are one
    line and exit 2, not a traceback."""
    net, kwargs = al.build_network(_config({'preset': 'tiny', 'cbase': 16}), 32, 3, 0)
    huge = dict(ema={'unet.out.2.bias': torch.zeros(3)}, net_kwargs={**kwargs, 'model_channels': 4096})
    torch.save(huge, tmp_path / 'huge.pt')
    assert os.path.getsize(tmp_path / 'huge.pt') < 4096
    bogus = dict(ema=net.state_dict(), net_kwargs={**kwargs, 'bogus': 1})
    torch.save(bogus, tmp_path / 'bogus.pt')
    ema = net.state_dict()
    ema._metadata = 5                                                    # pickled as BUILD with {'_metadata': 5}
    torch.save(dict(ema=ema, net_kwargs=kwargs), tmp_path / 'build.pt')
    for name, message in (('huge', 'no tensor'), ('bogus', 'bogus'), ('build', None)):
        result = _memory_limited(tmp_path, ['generate', f'--network={tmp_path / name}.pt', '--seeds=0',
                                            '--steps=2', f'--outdir={tmp_path / name}'])
        err = result.stderr.strip().splitlines()
        if message is None:  # attributes dropped: the weights load and sample
            assert result.returncode == 0, err
            assert os.listdir(tmp_path / name) == ['000000.png']
        else:
            assert result.returncode == 2 and len(err) == 1 and err[0].startswith('ambient_laws.py: error: '), err
            assert message in err[0], err


def test_resume_auto_continues_only_the_same_experiment(tmp_path, capsys):
    """Issue 23 item 5: a run on data set A is not continued when --resume=auto trains on B (same file name, other
    folder): a new run folder, and the log says why. The same config continues in the same folder. A folder whose
    lock a live process holds is refused in one line (item 11)."""
    other = tmp_path / 'b'
    other.mkdir()
    with np.load(TINY_DATA) as data:
        np.savez(other / os.path.basename(TINY_DATA), x=data['x'][::-1].copy())
    common = [*FAST, '--kimg=0.008', '--tick=1', f'--outdir={tmp_path / "runs"}', '--resume=auto']
    al.main([*common, f'--data={TINY_DATA}'])
    al.main([*common, f'--data={other / os.path.basename(TINY_DATA)}'])
    assert sorted(os.listdir(tmp_path / 'runs')) == ['00000-cifar10_tiny-tiny-sigma0-p0-keep1',
                                                     '00001-cifar10_tiny-tiny-sigma0-p0-keep1']
    assert 'differs: --data=' in capsys.readouterr().out
    al.main([*common, f'--data={TINY_DATA}', '--kimg=0.016'])
    assert len(os.listdir(tmp_path / 'runs')) == 2
    lock = tmp_path / 'runs' / '00001-cifar10_tiny-tiny-sigma0-p0-keep1' / 'run.lock'
    lock.write_text(f'{os.getppid()} {__import__("socket").gethostname()}\n')   # a live process holds it
    _fails(capsys, [*common, f'--data={other / os.path.basename(TINY_DATA)}', '--kimg=0.016'], 'is in use by')


# ----------------------------------------------------------------------------------------------------------------------
# Drop-in for giannisdaras/ambient-laws: the official data set, flags, README commands, failure paths


def test_official_dataset_bit_for_bit():
    """The default data set equals ambient_utils' ImageFolderDataset (as train.py configures it) bit for bit: the
    kept subset (max_size), which images are noisy (NumPy seeded with the raw index: a per-pixel Bernoulli(1) mask,
    then u, noisy iff u <= p) and their observed pixels (float32 image += sigma * float64 noise). --xflip copies keep
    their image's noise, unflipped, as the official __getitem__ flips before adding it; and train.py's max_size counts
    the flipped copies, so --xflip keeps twice the fraction: int(400 * 0.3) = 120 of the 200 images."""
    p, sigma = 0.3, 0.2
    cfg = _config({'preset': 'tiny', 'data': TINY_DATA, 'sigma': sigma, 'corruption_probability': p,
                             'dataset_keep_percentage': 0.3, 'xflip': True})
    x, _ = fid.read_image_set(TINY_DATA)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        images, _, sigma_n, raw_index, _ = al.prepare_data(cfg, lambda *a: None, pool)
        eps = al.numpy_noise(raw_index, sigma_n, (3, 32, 32), pool)
    ours = al.observe(images, torch.from_numpy(sigma_n), eps).numpy()
    n = len(raw_index) // 2
    official = np.arange(len(x))                                    # ambient_utils max_size, int(2 N keep)
    np.random.RandomState(0).shuffle(official)
    assert np.array_equal(raw_index[:n], np.sort(official[:int(2 * len(x) * 0.3)]))
    assert n == 120 and np.array_equal(raw_index[:n], raw_index[n:])
    noisy = []
    for k, raw in enumerate(raw_index[:n]):
        np.random.seed(raw)                                           # the official __getitem__, written out
        image = x[raw].astype(np.float32) / 127.5 - 1
        flipped = image[:, :, ::-1].copy()
        np.random.binomial(1, 1.0, size=image.shape)
        if np.random.rand() <= p:
            noise = np.random.normal(size=image.shape)
            image += sigma * noise
            flipped += sigma * noise
            noisy.append(k)
        assert np.array_equal(ours[k], image) and np.array_equal(ours[n + k], flipped), k
    assert np.flatnonzero(sigma_n[:n]).tolist() == noisy and 20 < len(noisy) < 55   # Binomial(120, 0.3): 36 +- 5
    # The law of the noisy count on a larger set: each image noisy with probability p, independently.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        count = al.official_noisy(np.arange(3000), (1, 2, 2), p, pool).sum()
    assert abs(count - 900) < 4 * (3000 * p * (1 - p)) ** 0.5


OFFICIAL_FLAGS = [  # (command, official flag, field, value): every flag of train.py, generate.py and eval_fid.py
    ('train', '--outdir=out', 'outdir', 'out'), ('train', '--data=d.zip', 'data', 'd.zip'),
    ('train', '--cond=1', 'cond', True), ('train', '--arch=ddpmpp', 'arch', 'ddpmpp'),
    ('train', '--arch=adm', 'arch', 'adm'), ('train', '--precond=edm', None, None),
    ('train', '--duration=0.05', 'kimg', 50), ('train', '--batch=8', 'batch', 8),
    ('train', '--batch-gpu=4', 'batch_gpu', 4), ('train', '--cbase=16', 'cbase', 16),
    ('train', '--cres=1,2', 'cres', '1,2'), ('train', '--lr=2e-4', 'lr', 2e-4),
    ('train', '--weight_decay=0.1', 'weight_decay', 0.1), ('train', '--ema=0.01', 'ema_halflife_kimg', 10),
    ('train', '--ema=0.0001', 'ema_halflife_kimg', 0), ('train', '--duration=0.0001', 'kimg', 1),
    ('train', '--dropout=0.2', 'dropout', 0.2), ('train', '--augment=0.3', 'augment', 0.3),
    ('train', '--xflip=1', 'xflip', True), ('train', '--fp16=0', None, None), ('train', '--ls=2', 'ls', 2.0),
    ('train', '--bench=0', 'bench', False), ('train', '--cache=1', None, None),
    ('train', '--workers=2', 'workers', 2), ('train', '--expr_id=abc', 'expr_id', 'abc'),
    ('train', '--desc=x', 'desc', 'x'), ('train', '--nosubdir', 'nosubdir', True), ('train', '--tick=3', 'tick', 3),
    ('train', '--snap=2', 'snap', 2), ('train', '--dump=7', 'dump', 7), ('train', '--seed=5', 'seed', 5),
    ('train', '--transfer=a.pkl', 'transfer', 'a.pkl'), ('train', '--resume=s.pt', 'resume', 's.pt'),
    ('train', '-n', 'dry_run', True), ('train', '--dry-run', 'dry_run', True),
    ('train', '--corruption_probability=0.9', 'corruption_probability', 0.9), ('train', '--sigma=0.2', 'sigma', 0.2),
    ('train', '--dataset_keep_percentage=0.5', 'dataset_keep_percentage', 0.5),
    ('train', '--consistency_batch_size=8', 'consistency_batch_size', 8),
    ('train', '--with_weight=1', 'with_weight', True), ('train', '--with_grad=0', 'with_grad', False),
    ('train', '--num_consistency_steps=4', 'num_consistency_steps', 4), ('train', '--num_primes=3', 'num_primes', 3),
    ('train', '--consistency_coeff=0.5', 'consistency_coeff', 0.5),
    ('generate', '--network=n.pkl', 'network', 'n.pkl'), ('generate', '--outdir=o', 'outdir', 'o'),
    ('generate', '--seeds=0-9', 'seeds', '0-9'), ('generate', '--subdirs', 'subdirs', True),
    ('generate', '--class=3', 'class_idx', 3), ('generate', '--batch=8', 'batch', 8),
    ('generate', '--steps=9', 'steps', 9),
    ('generate', '--sigma_min=0.01', 'sigma_min', 0.01), ('generate', '--sigma_max=50', 'sigma_max', 50.0),
    ('generate', '--rho=5', 'rho', 5.0), ('generate', '--S_churn=40', 'S_churn', 40.0),
    ('generate', '--S_min=0.05', 'S_min', 0.05), ('generate', '--S_max=50', 'S_max', 50.0),
    ('generate', '--S_noise=1.003', 'S_noise', 1.003), ('generate', '--stop_variance=0.1', 'stop_variance', 0.1),
    ('eval', '--gen_path=g', 'gen_path', 'g'), ('eval', '--ref_path=r', 'ref_path', 'r'),
    ('eval', '--ref_stats=r.npz', 'ref', 'r.npz'), ('eval', '--batch_size=32', 'batch', 32),
    ('eval', '--out_path=f.json', 'out_path', 'f.json'),
]
REFUSED_FLAGS = [('train', '--arch=ncsnpp'), ('train', '--precond=vp'), ('train', '--fp16=1'), ('train', '--cache=0'),
                 ('generate', '--solver=euler'), ('generate', '--disc=vp'), ('generate', '--schedule=vp'),
                 ('generate', '--scaling=vp')]


def test_every_official_flag_is_honoured_or_refused_in_one_line(capsys):
    for command, flag, field, value in OFFICIAL_FLAGS:
        cfg = al.command_config(command, [flag])
        if field is None:                        # accepted with its one official value, no field
            assert cfg == al.command_config(command, []), flag
        else:
            assert getattr(cfg, field) == value, flag
    for command, flag in REFUSED_FLAGS + [('train', '--corruption_prob=0.5'), ('generate', '--seed=1-3')]:
        with pytest.raises(SystemExit) as exit_info:
            al.main([command, flag])                                     # refused before any work
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith('ambient_laws.py: error: '), flag
        refused = (command, flag) in REFUSED_FLAGS  # the others are a prefix and a flag of another command
        assert ('(official flag) is not supported: ' in err[0] and '; use ' in err[0]
                if refused else 'unrecognized arguments' in err[0]), err


def test_help_layout(capsys):
    al.main(['--help'])                                                  # returns: exit code 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == 'usage: ambient_laws.py [COMMAND] [--flag=value ...]'
    assert 'arXiv:2411.02780' in out[1] and 'commands:' in out
    assert [line.split()[0] for line in out[out.index('commands:') + 1:] if line.startswith('  ')] == \
        ['train', 'generate', 'eval']
    assert out[-1] == "Run 'python ambient_laws.py COMMAND --help' for the flags of a command."
    order = ['data and corruption', 'network', 'optimisation', 'run', 'sampling', 'evaluation']
    for command in ('train', 'generate', 'eval'):
        with pytest.raises(SystemExit):
            al.main([command, '--help'])
        text = capsys.readouterr().out
        titles = [line[:-1] for line in text.splitlines() if line.endswith(':') and not line.startswith(' ')]
        assert titles == [t for t in order if t in titles] and len(titles) >= 3, titles
        entries, current = [], None                                          # one entry per flag
        for line in text.splitlines():
            if line.startswith('  -'):
                current = [line]
                entries.append(current)
            elif line.startswith('    ') and current is not None:
                current.append(line)
            else:
                current = None
        assert len(entries) > 10
        for entry in (' '.join(' '.join(e).split()) for e in entries):
            assert entry.startswith('-h') or re.search(r'\((default: [^)]*|required)\)$', entry), entry
        assert '--duration FLOAT' in text and 'Mimg -> kimg' in text if command == 'train' else True


def _readme_outdir(tmp_path):
    return tmp_path / 'outputs'


def test_official_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The seed README's train, generate and eval_fid commands with their placeholders filled and only sizes
    overridden by extra flags at the end (run in this process; the DDP test launches the script with
    `python -m torch.distributed.run --standalone` as the README does)."""
    cp, sigma, dp, cc = 0.5, 0.2, 1.0, 0.0
    train = ['--outdir=' + str(tmp_path / 'runs'), f'--data={TINY_DATA}', f'--sigma={sigma}',
             f'--corruption_probability={cp}', f'--dataset_keep_percentage={dp}', f'--consistency_coeff={cc}',
             f'--expr_id=cifar_cp{cp}_sigma{sigma}_dp{dp}_cc{cc}']
    sizes = ['--arch=tiny', '--cbase=16', '--batch=8', '--kimg=0.008', '--tick=1', '--grid=2', '--steps=3',
             '--workers=1', '--lr_rampup_kimg=0.1', '--ema=0.0001']
    al.main([*train, *sizes])  # `python -m torch.distributed.run --standalone` itself: see the DDP test
    run_dir = _run_dir(tmp_path / 'runs')
    config = json.load(open(os.path.join(run_dir, 'config.json')))['config']
    assert config['expr_id'] == 'cifar_cp0.5_sigma0.2_dp1.0_cc0.0' and config['kimg'] == 0.008
    assert config['seed'] >= 0 and config['arch'] == 'tiny'                         # the official random seed
    network = _latest(run_dir, 'network-snapshot')
    # generate.py: --seeds=0-49999 --network={checkpoint} --outdir="outputs" --batch=8, fewer seeds.
    al.main(['generate', '--seeds=0-49999', f'--network={network}', f'--outdir={_readme_outdir(tmp_path)}',
             '--batch=8', '--seeds=0-9', '--steps=4'])
    assert len(os.listdir(_readme_outdir(tmp_path))) == 10
    # eval_fid.py: --gen_path={outdir} --ref_stats={dataset_stats} (EDM's fid-refs hold mu and sigma only).
    weights = tmp_path / 'inception.pth'
    torch.save(fid.InceptionV3().state_dict(), weights)
    monkeypatch.setenv('FID_WEIGHTS', str(weights))
    np.savez(tmp_path / 'cifar10-32x32.npz', mu=np.zeros(2048), sigma=np.eye(2048))
    monkeypatch.chdir(tmp_path)
    al.main(['eval', f'--gen_path={_readme_outdir(tmp_path)}', f'--ref_stats={tmp_path / "cifar10-32x32.npz"}'])
    result = json.load(open(tmp_path / 'fid_out.json'))                         # the official output file and keys
    assert np.isfinite(result['fid_score']) and result['inception_score'] > 0 and result['preprocess'] == 'tf'


def _fails(capsys, argv, message, code=2):
    with pytest.raises(SystemExit) as exit_info:
        al.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == code and len(err) == 1 and message in err[0], err
    assert err[0].startswith('ambient_laws.py: error: ')


def test_bad_inputs_fail_before_any_write(tmp_path, capsys, monkeypatch):
    runs = tmp_path / 'runs'
    _fails(capsys, ['generate', '--network=missing.pt', f'--outdir={tmp_path / "g"}', '--seeds=5-1'], 'reversed')
    chw = tmp_path / 'chw.npz'
    np.savez(chw, x=np.zeros((4, 3, 32, 32), np.uint8))
    _fails(capsys, [*FAST, f'--data={chw}', f'--outdir={runs}'], 'channels first')
    labels = tmp_path / 'labels.npz'
    np.savez(labels, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array([0, 1, 10 ** 6, 2]))
    _fails(capsys, [*FAST, f'--data={labels}', '--cond=true', f'--outdir={runs}'], 'labels are not 0..K-1')
    _fails(capsys, [*FAST, f'--data={labels}', '--cond=true', '--num_classes=10', f'--outdir={runs}'],
           'label 1000000 is outside [0, 10)')
    empty = tmp_path / 'old' / 'training-state-000004.pt'
    empty.parent.mkdir()
    empty.write_bytes(b'')
    _fails(capsys, [*FAST, f'--resume={empty}', f'--outdir={runs}'], 'is empty (0 bytes')
    snapshot = tmp_path / 'old' / 'training-state-000008.pt'
    torch.save(dict(ema={}, net_kwargs={}), snapshot)
    _fails(capsys, [*FAST, f'--resume={snapshot}', f'--outdir={runs}'], 'a network snapshot, not a training state')
    _fails(capsys, ['generate', f'--network={empty}', f'--outdir={tmp_path / "g"}'], 'is empty (0 bytes')
    real_access = os.access
    monkeypatch.setattr(al.os, 'access', lambda path, mode: False if str(tmp_path) in str(path) else
                        real_access(path, mode))
    _fails(capsys, [*FAST, f'--outdir={runs}'], 'is not writable')
    assert not runs.exists() and not (tmp_path / 'g').exists()


def test_full_disk_then_kill_leftovers_then_resume_auto(tmp_path, capsys, monkeypatch):
    """A full disk at the first snapshot: one line, exit 1, no .tmp left. A .tmp left by a kill and the run folder
    without a training state: --resume=auto reuses that folder (no new numbered one) and removes the .tmp."""
    common = [*FAST, '--kimg=0.016', '--tick=0.008', '--snap=1', '--dump=1', f'--outdir={tmp_path / "runs"}']
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(al.torch, 'save', full_disk)
    _fails(capsys, common, 'No space left on device', code=1)
    monkeypatch.setattr(al.torch, 'save', real_save)
    [run] = os.listdir(tmp_path / 'runs')
    folder = tmp_path / 'runs' / run
    assert not [f for f in os.listdir(folder) if f.endswith('.tmp') or f.startswith('training-state')]
    (folder / 'network-snapshot-000000.pt.tmp').write_bytes(b'partial')          # as a kill -9 leaves it
    al.main([*common, '--resume=auto'])
    assert os.listdir(tmp_path / 'runs') == [run]
    assert not [f for f in os.listdir(folder) if f.endswith('.tmp')]
    assert _state(_latest(folder, 'training-state'))['cur_nimg'] == 16


def _perturbed(net, seed):
    """Random weights everywhere (a fresh EDM network has zero output layers, which would hide a wrong key map)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g))
    return net


def test_released_checkpoints_load_sample_and_transfer(tmp_path, monkeypatch, capsys):
    """An EDM network-snapshot-*.pkl (its embedded code never runs), an ambient-laws Hugging Face repo (config.json +
    model.safetensors, downloaded from a local server standing in for the Hub) and an EDM DhariwalUNet pickle sample
    in `generate` exactly what the same weights sample as our snapshot; --transfer takes the repo id."""
    import edm_layouts
    monkeypatch.setenv('CORRUPTED_DIFFUSION_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('EDM_LAYOUTS_EXEC_MARKER', str(tmp_path / 'executed'))
    repo = 'giannisdaras/ambient_laws_celeba_sigma_0.05_corruption_0.1_keep_1.0'
    song, song_kwargs = al.build_network(_config({'preset': 'tiny', 'cbase': 16}), 32, 3, 0)
    adm, adm_kwargs = al.build_network(_config({'arch': 'adm', 'cbase': 64, 'cres': '1,1'}), 16, 3, 10)
    for net, kwargs, name in ((_perturbed(song, 1), song_kwargs, 'song'), (_perturbed(adm, 2), adm_kwargs, 'adm')):
        torch.save(dict(ema=net.state_dict(), net_kwargs=kwargs, config=dict(sigma_data=0.5)), tmp_path / f'{name}.pt')
        edm_layouts.write_edm_pickle(tmp_path / f'{name}-network-snapshot-000000.pkl', net.unet,
                                     edm_layouts.edm_precond_kwargs(net.unet))
    edm_layouts.write_hf_folder(edm_layouts.hf_repo_folder(tmp_path / 'hub', repo), song.unet,
                                edm_layouts.edm_precond_kwargs(song.unet))

    def images(network, *flags):
        folder = tmp_path / 'gen' / str(len(os.listdir(tmp_path / 'gen')) if (tmp_path / 'gen').exists() else 0)
        al.main(['generate', f'--network={network}', '--seeds=0-1', '--steps=3', f'--outdir={folder}', *flags])
        return [np.asarray(PIL.Image.open(folder / name)) for name in sorted(os.listdir(folder))]

    with edm_layouts.serve_folder(tmp_path / 'hub') as base:
        monkeypatch.setenv('HF_ENDPOINT', base)
        ours = images(tmp_path / 'song.pt')
        for network in (tmp_path / 'song-network-snapshot-000000.pkl', repo, f'hf://{repo}'):
            assert all(np.array_equal(a, b) for a, b in zip(images(network), ours)), network
        ours = images(tmp_path / 'adm.pt', '--class=3')
        assert all(np.array_equal(a, b) for a, b in
                   zip(images(tmp_path / 'adm-network-snapshot-000000.pkl', '--class=3'), ours))
        # --transfer from the Hub: after one step at lr 0 (the warm-up starts at 0) the weights are the repo's.
        al.main([*FAST, f'--transfer={repo}', '--kimg=0.008', f'--outdir={tmp_path / "runs"}'])
    state = _state(_latest(_run_dir(tmp_path / 'runs'), 'training-state'))
    assert all(torch.equal(value, song.state_dict()[key]) for key, value in state['net'].items())
    assert not (tmp_path / 'executed').exists()
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')                      # offline: one line, what to fetch
    _fails(capsys, ['generate', '--network=someone/missing_repo', f'--outdir={tmp_path / "x"}'], 'download')


def test_consistency_rows_official_per_gpu_and_global():
    """Official: the first consistency_batch_size // GPUs rows of every microbatch (so more GPUs or accumulation
    rounds add rows); --consistency_rows=global: the first consistency_batch_size rows of the global batch. Rank k
    holds rows k, k + GPUs, ... of the global batch, split into rounds."""
    cfg = _config({'batch': 8, 'consistency_coeff': 1.0, 'consistency_batch_size': 4})
    ids, counts = al.consistency_rows(cfg, world=2, rounds=2, batch_gpu=2)
    assert counts == [[2, 2], [2, 2]] and ids.tolist() == list(range(8))
    ids, counts = al.consistency_rows(cfg, world=1, rounds=1, batch_gpu=8)
    assert counts == [[4]] and ids.tolist() == [0, 1, 2, 3]
    cfg.consistency_rows = 'global'
    ids, counts = al.consistency_rows(cfg, world=2, rounds=2, batch_gpu=2)
    assert counts == [[2, 0], [2, 0]] and ids.tolist() == [0, 1, 2, 3]
    cfg.consistency_coeff = 0.0
    assert al.consistency_rows(cfg, world=2, rounds=2, batch_gpu=2)[0].numel() == 0


def test_grey_images_keep_one_channel(tmp_path):
    # Stored channels, as the official loader: a grey .npz gives a 1-channel data set, not three copies.
    import types
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / 'grey.npz', x=x)
    images, labels = al.read_data(types.SimpleNamespace(data=str(tmp_path / 'grey.npz'), workers=1))
    assert images.shape == (5, 1, 8, 8) and labels is None
    assert np.array_equal(images[:, 0], x)
