"""Tests of ambient.py: the corruption, the loss's minimiser and the sampler on Gaussian data with closed-form answers,
augmentation, and a tiny end-to-end run with resume, DDP parity and bad input. CPU only."""
import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pytest
import torch

import ambient
import fid
import nets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = os.path.join(ROOT, 'tests', 'data', 'cifar10_tiny.npz')

# ----------------------------------------------------------------------------------------------------------------------
# Corruption


def test_masks_are_the_official_per_image_draws_with_the_right_rates():
    p, delta = 0.6, 0.3
    for full_rgb in (True, False):
        A, A_tilde = ambient.corruption_masks(np.arange(200), (3, 32, 32), p, delta, full_rgb)
        assert A.shape == A_tilde.shape == (200, 1 if full_rgb else 3, 32, 32) and A.dtype == torch.bool
        assert not (A_tilde & ~A).any()                                              # A_tilde = B * A <= A
        n = A.numel()
        for rate, expected in ((1 - A.float().mean(), p), (1 - A_tilde.float().mean(), p + (1 - p) * delta)):
            assert abs(float(rate) - expected) < 4 * (expected * (1 - expected) / n) ** 0.5
        # The official dataset: np.random.seed(raw_idx), then A, then B, per pixel (and copied to 3 channels).
        for index in (0, 7, 123):
            np.random.seed(index)
            size = (32, 32) if full_rgb else (3, 32, 32)
            official_A = np.random.binomial(1, 1 - p, size=size)
            official_A_tilde = np.minimum(official_A, np.random.binomial(1, 1 - delta, size=size))
            assert np.array_equal(A[index].squeeze(0).numpy() if full_rgb else A[index].numpy(), official_A)
            assert np.array_equal(A_tilde[index].squeeze(0).numpy() if full_rgb else A_tilde[index].numpy(),
                                  official_A_tilde)


def test_masks_are_fixed_per_image(tmp_path):
    """A mask depends on the image's raw index alone: not on the subset, the training seed or the epoch."""
    A_all, _ = ambient.corruption_masks(np.arange(50), (3, 8, 8), 0.5, 0.1, True)
    A_some, _ = ambient.corruption_masks(np.array([3, 17, 42]), (3, 8, 8), 0.5, 0.1, True)
    assert torch.equal(A_all[[3, 17, 42]], A_some)
    A_other, _ = ambient.corruption_masks(np.arange(50), (3, 8, 8), 0.5, 0.1, True, mask_seed=1)
    assert not torch.equal(A_all, A_other)
    # Two training runs with different seeds read the same corrupted images, whatever the epoch.
    cfg = ambient.Config(data=TINY_DATA, corruption_probability=0.5, augment=0)
    first = ambient.Data(cfg, torch.device('cpu'))
    second = ambient.Data(ambient.Config(**{**cfg.__dict__, 'seed': 5}), torch.device('cpu'))
    assert torch.equal(first.images, second.images) and torch.equal(first.A_tilde, second.A_tilde)
    order_epoch0 = first.indices(torch.arange(0, 200))
    order_epoch3 = first.indices(torch.arange(600, 800))
    assert sorted(order_epoch0.tolist()) == sorted(order_epoch3.tolist()) == list(range(200))
    assert not torch.equal(order_epoch0, order_epoch3)
    image = int(order_epoch0[0])
    y0, A0, _, _ = first.batch(order_epoch0[:1], 'cpu')
    y3, A3, _, _ = first.batch(order_epoch3[order_epoch3 == image], 'cpu')
    assert torch.equal(y0, y3) and torch.equal(A0, A3)
    assert ((y0 + 1) * (1 - A0)).abs().max() == 0                                # erased pixels hold 0 (= -1)


def test_masks_seen_by_training_steps():
    """A training step sees A erasing p of the pixels and A_tilde erasing p + (1 - p) delta; A_tilde is the image's
    fixed one (official), or redrawn every step with --resample_delta."""
    for resample in (False, True):
        cfg = ambient.Config(data=TINY_DATA, corruption_probability=0.6, delta_probability=0.3, batch=200, augment=0,
                             resample_delta=resample)
        data = ambient.Data(cfg, torch.device('cpu'))
        seen = []
        for cur_nimg in (0, 200):                                                     # two epochs
            step = ambient.draw_step(cfg, data, cur_nimg, torch.device('cpu'))
            _, A, A_tilde, _, _ = ambient.microbatch(cfg, data, step, torch.arange(200), torch.device('cpu'))
            for rate, expected in ((1 - A.mean(), 0.6), (1 - A_tilde.mean(), 0.6 + 0.4 * 0.3)):
                assert abs(float(rate) - expected) < 4 * (expected * (1 - expected) / A.numel()) ** 0.5
            assert not (A_tilde > A).any()
            seen.append(A_tilde[step['index'].argsort()])
        assert torch.equal(seen[0], seen[1]) != resample


def test_loss_ignores_erased_pixels():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(6, 6, 3, padding=1))
    wrapped = lambda x, sigma, class_labels, augment_labels: net(x) * sigma.reshape(-1, 1, 1, 1)  # noqa: E731
    y = torch.rand(4, 3, 8, 8) * 2 - 1
    A, A_tilde = (t.float() for t in ambient.corruption_masks(np.arange(4), (3, 8, 8), 0.5, 0.2, False))
    normal, eps = torch.randn(4), torch.randn(4, 3, 8, 8)
    results = []
    for hidden in (y, torch.randn_like(y) * 5):
        net.zero_grad()
        loss = ambient.ambient_loss(wrapped, A * y + (1 - A) * hidden, A, A_tilde, rnd_normal=normal, eps=eps)
        loss.sum().backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
    assert torch.equal(results[0][0], results[1][0]) and results[0][0].shape == (4,)
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert results[0][0].min() > 0


