"""Tests of ldm_labelnoise.py: condition corruption statistics, CEP noise, the loss minimiser, DDIM / DPM-Solver++ on
a class-conditional Gaussian mixture with the analytic eps-predictor, the latent cache, tiny end-to-end runs of both
backbones, resume equality, DDP parity and bad input. CPU only, a few seconds each."""
import argparse
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import ldm_labelnoise as L
import nets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = os.path.join(ROOT, 'tests', 'data', 'cifar10_tiny.npz')
FAST = ['--resolution=16', '--batch=8', '--tick=0.016', '--grid=4', '--ddim_steps=2', '--workers=1']

# ----------------------------------------------------------------------------------------------------------------------
# Condition corruption.


def test_corrupt_labels_count_never_self_and_prior():
    # Imbalanced prior: 50 / 30 / 15 / 5 %. A flipped class-0 label goes to k with probability n_k / (N - n_0).
    counts = [50000, 30000, 15000, 5000]
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    y_noisy, index = L.corrupt_labels(y, 0.1, torch.Generator().manual_seed(0))
    changed = (y_noisy != y).nonzero()[:, 0]
    assert len(index) == len(index.unique()) == len(changed) == 10000  # exactly floor(eta N), none to itself
    assert set(changed.tolist()) == set(index.tolist())
    for source in (0, 3):
        new = y_noisy[index][y[index] == source]
        others = [k for k in range(4) if k != source]
        expected = np.array([counts[k] for k in others]) / sum(counts[k] for k in others)
        observed = np.array([(new == k).float().mean().item() for k in others])
        assert np.all(np.abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / len(new)) + 1e-3)
    # floor(eta N) despite floating point: 0.29 * 100 = 28.999999999999996.
    assert len(L.corrupt_labels(torch.arange(100) % 4, 0.29)[1]) == 29
    assert len(L.corrupt_labels(torch.arange(100) % 4, 0.0)[1]) == 0


def test_corrupt_labels_asymmetric_stays_inside_the_subset():
    y = torch.arange(1000) % 5
    classes = torch.tensor([1, 3, 4])
    y_noisy, index = L.corrupt_labels(y, 0.2, torch.Generator().manual_seed(1), classes)
    assert len(index) == math.floor(0.2 * 600)  # eta of the eligible samples
    assert torch.isin(y[index], classes).all() and torch.isin(y_noisy[index], classes).all()
    assert (y_noisy[index] != y[index]).all()
    assert (y_noisy == y).sum() == 1000 - len(index)


def test_swap_captions_corrupts_the_stated_fraction():
    source, index = L.swap_captions(1001, 0.1, torch.Generator().manual_seed(0))
    assert len(index) == 2 * (100 // 2) == (source != torch.arange(1001)).sum()
    assert torch.equal(source[source], torch.arange(1001))  # pairs of swaps
    assert sorted(source.tolist()) == list(range(1001))


def test_conditions_are_corrupted_from_the_seed():
    clean = torch.arange(200) % 10
    first, corrupted = L.corrupt_conditions(L.TrainConfig(corruption_ratio=0.1, seed=3), clean)
    again, _ = L.corrupt_conditions(L.TrainConfig(corruption_ratio=0.1, seed=3), clean)
    other, _ = L.corrupt_conditions(L.TrainConfig(corruption_ratio=0.1, seed=4), clean)
    assert len(corrupted) == 20 and torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(L.UserError, match='two'):
        L.corrupt_conditions(L.TrainConfig(corruption_ratio=0.1), torch.zeros(50, dtype=torch.long))


def test_data_order_is_a_fresh_permutation_per_epoch_and_independent_of_batching():
    n = 10
    stream = np.concatenate([L.data_order(7, start, 6, n, {}) for start in range(0, 30, 6)])       # 3 epochs
    again = np.concatenate([L.data_order(7, start, 5, n, {}) for start in range(0, 30, 5)])
    assert np.array_equal(stream, again)  # image k of the stream depends on k only (resume, any batch split)
    epochs = stream.reshape(3, n)
    assert all(sorted(e) == list(range(n)) for e in epochs) and not np.array_equal(epochs[0], epochs[1])

# ----------------------------------------------------------------------------------------------------------------------
# CEP, condition dropout, the loss.


def test_cep_noise_bounds_and_std():
    for shape in ((20000, 64), (400, 77, 32)):
        d = shape[-1]
        uniform = L.cep_noise(shape, 'uniform', 2.0, torch.Generator().manual_seed(0))
        assert uniform.abs().max() <= 2 / math.sqrt(d) and uniform.abs().max() > 0.99 * 2 / math.sqrt(d)
        assert abs(uniform.std().item() - 2 / math.sqrt(3 * d)) < 0.01 * 2 / math.sqrt(3 * d)
        gaussian = L.cep_noise(shape, 'gaussian', 2.0, torch.Generator().manual_seed(0))
        assert abs(gaussian.std().item() - 2 / math.sqrt(d)) < 0.01 * 2 / math.sqrt(d)
        assert abs(gaussian.mean().item()) < 0.01 * 2 / math.sqrt(d)


def test_step_noise_null_rate_and_seeding():
    cfg = L.TrainConfig(batch=1000, class_dropout_prob=0.1, cep='gaussian', xflip=True)
    drops = torch.cat([L.draw_step_noise(cfg, k * 1000, (3, 2, 2), (8,), False, torch.device('cpu'))['drop']
                       for k in range(20)])
    assert abs(drops.float().mean().item() - 0.1) < 4 * math.sqrt(0.09 / len(drops))
    a = L.draw_step_noise(cfg, 5000, (3, 2, 2), (8,), True, torch.device('cpu'))
    b = L.draw_step_noise(cfg, 5000, (3, 2, 2), (8,), True, torch.device('cpu'))
    c = L.draw_step_noise(cfg, 5016, (3, 2, 2), (8,), True, torch.device('cpu'))
    assert a['xi'] is None and all(torch.equal(a[k], b[k]) for k in a if a[k] is not None)  # only (seed, cur_nimg)
    assert not torch.equal(a['eps'], c['eps'])
    assert a['delta'].shape == (1000, 8) and a['z'].shape == a['eps'].shape == (1000, 3, 2, 2)


def test_cep_only_in_training():
    """The loss feeds delta to the network; the samplers never do, and the eval network is deterministic."""
    calls = []

    def net(x, t, y, delta=None):
        calls.append(delta)
        return torch.zeros_like(x)
    alphas_cumprod = L.make_alphas_cumprod()
    x, y = torch.randn(4, 2, 1, 1), torch.zeros(4, dtype=torch.long)
    delta = L.cep_noise((4, 1, 8), 'uniform', 1.0)
    L.diffusion_loss(net, x, y, torch.randint(0, 1000, (4,)), torch.randn_like(x), alphas_cumprod, delta)
    assert calls.pop() is delta
    L.ddim_sample(net, x, y, alphas_cumprod, steps=3, scale=2.0, y_null=y + 1)
    L.dpm_solver_sample(net, x, y, alphas_cumprod, steps=3)
    assert calls == [None] * 6
    spec = dict(arch='DiT-tiny', cond='class', num_classes=10, shape=(3, 8, 8), class_dropout_prob=0.1)
    dit = L.build_network(spec).eval()
    for p in dit.parameters():  # leave adaLN-Zero's zero init so the label embedding reaches the output
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    assert torch.equal(dit(x, t, y), dit(x, t, y))
    assert not torch.allclose(dit(x, t, y), dit(x, t, y, L.cep_noise((2, 64), 'gaussian', 1.0)))


def test_drop_conditions_classes_and_tokens():
    drop = torch.tensor([True, False, True])
    assert L.drop_conditions(torch.tensor([4, 5, 6]), torch.tensor(10), drop).tolist() == [10, 5, 10]
    tokens = nets.byte_tokens(['a cat', 'a dog', 'x'])
    out = L.drop_conditions(tokens, nets.byte_tokens([''])[0], drop)
    assert torch.equal(out[1], tokens[1]) and torch.equal(out[0], nets.byte_tokens([''])[0])


def test_loss_minimiser_is_the_posterior_mean_with_and_without_ip():
    """For x0 ~ N(m, s^2) at a fixed t, the linear eps-predictor a x_t + b minimising the loss has
    a = sqrt(1 - ab) / (ab s^2 + (1 - ab)(1 + gamma^2)), b = -a sqrt(ab) m; IP adds gamma xi to the input noise only."""
    m, s, n = 0.7, 0.5, 200000
    alphas_cumprod = L.make_alphas_cumprod('scaled_linear', 0.0015, 0.0195)
    t = torch.full((n,), 300)
    ab = alphas_cumprod[300].item()
    g = torch.Generator().manual_seed(0)
    x0 = (m + s * torch.randn(n, 1, 1, 1, generator=g))
    eps, xi = torch.randn(n, 1, 1, 1, generator=g), torch.randn(n, 1, 1, 1, generator=g)
    for gamma in (0.0, 0.5):
        a_star = math.sqrt(1 - ab) / (ab * s ** 2 + (1 - ab) * (1 + gamma ** 2))
        for da in (0.0, 0.1):
            ab_params = torch.tensor([a_star + da, -a_star * math.sqrt(ab) * m], requires_grad=True)
            loss = L.diffusion_loss(lambda x, t, y, d: ab_params[0] * x + ab_params[1], x0, None, t, eps,
                                    alphas_cumprod, xi=xi if gamma else None, gamma_ip=gamma).mean()
            grad, = torch.autograd.grad(loss, ab_params)
            if da == 0:
                assert grad.abs().max() < 0.01
            else:
                assert grad[0] > 0.05  # the loss rises away from the optimum


def test_vb_terms_vanish_at_the_true_posterior():
    alphas_cumprod = L.make_alphas_cumprod()
    x0, eps = torch.rand(6, 3, 4, 4) * 2 - 1, torch.randn(6, 3, 4, 4)
    t = torch.tensor([1, 5, 50, 300, 700, 999])
    a = alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    exact = L.vb_terms(x0, x_t, t, eps, -torch.ones_like(x0), alphas_cumprod)  # v = -1: posterior variance
    assert exact.abs().max() < 1e-3
    assert (L.vb_terms(x0, x_t, t, eps + 0.1, torch.zeros_like(x0), alphas_cumprod) > exact).all()
    # t = 0: the decoder NLL of the 1/127.5-wide bin around an interior x0 under N(x0, beta_tilde_1), in bits
    # (beta_tilde_0 = 0 is "clipped" to beta_tilde_1, the variance v = -1 selects).
    x0 = torch.rand(6, 3, 4, 4) * 1.8 - 0.9
    nll = L.vb_terms(x0, x0, torch.zeros(6, dtype=torch.long), torch.zeros_like(x0), -torch.ones_like(x0),
                     alphas_cumprod)
    ab = alphas_cumprod.tolist()
    beta_tilde_1 = (1 - ab[1] / ab[0]) * (1 - ab[0]) / (1 - ab[1])
    expected = -math.log2(math.erf(1 / 255 / math.sqrt(2 * beta_tilde_1)))
    assert torch.allclose(nll, torch.full((6,), expected), rtol=2e-3)

# ----------------------------------------------------------------------------------------------------------------------
# Samplers on a class-conditional Gaussian mixture with the analytic eps-predictor.

MEANS = torch.tensor([[1.0, -0.5], [-1.5, 0.5]])
COVS = torch.tensor([[[0.30, 0.10], [0.10, 0.20]], [[0.10, -0.05], [-0.05, 0.40]]])


def gmm_net(alphas_cumprod):
    """eps(x_t, t, y) = E[eps | x_t, y]: per class sqrt(1 - ab) C^-1 (x_t - sqrt(ab) mu), C = ab Sigma + (1 - ab) I;
    the null class (2) gets the mixture's E[eps | x_t]."""
    def net(x, t, y, delta=None):
        ab = alphas_cumprod[t[0]].item()
        z = x.view(len(x), 2).double()
        cov = ab * COVS.double() + (1 - ab) * torch.eye(2, dtype=torch.float64)                  # (K, 2, 2)
        diff = z[:, None] - math.sqrt(ab) * MEANS.double()[None]                                 # (B, K, 2)
        eps_k = math.sqrt(1 - ab) * torch.linalg.solve(cov[None], diff.unsqueeze(-1))[..., 0]    # (B, K, 2)
        log_p = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov).log_prob(diff)
        weights = torch.where((y == 2)[:, None], log_p.softmax(1), torch.nn.functional.one_hot(y.clamp(max=1), 2))
        return (weights[..., None] * eps_k).sum(1).float().view_as(x)
    return net


