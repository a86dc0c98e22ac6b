"""Tests of ambient.py: the corruption, the loss's minimiser and the sampler on Gaussian data with closed-form answers,
augmentation, and a tiny end-to-end run with resume, DDP parity and bad input. CPU only."""
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

import numpy as np
import pytest
import torch

import ambient
import fid

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

    def net(x, sigma, class_labels=None, augment_labels=None, force_fp32=False):  # EDMPrecond's signature
        seen.update(x=x, sigma=sigma, class_labels=class_labels, augment_labels=augment_labels, force_fp32=force_fp32)
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
    """The paper's main theorem: E[x0 | A_tilde x_t, A_tilde] minimises the ambient loss on every pixel, those that A_tilde hides
    included: moving it along any direction raises the Monte-Carlo loss and the slope vanishes within 4 standard
    errors. The clean denoiser applied to the masked input (ignoring the mask) does much worse."""
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


# ----------------------------------------------------------------------------------------------------------------------
# Augmentation and network


def test_augmentation():
    generator = torch.Generator().manual_seed(0)
    flips, G_inv, labels = ambient.draw_augmentation(0.2, 20000, 8, 8, generator)
    assert labels.shape == (20000, 9)
    assert abs(flips[:, 0].float().mean() - 0.5) < 0.02                               # xflip=1e8: always a coin
    assert abs(flips[:, 1].float().mean() - 0.1) < 0.01                               # yflip: p, then a coin
    for column in (2, 4, 7):                                                          # scale, rotation, translation
        assert abs((labels[:, column] != 0).float().mean() - 0.2) < 0.015
    images = torch.rand(4, 3, 8, 8)
    identity = torch.eye(3).expand(4, 3, 3)
    none = torch.zeros(4, 2, dtype=torch.long)
    assert torch.equal(ambient.augment(images, none, identity, 'joint'), images)
    assert (ambient.augment(images, none, identity, 'official') - images).abs().max() < 1e-4
    flipped = torch.tensor([[1, 0]] * 4)
    assert torch.equal(ambient.augment(images, flipped, identity, 'joint'), images.flip(3))
    # Joint warps move every pixel with its mask bit: masks stay binary and erased values never surface.
    A = (torch.rand(4, 1, 8, 8) < 0.5).float()
    warped = ambient.augment(torch.cat([images * A, A], 1), flips[:4], G_inv[:4], 'joint')
    assert set(warped[:, 3].unique().tolist()) <= {0.0, 1.0}
    assert warped[:, :3][warped[:, 3:].expand(-1, 3, -1, -1) == 0].abs().max() == 0
    # The official order (augment the clean image, then mask) reads the erased pixels (spec quirk A10.1).
    rotated = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0, 0, 1]]).expand(4, 3, 3) @ G_inv[:4]
    leak = [A * ambient.augment(images * A + (1 - A) * value, none, rotated, 'official') for value in (0.0, 5.0)]
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
    assert {'config.json', 'log.txt', 'stats.jsonl', 'data-corrupted.png', 'samples-000000.032.png',
            'network-snapshot-000000.032.pt', 'training-state-000000.032.pt'} <= names
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
    assert 'different sizes' in capsys.readouterr().err
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


def test_cifar10_download_is_checked_extracted_and_cached(tmp_path, monkeypatch):
    """--data=cifar10 offline: a fake archive in the official layout goes through the md5 check (a bad one is not
    cached), the extraction and the cache (the second load does not download)."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode='w:gz') as tar:
        for k in range(1, 6):
            blob = pickle.dumps({b'data': np.full((2, 3072), k, np.uint8), b'labels': [k, k + 1]})
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{k}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    calls = []
    response = type('Response', (), dict(content=archive.getvalue(), raise_for_status=lambda self: None))()
    monkeypatch.setattr(ambient.requests, 'get', lambda *args, **kwargs: calls.append(args) or response)
    with pytest.raises(ambient.DataError, match='md5'):
        ambient.load_images('cifar10', str(tmp_path / 'cache'))
    assert not os.path.exists(tmp_path / 'cache' / 'cifar-10-python.tar.gz')
    monkeypatch.setattr(ambient, 'CIFAR10_MD5', hashlib.md5(response.content).hexdigest())
    for _ in range(2):
        x, y = ambient.load_images('cifar10', str(tmp_path / 'cache'))
        assert x.shape == (10, 32, 32, 3) and x[2, 0, 0, 0] == 2 and y.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert len(calls) == 2 and os.listdir(tmp_path / 'cache') == ['cifar-10-python.tar.gz']
    (tmp_path / 'cache' / 'cifar-10-python.tar.gz').write_bytes(b'cut short')
    with pytest.raises(ambient.DataError, match='delete it'):
        ambient.load_images('cifar10', str(tmp_path / 'cache'))