def test_loss_is_the_official_formula():
    """The network reads [A_tilde (y + sigma eps), A_tilde] (noise first, then the mask: official order) and the
    loss is lambda(sigma) A |D[:C] - y|^norm with lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    y = torch.rand(4, 3, 8, 8) * 2 - 1
    A, A_tilde = (t.float() for t in ambient.corruption_masks(np.arange(4), (3, 8, 8), 0.5, 0.2, True))
    normal, eps, out = torch.randn(4), torch.randn(4, 3, 8, 8), torch.randn(4, 6, 8, 8)
    labels, augment_labels = torch.tensor([1, 0, 2, 1]), torch.randn(4, 9)
    seen = {}

    def net(x, sigma, class_labels=None, force_fp32=False, **model_kwargs):  # EDM's EDMPrecond.forward signature
        seen.update(x=x, sigma=sigma, class_labels=class_labels, augment_labels=model_kwargs.get('augment_labels'),
                    force_fp32=force_fp32)
        return out
    sigma = (normal * 1.2 - 1.2).exp()                                                # EDM's log-normal draw
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2
    for norm, error in ((2, (out[:, :3] - y).square()), (1, (out[:, :3] - y).abs())):
        loss = ambient.ambient_loss(net, y, A, A_tilde, labels, augment_labels, norm=norm, rnd_normal=normal, eps=eps)
        assert torch.allclose(loss, (weight * A * error).sum((1, 2, 3)))               # per image, summed
    mask = A_tilde.expand(-1, 3, -1, -1)
    assert torch.allclose(seen['x'], torch.cat([mask * (y + s * eps), mask], 1))
    assert torch.allclose(seen['sigma'], sigma) and seen['force_fp32'] is False      # keywords, not positional
    assert seen['class_labels'] is labels and seen['augment_labels'] is augment_labels
    # Without draws the loss draws sigma and the noise itself.
    torch.manual_seed(0)
    drawn = ambient.ambient_loss(net, y, A, A_tilde)
    torch.manual_seed(0)
    assert torch.equal(drawn, ambient.ambient_loss(net, y, A, A_tilde, rnd_normal=torch.randn(4),
                                                   eps=torch.randn(4, 3, 8, 8)))


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian data: the loss's minimiser and the sampler's output in closed form

C, H, W = 3, 2, 2
DIM = C * H * W


def gaussian(rank=None):
    """N(mu, Sigma) on (3, 2, 2) images; rank r keeps r directions (plus a tiny jitter)."""
    generator = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=torch.float64))[0]
    eigenvalues = torch.linspace(0.05, 0.3, DIM, dtype=torch.float64)
    if rank:
        eigenvalues[:-rank] = 1e-7
    mu = 0.3 * torch.randn(DIM, generator=generator, dtype=torch.float64)
    return mu, (Q * eigenvalues) @ Q.T


def analytic_denoiser(mu, Sigma):
    """E[x0 | M x_t, M] for x_t = x0 + sigma eps (Gaussian conditioning on the observed pixels), as a `net` with the
    ambient interface: input [M x_t, M] (2C channels), or x_t alone (C channels, M = 1)."""

    def net(inputs, sigma, class_labels=None, augment_labels=None):
        inputs = inputs.double()
        x, mask = (inputs[:, :C], inputs[:, C:]) if inputs.shape[1] == 2 * C else (inputs, torch.ones_like(inputs))
        x, mask = x.flatten(1), mask.flatten(1)
        K = Sigma * (mask[:, :, None] * mask[:, None, :]) + sigma.double().reshape(-1, 1, 1) ** 2 * torch.eye(
            DIM, dtype=torch.float64)
        solution = torch.linalg.solve(K, mask * (x - mu))                          # (B, DIM)
        return (mu + (mask * solution) @ Sigma).reshape(-1, C, H, W)
    return net


def monte_carlo_loss(loss_fn, n=20000, seed=2):
    """Per-sample losses (n,) of a denoiser on fixed draws (common random numbers): x0 ~ N(mu, Sigma), EDM's
    log-normal sigma, p = 0.5, delta = 0.3, masks per pixel and channel."""
    generator = torch.Generator().manual_seed(seed)
    mu, Sigma = gaussian()
    x0 = (mu + torch.randn(n, DIM, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(Sigma).T)
    x0 = x0.reshape(n, C, H, W)
    normal = torch.randn(n, generator=generator, dtype=torch.float64)                # ln(sigma) = 1.2 normal - 1.2
    eps = torch.randn(n, C, H, W, generator=generator, dtype=torch.float64)
    A = (torch.rand(n, C, H, W, generator=generator) >= 0.5).double()
    A_tilde = A * (torch.rand(n, C, H, W, generator=generator) >= 0.3).double()
    return lambda net: loss_fn(net, x0, A, A_tilde, normal, eps)


DIRECTIONS = {
    'constant': lambda inputs: torch.ones_like(inputs[:, :C]),
    'observed input': lambda inputs: inputs[:, :C],
    'hidden pixels': lambda inputs: 1 - inputs[:, C:] if inputs.shape[1] == 2 * C else torch.zeros_like(inputs),
    'mean of observed': lambda inputs: inputs[:, :C].mean((1, 2, 3), keepdim=True).expand(-1, C, H, W),
}


def slope_z_scores(loss, denoiser, step=0.05):
    """Moving the denoiser by t g changes the loss as L(t) = L(0) + 2 t b + t^2 a. For each direction g: whether
    both t = +-step raise the Monte-Carlo loss, and the slope b in units of its Monte-Carlo standard error."""
    base, results = loss(denoiser), {}
    for name, g in DIRECTIONS.items():
        plus, minus = (loss(lambda inputs, sigma, t=t, **_: denoiser(inputs, sigma) + t * g(inputs.double()))
                       for t in (step, -step))
        slope = (plus - minus) / (4 * step)                                            # per-sample b
        rises = bool(plus.mean() > base.mean() and minus.mean() > base.mean())
        results[name] = rises, float(slope.mean() / (slope.std() / len(slope) ** 0.5))
    return results


def test_analytic_denoiser_minimises_the_ambient_loss():
    """The paper's main theorem: E[x0 | A_tilde x_t, A_tilde] minimises the ambient loss on every pixel, those that
    A_tilde hides included: moving it along any direction raises the Monte-Carlo loss and the slope vanishes within 4
    standard errors. The clean denoiser applied to the masked input (ignoring the mask) does much worse."""
    mu, Sigma = gaussian()
    best = analytic_denoiser(mu, Sigma)
    loss = monte_carlo_loss(lambda net, x0, A, A_tilde, normal, eps: ambient.ambient_loss(
        net, x0, A, A_tilde, rnd_normal=normal, eps=eps))
    for name, (rises, z) in slope_z_scores(loss, best).items():
        assert rises and abs(z) < 4, (name, z)
    assert loss(lambda inputs, sigma, **_: best(inputs[:, :C], sigma)).mean() > 1.05 * loss(best).mean()


def test_naive_loss_on_masked_images_is_not_minimised_by_the_clean_denoiser():
    """EDM's loss on the masked images A x0 (no mask input, no further corruption) is minimised by the denoiser of
    the masked-image distribution, E[A x0 | x_t]; the clean denoiser E[x0 | x_t] is far from stationary for it."""
    mu, Sigma = gaussian()
    clean = analytic_denoiser(mu, Sigma)
    loss = monte_carlo_loss(lambda net, x0, A, A_tilde, normal, eps: ambient.edm_loss(net, A * x0, rnd_normal=normal,
                                                                                      eps=eps))
    z_scores = [abs(z) for _, z in slope_z_scores(loss, clean).values()]
    assert max(z_scores) > 20, z_scores


def test_without_delta_the_hidden_pixels_are_unconstrained():
    """delta = 0 (A_tilde = A): the loss never sees a pixel the network cannot see, so anything goes there: the
    reason for the further corruption."""
    mu, Sigma = gaussian()
    best = analytic_denoiser(mu, Sigma)
    loss = monte_carlo_loss(lambda net, x0, A, A_tilde, normal, eps: ambient.ambient_loss(
        net, x0, A, A, rnd_normal=normal, eps=eps), n=4000)
    garbage = lambda inputs, sigma, **_: best(inputs, sigma) + 7 * (1 - inputs[:, C:].double())  # noqa: E731
    assert torch.allclose(loss(best), loss(garbage), rtol=1e-12, atol=0)


def sampler_output_law(net, masks, num_steps):
    """Exact mean (B, DIM) and covariance (B, DIM, DIM) of the sampler's output per sampling mask: with a Gaussian
    and the analytic denoiser the sampler is an affine map of the latents, read off from DIM + 1 runs."""
    B = masks.shape[1]
    basis = torch.cat([torch.zeros(1, DIM), torch.eye(DIM)]).double().reshape(DIM + 1, 1, C, H, W)
    latents = basis.expand(-1, B, -1, -1, -1).reshape(-1, C, H, W)                   # ((DIM + 1) B, C, H, W)
    repeated = masks.repeat(1, DIM + 1, 1, 1, 1)
    out = ambient.ambient_sampler(net, latents, repeated, clip=False, num_steps=num_steps)
    out = out.reshape(DIM + 1, B, DIM)
    T = (out[1:] - out[:1]).permute(1, 2, 0)                                           # (B, DIM, DIM)
    return out[0], T @ T.transpose(1, 2)


def test_heun_sampler_reproduces_the_gaussian():
    mu, Sigma = gaussian()
    mean, cov = sampler_output_law(analytic_denoiser(mu, Sigma), torch.ones(1, 1, C, H, W, dtype=torch.float64), 128)
    assert (mean[0] - mu).abs().max() < 5e-3
    assert (cov[0] - Sigma).abs().max() < 0.01 * Sigma.abs().max()
    # The official 18 steps leave a discretisation error of ~10 % on this Gaussian (and our check would see it).
    _, cov18 = sampler_output_law(analytic_denoiser(mu, Sigma), torch.ones(1, 1, C, H, W, dtype=torch.float64), 18)
    assert (cov18[0] - Sigma).abs().max() > 0.05 * Sigma.abs().max()


def test_fixed_mask_sampler_on_gaussians():
    """The fixed-mask sampler samples the observed pixels from their marginal and fills the others with the
    conditional mean E[x_U | x_S]. On a low-rank Gaussian (as images nearly are) that is exact: every mask gives
    N(mu, Sigma). On a full-rank Gaussian each mask gives covariance P Sigma_SS P^T, P = [I; Sigma_US Sigma_SS^-1]."""
    generator = torch.Generator().manual_seed(3)
    masks = (torch.rand(1, 12, C, H, W, generator=generator) < 0.5).double()
    masks = masks[:, masks.flatten(2).sum(2)[0] >= 3]                                 # at least rank-many pixels
    mu, Sigma = gaussian(rank=2)
    mean, cov = sampler_output_law(analytic_denoiser(mu, Sigma), masks, 128)
    assert (mean - mu).abs().max() < 5e-3
    assert (cov - Sigma).abs().max() < 0.01 * Sigma.abs().max()
    mu, Sigma = gaussian()
    mean, cov = sampler_output_law(analytic_denoiser(mu, Sigma), masks, 128)
    for k, mask in enumerate(masks[0].flatten(1).bool()):
        P = torch.zeros(DIM, int(mask.sum()), dtype=torch.float64)
        P[mask] = torch.eye(int(mask.sum()), dtype=torch.float64)
        P[~mask] = Sigma[~mask][:, mask] @ torch.linalg.inv(Sigma[mask][:, mask])
        expected = P @ Sigma[mask][:, mask] @ P.T
        assert (cov[k] - expected).abs().max() < 0.01 * Sigma.abs().max()
        assert (mean[k] - mu).abs().max() < 5e-3
        assert (expected - Sigma).abs().max() > 0.05 * Sigma.abs().max()              # not the data covariance


def test_reconstruction_guidance():
    """With K masks and w = 0 only mask 1 matters; with w > 0 every evaluation also moves by -w grad R,
    R = K/2 sum_k ||D_1 - D_k||^2 summed over the batch (the official cdist_masked counts each difference K times).
    Checked against the recursion written out for the toy denoiser D_k(x) = M_k x: grad R = K sum_k |M_1 - M_k| x."""
    generator = torch.Generator().manual_seed(4)
    masks = (torch.rand(3, 2, C, H, W, generator=generator) < 0.5).double()
    latents = torch.randn(2, C, H, W, generator=generator, dtype=torch.float64)
    toy = lambda inputs, sigma, **_: inputs[:, :C] * 1.0  # noqa: E731
    one = ambient.ambient_sampler(toy, latents, masks[:1], clip=False, num_steps=4)
    assert torch.equal(one, ambient.ambient_sampler(toy, latents, masks, clip=False, num_steps=4))
    w = 0.02
    guided = ambient.ambient_sampler(toy, latents, masks, clip=False, num_steps=4, guidance_scale=w)
    i = torch.arange(4, dtype=torch.float64)
    t = torch.cat([(80 ** (1 / 7) + i / 3 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, torch.zeros(1).double()])
    disagreement = (masks[0] - masks).abs().sum(0)
    step = lambda x, t, h: h * (x - masks[0] * x) / t - w * 3 * disagreement * x  # noqa: E731
    x = latents * t[0]
    for k in range(4):
        h = t[k + 1] - t[k]
        x_next = x + step(x, t[k], h)
        x = x + 0.5 * (step(x, t[k], h) + step(x_next, t[k + 1], h)) if k < 3 else x_next
    assert (guided - x).abs().max() < 1e-5 * x.abs().max()                           # the net runs in fp32
    assert (guided - one).abs().max() > 0.1 * x.abs().max()


def test_churn_and_clip_follow_the_official_recursion():
    """The official eval.py step written out for one mask: churn to t_hat, Euler point from x_cur (not x_hat), Heun
    average from x_hat, last step x_hat + Euler; the denoiser clipped by s = max(np.percentile(|D|, 0.99), 1) per
    image, D -> clip(D, s) / s. Image 0's denoiser exceeds 1 everywhere, so s > 1 there and the clip is not static."""
    generator = torch.Generator().manual_seed(5)
    masks = (torch.rand(1, 2, C, H, W, generator=generator) < 0.7).double()
    latents = torch.randn(2, C, H, W, generator=generator, dtype=torch.float64)
    offset = torch.tensor([1.6, 0.0]).reshape(-1, 1, 1, 1) + 0.4 * torch.linspace(0, 1, DIM).reshape(C, H, W)
    toy = lambda inputs, sigma, **_: offset + 0.2 * inputs[:, :C] / (1 + sigma.reshape(-1, 1, 1, 1))  # noqa: E731
    churn_noise = torch.randn(2, C, H, W, generator=generator, dtype=torch.float64)
    noise = lambda x: churn_noise  # noqa: E731

    def clipped(x, t):
        D = toy(torch.cat([masks[0] * x, masks[0]], 1).float(), t.float().expand(2)).double()
        s = np.maximum(np.percentile(D.abs().numpy(), 0.99, axis=(1, 2, 3)), 1.0)
        s = torch.from_numpy(s).reshape(-1, 1, 1, 1)
        return torch.clip(D, -s, s) / s
    steps, S_churn, S_min, S_max = 5, 2.0, 0.001, 20.0                              # churn at all but t_0 = 80
    i = torch.arange(steps, dtype=torch.float64)
    t = torch.cat([(80 ** (1 / 7) + i / (steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, torch.zeros(1)])
    x = latents * t[0]
    for k in range(steps):
        gamma = min(S_churn / steps, 2 ** 0.5 - 1) if S_min <= t[k] <= S_max else 0.0
        t_hat = t[k] * (1 + gamma)
        x_hat = x + (t_hat ** 2 - t[k] ** 2).sqrt() * noise(x)
        d1 = (t[k + 1] - t_hat) * (x_hat - clipped(x_hat, t_hat)) / t_hat
        x_next = x + d1
        if k < steps - 1:
            d2 = (t[k + 1] - t_hat) * (x_next - clipped(x_next, t[k + 1])) / t[k + 1]
            x = x_hat + 0.5 * (d1 + d2)
        else:
            x = x_hat + d1
    out = ambient.ambient_sampler(toy, latents, masks, num_steps=steps, S_churn=S_churn, S_min=S_min, S_max=S_max,
                                  randn_like=noise)
    assert (out - x).abs().max() < 1e-6 * x.abs().max()
    static = ambient.ambient_sampler(lambda inputs, sigma, **_: toy(inputs, sigma).clip(-1, 1), latents, masks,
                                     num_steps=steps, S_churn=S_churn, S_min=S_min, S_max=S_max, randn_like=noise)
    assert (static - x).abs().max() > 1e-3                   # s > 1 mattered: image 0's smallest value became < 1


def test_churn_is_official_and_reproducible():
    """S_churn > 0 (an argument of the official ambient_sampler): noise from randn_like at every step; no step in
    [S_min, S_max] gives the deterministic sampler; generate_images draws the churn noise from the per-seed
    generators."""
    generator = torch.Generator().manual_seed(4)
    masks = (torch.rand(1, 2, C, H, W, generator=generator) < 0.5).double()
    latents = torch.randn(2, C, H, W, generator=generator, dtype=torch.float64)
    toy = lambda inputs, sigma, **_: inputs[:, :C] * 0.5  # noqa: E731
    calls = []
    noise = lambda x: calls.append(1) or torch.ones_like(x)  # noqa: E731
    plain = ambient.ambient_sampler(toy, latents, masks, clip=False, num_steps=4)
    outside = ambient.ambient_sampler(toy, latents, masks, clip=False, num_steps=4, S_churn=5, S_min=0, S_max=0,
                                      randn_like=noise)
    churned = ambient.ambient_sampler(toy, latents, masks, clip=False, num_steps=4, S_churn=5, randn_like=noise)
    assert torch.allclose(plain, outside, rtol=0, atol=1e-12) and len(calls) == 8        # drawn at every step
    assert (churned - plain).abs().max() > 1e-3
    net_config = ambient.network_config(ambient.Config(**ambient.PRESETS['tiny']), 32, 3, 0)
    net = ambient.build_network(net_config).eval()
    run = lambda seeds: ambient.generate_images(net, net_config, seeds, torch.device('cpu'), steps=3,  # noqa: E731
                                                S_churn=40, S_min=0.01, S_max=50)
    assert torch.equal(run([3, 4])[1], run([4])[0])


# ----------------------------------------------------------------------------------------------------------------------
# Augmentation and network


def test_augmentation():
    generator = torch.Generator().manual_seed(0)
    flips, G_inv, labels = nets.draw_augmentation(0.2, 20000, 8, 8, generator)
    assert labels.shape == (20000, 9)
    assert abs(flips[:, 0].float().mean() - 0.5) < 0.02                               # xflip=1e8: always a coin
    assert abs(flips[:, 1].float().mean() - 0.1) < 0.01                               # yflip: p, then a coin
    for column in (2, 4, 7):                                                          # scale, rotation, translation
        assert abs((labels[:, column] != 0).float().mean() - 0.2) < 0.015
    images = torch.rand(4, 3, 8, 8)
    identity = torch.eye(3).expand(4, 3, 3)
    none = torch.zeros(4, 2, dtype=torch.long)
    assert torch.equal(nets.augment(images, none, identity, 'joint'), images)
    assert (nets.augment(images, none, identity, 'official') - images).abs().max() < 1e-4
    flipped = torch.tensor([[1, 0]] * 4)
    assert torch.equal(nets.augment(images, flipped, identity, 'joint'), images.flip(3))
    # Joint warps move every pixel with its mask bit: masks stay binary and erased values never surface.
    A = (torch.rand(4, 1, 8, 8) < 0.5).float()
    warped = nets.augment(torch.cat([images * A, A], 1), flips[:4], G_inv[:4], 'joint')
    assert set(warped[:, 3].unique().tolist()) <= {0.0, 1.0}
    assert warped[:, :3][warped[:, 3:].expand(-1, 3, -1, -1) == 0].abs().max() == 0
    # The official order (augment the clean image, then mask) reads the erased pixels (the leak measured in the README).
    rotated = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0, 0, 1]]).expand(4, 3, 3) @ G_inv[:4]
    leak = [A * nets.augment(images * A + (1 - A) * value, none, rotated, 'official') for value in (0.0, 5.0)]
    assert not torch.allclose(leak[0], leak[1])