# DDIM is first order (at 50 steps it is ~10% short of the covariance here) and ancestral DDIM (eta = 1) also loses
# the variance of x0 given x_t at every step: both get 250 steps (the paper's DDIM setting), DPM-Solver++ 50.
@pytest.mark.parametrize('sampler, steps, n', [('dpm', 50, 6000), ('ddim', 250, 3000), ('ddim-stochastic', 250, 3000),
                                               ('ddpm', 250, 3000)])
def test_samplers_reproduce_each_class_distribution(sampler, steps, n):
    alphas_cumprod = L.make_alphas_cumprod('scaled_linear', 0.0015, 0.0195)
    net = gmm_net(alphas_cumprod)
    y = torch.arange(2 * n) % 2
    noise = torch.randn(2 * n, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    if sampler == 'dpm':
        x = L.dpm_solver_sample(net, noise, y, alphas_cumprod, steps=steps)
    elif sampler == 'ddpm':  # DiT's ancestral sampler; a network without v gets the fixed large variance
        g = torch.Generator().manual_seed(1)
        x = L.ddpm_sample(net, noise, y, alphas_cumprod, steps, randn_like=lambda v: torch.randn(v.shape, generator=g))
    else:
        g = torch.Generator().manual_seed(1)
        x = L.ddim_sample(net, noise, y, alphas_cumprod, steps, eta=1.0 if sampler == 'ddim-stochastic' else 0.0,
                          randn_like=lambda v: torch.randn(v.shape, generator=g))
    # The last step jumps from t_last to the x0 prediction E[x0 | x_t]: covariance ab Sigma C^-1 Sigma, not Sigma.
    solver, spacing = ('dpm', 'linspace') if sampler == 'dpm' else ('ddim', 'leading')
    ab = alphas_cumprod[0 if sampler == 'ddpm' else L.sampling_timesteps(1000, steps, spacing, solver)[-1]].item()
    for k in range(2):
        samples = x.view(-1, 2)[y == k]
        cov = ab * COVS[k] + (1 - ab) * torch.eye(2)
        expected_cov = ab * COVS[k] @ torch.linalg.solve(cov, COVS[k])
        assert torch.allclose(samples.mean(0), MEANS[k], atol=0.03)
        assert torch.allclose(torch.cov(samples.T), expected_cov, atol=0.025)


def test_ancestral_ddim_step_is_the_ddpm_posterior():
    """eta = 1: each DDIM step samples q(x_s | x_t, x0_hat) = N(mu_tilde, beta_tilde) (Ho et al., Eq. 6-7)."""
    alphas_cumprod = L.make_alphas_cumprod()
    x, z = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)

    def net(x, t, y, delta=None):
        return 0.3 * x
    out = L.ddim_sample(net, x, None, alphas_cumprod, steps=2, eta=1.0, randn_like=lambda v: z)  # t = 501, then 1
    a, a_prev = alphas_cumprod[501].item(), alphas_cumprod[1].item()
    x0 = (x - math.sqrt(1 - a) * 0.3 * x) / math.sqrt(a)
    mu = (math.sqrt(a_prev) * (1 - a / a_prev) * x0 + math.sqrt(a / a_prev) * (1 - a_prev) * x) / (1 - a)
    x1 = mu + math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)) * z
    assert torch.allclose(out, (x1 - math.sqrt(1 - a_prev) * 0.3 * x1) / math.sqrt(a_prev), atol=1e-5)


def test_clean_batch_flips_pixels_and_picks_the_mirrored_latents():
    flip = torch.tensor([False, True])
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    x0 = L.clean_batch(images, flip)
    assert torch.equal(x0[0], images[0] / 127.5 - 1) and torch.equal(x0[1], images[1].flip(2) / 127.5 - 1)
    moments = torch.randn(2, 2, 8, 4, 4)                                  # (B, views, 2C, h, w)
    z = torch.randn(2, 4, 4, 4)
    x0 = L.clean_batch(moments, flip, z, 0.5)
    for b, view in enumerate((0, 1)):
        mean, logvar = moments[b, view].chunk(2)
        assert torch.allclose(x0[b], 0.5 * (mean + (0.5 * logvar).exp() * z[b]))


def test_timesteps_match_diffusers():
    # diffusers 0.42: DPMSolverMultistepScheduler / DDIMScheduler(steps_offset=1, timestep_spacing).set_timesteps(10)
    assert L.sampling_timesteps(1000, 10, 'linspace', 'dpm') == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    assert L.sampling_timesteps(1000, 10, 'leading', 'dpm') == [901, 811, 721, 631, 541, 451, 361, 271, 181, 91]
    assert L.sampling_timesteps(1000, 10, 'linspace', 'ddim') == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert L.sampling_timesteps(1000, 10, 'leading', 'ddim') == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_guidance_scale_one_equals_conditional_sampling():
    alphas_cumprod = L.make_alphas_cumprod('scaled_linear', 0.0015, 0.0195)
    net = gmm_net(alphas_cumprod)
    noise, y = torch.randn(64, 2, 1, 1), torch.arange(64) % 2
    null = torch.full_like(y, 2)
    for sample in (L.ddim_sample, L.dpm_solver_sample):
        plain = sample(net, noise, y, alphas_cumprod, steps=20)
        assert torch.allclose(sample(net, noise, y, alphas_cumprod, steps=20, scale=1.0, y_null=null), plain,
                              atol=1e-5)
        assert not torch.allclose(sample(net, noise, y, alphas_cumprod, steps=20, scale=3.0, y_null=null), plain,
                                  atol=1e-2)



def dit_forward_with_cfg_reference(dit, x, t, y, null, scale, channels):
    """DiT's forward_with_cfg as its models.py defines it: the conditional and null passes on the same x, guidance on
    the first `channels` eps channels, the rest (the 4th eps channel, v) from the conditional pass."""
    out = dit(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
    cond, uncond = out.chunk(2)
    return torch.cat([uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels]),
                      cond[:, channels:]], dim=1)


def dit_p_sample_loop_reference(model, x, steps, noises):
    """improved-DDPM / DiT p_sample_loop with learned-range variance and clip_denoised=False, written from the
    paper's formulas with numpy float64 tables: respaced betas from the kept alpha_bar, posterior mean and variance,
    log-variance interpolated between log beta and the clipped log beta_tilde."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alpha_bar = np.cumprod(1 - betas)
    kept, position = [], 0.0
    for _ in range(steps):
        kept.append(round(position))
        position += 999 / (steps - 1)
    new_betas = 1 - alpha_bar[kept] / np.append(1.0, alpha_bar[kept][:-1])
    ab = np.cumprod(1 - new_betas)
    ab_prev = np.append(1.0, ab[:-1])
    var_tilde = new_betas * (1 - ab_prev) / (1 - ab)
    log_tilde = np.log(np.append(var_tilde[1], var_tilde[1:]))
    for i in reversed(range(steps)):
        out = model(x, torch.full((len(x),), kept[i]))
        eps, v = out[:, :4], out[:, 4:]
        x0 = float(np.sqrt(1 / ab[i])) * x - float(np.sqrt(1 / ab[i] - 1)) * eps
        mean = float(new_betas[i] * np.sqrt(ab_prev[i]) / (1 - ab[i])) * x0 + \
            float((1 - ab_prev[i]) * np.sqrt(1 - new_betas[i]) / (1 - ab[i])) * x
        frac = (v + 1) / 2
        log_var = frac * float(np.log(new_betas[i])) + (1 - frac) * float(log_tilde[i])
        x = mean + (i > 0) * torch.exp(0.5 * log_var) * noises[steps - 1 - i]
    return x


def random_dit(**kwargs):
    torch.manual_seed(0)
    dit = nets.DiT(**{**dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                             num_classes=10), **kwargs})
    for p in dit.parameters():  # leave adaLN-Zero's zero init, so every part of the network acts
        torch.nn.init.normal_(p, std=0.02)
    return dit.eval()


def test_ddpm_sampler_is_dits_p_sample_loop_with_either_guidance():
    dit = random_dit()
    net = L.Denoiser(dit, None, (64,), null=10)
    z, y, steps = torch.randn(3, 4, 8, 8), torch.tensor([1, 5, 7]), 12
    assert L.respaced_timesteps(1000, 12)[:4] == [0, 91, 182, 272] and L.respaced_timesteps(1000, 250)[-1] == 999
    noises = [torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(k)) for k in range(steps)]
    samples = {}
    with torch.no_grad():
        for mode, channels in (('dit', 3), ('all', 4)):
            ref = dit_p_sample_loop_reference(lambda x, t: dit_forward_with_cfg_reference(dit, x, t, y, 10, 1.5,
                                                                                          channels), z, steps, noises)
            draws = iter(noises)
            samples[mode] = L.ddpm_sample(net, z, y, L.make_alphas_cumprod(), steps, 1.5, torch.full_like(y, 10),
                                          mode, randn_like=lambda x: next(draws))
            assert (samples[mode] - ref).abs().max() < 1e-6 * ref.abs().max(), mode
    assert not torch.allclose(samples['dit'], samples['all'], rtol=1e-4)  # the 4th channel's guidance matters


def test_loss_draws_x_t_from_float64_tables():
    """DiT's q_sample: sqrt(alpha_bar) and sqrt(1 - alpha_bar) from float64 tables, rounded to float32 last."""
    captured = {}

    def net(x_t, t, y, delta=None):
        captured['x_t'] = x_t
        return torch.zeros_like(x_t)
    alphas_cumprod = L.make_alphas_cumprod()
    x0, eps, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    L.diffusion_loss(net, x0, None, t, eps, alphas_cumprod)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    exact = a.sqrt().float() * x0 + (1 - a).sqrt().float() * eps
    assert torch.equal(captured['x_t'], exact)
    a32 = a.float()
    assert not torch.allclose(a32.sqrt() * x0 + (1 - a32).sqrt() * eps, exact, rtol=1e-5, atol=0)


def test_cep_is_applied_where_the_condition_embedding_forms_and_null_is_a_named_choice():
    delta = torch.randn(4, 64)
    y = torch.tensor([1, 10, 3, 10])                                      # 10: the null label of CFG training
    for perturb_null in (True, False):
        dit = random_dit()
        net = L.Denoiser(dit, None, (64,), null=10, perturb_null=perturb_null)
        embedding = L.perturb_condition(dit.y_embedder(y), delta, y == 10, perturb_null=perturb_null)
        x, t = torch.randn(4, 4, 8, 8), torch.tensor([3, 300, 600, 900])
        with torch.no_grad():
            out = net(x, t, y, delta)
            manual = dit(x, t, y, embedding_noise=embedding - dit.y_embedder(y))
        assert torch.allclose(out, manual, atol=1e-6)
        changed = (out - dit(x, t, y)).flatten(1).abs().amax(1) > 1e-6
        assert changed.tolist() == [True, perturb_null, True, perturb_null]
    # The LDM context: (B, 1, width) class embeddings, nulls recognised by class id or by the tokens of ''.
    context = torch.zeros(2, 1, 8)
    out = L.perturb_condition(context, torch.ones(2, 1, 8), torch.tensor([False, True]), perturb_null=False)
    assert out[0].eq(1).all() and out[1].eq(0).all()
    text = L.build_network(dict(arch='tiny-ldm', cond='text', num_classes=0, shape=(3, 8, 8), dropout=0.0,
                                text_layers=1, embedding_dropout=0.0, class_dropout_prob=0.1))
    assert text.is_null(nets.byte_tokens(['', 'a cat'])).tolist() == [True, False]

# ----------------------------------------------------------------------------------------------------------------------
# Latent cache.