def test_official_network_size_and_preconditioning():
    cfg = ambient.Config(arch='ddpmpp', augment=0.12)
    net = ambient.build_network(ambient.network_config(cfg, 32, 3, 0))
    assert sum(p.numel() for p in net.parameters()) == 106_752_006                  # official gated 6-channel DDPM++
    # EDM's c_skip x + c_out F(c_in x, c_noise) on all channels.
    seen = {}
    unet = lambda x, c_noise, **_: seen.update(x=x, c_noise=c_noise) or torch.ones_like(x)  # noqa: E731
    precond = ambient.Precond(unet)
    x, sigma = torch.randn(2, 6, 4, 4), torch.tensor([0.1, 10.0])
    D = precond(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    assert torch.allclose(seen['x'], x / (s ** 2 + 0.25).sqrt()) and torch.allclose(seen['c_noise'], sigma.log() / 4)
    assert torch.allclose(D, 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt())


# ----------------------------------------------------------------------------------------------------------------------
# End to end: tiny runs


TINY = ['--preset=tiny', '--batch=8', '--tick=0.016', '--snap=1', '--grid=4', '--steps=3', '--workers=1',
        '--corruption_probability=0.6']


def train(tmp_path, *flags, outdir='runs'):
    ambient.main(['train', f'--data={TINY_DATA}', f'--outdir={tmp_path / outdir}', *TINY, *flags])
    return sorted(glob.glob(str(tmp_path / outdir / '*')))[-1]


def final_state(run_dir):
    return torch.load(sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1], weights_only=False)


def losses(run_dir):
    return [(entry['kimg'], entry['loss']) for entry in map(json.loads, open(os.path.join(run_dir, 'stats.jsonl')))]


def test_train_generate_eval_neighbors(tmp_path, monkeypatch):
    run_dir = train(tmp_path, '--kimg=0.032')
    names = set(os.listdir(run_dir))
    assert {'config.json', 'log.txt', 'stats.jsonl', 'data-preview.png', 'source.py', 'training_options.json',
            'samples-000000.032.png', 'network-snapshot-000000.032.pt', 'training-state-000000.032.pt'} <= names
    assert all(np.isfinite(loss) for _, loss in losses(run_dir))
    network = os.path.join(run_dir, 'network-snapshot-000000.032.pt')
    # Image k depends on seed k only, not on the batch.
    for batch, outdir in ((2, 'a'), (3, 'b')):
        ambient.main(['generate', f'--network={network}', '--seeds=0-4', f'--outdir={tmp_path / outdir}',
                      f'--batch={batch}', '--steps=3'])
    assert ambient.parse_seeds('3,0-2,7') == [3, 0, 1, 2, 7]
    first = [np.asarray(ambient.PIL.Image.open(tmp_path / 'a' / f'{k:06d}.png')) for k in range(5)]
    second = [np.asarray(ambient.PIL.Image.open(tmp_path / 'b' / f'{k:06d}.png')) for k in range(5)]
    assert len(os.listdir(tmp_path / 'a')) == 5 and first[0].shape == (32, 32, 3)
    assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(first, second))
    assert not np.array_equal(first[0], first[1])
    # FID with a random-weights Inception against statistics of a few real images.
    weights = tmp_path / 'inception.pth'
    torch.save(fid.InceptionV3().state_dict(), weights)
    monkeypatch.setenv('FID_WEIGHTS', str(weights))
    real = torch.from_numpy(np.load(TINY_DATA)['x'][:4]).permute(0, 3, 1, 2)
    fid.save_ref(str(tmp_path / 'ref.npz'), fid.compute_stats([real], spatial=False, progress=False))
    ambient.main(['eval', f'--network={network}', f'--ref={tmp_path / "ref.npz"}', '--num=4', '--batch=4',
                  '--steps=3', '--protocol=pytorch-fid'])
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, 'metrics.jsonl'))]
    assert len(metrics) == 1 and np.isfinite(metrics[0]['fid']) and metrics[0]['num'] == 4
    # Nearest training neighbours.
    small = tmp_path / 'small.npz'
    np.savez(small, x=np.load(TINY_DATA)['x'][:6])
    ambient.main(['neighbors', f'--input_dir={tmp_path / "a"}', f'--data={small}', '--max_size=3', '--batch=3',
                  f'--output_dir={tmp_path / "nn"}', '--top=2'])
    summary = json.load(open(tmp_path / 'nn' / 'neighbors.json'))
    assert summary['num_generated'] == 3 and summary['num_train'] == 6 and 0 <= summary['fraction_above'] <= 1
    assert np.load(tmp_path / 'nn' / 'neighbors.npz')['neighbor'].shape == (3, 3)
    assert os.path.exists(tmp_path / 'nn' / 'neighbors.png')


def test_ema_and_lr_schedule(tmp_path):
    """Three steps: the lr ramps up linearly from 0 at the first step (lr * cur_nimg / rampup), and the EMA follows
    ema <- beta ema + (1 - beta) net with beta = 0.5^(batch / half-life) (EDM's training_loop)."""
    run_dir = train(tmp_path, '--kimg=0.024', '--tick=0.008', '--dump=1', '--grid=0', '--ema=0.00002',
                    '--ema_rampup_ratio=0')
    assert [entry['lr'] for entry in map(json.loads, open(os.path.join(run_dir, 'stats.jsonl')))] == \
        [0.0, pytest.approx(2e-3 * 8 / 100), pytest.approx(2e-3 * 16 / 100)]
    first, second = (torch.load(os.path.join(run_dir, f'training-state-{kimg}.pt'), weights_only=False)
                     for kimg in ('000000.016', '000000.024'))
    beta = 0.5 ** (8 / 20)
    for k in second['ema']:
        assert torch.allclose(second['ema'][k], beta * first['ema'][k] + (1 - beta) * second['net'][k], atol=1e-7)


def test_erased_pixels_never_reach_training(tmp_path):
    """Changing the clean pixels under A changes nothing (joint augmentation); the official augmentation order does
    read them."""
    x = np.load(TINY_DATA)['x']
    A = ambient.corruption_masks(np.arange(len(x)), (3, 32, 32), 0.6, 0.1, True)[0].permute(0, 2, 3, 1).numpy()
    other = np.where(A, x, 255 - x).astype(np.uint8)
    np.savez(tmp_path / 'other.npz', x=other)
    for mode, same in (('joint', True), ('official', False)):
        runs = [train(tmp_path, f'--data={data}', '--kimg=0.016', f'--augment_mode={mode}', '--augment=0.5',
                      '--grid=0', outdir=f'{mode}{k}') for k, data in enumerate((TINY_DATA, tmp_path / 'other.npz'))]
        weights = [final_state(run)['net'] for run in runs]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]) == same, mode