def test_latent_cache_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = nets.AutoencoderKL(**nets.AUTOENCODER_TINY).eval()
    images = np.random.RandomState(0).randint(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / 'data.npz', x=images)
    dataset = L.ImageDataset(str(tmp_path / 'data.npz'), 0, str(tmp_path))
    path = str(tmp_path / 'cache' / 'latents.npy')
    rows = L.cache_latents(dataset, vae, path, True, 2, torch.device('cpu'), 0, 1, 1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        for view, images_in in enumerate((x, x.flip(3))):
            mean, logvar = vae.encode_moments(images_in)
            cached = torch.from_numpy(np.array(rows[:, view])).float()                            # (N, 2C, h, w)
            assert torch.allclose(cached, torch.cat([mean, logvar], 1), atol=2e-3, rtol=2e-3)
    vae.encode_moments = None  # a second run reads the cache without encoding
    assert np.array_equal(L.cache_latents(dataset, vae, path, True, 2, torch.device('cpu'), 0, 1, 1), rows)

# ----------------------------------------------------------------------------------------------------------------------
# End to end: train -> snapshot -> generate -> eval, resume, DDP.


def run(argv):
    return L.main([str(a) for a in argv])


def final_state(run_dir):
    names = sorted(f for f in os.listdir(run_dir) if f.startswith('training-state-'))
    return torch.load(os.path.join(run_dir, names[-1]), weights_only=True)


def losses(run_dir):
    with open(os.path.join(run_dir, 'stats.jsonl')) as file:
        return [json.loads(line)['loss'] for line in file]


def test_end_to_end_ldm_class_generate_eval(tmp_path, monkeypatch):
    run_dir = run(['--preset=tiny', f'--data={TINY_DATA}', '--kimg=0.032', '--corruption_ratio=0.1', '--cep=uniform',
                   f'--outdir={tmp_path}', *FAST])
    files = os.listdir(run_dir)
    assert {'config.json', 'log.txt', 'stats.jsonl', 'conditions.npz'} <= set(files)
    assert any(f.startswith('samples-') for f in files)
    with np.load(os.path.join(run_dir, 'conditions.npz')) as saved:
        assert len(saved['corrupted']) == 20
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert len(stats) == 2 and all(np.isfinite(s['loss']) for s in stats)
    network = os.path.join(run_dir, sorted(f for f in files if f.startswith('network-snapshot'))[-1])

    # Generate: image k depends on seed k only, not on the batch.
    for batch in (2, 3):
        run(['generate', f'--network={network}', '--seeds=0-4', f'--outdir={tmp_path}/gen{batch}', f'--batch={batch}',
             '--ddim_steps=3', '--scale=2'])
    for seed in range(5):
        a = np.asarray(PIL.Image.open(f'{tmp_path}/gen2/000000/{seed:06d}.png'))
        assert a.shape == (16, 16, 3)
        assert np.array_equal(a, np.asarray(PIL.Image.open(f'{tmp_path}/gen3/000000/{seed:06d}.png')))
    labels = json.load(open(f'{tmp_path}/gen2/dataset.json'))['labels']
    assert [label for _, label in labels] == [0, 1, 2, 3, 4]

    # Eval with a random-weights Inception against statistics of the tiny data.
    weights = str(tmp_path / 'inception.pth')
    torch.save(L.fid.InceptionV3().state_dict(), weights)
    monkeypatch.setenv('FID_WEIGHTS', weights)
    images = torch.from_numpy(np.load(TINY_DATA)['x'][:10]).permute(0, 3, 1, 2)
    stats = L.fid.compute_stats([images], device='cpu', spatial=False, progress=False)
    L.fid.save_ref(str(tmp_path / 'ref.npz'), stats)
    # FID itself is left out here only for time: its 2048 x 2048 eigendecompositions take ~10 s on this CPU.
    results = run(['eval', f'--network={network}', f'--ref={tmp_path}/ref.npz', '--num=10', '--batch=5',
                   '--ddim_steps=2', '--metrics=is,pr', '--protocol=pytorch-fid'])
    assert {'is', 'precision', 'recall'} <= set(results) and np.isfinite(results['is'])
    record = json.loads(open(os.path.join(run_dir, 'metrics.jsonl')).read().splitlines()[-1])
    assert record['num'] == 10 and record['is'] == results['is'] and record['scale'] == 7.5
    assert record['protocol'] == 'pytorch-fid'


def test_end_to_end_dit_on_cached_latents_and_walk(tmp_path):
    torch.manual_seed(0)
    vae = nets.AutoencoderKL(**nets.AUTOENCODER_TINY)
    torch.save(vae.state_dict(), tmp_path / 'vae.bin')
    run_dir = run(['--preset=tiny', '--arch=DiT-tiny', f'--vae={tmp_path}/vae.bin', f'--data={TINY_DATA}',
                   '--kimg=0.016', '--xflip', '--cep=gaussian', f'--cache_dir={tmp_path}/cache', f'--outdir={tmp_path}',
                   *FAST])
    spec = final_state(run_dir)['spec']
    assert spec['shape'] == (4, 8, 8) and spec['vae'].endswith('vae.bin')
    assert len([f for f in os.listdir(tmp_path / 'cache') if f.startswith('latents-')]) == 1
    network = os.path.join(run_dir, [f for f in os.listdir(run_dir) if f.startswith('network-snapshot')][-1])
    run(['walk', f'--network={network},{network}', '--classes=3', '--walk_steps=4', '--ddim_steps=2',
         f'--outdir={tmp_path}/walk'])
    grid = np.asarray(PIL.Image.open(tmp_path / 'walk' / 'walk-3-000.png'))
    assert grid.shape == (2 * 16, 4 * 16, 3)
    assert np.array_equal(grid[:16], grid[16:])  # the same network twice gives the same row


def test_end_to_end_text_conditioning_with_caption_swaps(tmp_path):
    data = np.load(TINY_DATA)
    names = [str(c) for c in data['classes']]
    captions = np.array([f'a photo of a {names[k]}' for k in data['y']])
    np.savez(tmp_path / 'captioned.npz', x=data['x'], y=data['y'], captions=captions)
    run_dir = run(['--preset=tiny', '--cond=text', '--text_layers=1', f'--data={tmp_path}/captioned.npz',
                   '--kimg=0.016', '--corruption_ratio=0.1', f'--outdir={tmp_path}', *FAST])
    with np.load(os.path.join(run_dir, 'conditions.npz')) as saved:
        assert len(saved['corrupted']) == 20 and (saved['source'] != np.arange(200)).sum() == 20
    (tmp_path / 'prompts.txt').write_text('a photo of a cat\na photo of a ship\n')
    network = os.path.join(run_dir, [f for f in os.listdir(run_dir) if f.startswith('network-snapshot')][-1])
    run(['generate', f'--network={network}', '--seeds=0-2', f'--prompts={tmp_path}/prompts.txt',
         f'--outdir={tmp_path}/gen', '--ddim_steps=2', '--scale=3'])
    assert len(os.listdir(tmp_path / 'gen' / '000000')) == 3


def test_resume_equals_uninterrupted_run(tmp_path):
    flags = ['--preset=tiny', f'--data={TINY_DATA}', '--corruption_ratio=0.05', '--cep=uniform', '--snap=1', *FAST]
    full = run([*flags, '--kimg=0.048', f'--outdir={tmp_path}/a'])
    part = run([*flags, '--kimg=0.032', f'--outdir={tmp_path}/b'])
    conditions = open(os.path.join(part, 'conditions.npz'), 'rb').read()
    with open(os.path.join(part, 'stats.jsonl'), 'a') as file:  # a line written after the state, then kill -9
        file.write(json.dumps(dict(kimg=0.04, loss=123.0)) + '\n')
    resumed = run([*flags, '--kimg=0.048', f'--outdir={tmp_path}/b', '--resume=auto'])
    assert resumed == part
    assert open(os.path.join(part, 'conditions.npz'), 'rb').read() == conditions
    a, b = final_state(full), final_state(resumed)
    assert a['cur_nimg'] == b['cur_nimg'] == 48
    for key in a['net']:
        assert torch.equal(a['net'][key], b['net'][key]), key
        assert torch.equal(a['ema'][key], b['ema'][key]), key
    assert losses(full) == losses(resumed)


def test_resume_reloads_the_saved_conditions(tmp_path):
    flags = ['--preset=tiny', '--arch=DiT-tiny', f'--data={TINY_DATA}', '--corruption_ratio=0.1', '--snap=1',
             f'--outdir={tmp_path}', *FAST]
    run_dir = run([*flags, '--kimg=0.008'])
    labels = np.load(TINY_DATA)['y'].copy()
    labels[:7] = (labels[:7] + 1) % 10
    np.savez(os.path.join(run_dir, 'conditions.npz'), source=labels, corrupted=np.arange(7))
    assert run([*flags, '--kimg=0.016', '--resume=auto']) == run_dir
    assert json.load(open(os.path.join(run_dir, 'config.json')))['corrupted'] == 7
    with np.load(os.path.join(run_dir, 'conditions.npz')) as saved:
        assert np.array_equal(saved['source'], labels)


def test_ddp_two_processes_match_one(tmp_path):
    flags = ['--preset=tiny', '--arch=DiT-tiny', f'--data={TINY_DATA}', '--kimg=0.024', '--cep=gaussian',
             '--corruption_ratio=0.1', '--xflip', *FAST]
    one = run([*flags, f'--outdir={tmp_path}/one'])
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             os.path.join(ROOT, 'ldm_labelnoise.py'), *flags, '--batch_gpu=2',
                             f'--outdir={tmp_path}/two'], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    two = os.path.join(tmp_path, 'two', os.listdir(tmp_path / 'two')[0])
    a, b = final_state(one), final_state(two)
    for key in a['net']:
        assert torch.allclose(a['net'][key], b['net'][key], atol=2e-5, rtol=1e-4), key
    assert np.allclose(losses(one), losses(two), rtol=1e-5)

# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, a non-zero exit, nothing written.


def expect_error(argv, capsys, code, words, outdir):
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == code and err.startswith('ldm_labelnoise.py: error: ') and '\n' not in err, err
    assert words in err, err
    assert not os.path.exists(outdir)


@pytest.mark.parametrize('flag, words', [
    ('--corruption_ratio=1', '--corruption_ratio must be in [0, 1)'),
    ('--corruption_ratio=-0.1', '--corruption_ratio must be in [0, 1)'),
    ('--cep=laplace', "invalid choice: 'laplace'"),
    ('--batch=10', 'divisible'),
    ('--corruption_classes=3', '--corruption_classes'),
    ('--corruption_classes=3,42', '[0, 10)'),
])
def test_bad_flags(tmp_path, capsys, flag, words):
    expect_error(['--preset=tiny', f'--data={TINY_DATA}', '--batch=8', '--batch_gpu=4', flag,
                  f'--outdir={tmp_path}/out'], capsys, 2, words, tmp_path / 'out')


def test_bad_data(tmp_path, capsys):
    outdir = tmp_path / 'out'
    data = np.load(TINY_DATA)
    np.savez(tmp_path / 'labels.npz', x=data['x'][:20], y=np.arange(20))
    expect_error(['--preset=tiny', f'--data={tmp_path}/labels.npz', '--num_classes=10', f'--outdir={outdir}'],
                 capsys, 2, 'outside [0, 10)', outdir)
    expect_error(['--preset=tiny', '--cond=text', f'--data={TINY_DATA}', f'--outdir={outdir}'], capsys, 2,
                 'needs one caption per image', outdir)
    np.savez(tmp_path / 'few_labels.npz', x=data['x'][:20], y=data['y'][:10])
    expect_error(['--preset=tiny', f'--data={tmp_path}/few_labels.npz', f'--outdir={outdir}'], capsys, 2,
                 'labels must be 20 integers', outdir)
    expect_error(['--preset=tiny', '--arch=DiT-tiny', '--resolution=17', f'--data={TINY_DATA}', f'--outdir={outdir}'],
                 capsys, 2, 'divisible by patch_size', outdir)
    (tmp_path / 'damaged' / 'training-state-000001.pt').parent.mkdir()
    (tmp_path / 'damaged' / 'training-state-000001.pt').write_bytes(b'cut short')
    expect_error(['--preset=tiny', f'--data={TINY_DATA}', f'--resume={tmp_path}/damaged/training-state-000001.pt',
                  f'--outdir={outdir}'], capsys, 2, 'damaged', outdir)
    assert os.listdir(tmp_path / 'damaged') == ['training-state-000001.pt']  # nothing written beside it
    expect_error(['generate', f'--network={tmp_path}/damaged/training-state-000001.pt', f'--outdir={outdir}'], capsys,
                 2, 'damaged', outdir)
    expect_error(['--preset=tiny', f'--data={tmp_path}/missing', f'--outdir={outdir}'], capsys, 2, 'not found', outdir)
    folder = tmp_path / 'images'
    for k in range(2):
        (folder / f'class{k}').mkdir(parents=True)
        PIL.Image.fromarray(data['x'][k]).save(folder / f'class{k}' / 'a.png')
    (folder / 'class1' / 'b.png').write_bytes(b'not a png')
    expect_error(['--preset=tiny', f'--data={folder}', f'--outdir={outdir}'], capsys, 2, 'class1/b.png', outdir)
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / 'class1' / 'b.png')
    expect_error(['--preset=tiny', f'--data={folder}', f'--outdir={outdir}'], capsys, 2, 'set --resolution', outdir)
    # Issue 23 item 9: float labels are refused, not truncated; a malformed dataset.json is one line.
    np.savez(tmp_path / 'float_labels.npz', x=data['x'][:20], y=np.arange(20) % 10 + 0.5)
    expect_error(['--preset=tiny', f'--data={tmp_path}/float_labels.npz', f'--outdir={outdir}'], capsys, 2,
                 'labels must be 20 integers, got float64', outdir)
    rest = '["class1/a.png", 0], ["class1/b.png", 0]]}'
    for table in ('{"labels": [["class0/a.png", 1.5], ' + rest, '[1, 2]', '{"labels": 5}', 'nope',
                  '{"labels": [["class0/a.png", "cat"], ' + rest):
        (folder / 'dataset.json').write_text(table)
        expect_error(['--preset=tiny', f'--data={folder}', '--resolution=8', f'--outdir={outdir}'], capsys, 2,
                     'dataset.json', outdir)


def test_cifar10_cache_is_md5_checked_and_never_unpickled(tmp_path, capsys):
    """Issue 23 item 1: a cifar-10-python.tar.gz planted in the cache holds a pickle whose payload would create a
    marker file. The data goes through fid.ImageSource('cifar10'): md5-checked at every use, read without running
    anything; the run stops with one line and exit 2, and the payload never runs."""
    import io as io_module
    import pickle
    import tarfile

    marker = tmp_path / 'payload-ran'

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), 'w'))
    cache = tmp_path / 'cache'
    cache.mkdir()
    with tarfile.open(cache / 'cifar-10-python.tar.gz', 'w:gz') as archive:
        for i in range(1, 6):
            data = pickle.dumps({'data': Payload(), 'labels': [0]})
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{i}')
            info.size = len(data)
            archive.addfile(info, io_module.BytesIO(data))
    outdir = tmp_path / 'out'
    expect_error(['--preset=tiny', '--data=cifar10', f'--cache_dir={cache}', f'--outdir={outdir}'], capsys, 2, 'md5',
                 outdir)
    assert not marker.exists()


def test_snapshot_sizes_are_checked_before_any_allocation(tmp_path, capsys):
    """Issue 23 item 4: a snapshot whose spec declares a DiT-XL/2 on 1024 x 1024 latents (gigabytes) with a few
    bytes of weights is refused in one line, quickly: the network is built on the meta device and checked first."""
    import time
    spec = dict(arch='DiT-XL/2', cond='class', num_classes=1000, shape=(4, 1024, 1024), dropout=0.0, text_layers=0,
                embedding_dropout=0.0, class_dropout_prob=0.1, vae=None, scaling_factor=1, beta_schedule='linear',
                linear_start=1e-4, linear_end=0.02)
    torch.save(dict(ema={'backbone.pos_embed': torch.zeros(1)}, spec=spec), tmp_path / 'bomb.pt')
    start = time.time()
    with pytest.raises(L.UserError, match='bomb.pt'):
        L.load_network(str(tmp_path / 'bomb.pt'), 'cpu')
    assert time.time() - start < 20