def test_resume_is_bitwise(tmp_path):
    straight = train(tmp_path, '--kimg=0.048', '--grid=0', outdir='straight')
    interrupted = train(tmp_path, '--kimg=0.040', '--grid=0', outdir='resumed')
    with open(os.path.join(interrupted, 'stats.jsonl'), 'a') as file:
        file.write('{"kimg": 0.04')                                                # a line cut short by kill -9
    resumed = train(tmp_path, '--kimg=0.048', '--grid=0', '--resume=auto', outdir='resumed')
    assert len(os.listdir(tmp_path / 'resumed')) == 1                               # continued in the same folder
    a, b = final_state(straight), final_state(resumed)
    assert a['cur_nimg'] == b['cur_nimg'] == 48
    for key in ('net', 'ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert losses(straight) == losses(resumed)
    # Resuming a finished run trains no further.
    train(tmp_path, '--kimg=0.048', '--grid=0', '--resume=auto', outdir='resumed')
    assert final_state(resumed)['cur_nimg'] == 48 and losses(resumed) == losses(straight)
    # A different training config does not continue this run: it starts a new folder.
    train(tmp_path, '--kimg=0.016', '--grid=0', '--resume=auto', '--norm=1', outdir='resumed')
    assert len(os.listdir(tmp_path / 'resumed')) == 2


def test_nosubdir_writes_into_outdir_and_resumes_there(tmp_path):
    """Official --nosubdir: the run folder is --outdir itself; --resume=auto continues its latest state."""
    run_dir = tmp_path / 'flat'
    ambient.main(['train', f'--data={TINY_DATA}', f'--outdir={run_dir}', *TINY, '--kimg=0.016', '--grid=0',
                  '--nosubdir'])
    assert {'config.json', 'source.py', 'training-state-000000.016.pt'} <= set(os.listdir(run_dir))
    ambient.main(['train', f'--data={TINY_DATA}', f'--outdir={run_dir}', *TINY, '--kimg=0.024', '--grid=0',
                  '--nosubdir', '--resume=auto'])
    assert final_state(str(run_dir))['cur_nimg'] == 24 and 'run.lock' not in os.listdir(run_dir)
    assert '---- resumed from training-state-000000.016.pt' in open(run_dir / 'log.txt').read()


def test_resume_after_kill_9(tmp_path):
    """kill -9 a run once it has written a training state; --resume=auto then ends exactly like a run that was never
    interrupted (weights bitwise, per-tick losses)."""
    flags = [f'--data={TINY_DATA}', *TINY, '--kimg=0.064', '--grid=0']
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, 'ambient.py'), *flags,
                                f'--outdir={tmp_path / "killed"}'], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS='1'))
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / 'killed' / '*' / 'training-state-*.pt')) and time.time() < deadline:
        time.sleep(0.01)
    process.kill()
    process.wait()
    killed = glob.glob(str(tmp_path / 'killed' / '*'))[0]
    assert final_state(killed)['cur_nimg'] < 64                                    # killed before the end
    train(tmp_path, '--kimg=0.064', '--grid=0', '--resume=auto', outdir='killed')
    straight = train(tmp_path, '--kimg=0.064', '--grid=0', outdir='straight')
    a, b = final_state(straight), final_state(killed)
    assert a['cur_nimg'] == b['cur_nimg'] == 64
    for key in ('net', 'ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert losses(straight) == losses(killed)


def test_ddp_matches_one_process(tmp_path):
    flags = [f'--data={TINY_DATA}', *TINY, '--kimg=0.024', '--grid=0', '--batch_gpu=4', '--dropout=0']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             os.path.join(ROOT, 'ambient.py'), *flags, f'--outdir={tmp_path / "ddp"}'],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    single = train(tmp_path, '--kimg=0.024', '--grid=0', '--batch_gpu=4', '--dropout=0', outdir='single')
    a, b = final_state(glob.glob(str(tmp_path / 'ddp' / '*'))[0]), final_state(single)
    for k in a['net']:
        assert torch.allclose(a['net'][k], b['net'][k], rtol=1e-4, atol=1e-6), k
    assert np.allclose([l for _, l in losses(glob.glob(str(tmp_path / 'ddp' / '*'))[0])],
                       [l for _, l in losses(single)], rtol=1e-4)


@pytest.mark.parametrize('flags, code, message', [
    (['--corruption_probability=1'], 2, '--corruption_probability must be in [0, 1)'),
    (['--delta_probability=-0.1'], 2, '--delta_probability must be in [0, 1)'),
    (['--norm=3'], 2, '--norm must be 1 or 2'),
    (['--batch=10', '--batch_gpu=4'], 2, 'must be divisible'),
    (['--bogus=1'], 2, 'unrecognized arguments'),
    (['--data=does/not/exist'], 2, 'does not exist'),
])
def test_bad_flags(tmp_path, capsys, flags, code, message):
    with pytest.raises(SystemExit) as exit_info:
        ambient.main(['train', f'--data={TINY_DATA}', f'--outdir={tmp_path / "runs"}', '--preset=tiny', *flags])
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('ambient.py: error:') and message in err[0]
    assert not os.path.exists(tmp_path / 'runs')