def test_resume_auto_continues_only_the_same_experiment(tmp_path, capsys):
    """Issue 23 item 5: --resume=auto on another data set (or other method flags) starts a new run folder and says
    why; it never re-applies the earlier run's saved corrupted labels to other images."""
    data = np.load(TINY_DATA)
    np.savez(tmp_path / 'other.npz', x=data['x'][::-1].copy(), y=data['y'][::-1].copy())
    flags = ['--preset=tiny', '--arch=DiT-tiny', '--corruption_ratio=0.1', '--kimg=0.008', '--snap=1',
             f'--outdir={tmp_path}/runs', *FAST]
    first = run([*flags, f'--data={TINY_DATA}'])
    capsys.readouterr()
    second = run([*flags, f'--data={tmp_path}/other.npz', '--resume=auto'])
    assert second != first and 'nothing to continue' in capsys.readouterr().out
    with np.load(os.path.join(first, 'conditions.npz')) as a, np.load(os.path.join(second, 'conditions.npz')) as b:
        assert not np.array_equal(a['source'], b['source'])
        assert np.array_equal(b['source'][np.setdiff1d(np.arange(200), b['corrupted'])],
                              data['y'][::-1][np.setdiff1d(np.arange(200), b['corrupted'])])
    third = run([*flags, f'--data={TINY_DATA}', '--resume=auto', '--kimg=0.016'])  # kimg may change
    assert third == first
    # --resume=PATH from the other data set: a new folder, whose conditions are its own data's.
    state = os.path.join(first, sorted(f for f in os.listdir(first) if f.startswith('training-state'))[-1])
    fourth = run([*flags, f'--data={tmp_path}/other.npz', f'--resume={state}', '--kimg=0.024'])
    with np.load(os.path.join(second, 'conditions.npz')) as b, np.load(os.path.join(fourth, 'conditions.npz')) as d:
        assert fourth not in (first, second) and np.array_equal(b['source'], d['source'])


def test_dry_run_prints_the_network_and_touches_nothing(tmp_path, capsys):
    run(['--preset=in1k-dit', '--data=cifar10', f'--outdir={tmp_path}/runs', f'--cache_dir={tmp_path}/cache',
         '--dry_run'])
    out = capsys.readouterr().out
    assert '"arch": "DiT-XL/2"' in out and 'network: DiT-XL/2, channel_mult None, 675,129,632 parameters' in out
    assert os.listdir(tmp_path) == []


def test_command_line_exit_code(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'ldm_labelnoise.py'), '--preset=tiny',
                             f'--data={TINY_DATA}', '--corruption_ratio=1.5', f'--outdir={tmp_path}/out'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == 'ldm_labelnoise.py: error: --corruption_ratio must be in [0, 1)'
    assert not os.path.exists(tmp_path / 'out')

# ----------------------------------------------------------------------------------------------------------------------
# Released formats and the official command lines.


def write_tiny_vae(path):
    torch.manual_seed(0)
    torch.save(nets.AutoencoderKL(**nets.AUTOENCODER_TINY).state_dict(), path)  # f = 2: 8x8 latents, 16x16 images
    return str(path)


def test_facebookresearch_dit_checkpoints_in_generate_walk_eval_and_transfer(tmp_path):
    dit = random_dit(hidden_size=384, num_heads=6, depth=1, patch_size=4)
    torch.save(dit.state_dict(), tmp_path / 'DiT-tiny.pt')                # the layout of DiT-XL-2-256x256.pt
    noisy = {key: value + 1 for key, value in dit.state_dict().items()}
    torch.save(dict(model=noisy, ema=dit.state_dict(), opt={}, args=argparse.Namespace(model='DiT-S/4')),
               tmp_path / '0400000.pt')                                   # DiT train.py: the EMA is used
    vae = write_tiny_vae(tmp_path / 'vae.bin')
    net, spec, _ = L.load_network(str(tmp_path / 'DiT-tiny.pt'), 'cpu')
    assert (spec['shape'], spec['num_classes'], spec['vae']) == ((4, 8, 8), 10, 'mse') and spec['linear_end'] == 0.02
    assert L.load_network(str(tmp_path / 'DiT-tiny.pt'), 'cpu', for_fid=True)[1]['vae'] == 'ema'  # sample_ddp.py
    flags = [f'--vae={vae}', '--scheduler=ddpm', '--ddim_steps=4', '--cfg_channels=dit', '--scale=1.5']
    for name in ('DiT-tiny.pt', '0400000.pt'):
        run(['generate', f'--network={tmp_path / name}', '--seeds=0-2', f'--outdir={tmp_path / name}.out', *flags])
    for seed in range(3):
        a = np.asarray(PIL.Image.open(tmp_path / 'DiT-tiny.pt.out' / '000000' / f'{seed:06d}.png'))
        assert a.shape == (16, 16, 3)
        b = np.asarray(PIL.Image.open(tmp_path / '0400000.pt.out' / '000000' / f'{seed:06d}.png'))
        assert np.array_equal(a, b)
    run(['walk', f'--network={tmp_path}/DiT-tiny.pt,{tmp_path}/0400000.pt', '--classes=3', '--walk_steps=3',
         '--n_samples=1', f'--outdir={tmp_path}/walk', *flags])
    grid = np.asarray(PIL.Image.open(tmp_path / 'walk' / 'walk-3-000.png'))
    assert grid.shape == (32, 48, 3) and np.array_equal(grid[:16], grid[16:])

    # --transfer: training starts from the DiT weights (a tiny learning rate leaves them in the EMA).
    train = ['--preset=tiny', '--arch=DiT-S-tiny', f'--vae={vae}', f'--data={TINY_DATA}', '--kimg=0.008',
             '--lr=1e-12', f'--cache_dir={tmp_path}/cache', f'--outdir={tmp_path}/runs', *FAST]
    run_dir = run([*train, f'--transfer={tmp_path}/DiT-tiny.pt'])
    ema = final_state(run_dir)['ema']
    assert all(torch.allclose(ema['backbone.' + key], value, atol=1e-6) for key, value in dit.state_dict().items())
    with pytest.raises(SystemExit) as exit_info:
        run([*train, '--arch=DiT-tiny', f'--transfer={tmp_path}/DiT-tiny.pt'])
    assert exit_info.value.code == 2


def class_snapshot(path, num_classes=2):
    """A network snapshot of this script, written directly: a random DiT-tiny in pixel space."""
    spec = dict(arch='DiT-tiny', cond='class', num_classes=num_classes, shape=(3, 8, 8), dropout=0.0, text_layers=0,
                embedding_dropout=0.0, class_dropout_prob=0.1, vae=None, scaling_factor=1, beta_schedule='linear',
                linear_start=1e-4, linear_end=0.02)
    torch.manual_seed(0)
    net = L.build_network(spec)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    torch.save(dict(ema=net.state_dict(), spec=spec), path)
    return str(path)


def test_official_readme_sampling_commands_run_as_written(tmp_path, capsys, monkeypatch):
    """The README commands of Hhhhhhao/DiffusionNoise with a local network in place of the repo id: the official
    per-class folders of JPEGs, the same images for any --batch_size."""
    network = class_snapshot(tmp_path / 'network.pt')
    ldm = f'--pretrained_model_name_or_path {network} --outdir {tmp_path}/in1k --ddim_steps 50 --scheduler dpm ' \
          '--batch_size 10 --n_samples 10 --scale 2.25 --fixed_code'
    dit = f'--pretrained_model_name_or_path {network} --prompt_data mscoco --outdir {tmp_path}/dit --ddim_steps 50 ' \
          '--scheduler dpm --batch_size 10 --n_samples 10 --scale 2.25 --fixed_code'
    run(['generate', *ldm.split()])
    run(['generate', *dit.split()])
    assert 'not used by a class-conditional model' in capsys.readouterr().err
    run(['generate', *ldm.replace('--batch_size 10', '--batch_size 3').replace('in1k', 'in1k-3').split()])
    for c in range(2):
        names = sorted(os.listdir(tmp_path / 'in1k' / str(c)))
        assert names == [f'{k:05d}.jpeg' for k in range(10)]
        for name in names:
            image = np.asarray(PIL.Image.open(tmp_path / 'in1k' / str(c) / name))
            assert image.shape == (8, 8, 3)
            assert np.array_equal(image, np.asarray(PIL.Image.open(tmp_path / 'in1k-3' / str(c) / name)))
            assert np.array_equal(image, np.asarray(PIL.Image.open(tmp_path / 'dit' / str(c) / name)))
    assert not np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'in1k' / '0' / '00000.jpeg')),
                              np.asarray(PIL.Image.open(tmp_path / 'in1k' / '0' / '00001.jpeg')))

    # Refused official flags: one line naming our equivalent; --hub_token is passed on as HF_TOKEN.
    monkeypatch.setenv('HF_TOKEN', '')  # main() sets it below: monkeypatch restores it after the test
    for flag, words in (('--push_to_hub', 'is not supported: uploading'), ('--class_synset n01440764', '--classes')):
        with pytest.raises(SystemExit) as exit_info:
            run(['generate', f'--network={network}', *flag.split()])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count('\n') == 1 and '(official flag) is not supported' in err
        assert words in err
    run(['generate', f'--network={network}', '--hub_token', 'hf_abc', '--seeds=0', f'--outdir={tmp_path}/token',
         '--ddim_steps=1'])
    assert os.environ['HF_TOKEN'] == 'hf_abc'

# ----------------------------------------------------------------------------------------------------------------------
# Failure paths and the command-line layout.


def test_failure_paths_are_one_line_with_the_common_exit_codes(tmp_path, capsys, monkeypatch):
    outdir = tmp_path / 'out'
    data = np.load(TINY_DATA)
    np.savez(tmp_path / 'chw.npz', x=data['x'][:8].transpose(0, 3, 1, 2), y=data['y'][:8])
    expect_error(['--preset=tiny', f'--data={tmp_path}/chw.npz', f'--outdir={outdir}'], capsys, 2,
                 'channels first', outdir)
    np.savez(tmp_path / 'huge_label.npz', x=data['x'][:8], y=np.array([0, 1, 2, 3, 4, 5, 6, 10 ** 6]))
    expect_error(['--preset=tiny', f'--data={tmp_path}/huge_label.npz', f'--outdir={outdir}'], capsys, 2,
                 'reach 1000000, more classes than its 8 images', outdir)
    network = class_snapshot(tmp_path / 'network.pt')
    expect_error(['generate', f'--network={network}', '--seeds=5-1', f'--outdir={outdir}'], capsys, 2, 'reversed',
                 outdir)
    (tmp_path / 'a_file').write_text('')
    expect_error(['--preset=tiny', f'--data={TINY_DATA}', f'--outdir={tmp_path}/a_file/runs'], capsys, 2,
                 'not a folder', outdir)
    (tmp_path / 'empty.pt').write_bytes(b'')
    expect_error(['generate', f'--network={tmp_path}/empty.pt', f'--outdir={outdir}'], capsys, 2, 'empty (0 bytes)',
                 outdir)
    expect_error(['generate', f'--network={TINY_DATA}', f'--outdir={outdir}'], capsys, 2, 'not a checkpoint', outdir)
    expect_error(['--preset=tiny', f'--data={TINY_DATA}', f'--resume={network}', f'--outdir={outdir}'], capsys, 2,
                 'is a network snapshot, not a training state', outdir)
    with monkeypatch.context() as patch:  # a read-only folder (root ignores permissions, so os.access is patched)
        patch.setattr(L.os, 'access', lambda path, mode: False)
        expect_error(['generate', f'--network={network}', f'--outdir={outdir}'], capsys, 2, 'is not writable', outdir)

    # A full disk during the first snapshot: one line, exit 1, no partial file. --resume=auto then reuses the run
    # folder that has no state (and removes what a kill -9 left half-written).
    flags = ['--preset=tiny', '--arch=DiT-tiny', f'--data={TINY_DATA}', '--kimg=0.008', f'--outdir={outdir}', *FAST]
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):  # path: the temporary file object of nets.write_atomic
        if 'network-snapshot' in str(getattr(path, 'name', path)):
            path.write(b'partial')
            raise OSError(28, 'No space left on device', str(path.name))
        return real_save(obj, path, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(L.torch, 'save', full_disk)
        with pytest.raises(SystemExit) as exit_info:
            run(flags)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and '\n' not in err and 'No space left on device' in err, err
    run_dir = os.path.join(outdir, os.listdir(outdir)[0])
    assert not [f for f in os.listdir(run_dir) if '.tmp' in f or f.startswith('training-state')]
    (tmp_path / 'out' / os.listdir(outdir)[0] / 'training-state-000008.pt.tmp').write_bytes(b'kill -9')
    assert run([*flags, '--resume=auto']) == run_dir and len(os.listdir(outdir)) == 1
    assert not [f for f in os.listdir(run_dir) if '.tmp' in f] and len(losses(run_dir)) == 1


def test_help_layout(capsys):
    L.main(['--help'])
    top = capsys.readouterr().out.splitlines()
    assert top[0] == 'usage: ldm_labelnoise.py [COMMAND] [--flag=value ...]' and 'Chen et al.' in top[1]
    assert top[2] == 'commands:' and [line.split()[0] for line in top[3:7]] == ['train', 'generate', 'eval', 'walk']
    assert top[-1] == "Run 'python ldm_labelnoise.py COMMAND --help' for the flags of a command."
    order = ['data and corruption', 'network', 'optimisation', 'run', 'sampling', 'evaluation']
    for command in ('train', 'generate', 'eval', 'walk'):
        with pytest.raises(SystemExit) as exit_info:
            L.main([command, '--help'])
        text = capsys.readouterr().out
        assert exit_info.value.code == 0 and 'dataclass' not in text and 'options:' not in text
        titles = [line[:-1] for line in text.splitlines() if line.endswith(':') and not line.startswith(' ')]
        assert titles == [title for title in order if title in titles], titles
        entries = re.split(r'\n  -', text.split('\n\n', 1)[1])[1:]      # one entry per flag, wrapped lines joined
        for entry in entries:
            if not entry.startswith('h, --help'):
                assert re.search(r'\((default: .*|required)\)$', ' '.join(entry.split('\n\n')[0].split())), entry
    flat = ' '.join(text.split())
    assert 'official: --batch_size' in flat and 'official: --pretrained_model_name_or_path' in flat


def test_released_diffusers_pipelines_by_folder_and_hub_repo_id(tmp_path, monkeypatch, capsys):
    """A DiffusionNoise-style DiTPipeline folder (diffusers DiT, KL autoencoder with scaling 0.3, DDIM scheduler
    config) samples as diffusers' DiTPipeline does: all four eps channels guided, null class 10, latents divided by
    the scaling factor before decoding; the same folder served as a Hub repo over 127.0.0.1 gives the same images.
    An LDMClassToImagePipeline folder (VQ autoencoder, LDM UNet, class embedder) writes the official folders."""
    from edm_layouts import hf_repo_folder, serve_folder
    from test_nets_diffusers import (randomize, tiny_vq, unet_diffusers_config, unet_to_diffusers, vq_diffusers_config,
                                     write_dit_pipeline, write_folder, write_json)
    dit, kl = write_dit_pipeline(tmp_path / 'dit')
    flags = ['--seeds=0-1', '--scheduler=dpm', '--ddim_steps=3', '--scale=2']
    decoded, decode = [], nets.AutoencoderKL.decode
    monkeypatch.setattr(nets.AutoencoderKL, 'decode', lambda self, z: decoded.append((z, self.scaling_factor)) or
                        decode(self, z))
    run(['generate', f'--network={tmp_path}/dit', f'--outdir={tmp_path}/out', *flags])
    noise, _ = L.seeded_noise([0, 1], (4, 8, 8), 'cpu')
    with torch.no_grad():
        x = L.dpm_solver_sample(lambda x, t, y, delta=None: dit(x, t, y), noise, torch.tensor([0, 1]),
                                L.make_alphas_cumprod(), 3, 2.0, torch.tensor([10, 10]), 'linspace')
    (latents, scaling_factor), = decoded
    assert torch.allclose(latents, x, rtol=1e-5, atol=1e-4 * x.abs().max()) and scaling_factor == 0.3
    write_dit_pipeline(hf_repo_folder(tmp_path / 'hub', 'DiffusionNoise/dit-tiny'))
    monkeypatch.setenv('CORRUPTED_DIFFUSION_CACHE', str(tmp_path / 'cache'))
    with serve_folder(tmp_path / 'hub') as base_url:
        monkeypatch.setenv('HF_ENDPOINT', base_url)
        run(['generate', '--pretrained_model_name_or_path=DiffusionNoise/dit-tiny', f'--outdir={tmp_path}/hub-out',
             *flags])
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')  # nothing listens there: offline
    with pytest.raises(SystemExit) as exit_info:
        run(['generate', '--network=DiffusionNoise/other', f'--outdir={tmp_path}/offline'])
    assert exit_info.value.code == 2 and 'DiffusionNoise/other/resolve/main/model_index.json' in capsys.readouterr().err
    for seed in range(2):
        name = f'000000/{seed:06d}.png'
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'out' / name)),
                              np.asarray(PIL.Image.open(tmp_path / 'hub-out' / name)))

    # LDM-4 class pipeline: VQ latents decoded unscaled, the class embedder's last row the null class.
    folder = tmp_path / 'ldm'
    unet = randomize(nets.UNet(arch='ldm', img_resolution=16, in_channels=3, out_channels=3, model_channels=32,
                               channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(16, 8), num_heads=2,
                               context_dim=24)).eval()
    write_json(os.path.join(folder, 'model_index.json'), {
        '_class_name': 'LDMClassToImagePipeline', 'class_embedder': ['latent_diffusion', 'ClassEmbedder'],
        'scheduler': ['diffusers', 'DDIMScheduler'], 'unet': ['diffusers', 'UNet2DConditionModel'],
        'vqvae': ['diffusers', 'VQModel']})
    write_folder(os.path.join(folder, 'vqvae'), vq_diffusers_config(), tiny_vq().state_dict())
    write_folder(os.path.join(folder, 'unet'), unet_diffusers_config('ldm'),
                 unet_to_diffusers(unet.state_dict(), 3, 2, [0, 1], 'ldm'))
    write_folder(os.path.join(folder, 'class_embedder'), {}, {'embedding.weight': torch.randn(4, 24)})
    write_json(os.path.join(folder, 'scheduler', 'scheduler_config.json'), {
        '_class_name': 'DDIMScheduler', 'beta_schedule': 'scaled_linear', 'beta_start': 0.0015, 'beta_end': 0.0195,
        'num_train_timesteps': 1000, 'steps_offset': 1})
    net, spec, vae = L.load_snapshot(str(folder), 'cpu', 2.0)
    assert (spec['cond'], spec['num_classes'], net.null, vae.scaling_factor) == ('class', 3, 3, 1.0)
    assert spec['clip_sample'] == 1.0 and spec['steps_offset'] == 1  # DDIMScheduler's default clip_sample=True
    run(['generate', f'--network={folder}', '--n_samples=1', '--ddim_steps=2', f'--outdir={tmp_path}/ldm-out'])
    assert sorted(os.listdir(tmp_path / 'ldm-out')) == ['0', '1', '2', 'dataset.json']
    assert np.asarray(PIL.Image.open(tmp_path / 'ldm-out' / '2' / '00000.jpeg')).shape == (32, 32, 3)