def test_bad_data(tmp_path, capsys):
    folder = tmp_path / 'images'
    folder.mkdir()
    x = np.load(TINY_DATA)['x']
    for k in range(3):
        ambient.PIL.Image.fromarray(x[k]).save(folder / f'{k}.png')
    (folder / 'broken.png').write_bytes(b'not a png')
    npz = tmp_path / 'labels.npz'
    np.savez(npz, x=x[:4], y=np.array([0, 1, -3, 2]))
    ambient.PIL.Image.fromarray(x[0][:16]).save(tmp_path / 'mixed.png')
    (tmp_path / 'garbage.npz').write_bytes(b'not an npz')
    (tmp_path / 'garbage.pt').write_bytes(b'not a state')
    cases = [([f'--data={folder}'], 2, 'broken.png'), ([f'--data={npz}', '--cond'], 2, 'labels'),
             ([f'--data={tmp_path / "garbage.npz"}'], 2, 'cannot read'),
             ([f'--data={TINY_DATA}', f'--resume={tmp_path / "garbage.pt"}'], 2, '--resume: cannot read')]
    for flags, code, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            ambient.main(['train', f'--outdir={tmp_path / "runs"}', '--preset=tiny', *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == code and len(err) == 1 and message in err[0], err
    (folder / 'broken.png').unlink()
    os.replace(tmp_path / 'mixed.png', folder / 'mixed.png')
    with pytest.raises(SystemExit):
        ambient.main(['train', f'--outdir={tmp_path / "runs"}', '--preset=tiny', f'--data={folder}'])
    assert 'resize' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'runs')


def test_bad_sampling_input(tmp_path, capsys):
    """generate / eval reject a broken network, unknown metrics and a broken reference in one line, before sampling
    and before writing anything."""
    net_config = ambient.network_config(ambient.Config(**ambient.PRESETS['tiny']), 32, 3, 0)
    network = tmp_path / 'network.pt'
    torch.save(dict(config=net_config, ema=ambient.build_network(net_config).state_dict()), network)
    (tmp_path / 'garbage.npz').write_bytes(b'not statistics')
    (tmp_path / 'garbage.pt').write_bytes(b'not a network')
    cases = [(['generate', f'--network={tmp_path / "garbage.pt"}', f'--outdir={tmp_path / "out"}'], 2, '--network'),
             (['eval', f'--network={network}', f'--ref={tmp_path / "garbage.npz"}', '--metrics=fid,bogus'], 2,
              '--metrics'),
             (['eval', f'--network={network}', f'--ref={tmp_path / "garbage.npz"}', '--num=4'], 2, 'garbage.npz')]
    for argv, code, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            ambient.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == code and len(err) == 1 and message in err[0], err
    assert sorted(os.listdir(tmp_path)) == ['garbage.npz', 'garbage.pt', 'network.pt']


def test_cifar10_word_reads_the_md5_checked_archive_through_fid(tmp_path, monkeypatch, capsys):
    """--data=cifar10 goes through fid.read_image_set (download, md5 at every use, no pickle.load: tested in
    test_untrusted.py): an archive in the official layout in --cache_dir is read as (N, H, W, 3) with labels; a
    changed archive is one line, exit 2; --dry_run reads nothing."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode='w:gz') as tar:
        for k in range(1, 6):
            blob = pickle.dumps({b'data': np.full((2, 3072), k, np.uint8), b'labels': [k, k + 1]}, protocol=4)
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{k}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    (tmp_path / 'cache').mkdir()
    (tmp_path / 'cache' / 'cifar-10-python.tar.gz').write_bytes(archive.getvalue())
    monkeypatch.setattr(fid, 'CIFAR10_MD5', hashlib.md5(archive.getvalue()).hexdigest())
    x, y = ambient.load_images('cifar10', str(tmp_path / 'cache'))
    assert x.shape == (10, 3, 32, 32) and x[2, 0, 0, 0] == 2 and y.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    with open(tmp_path / 'cache' / 'cifar-10-python.tar.gz', 'ab') as file:
        file.write(b'x')
    code, err = run_main(['train', '--data=cifar10', f'--cache_dir={tmp_path / "cache"}', '--preset=tiny',
                          f'--outdir={tmp_path / "runs"}'], capsys)
    assert code == 2 and len(err) == 1 and 'md5' in err[0] and not os.path.exists(tmp_path / 'runs'), err
    ambient.main(['--preset=cifar10', '--data=cifar10', f'--cache_dir={tmp_path / "none"}', '--dry_run'])
    out = capsys.readouterr().out
    assert 'channel_mult [2, 2, 2]' in out and '106,753,414 parameters' in out  # + a 10-class embedding
    assert not os.path.exists(tmp_path / 'none')


# ----------------------------------------------------------------------------------------------------------------------
# Drop-in for giannisdaras/ambient-diffusion: command lines, defaults, patterns, checkpoints, failure paths

# Every flag of the official train.py, eval.py and find_dataset_neighbors.py with a value the official code accepts.
OFFICIAL_TRAIN = ['--outdir=o', '--data=d', '--cond=False', '--arch=ddpmpp', '--precond=ambient', '--duration=200',
                  '--batch=512', '--batch-gpu=64', '--cbase=128', '--cres=1,2,2,2', '--lr=10e-4', '--ema=0.5',
                  '--dropout=0.13', '--augment=0.12', '--max_grad_norm=1.0', '--weight_decay=0.', '--S_churn=10',
                  '--S_min=0.01', '--S_max=1', '--S_noise=1.007', '--corruption_probability=0.4',
                  '--delta_probability=0.1', '--mask_full_rgb=False', '--norm=2', '--gated=True',
                  '--corruption_pattern=dust', '--max_size=100', '--xflip=False', '--fp16=False', '--ls=1',
                  '--bench=True', '--cache=True', '--workers=1', '--desc=x', '--nosubdir', '--tick=50', '--snap=50',
                  '--dump=500', '--seed=3', '--transfer=t.pkl', '--wandb_id=', '-n', '--dry-run',
                  '--experiment_name=e']
OFFICIAL_EVAL = ['--with_wandb=False', '--network=n', '--training_options_loc=t', '--outdir=o', '--seeds=0-63',
                 '--subdirs', '--class=1', '--batch=64', '--corruption_probability=0.4', '--delta_probability=0.1',
                 '--num_masks=1', '--guidance_scale=0.0', '--mask_full_rgb=False', '--experiment_name=e',
                 '--wandb_id=', '--ref=r', '--num=50000', '--seed=0', '--eval_step=1', '--skip_generation=False',
                 '--skip_calculation=False', '--num_classes=0', '--steps=18', '--sigma_min=0.002', '--sigma_max=80',
                 '--rho=7', '--S_churn=0', '--S_min=0', '--S_max=inf', '--S_noise=1']
OFFICIAL_NEIGHBORS = ['--input_dir=i', '--output_dir=o', '--features_path=f.npy', '--data=d', '--max_size=10000',
                      '--cache=True', '--workers=1', '--batch=4', '--batch-gpu=4', '--seed=42', '--normalize=True']
REFUSED = [(['train', '--arch=ncsnpp'], '--arch=ncsnpp'), (['train', '--arch=adm'], '--arch=adm'),
           (['train', '--precond=vp'], '--precond=vp'), (['train', '--precond=ve'], '--precond=ve'),
           (['train', '--fp16=True'], '--fp16=True'), (['train', '--cache=False'], '--cache=False'),
           (['train', '--wandb_id=abc'], '--wandb_id'), (['train', '--corruption_pattern=downscale'], 'downscale'),
           (['eval', '--with_wandb=True'], '--with_wandb=True'), (['eval', '--wandb_id=abc'], '--wandb_id'),
           (['eval', '--solver=euler'], '--solver'), (['eval', '--disc=vp'], '--disc'),
           (['eval', '--schedule=vp'], '--schedule'), (['eval', '--scaling=none'], '--scaling'),
           (['neighbors', '--cache=False'], '--cache=False')]


def run_main(argv, capsys):
    """ambient.main -> (exit code, stderr lines)."""
    code = 0
    try:
        ambient.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err.strip().splitlines()


def sampling_parser(command):
    """The argparse parser of generate, eval or neighbors, as main builds it."""
    config = dict(generate=ambient.GenerateConfig, eval=ambient.EvalConfig, neighbors=ambient.NeighborsConfig)
    return ambient.make_parser(command, config[command], ambient.OFFICIAL_FLAGS[command])


def test_every_official_flag_is_honoured_or_refused_in_one_line(tmp_path, capsys):
    cfg = ambient.parse_train_args(OFFICIAL_TRAIN)
    assert (cfg.kimg, cfg.batch_gpu, cfg.cres, cfg.seed, cfg.transfer, cfg.precision, cfg.nosubdir, cfg.dry_run) == \
        (200000, 64, '1,2,2,2', 3, 't.pkl', 'fp32', True, True)
    assert ambient.parse_train_args(['--data=d', '--duration=0.0005']).kimg == 1         # official max(int(), 1)
    assert ambient.parse_train_args(['--data=d', '--duration=1', '--kimg=8']).kimg == 8   # the later one wins
    args = sampling_parser('eval').parse_args(OFFICIAL_EVAL)
    assert (args.network, args.class_idx, args.batch, args.S_max, args.subdirs) == ('n', 1, 64, float('inf'), True)
    args = sampling_parser('neighbors').parse_args(OFFICIAL_NEIGHBORS)
    assert (args.images, args.outdir, args.max_size, args.batch_gpu, args.normalize) == ('i', 'o', 10000, 4, True)
    # No prefix matching: an abbreviation is an unknown flag, not another flag (--cache is not --cache_dir).
    for argv in (['train', '--data=d', '--cache_d=x'], ['train', '--data=d', '--corruption_prob=0.5'],
                 ['eval', '--network=n', '--ref=r', '--nu=3']):
        code, err = run_main(argv, capsys)
        assert code == 2 and len(err) == 1 and 'unrecognized arguments' in err[0], err
    # Refused official flags and values: one line naming the flag and our equivalent, before anything is written.
    for argv, name in REFUSED:
        extra = {'train': [f'--data={TINY_DATA}', f'--outdir={tmp_path / "o"}'],
                 'eval': ['--network=n', '--ref=r'], 'neighbors': ['--data=d', f'--output_dir={tmp_path / "o"}',
                                                                   '--input_dir=i']}[argv[0]]
        code, err = run_main(argv + extra, capsys)
        assert code == 2 and len(err) == 1 and name in err[0] and '(official flag)' in err[0] and \
            'is not supported' in err[0] and '; use ' in err[0], err
    assert not os.path.exists(tmp_path / 'o')


def test_help_follows_the_common_layout(capsys):
    ambient.main(['--help'])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == 'usage: ambient.py [COMMAND] [--flag=value ...]' and 'arXiv:2305.19256' in out[1]
    assert out[2] == 'commands:' and [line.split()[0] for line in out[3:7]] == ['train', 'generate', 'eval',
                                                                                  'neighbors']
    assert out[-1] == "Run 'python ambient.py COMMAND --help' for the flags of a command."
    order = ['data and corruption', 'network', 'optimisation', 'run', 'sampling', 'evaluation']
    for command, parser in (('train', None), ('generate', sampling_parser('generate')),
                            ('eval', sampling_parser('eval')), ('neighbors', sampling_parser('neighbors'))):
        with pytest.raises(SystemExit) as exit_info:
            ambient.main([command, '--help'])
        text = capsys.readouterr().out
        assert exit_info.value.code == 0 and 'dataclass' not in text and 'Config(' not in text
        titles = [line[:-1] for line in text.splitlines() if line.endswith(':') and not line.startswith(' ')]
        assert titles == [t for t in order if t in titles] and len(titles) >= 2, (command, titles)
        if parser is not None:
            for action in [a for a in parser._actions if a.dest != 'help']:
                assert action.help.endswith(')') and ('(default: ' in action.help or '(required)' in action.help), \
                    action.option_strings
    help_text = ' '.join(subprocess_free_help('train').split())
    assert '--batch_gpu INT, --batch-gpu INT' in help_text and 'official: --batch-gpu' in help_text
    assert '(default: 0.4)' in help_text and '(default: official)' in help_text          # official defaults shown


def subprocess_free_help(command):
    """The --help text of a command, captured in-process."""
    buffer = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stdout(buffer):
        ambient.main([command, '--help'])
    return buffer.getvalue()


def official_box_draws(index, pattern, p, delta, size):
    """The official dataset.py box draws for one image, written out from its torch_utils helpers: torch seeded with
    the raw index, corner row then column, A first; boxes of ceil(p H) (box), int(p H) (fixed_box), or a kept square
    of int((1 - p) H) with a sub-square of int((1 - delta) side) (keep_patch)."""
    torch.manual_seed(index)
    grid = torch.arange(size)

    def box(side, high):
        top, left = torch.randint(0, high, (1, 1, 1)).item(), torch.randint(0, high, (1, 1, 1)).item()
        return ((grid[:, None] >= top) & (grid[:, None] < top + side) & (grid[None] >= left) &
                (grid[None] < left + side))
    if pattern == 'box':
        side = int(torch.ceil(torch.tensor(p * size)))
        A = ~box(side, size)
        return A, A & ~box(side, size)
    if pattern == 'fixed_box':
        side = int(p * size)
        A = ~box(side, size - side)
        return A, (A & ~box(side, size - side)) if delta > 0 else A
    side = int((1 - p) * size)
    A = box(side, size - side)
    inner = int((1 - delta) * side)
    A_tilde = torch.zeros_like(A)
    A_tilde[A] = box(inner, side - inner)[:side, :side].flatten()
    return A, A_tilde


def test_box_patterns_are_the_official_per_image_draws():
    for pattern, p, delta in (('box', 0.3, 0.1), ('fixed_box', 0.5, 0.2), ('fixed_box', 0.5, 0.0),
                              ('keep_patch', 0.4, 0.3)):
        A, A_tilde = ambient.corruption_masks(np.arange(12), (3, 16, 16), p, delta, False, pattern=pattern)
        assert A.shape == (12, 1, 16, 16) and not (A_tilde & ~A).any()
        for index in (0, 5, 11):
            expected_A, expected_A_tilde = official_box_draws(index, pattern, p, delta, 16)
            assert torch.equal(A[index, 0], expected_A) and torch.equal(A_tilde[index, 0], expected_A_tilde), pattern
    # Sampling masks follow the pattern, one draw per seed; keep_patch with no room for a smaller square is refused.
    net_config = dict(precond='ambient', channels=3, unet=dict(img_resolution=16), corruption_probability=0.4,
                      delta_probability=0.3, corruption_pattern='keep_patch')
    masks = ambient.sampling_masks(net_config, [0, 1], None, 2, torch.device('cpu'))
    assert masks.shape == (2, 2, 3, 16, 16) and masks[0, 0, 0].sum() == int(0.7 * int(0.6 * 16)) ** 2
    assert torch.equal(masks, ambient.sampling_masks(net_config, [0, 1], None, 2, torch.device('cpu')))
    with pytest.raises(ambient.UserError, match='keep_patch'):
        ambient.sampling_masks({**net_config, 'delta_probability': 0.0}, [0], None, 1, torch.device('cpu'))


def test_xflip_doubles_the_dataset_with_the_official_masks():
    """Items N..2N-1 are the x-flipped images. Official: their masks are the un-flipped ones of the raw image, so
    other pixels show; --augment_mode=joint flips the masks with the image."""
    for mode in ('official', 'joint'):
        cfg = ambient.Config(data=TINY_DATA, xflip=True, augment=0, augment_mode=mode, corruption_probability=0.5)
        data = ambient.Data(cfg, torch.device('cpu'))
        assert data.num_images == 400 and sorted(data.indices(torch.arange(400)).tolist()) == list(range(400))
        y, A, A_tilde, _ = data.batch(torch.tensor([7, 207]), 'cpu')
        clean = torch.from_numpy(np.load(TINY_DATA)['x'][7]).permute(2, 0, 1).float() / 127.5 - 1
        if mode == 'official':
            assert torch.equal(y[1], clean.flip(2)) and torch.equal(A[1], A[0]) and torch.equal(y[0], clean)
            assert ((A[1] * y[1] - A[1] * clean.flip(2)).abs().max() == 0)         # unmasked clean pixels show
        else:
            assert torch.equal(A[1], A[0].flip(2)) and torch.equal(A_tilde[1], A_tilde[0].flip(2))
            assert torch.equal(y[1], y[0].flip(2)) and ((y[0] + 1) * (1 - A[0])).abs().max() == 0


def test_defaults_are_the_official_ones():
    cfg = ambient.parse_train_args(['--data=d'])
    checked = ambient.check_config(cfg)
    assert checked == cfg and checked is not cfg                                    # a new config, same values
    for field in ('cache', 'S_churn', 'S_min', 'S_max', 'S_noise'):                 # official flags only
        assert not hasattr(cfg, field) and f'--{field}' in ambient.OFFICIAL_FLAGS['train']
    official = dict(corruption_probability=0.4, delta_probability=0.1, mask_full_rgb=False, norm=2, gated=True,
                    corruption_pattern='dust', xflip=False, augment=0.12, dropout=0.13, lr=1e-3, batch=512,
                    ema=0.5, kimg=200000, tick=50, snap=50, dump=500, arch='ddpmpp', precond='ambient', cond=False,
                    weight_decay=0.0, max_grad_norm=0.0, ls=1.0, bench=True, workers=1,
                    augment_mode='official', nosubdir=False)
    assert {k: getattr(cfg, k) for k in official} == official


def write_zip_dataset(path, count=16):
    """An EDM-style dataset zip (PNG files, no labels) of the first images of the tiny CIFAR-10 file."""
    with zipfile.ZipFile(path, 'w') as archive:
        for k, image in enumerate(np.load(TINY_DATA)['x'][:count]):
            buffer = io.BytesIO()
            ambient.PIL.Image.fromarray(image).save(buffer, format='png')
            archive.writestr(f'{k:05d}/img{k:08d}.png', buffer.getvalue())
    return path


def test_official_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The two README commands of ambient-diffusion with their placeholders filled in, as written, plus flags that
    only shrink sizes; --dry-run prints the README's recipe in the official training_options layout."""
    data = write_zip_dataset(tmp_path / 'celeba.zip')
    readme_train = ['train', f'--outdir={tmp_path / "runs"}', '--experiment_name=celeba-p09', '--dump=200',
                    '--cond=0', '--arch=ddpmpp', '--precond=ambient', '--cres=1,2,2,2', '--lr=2e-4', '--dropout=0.1',
                    '--augment=0.15', f'--data={data}', '--norm=2', '--max_grad_norm=1.0', '--mask_full_rgb=True',
                    '--corruption_probability=0.9', '--delta_probability=0.1', '--batch=256', '--max_size=30000']
    ambient.main(readme_train + ['--dry-run'])
    printed = capsys.readouterr().out
    options = json.loads(printed[printed.index('{', printed.index('Official training options')):])
    assert options['network_kwargs']['channel_mult'] == [1, 2, 2, 2] and options['network_kwargs']['gated']
    assert options['network_kwargs']['dropout'] == 0.1 and options['optimizer_kwargs']['lr'] == 2e-4
    assert options['augment_kwargs']['p'] == 0.15 and options['batch_size'] == 256 and options['max_grad_norm'] == 1
    assert options['dataset_kwargs']['mask_full_rgb'] and options['dataset_kwargs']['corruption_probability'] == 0.9
    assert options['total_kimg'] == 200000 and options['state_dump_ticks'] == 200
    assert not os.path.exists(tmp_path / 'runs')
    # Train: sizes shrunk (width, batch, length, no progress grid).
    ambient.main(readme_train + ['--cbase=8', '--batch=8', '--kimg=0.008', '--grid=0', '--tick=0.008'])
    run_dir = glob.glob(str(tmp_path / 'runs' / '*'))[0]
    saved = json.load(open(os.path.join(run_dir, 'config.json')))['config']
    assert saved['augment_mode'] == 'official' and saved['experiment_name'] == 'celeba-p09'
    assert os.path.exists(os.path.join(run_dir, 'training_options.json'))
    # Eval: the README command on the run folder; random-weight Inception, EDM-protocol statistics of 4 images.
    weights = tmp_path / 'inception.pth'
    torch.save(fid.InceptionV3().state_dict(), weights)
    monkeypatch.setenv('FID_WEIGHTS', str(weights))
    real = torch.from_numpy(np.load(TINY_DATA)['x'][:4]).permute(0, 3, 1, 2)
    fid.save_ref(str(tmp_path / 'ref.npz'), fid.compute_stats([real], preprocess='tf', spatial=False, progress=False))
    readme_eval = ['eval', f'--network={run_dir}', f'--ref={tmp_path / "ref.npz"}', f'--outdir={tmp_path / "out"}',
                   '--experiment_name=celeba-p09', '--seeds=0-49999', '--batch=16', '--corruption_probability=0.9',
                   '--delta_probability=0.1', '--mask_full_rgb=True', '--num_masks=1', '--guidance_scale=0.0',
                   f'--training_options_loc={run_dir}/training_options.json', '--num=50000', '--with_wandb=False']
    ambient.main(readme_eval + ['--num=4', '--steps=2'])
    assert sorted(os.listdir(tmp_path / 'out' / '0')) == [f'{k:06d}.png' for k in range(4)]
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, 'metrics.jsonl'))]
    assert np.isfinite(metrics[0]['fid']) and metrics[0]['protocol'] == 'edm' and metrics[0]['num'] == 4
    # --skip_generation: the official calc() on those PNGs gives the same FID.
    ambient.main(['eval', f'--network={tmp_path / "out" / "0"}', f'--ref={tmp_path / "ref.npz"}', '--num=4',
                  '--skip_generation=True'])
    again = json.loads(open(tmp_path / 'out' / '0' / 'metrics.jsonl').read())
    assert again['fid'] == pytest.approx(metrics[0]['fid'], rel=1e-6)


def tiny_ambient_net(p=0.7, seed=0):
    """(net, net_config, cfg) of the tiny preset's gated 6-channel DDPM++ with random (non-zero) weights."""
    cfg = ambient.Config(**{**ambient.PRESETS['tiny'], 'data': 'x', 'corruption_probability': p})
    net_config = ambient.network_config(cfg, 32, 3, 0)
    torch.manual_seed(seed)
    net = ambient.build_network(net_config).eval()
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0, 0.05)
    return net, net_config, cfg


def test_official_pickle_loads_samples_and_transfers(tmp_path, capsys):
    """A network-snapshot-*.pkl in ambient-diffusion's layout (ema as a compiled state dict, training_options.json
    beside it) gives the same D(x; sigma) as the same weights in our snapshot, takes its corruption settings from the
    options file, samples from a path or a URL, and starts a training run with --transfer."""
    import edm_layouts
    net, net_config, cfg = tiny_ambient_net()
    folder = tmp_path / 'released'
    folder.mkdir()
    pkl = str(folder / 'network-snapshot-000200.pkl')
    loss = ('AmbientLoss', dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5, norm=2))
    edm_layouts.write_edm_pickle(pkl, net.unet, edm_layouts.edm_precond_kwargs(net.unet, gated=True),
                                 ema_as_state_dict=True, loss=loss,
                                 with_training_options=ambient.nets.ambient_training_options(cfg, net_config, 200))
    loaded, config = ambient.load_network(pkl, 'cpu')
    assert ambient.snapshots_to_evaluate(str(folder), 1) == [pkl]                    # eval --network=FOLDER
    x, sigma = torch.randn(2, 6, 32, 32), torch.tensor([0.3, 5.0])
    assert torch.equal(loaded(x, sigma), net(x, sigma))
    assert (config['precond'], config['corruption_probability'], config['mask_full_rgb']) == ('ambient', 0.7, True)
    ours = tmp_path / 'ours.pt'
    torch.save(dict(config=net_config, ema=net.state_dict()), ours)
    for source, outdir in ((pkl, 'from_pkl'), (str(ours), 'from_pt')):
        ambient.main(['generate', f'--network={source}', '--seeds=0-1', '--steps=2', f'--outdir={tmp_path / outdir}'])
    for k in range(2):
        name = f'{k:06d}.png'
        assert np.array_equal(np.asarray(ambient.PIL.Image.open(tmp_path / 'from_pkl' / name)),
                              np.asarray(ambient.PIL.Image.open(tmp_path / 'from_pt' / name)))
    with edm_layouts.serve_folder(folder) as base_url:
        ambient.main(['generate', f'--network={base_url}/network-snapshot-000200.pkl', '--seeds=0-1', '--steps=2',
                      f'--outdir={tmp_path / "from_url"}', f'--cache_dir={tmp_path / "cache"}'])
    assert np.array_equal(np.asarray(ambient.PIL.Image.open(tmp_path / 'from_url' / '000001.png')),
                          np.asarray(ambient.PIL.Image.open(tmp_path / 'from_pkl' / '000001.png')))
    # nets.load_ambient_pickle: --training_options_loc (a dict) overrides the file beside the pickle.
    _, options_config = ambient.nets.load_ambient_pickle(pkl, training_options=dict(
        dataset_kwargs=dict(corruption_probability=0.3, corruption_pattern='box'),
        loss_kwargs=dict(class_name='training.loss.AmbientLoss')))
    assert (options_config['corruption_probability'], options_config['corruption_pattern'],
            options_config['delta_probability']) == (0.3, 'box', 0.1)              # eval.py's default delta
    # --transfer: the pickle's weights, a fresh optimizer.
    fresh = ambient.build_network(net_config)
    ambient.transfer_weights(fresh, pkl)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    # Not a snapshot: one line, exit 2.
    (tmp_path / 'empty.pkl').write_bytes(b'')
    (tmp_path / 'junk.pkl').write_bytes(pickle.dumps({'ema': print}))
    for bad, message in (('empty.pkl', 'empty'), ('junk.pkl', 'cannot load')):
        code, err = run_main(['generate', f'--network={tmp_path / bad}', f'--outdir={tmp_path / "x"}'], capsys)
        assert code == 2 and len(err) == 1 and message in err[0], err