def test_ldm4_trains_on_vq_latents(tmp_path):
    """LDM-4: the pre-quantisation VQ latents, cached with zero variance, unscaled; decoding quantises."""
    torch.manual_seed(0)
    vq = nets.VQModel(**nets.VQMODEL_TINY).eval()
    torch.save(vq.state_dict(), tmp_path / 'vq.pt')
    assert L.PRESETS['in1k-ldm']['vae'] == L.PRESETS['cc3m-ldm']['vae'] == 'vq-f4'
    run_dir = run(['--preset=tiny', f'--vae={tmp_path}/vq.pt', f'--data={TINY_DATA}', '--kimg=0.008',
                   f'--cache_dir={tmp_path}/cache', f'--outdir={tmp_path}', *FAST])
    spec = final_state(run_dir)['spec']
    assert spec['shape'] == (3, 8, 8) and spec['scaling_factor'] == 1.0
    cache = np.load(next((tmp_path / 'cache').glob('latents-*.npy')))
    images = torch.from_numpy(L.ImageDataset(TINY_DATA, 16, '').read_many([0, 1], 1)).float()  # (2, 3, 16, 16)
    with torch.no_grad():
        h = vq.encode(images / 127.5 - 1)
    assert torch.allclose(torch.from_numpy(cache[:2, 0, :3]).float(), h, atol=2e-3, rtol=2e-3)
    x0 = L.clean_batch(torch.from_numpy(cache[:2]), torch.tensor([False, False]), torch.randn(2, 3, 8, 8))
    assert torch.equal(x0, torch.from_numpy(cache[:2, 0, :3]).float())  # no posterior noise


def test_bare_diffusers_dit_folder_loads_as_the_pipeline_does(tmp_path, capsys):
    """A diffusers DiT model folder (config.json + weights, made here with random weights) given to --network: inside
    its pipeline it takes the sibling scheduler and vae; copied out alone with those two beside it, the same. Both
    compute the function of the whole pipeline folder. A lone folder with nothing beside it asks for --vae."""
    import shutil
    from test_nets_diffusers import write_dit_pipeline
    write_dit_pipeline(tmp_path / 'pipe')
    alone = tmp_path / 'alone'
    for part in ('transformer', 'scheduler', 'vae'):
        shutil.copytree(tmp_path / 'pipe' / part, alone / part)
    shutil.copytree(tmp_path / 'pipe' / 'transformer', tmp_path / 'lone' / 'transformer')
    cfg = L.GenerateConfig(network='x', scheduler='dpm', ddim_steps=3, scale=2.0)
    noise, randn_like = L.seeded_noise([0, 1], (4, 8, 8), 'cpu')
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 10])
    results = []
    for source in (tmp_path / 'pipe', tmp_path / 'pipe' / 'transformer', alone / 'transformer'):
        net, spec, vae = L.load_snapshot(str(source), 'cpu', 2.0)
        with torch.no_grad():
            results.append((net(x, t, y), L.sample_images(net, spec, vae, noise, torch.tensor([0, 1]), cfg, randn_like),
                            {k: v for k, v in spec.items() if k not in ('arch', 'vae', 'id2label')}))
    for out, images, spec in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(images, results[0][1]) and spec == results[0][2]
    expect_error(['generate', f'--network={tmp_path}/lone/transformer', f'--outdir={tmp_path}/out'], capsys, 2,
                 'pass --vae', tmp_path / 'out')


def test_released_text_pipeline_with_ldm_bert_and_the_official_text_command(tmp_path, capsys):
    """An LDMTextToImagePipeline folder: prompts through its WordPiece tokenizer and LDM-BERT, the null condition the
    tokens of '', latents divided by the vqvae's scaling factor (0.5 here) before decoding; the official CC3M
    command's --prompt_data takes a caption file, and refuses the `datasets` corpora in one line."""
    from test_nets_diffusers import write_text_pipeline
    vq, unet, bert = write_text_pipeline(tmp_path / 'text')
    net, spec, vae = L.load_snapshot(str(tmp_path / 'text'), 'cpu', 2.0)
    tokens = net.tokenize(['a photo of the cat'])
    assert spec['cond'] == 'text' and vae.scaling_factor == 0.5 and tokens[0, :3].tolist() == [3, 12, 15]
    assert torch.equal(net.null, net.tokenize([''])[0]) and net.is_null(net.tokenize(['', 'a cat'])).tolist() == \
        [True, False]
    (tmp_path / 'captions.txt').write_text('a photo of the cat\nthe cat playing\n')
    official = f'--pretrained_model_name_or_path {tmp_path}/text --prompt_data {tmp_path}/captions.txt ' \
               f'--outdir {tmp_path}/cc3m --ddim_steps 2 --scheduler dpm --batch_size 10 --n_samples 2 --scale 2.25 ' \
               '--fixed_code'
    run(['generate', *official.split()])
    assert sorted(os.listdir(tmp_path / 'cc3m' / '00001')) == ['00000.jpeg', '00001.jpeg', 'meta.txt']
    assert (tmp_path / 'cc3m' / '00001' / 'meta.txt').read_text() == 'Prompt: the cat playing\n'
    with pytest.raises(SystemExit) as exit_info:
        run(['generate', *official.replace(f'{tmp_path}/captions.txt', 'mscoco').split()])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and '--prompt_data=mscoco (official flag) is not supported' in err