def test_dinov2_neighbors_and_cached_features(tmp_path, capsys):
    """--features=dinov2 with a small random DINOv2 in the official state-dict layout; --features_path saves the
    training features and is read back on the next run (the official cache)."""
    torch.manual_seed(0)
    dinov2 = tmp_path / 'dinov2.pth'
    torch.save(ambient.nets.DINOv2(embed_dim=128, depth=1, num_heads=2, img_size=56).state_dict(), dinov2)
    images = tmp_path / 'generated.npz'
    x = np.load(TINY_DATA)['x']
    np.savez(images, x=x[:3])
    data = tmp_path / 'train.npz'
    np.savez(data, x=x[:6])
    features_path = tmp_path / 'features.npy'
    argv = ['neighbors', f'--input_dir={images}', f'--data={data}', f'--features_path={features_path}',
            '--features=dinov2', f'--dinov2={dinov2}', '--top=1']
    ambient.main(argv + [f'--output_dir={tmp_path / "a"}'])
    summary = json.load(open(tmp_path / 'a' / 'neighbors.json'))
    assert summary['features'] == 'dinov2' and summary['max_top1'] == pytest.approx(1.0, abs=1e-5)  # copies
    assert np.load(tmp_path / 'a' / 'neighbors.npz')['neighbor'][:, 0].tolist() == [0, 1, 2]
    assert pickle.load(open(tmp_path / 'a' / 'max_products.pkl', 'rb')) == pytest.approx([1, 1, 1], abs=1e-5)
    assert os.path.exists(tmp_path / 'a' / '2_nearest_neighbors_0_dataset_index_2.png')
    assert np.load(features_path).shape == (6, 128)
    np.save(features_path, -np.load(features_path))            # the cache is read, not recomputed
    ambient.main(argv + [f'--output_dir={tmp_path / "b"}'])
    assert json.load(open(tmp_path / 'b' / 'neighbors.json'))['max_top1'] < 0.5
    capsys.readouterr()


def test_failure_paths_give_one_line(tmp_path, capsys, monkeypatch):
    """Out-of-range labels, a CHW array, reversed seeds, an unwritable --outdir, empty or wrong resume files: exit 2,
    one line, nothing written. A full disk during training: exit 1, one line naming the file, no temp file left; the
    next --resume=auto reuses the folder. Grayscale (N, H, W) arrays are read."""
    x = np.load(TINY_DATA)['x'][:16]
    np.savez(tmp_path / 'huge_label.npz', x=x, y=np.r_[np.zeros(15, int), 10 ** 6])
    np.savez(tmp_path / 'chw.npz', x=x.transpose(0, 3, 1, 2))
    np.savez(tmp_path / 'gray.npz', x=x[..., 0])
    (tmp_path / 'empty.pt').write_bytes(b'')
    torch.save(dict(config={}, ema={}), tmp_path / 'snapshot.pt')
    outdir = f'--outdir={tmp_path / "runs"}'
    cases = [(['train', f'--data={tmp_path / "huge_label.npz"}', '--cond', outdir], 'largest label, 1000000'),
             (['train', f'--data={tmp_path / "chw.npz"}', outdir], 'channels first'),
             (['train', f'--data={TINY_DATA}', f'--resume={tmp_path / "empty.pt"}', outdir], 'empty (0 bytes)'),
             (['train', f'--data={TINY_DATA}', f'--resume={tmp_path / "snapshot.pt"}', outdir, '--preset=tiny'],
              'not a training state'),
             (['generate', '--network=n.pt', '--seeds=5-1', outdir], '--seeds: the range 5-1 is empty')]
    for argv, message in cases:
        code, err = run_main(argv, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith('ambient.py: error: ') and message in err[0], err
    assert ambient.load_images(str(tmp_path / 'gray.npz'))[0].shape == (16, 3, 32, 32)
    # An unwritable --outdir is found before the data is read.
    monkeypatch.setattr(ambient.os, 'access', lambda *args, **kwargs: False)
    code, err = run_main(['train', f'--data={TINY_DATA}', outdir, *TINY, '--kimg=0.008'], capsys)
    assert code == 2 and len(err) == 1 and 'not writable' in err[0], err
    monkeypatch.undo()
    assert not os.path.exists(tmp_path / 'runs')
    # A full disk while the first training state is written.
    real_save = torch.save

    def full_disk(obj, file):
        file.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(ambient.torch, 'save', full_disk)
    code, err = run_main(['train', f'--data={TINY_DATA}', outdir, *TINY, '--kimg=0.008', '--grid=0'], capsys)
    monkeypatch.setattr(ambient.torch, 'save', real_save)
    assert code == 1 and len(err) == 1 and 'network-snapshot' in err[0] and 'No space left' in err[0], err
    run_dir = glob.glob(str(tmp_path / 'runs' / '*'))[0]
    assert not [name for name in os.listdir(run_dir) if '.tmp' in name]
    (tmp_path / 'runs' / os.path.basename(run_dir) / '.stats.jsonl.123.ab12.tmp').write_bytes(b'killed')
    ambient.main(['train', f'--data={TINY_DATA}', outdir, *TINY, '--kimg=0.008', '--grid=0', '--resume=auto'])
    assert os.listdir(tmp_path / 'runs') == [os.path.basename(run_dir)]                  # the folder was reused
    assert glob.glob(os.path.join(run_dir, 'training-state-*.pt'))
    assert not [n for n in os.listdir(run_dir) if '.tmp' in n]
