"""Tests for ddpm_ip.py: the diffusion math against closed forms, input perturbation on Gaussian data with an analytic
denoiser, the samplers' output moments, the exposure-bias measurement, checkpoint loading, and the command line
(train -> generate -> eval -> exposure, resume, DDP parity, bad input). CPU only; run with OMP_NUM_THREADS=1."""
import errno
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm_ip
import nets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = os.path.join(ROOT, 'tests', 'data', 'cifar10_tiny.npz')

# ----------------------------------------------------------------------------------------------------------------------
# Helpers: Gaussian data with an analytic eps-predictor


def gaussian_eps_net(mu, cov, alphas_cumprod, gamma=0.0, v=None, scale=1.0):
    """The MSE-optimal DDPM-IP predictor E[eps | x_t] for x0 ~ N(mu, cov), x_t = sqrt(ab) x0 + sqrt(1-ab)(eps + gamma
    xi): eps_hat = s M^-1 (x - a mu), M = a^2 cov + s^2 (1 + gamma^2) I. Works on (B, C, 1, 1) tensors and receives the
    original timestep (alphas_cumprod of the full process); `v` adds constant learned-range variance channels."""
    eye = torch.eye(len(mu), dtype=torch.float64)

    def net(x, t, class_labels=None):
        ab = alphas_cumprod[t].double()[:, None, None]                       # (B, 1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        M = a ** 2 * cov + s ** 2 * (1 + gamma ** 2) * eye                    # (B, C, C)
        centered = x.flatten(1).double() - a[:, 0] * mu                      # (B, C)
        eps = s[:, 0] * torch.linalg.solve(M, centered[..., None])[..., 0]
        out = (scale * eps).float().view_as(x)
        return out if v is None else torch.cat([out, torch.full_like(out, v)], dim=1)
    return net


MU = torch.tensor([0.3, -0.2], dtype=torch.float64)
COV = torch.tensor([[0.20, 0.06], [0.06, 0.10]], dtype=torch.float64)


def gaussian_data(n, generator):
    z = torch.randn(n, 2, dtype=torch.float64, generator=generator)
    return (MU + z @ torch.linalg.cholesky(COV).T).float()[:, :, None, None]  # (n, 2, 1, 1)


def moments(x):
    x = x.flatten(1).double()
    return x.mean(0), torch.cov(x.T)

# ----------------------------------------------------------------------------------------------------------------------
# Diffusion math


def test_beta_schedules_match_closed_forms():
    linear = ddpm_ip.get_named_beta_schedule('linear', 1000)
    assert linear.dtype == torch.float64
    torch.testing.assert_close(linear, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), rtol=0, atol=1e-15)
    assert ddpm_ip.get_named_beta_schedule('linear', 250)[-1].item() == pytest.approx(0.08)  # scaled by 1000 / T

    cosine = ddpm_ip.get_named_beta_schedule('cosine', 1000)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    alphas_cumprod = torch.cumprod(1 - cosine, 0)
    expected = torch.tensor([f((t + 1) / 1000) / f(0) for t in range(1000)], dtype=torch.float64)
    torch.testing.assert_close(alphas_cumprod[:999], expected[:999], rtol=1e-10, atol=1e-12)  # Nichol & Dhariwal Eq. 17
    assert cosine[999].item() == 0.999 and (cosine[:999] < 0.999).all()  # only the last beta is clipped
    # Values from the spec (verified against the official code).
    assert cosine[0].item() == pytest.approx(4.128e-5, rel=1e-3)
    assert cosine[998].item() == pytest.approx(0.75, rel=1e-4)
    assert alphas_cumprod[999].item() == pytest.approx(2.43e-9, rel=1e-2)


def test_space_timesteps_official_examples():
    assert ddpm_ip.space_timesteps(1000, 'ddim50') == list(range(0, 1000, 20))
    assert ddpm_ip.space_timesteps(1000, 'ddim100') == list(range(0, 1000, 10))
    hundred = ddpm_ip.space_timesteps(1000, '100')
    assert len(hundred) == 100 and hundred[:7] == [0, 10, 20, 30, 40, 50, 61] and hundred[-2:] == [989, 999]
    assert ddpm_ip.space_timesteps(1000, '50')[:3] == [0, 20, 41]
    assert ddpm_ip.space_timesteps(300, '10,15,20')[:11] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99, 100]
    with pytest.raises(ValueError):
        ddpm_ip.space_timesteps(1000, 'ddim999')  # no integer stride gives 999 steps
    with pytest.raises(ValueError):
        ddpm_ip.space_timesteps(10, '11')


def test_respacing_keeps_alpha_bar_and_all_steps_is_the_original_process():
    betas = ddpm_ip.get_named_beta_schedule('cosine', 1000)
    full = ddpm_ip.GaussianDiffusion(betas)
    spaced = ddpm_ip.make_diffusion('cosine', 1000, '100')
    kept = spaced.timestep_map
    torch.testing.assert_close(spaced.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-10, atol=0)
    assert spaced.betas[-1].item() > 0.999  # respaced betas are not re-clipped (official)

    same = ddpm_ip.make_diffusion('cosine', 1000, '1000')
    assert same.timestep_map.tolist() == list(range(1000))
    for name in ('betas', 'alphas_cumprod', 'posterior_log_variance_clipped', 'posterior_mean_coef1'):
        torch.testing.assert_close(getattr(same, name), getattr(full, name), rtol=1e-9, atol=1e-15)
    # The same chain from the same noise.
    net = gaussian_eps_net(MU, COV, full.alphas_cumprod, v=0.3)
    x_T = torch.randn(64, 2, 1, 1, generator=torch.Generator().manual_seed(1))
    noise = lambda: torch.Generator().manual_seed(2)
    out_full = ddpm_ip.sample(net, full, x_T, clip_denoised=False, randn_like=rng_like(noise()))
    out_same = ddpm_ip.sample(net, same, x_T, clip_denoised=False, randn_like=rng_like(noise()))
    torch.testing.assert_close(out_full, out_same, rtol=1e-5, atol=1e-5)


def rng_like(generator):
    return lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype)


def test_posterior_and_vb_terms_against_float64_direct_computation():
    d = ddpm_ip.make_diffusion('linear', 1000)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (6, 3, 4, 4), generator=g).float() / 127.5 - 1)
    x_t = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 5, 300, 998, 999])

    # Posterior q(x_{t-1} | x_t, x0) by Bayes' rule in float64 (t > 0).
    ab_prev, beta = d.alphas_cumprod_prev[t], d.betas[t]
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    var = (1 / precision)[:, None, None, None]
    mean = var * ((ab_prev.sqrt() / (1 - ab_prev))[:, None, None, None] * x0.double()
                  + ((1 - beta).sqrt() / beta)[:, None, None, None] * x_t.double())
    got_mean, got_log_var = d.q_posterior(x0, x_t, t)
    torch.testing.assert_close(got_mean[1:].double(), mean[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_log_var[1:, :, 0, 0].double().exp(), var[1:, :, 0, 0].expand(5, 1),
                               rtol=1e-5, atol=0)
    assert got_log_var[0].item() == pytest.approx(got_log_var[1].item())  # clipped: entry 0 = beta_tilde_1

    # Learned range: v = 1 gives beta_t, v = -1 the clipped posterior variance (Nichol & Dhariwal Eq. 15).
    for v, expected in ((1.0, d.betas[t]), (-1.0, d.posterior_log_variance_clipped[t].exp())):
        out = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], 1)
        _, log_var, _ = d.p_mean_variance(out, x_t, t, clip_denoised=False)
        torch.testing.assert_close(log_var[:, 0, 0, 0].double().exp(), expected, rtol=1e-5, atol=0)

    # KL in bits/dim against torch.distributions in float64; at t = 0 the decoder NLL.
    out = torch.randn(6, 6, 4, 4, generator=g) * 0.5
    vb = ddpm_ip.vb_terms_bpd(d, out, x0, x_t, t)
    p_mean, p_log_var, _ = d.p_mean_variance(out, x_t, t, clip_denoised=False)
    q_mean, q_log_var = d.q_posterior(x0, x_t, t)
    N = torch.distributions.Normal
    kl = torch.distributions.kl_divergence(N(q_mean.double(), (0.5 * q_log_var.double()).exp().expand_as(q_mean)),
                                           N(p_mean.double(), (0.5 * p_log_var.double()).exp()))
    torch.testing.assert_close(vb[1:].double(), kl.flatten(1).mean(1)[1:] / math.log(2), rtol=1e-4, atol=1e-6)
    nll = -ddpm_ip.discretized_gaussian_log_likelihood(x0, p_mean, 0.5 * p_log_var)
    assert vb[0].item() == pytest.approx(nll[0].mean().item() / math.log(2), rel=1e-6)

    # The discretised decoder likelihood against the exact normal CDF (official tanh approximation: ~1e-3).
    x = x0.double()
    mean = x + 0.02 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    log_scale = torch.full_like(x, math.log(0.03))
    normal = N(mean, log_scale.exp())
    upper = torch.where(x > 0.999, torch.ones_like(x), normal.cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), normal.cdf(x - 1 / 255))
    exact = (upper - lower).clamp(min=1e-12).log()
    got = ddpm_ip.discretized_gaussian_log_likelihood(x.float(), mean.float(), log_scale.float()).double()
    assert (x.abs() > 0.999).any() and (x.abs() < 0.999).any()  # both the edge bins and inner bins are covered
    torch.testing.assert_close(got.exp(), exact.exp(), rtol=0, atol=2e-3)


def test_input_perturbation_adds_exactly_gamma_squared_times_one_minus_alpha_bar():
    d = ddpm_ip.make_diffusion('cosine', 1000)
    seen = {}

    def recording_net(x, t, class_labels=None):
        seen['x_t'] = x
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    g = torch.Generator().manual_seed(0)
    n, gamma, t_index = 200_000, 0.3, 400
    x0 = torch.full((n, 1, 1, 1), 0.5)
    eps, xi = torch.randn(n, 1, 1, 1, generator=g), torch.randn(n, 1, 1, 1, generator=g)
    t = torch.full((n,), t_index)
    ddpm_ip.ip_loss(recording_net, d, x0, t, eps, xi, gamma=0.0)
    base = seen['x_t']
    ddpm_ip.ip_loss(recording_net, d, x0, t, eps, xi, gamma=gamma)
    perturbed = seen['x_t']
    one_minus_ab = 1 - d.alphas_cumprod[t_index].item()
    # The perturbation enters linearly: x_t moves by sqrt(1 - ab) gamma xi, an independent term ...
    torch.testing.assert_close(perturbed - base, math.sqrt(one_minus_ab) * gamma * xi, rtol=0, atol=1e-6)
    # ... so the variance of x_t given x0 grows from (1 - ab) to (1 + gamma^2)(1 - ab), the mean is unchanged.
    assert perturbed.var().item() == pytest.approx((1 + gamma ** 2) * one_minus_ab, rel=0.01)
    assert base.var().item() == pytest.approx(one_minus_ab, rel=0.01)
    assert perturbed.mean().item() == pytest.approx(0.5 * d.alphas_cumprod[t_index].sqrt().item(), abs=0.005)


@pytest.mark.parametrize('gamma', [0.0, 0.5])
def test_analytic_eps_predictor_minimises_the_ip_loss(gamma):
    """On Gaussian data the minimiser of E||eps - eps_hat(x_t)||^2 with x_t built from eps + gamma xi is
    s M^-1 (x - a mu) with M = a^2 cov + s^2 (1 + gamma^2) I: its MSE equals the closed-form minimum, any rescaling
    of it is worse, and the gamma = 0 predictor is not the minimiser once gamma > 0."""
    d = ddpm_ip.make_diffusion('cosine', 1000)
    g = torch.Generator().manual_seed(3)
    n = 100_000
    for t_index in (200, 500, 900):  # where eps_hat carries signal, the minimiser's MC error is < 0.003
        x0 = gaussian_data(n, g)
        eps, xi = torch.randn(n, 2, 1, 1, generator=g), torch.randn(n, 2, 1, 1, generator=g)
        t = torch.full((n,), t_index)

        def best_scale(net_gamma):
            scales = (0.9, 1.0, 1.1)
            losses = [ddpm_ip.ip_loss(gaussian_eps_net(MU, COV, d.alphas_cumprod, net_gamma, scale=s), d, x0, t,
                                      eps, xi, gamma)[1].double().mean().item() for s in scales]
            curvature = losses[0] - 2 * losses[1] + losses[2]
            return 1.0 - 0.1 * (losses[2] - losses[0]) / (2 * curvature), losses[1]

        scale, loss = best_scale(gamma)
        assert scale == pytest.approx(1.0, abs=0.01)
        ab = d.alphas_cumprod[t_index]
        M = ab * COV + (1 - ab) * (1 + gamma ** 2) * torch.eye(2, dtype=torch.float64)
        minimum = (1 - (1 - ab) * torch.linalg.inv(M).diagonal().mean()).item()
        assert loss == pytest.approx(minimum, rel=0.02, abs=2e-4)
        if gamma > 0 and t_index >= 500:  # the ADM optimum is off by about 1 / (1 + gamma^2) under IP
            assert best_scale(0.0)[0] < 0.9


def test_vb_term_trains_only_the_variance_channels():
    d = ddpm_ip.make_diffusion('cosine', 1000)
    out = torch.randn(4, 6, 8, 8, requires_grad=True)
    net = lambda x, t, class_labels=None: out * 1.0
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    eps, xi = torch.randn_like(x0), torch.randn_like(x0)
    loss, mse, vb = ddpm_ip.ip_loss(net, d, x0, t, eps, xi, gamma=0.1)
    assert mse.shape == vb.shape == (4,) and (vb > 0).all()
    # The VLB term sees the same perturbed y_t as the mse term (official: one x_t for both), not the clean x_t.
    torch.testing.assert_close(vb, ddpm_ip.vb_terms_bpd(d, out, x0, d.q_sample(x0, t, eps + 0.1 * xi), t))
    torch.testing.assert_close(loss, mse + vb)  # T = 1000: the rescaled VLB weight T / 1000 is 1
    d4000 = ddpm_ip.make_diffusion('cosine', 4000)
    for rescale, weight in ((True, 4.0), (False, 1.0)):  # official RESCALED_MSE / MSE
        total, part_mse, part_vb = ddpm_ip.ip_loss(net, d4000, x0, t, x0 * 0, x0 * 0, 0.0, rescale)
        torch.testing.assert_close(total, part_mse + weight * part_vb)
    grad_vb, = torch.autograd.grad(vb.sum(), out, retain_graph=True)
    assert grad_vb[:, :3].abs().max() == 0 and grad_vb[:, 3:].abs().max() > 0  # stop-gradient on the mean
    grad_mse, = torch.autograd.grad(mse.sum(), out)
    assert grad_mse[:, 3:].abs().max() == 0


# The x0-posterior sampler ignores the uncertainty of x0, so with few steps a small variance (beta_tilde, which DDIM
# eta = 1 uses) under-disperses: 250 steps for eta = 1, 100 for the learned range at v = 0.5.
@pytest.mark.parametrize('respacing,eta,v', [('100', None, 0.5), ('ddim50', 0.0, 0.0), ('ddim250', 1.0, 0.0)])
def test_samplers_with_the_analytic_predictor_reproduce_the_data_moments(respacing, eta, v):
    full = ddpm_ip.make_diffusion('cosine', 1000)
    d = ddpm_ip.make_diffusion('cosine', 1000, respacing)
    net = gaussian_eps_net(MU, COV, full.alphas_cumprod, v=v)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(20_000, 2, 1, 1, generator=g)
    x = ddpm_ip.sample(net, d, x_T, clip_denoised=False, eta=eta, randn_like=rng_like(g))
    mean, cov = moments(x)
    torch.testing.assert_close(mean, MU, rtol=0, atol=0.012)
    torch.testing.assert_close(cov, COV, rtol=0, atol=0.012)
    # A predictor that is 10% off visibly fails the same check.
    wrong = ddpm_ip.sample(gaussian_eps_net(MU, COV, full.alphas_cumprod, v=v, scale=0.9), d, x_T,
                           clip_denoised=False, eta=eta, randn_like=rng_like(g))
    assert (moments(wrong)[1] - COV).abs().max() > 0.03

def test_ddim_with_eta_one_takes_the_posterior_step():
    """Song et al. Eq. 16 at eta = 1 gives sigma^2 = beta_tilde_t, and the DDIM step becomes a draw from the posterior
    q(x_{t-1} | x_t, x0_hat): mean c1 x0_hat + c2 x_t, variance beta_tilde_t (Ho et al. Eq. 7)."""
    full, d = ddpm_ip.make_diffusion('cosine', 1000), ddpm_ip.make_diffusion('cosine', 1000, '50')
    net = gaussian_eps_net(MU, COV, full.alphas_cumprod)
    g = torch.Generator().manual_seed(4)
    x, z = torch.randn(8, 2, 1, 1, generator=g), torch.randn(8, 2, 1, 1, generator=g)
    for i in (1, 10, 49):
        _, x_prev, x0_hat = next(ddpm_ip.sample_chain(net, d, x, i, clip_denoised=False, eta=1.0,
                                                      randn_like=lambda _: z))
        t = torch.full((8,), i)
        mean, _ = d.q_posterior(x0_hat, x, t)
        torch.testing.assert_close(x_prev, mean + d.at(d.posterior_variance, t).sqrt() * z, rtol=1e-5, atol=1e-5)
    # Ancestral sampling draws noise at every step but adds none at the last one (official nonzero_mask).
    last = [next(ddpm_ip.sample_chain(net, d, x, i, clip_denoised=False, randn_like=noise))[1]
            for i in (0, 1) for noise in (lambda _: z, torch.zeros_like)]
    assert torch.equal(last[0], last[1]) and not torch.allclose(last[2], last[3])

# ----------------------------------------------------------------------------------------------------------------------
# Timestep sampler and exposure bias


class OfficialLossSecondMoment:
    """Sequential re-statement of guided-diffusion resample.py LossSecondMomentResampler, in numpy."""

    def __init__(self, T, history=10, uniform_prob=0.001):
        self.h, self.u = history, uniform_prob
        self.loss_history = np.zeros([T, history])
        self.counts = np.zeros([T], dtype=np.int64)

    def weights(self):
        if not (self.counts == self.h).all():
            return np.ones(len(self.counts)) / len(self.counts)
        w = np.sqrt(np.mean(self.loss_history ** 2, axis=-1))
        w = w / w.sum() * (1 - self.u) + self.u / len(w)
        return w / w.sum()

    def update(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self.counts[t] == self.h:
                self.loss_history[t, :-1] = self.loss_history[t, 1:]
                self.loss_history[t, -1] = loss
            else:
                self.loss_history[t, self.counts[t]] = loss
                self.counts[t] += 1


def test_loss_second_moment_sampler_matches_the_official_fifo():
    T = 7
    ours, official = ddpm_ip.TimestepSampler(T, 'loss-second-moment', 'cpu'), OfficialLossSecondMoment(T)
    rng = np.random.default_rng(0)
    for step in range(12):
        ts = rng.integers(0, T, size=25)
        if step == 3:
            ts[:] = 2  # 25 copies of one timestep in one batch: only the newest 10 may survive
        losses = rng.random(25) * (ts + 1)
        ours.update(torch.from_numpy(ts), torch.from_numpy(losses).float())
        official.update(ts, losses.astype(np.float32))
        np.testing.assert_allclose(ours.probabilities().numpy(), official.weights(), rtol=1e-6)
        # The same queues, entry for entry: oldest first, as the official fixed-length FIFO per timestep.
        np.testing.assert_array_equal(ours.history.numpy(), official.loss_history)
        np.testing.assert_array_equal(ours.counts.numpy(), official.counts)
    assert not np.allclose(official.weights(), 1 / T)  # warmed up, so the comparison covered the non-uniform case
    t, w = ours.sample(100_000, torch.Generator().manual_seed(0))
    p = ours.probabilities()
    np.testing.assert_allclose(torch.bincount(t, minlength=T).numpy() / 1e5, p.numpy(), atol=0.005)
    torch.testing.assert_close(w, (1 / (T * p[t])).float())  # importance weights keep the objective unbiased
    uniform = ddpm_ip.TimestepSampler(T, 'uniform', 'cpu')
    uniform.update(torch.from_numpy(ts), torch.from_numpy(losses).float())
    assert torch.all(uniform.probabilities() == 1 / T)


def test_exposure_metric_matches_its_closed_form_on_gaussian_data():
    """Chains from q_sample(x0, start) with a linear (Gaussian-optimal) predictor: x stays jointly Gaussian with x0, so
    Var(x_t - sqrt(ab_t) x0) follows from propagating the joint covariance through the linear sampler steps."""
    mu, var0 = torch.tensor([0.2, -0.1, 0.0]), torch.tensor([1.0, 0.6, 0.3])
    full = ddpm_ip.make_diffusion('cosine', 1000)
    d = ddpm_ip.make_diffusion('cosine', 1000, '20')
    net = gaussian_eps_net(mu.double(), torch.diag(var0).double(), full.alphas_cumprod, v=0.0)
    g = torch.Generator().manual_seed(7)
    n, start = 20_000, 19
    x0 = (mu + var0.sqrt() * torch.randn(n, 3, generator=g))[:, :, None, None]
    sums, squares, l1 = ddpm_ip.exposure_bias(net, d, x0, start, torch.randn(x0.shape, generator=g),
                                              clip_denoised=False, randn_like=rng_like(g))
    rows = ddpm_ip.exposure_table(sums, squares, n, d, start)
    assert [r['t'] for r in rows] == d.timestep_map[:start].flip(0).tolist()

    # Closed form, per dimension: x_{i-1} = P x_i + q + sigma z, with P from the posterior-mean coefficients.
    a = lambda i: d.alphas_cumprod[i].sqrt().double()
    cov_x0_x, var_x = a(start) * var0.double(), a(start) ** 2 * var0.double() + (1 - d.alphas_cumprod[start])
    for row, i in zip(rows, range(start, 0, -1)):
        ab_full = full.alphas_cumprod[d.timestep_map[i]]
        s_i = (1 - d.alphas_cumprod[i]).sqrt()
        k = s_i / (ab_full * var0.double() + (1 - ab_full))                        # eps_hat = k (x - a mu)
        P = d.posterior_mean_coef1[i] * (1 - s_i * k) / a(i) + d.posterior_mean_coef2[i]
        log_var = 0.5 * (d.log_betas[i] + d.posterior_log_variance_clipped[i])     # v = 0: geometric mean
        cov_x0_x, var_x = P * cov_x0_x, P ** 2 * var_x + log_var.exp()
        var_r = var_x - 2 * a(i - 1) * cov_x0_x + a(i - 1) ** 2 * var0.double()
        assert row['sigma_hat'] == pytest.approx(var_r.sqrt().mean().item(), rel=0.01)
        assert row['sigma_train'] == pytest.approx((1 - d.alphas_cumprod[i - 1]).sqrt().item(), rel=1e-6)
        assert row['delta'] == pytest.approx((row['sigma_hat'] - row['sigma_train']) ** 2, rel=1e-6)
    assert rows[-1]['sigma_hat'] > 2 * rows[-1]['sigma_train']  # chains forget x0: the bias grows towards t = 0
    assert 0 < l1.item() / n < 1

# ----------------------------------------------------------------------------------------------------------------------
# Networks and checkpoints


def test_official_cifar10_config_and_guided_diffusion_state_dict_load(tmp_path):
    with torch.device('meta'):
        net = nets.UNet(**nets.UNET_PRESETS['adm-cifar10'])
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 57_094_662 and len(state) == 494  # spec Sec. 3.3
    for key in ('time_embed.0.weight', 'input_blocks.0.0.weight', 'input_blocks.4.0.in_layers.2.weight',
                'input_blocks.5.1.qkv.weight', 'middle_block.1.proj_out.weight',
                'output_blocks.11.2.in_layers.0.weight',
                'out.2.weight'):
        assert key in state, key
    assert state['out.2.weight'].shape == (6, 128, 3, 3)
    # The official README command's model flags give exactly this network, whatever --arch says.
    _, c = ddpm_ip.parse_args(
        '--arch=tiny-adm --num_channels 128 --channel_mult 1,2,2,2 --num_res_blocks 3 --attention_resolutions 16,8 '
        '--num_head_channels 32 --dropout 0.3 --learn_sigma True --use_scale_shift_norm True --resblock_updown True '
        '--use_new_attention_order True'.split())
    assert ddpm_ip.net_config(c, 32, 3, 0) == {**nets.UNET_PRESETS['adm-cifar10'], 'num_heads': 4}  # unused here

    # A released checkpoint is a plain state dict: it loads through --network with official flags and samples.
    tiny = nets.UNet(**nets.UNET_PRESETS['tiny-adm']).eval()
    with torch.no_grad():
        for p in tiny.parameters():
            p.normal_(0, 0.02)
    torch.save(tiny.state_dict(), tmp_path / 'released.pt')
    c = ddpm_ip.Config(image_size=32, num_head_channels=32, timestep_respacing='10')
    loaded, diffusion = ddpm_ip.load_network(str(tmp_path / 'released.pt'), c, 'cpu')
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    torch.testing.assert_close(loaded(x, t), tiny(x, t))
    assert diffusion.num_timesteps == 10 and diffusion.timestep_map[-1].item() == 999
    images = ddpm_ip.generate_images(ddpm_ip.make_denoiser(loaded, 'fp32'), diffusion, [0, 1], (3, 32, 32), 0, 'cpu', c)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8

def test_a_snapshot_allocates_nothing_from_the_sizes_it_claims(tmp_path, capsys):
    """Issue 23 item 4: the network of a snapshot is built on the meta device and checked against the file's
    tensors before anything is allocated: a 1 KB file that claims 65,536 channels, a bogus keyword or a stride-0
    tensor is one line and exit 2, not gigabytes and a traceback."""
    tiny = dict(nets.UNET_PRESETS['tiny-adm'])
    cases = [(dict(tiny, model_channels=1 << 16), {'out.2.weight': torch.zeros(6, 1, 3, 3)}),
             (dict(tiny, bogus=1), {}),
             (tiny, {'out.2.weight': torch.zeros(1).expand(1 << 20, 1 << 20)})]
    for kwargs, ema in cases:
        path = tmp_path / 'snapshot.pt'
        torch.save(dict(net_kwargs=kwargs, ema=ema, diffusion_steps=1000, noise_schedule='cosine', config={}), path)
        assert os.path.getsize(path) < 1 << 20
        assert run_main(['generate', f'--network={path}', f'--outdir={tmp_path}/gen']) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('ddpm_ip.py: error: --network'), err
    assert not (tmp_path / 'gen').exists()


def test_data_is_read_through_fid_with_official_file_name_labels(tmp_path, monkeypatch):
    """--data goes through fid.read_image_set (which owns the cifar10 download and its checksum: tests/test_fid.py);
    the official '<class>_<n>.png' file names give labels where the folder has none."""
    seen = []
    monkeypatch.setattr(ddpm_ip.fid, 'read_image_set', lambda source, **kwargs: seen.append(source) or
                        (np.zeros((2, 3, 4, 4), np.uint8), np.array([1, 0])))
    x, y = ddpm_ip.load_dataset('cifar10')
    assert seen == ['cifar10'] and x.shape == (2, 3, 4, 4) and y.tolist() == [1, 0]
    monkeypatch.undo()
    for name in ('cat_1.png', 'dog_2.png', 'cat_3.png'):
        ddpm_ip.PIL.Image.new('RGB', (4, 4)).save(tmp_path / name)
    x, y = ddpm_ip.load_dataset(str(tmp_path))
    assert x.shape == (3, 3, 4, 4) and y.tolist() == [0, 0, 1]  # sorted: cat_1, cat_3, dog_2
    assert not hasattr(ddpm_ip, 'requests')  # no downloader of its own


# ----------------------------------------------------------------------------------------------------------------------
# Command line: tiny runs on 8x8 images (the embedded CIFAR-10 sample, box-downsampled)

TINY_NET = ['--preset=tiny', '--channel_mult=1,2', '--num_res_blocks=1', '--attention_resolutions=4', '--batch=8',
            '--tick=0.016', '--snap=2', '--grid=4', '--grid_steps=5', '--seed=1']


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    with np.load(TINY_DATA) as npz:
        x, y = npz['x'], npz['y']
    x = x.reshape(-1, 8, 4, 8, 4, 3).mean((2, 4)).round().astype(np.uint8)  # (200, 8, 8, 3)
    path = tmp_path_factory.mktemp('data') / 'small.npz'
    np.savez(path, x=x[:64], y=y[:64])
    return str(path)


def run_main(args):
    """ddpm_ip.main in this process; returns the exit code."""
    try:
        ddpm_ip.main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def only_run_dir(outdir):
    runs = sorted(os.listdir(outdir))
    assert len(runs) == 1, runs
    return os.path.join(outdir, runs[0])


def test_train_generate_eval_exposure_end_to_end(small_data, tmp_path, monkeypatch, capsys):
    import fid
    outdir = tmp_path / 'runs'
    assert run_main(['train', f'--data={small_data}', f'--outdir={outdir}', '--kimg=0.032', *TINY_NET]) == 0
    run_dir = only_run_dir(outdir)
    files = set(os.listdir(run_dir))
    assert {'config.json', 'log.txt', 'stats.jsonl', 'source.py', 'data-preview.png', 'network-snapshot-000000.pt',
            'training-state-000000.pt', 'samples-000000.png'} <= files
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert [s['nimg'] for s in stats] == [16, 32] and all(math.isfinite(s['loss']) for s in stats)
    assert {'mse_q0', 'mse_q3', 'vb', 'grad_norm', 'img_per_sec'} <= set(stats[0])
    network = os.path.join(run_dir, 'network-snapshot-000000.pt')

    # generate: image k depends only on seed k, whatever the batch.
    for batch in (1, 3):
        code = run_main(['generate', f'--network={network}', '--seeds=0-3', f'--outdir={tmp_path}/gen{batch}',
                         f'--batch={batch}', '--timestep_respacing=ddim5', '--use_ddim'])
        assert code == 0
    names = sorted(os.listdir(tmp_path / 'gen1'))
    assert names == ['000000.png', '000001.png', '000002.png', '000003.png']
    for name in names:
        a, b = (np.asarray(ddpm_ip.PIL.Image.open(tmp_path / f'gen{k}' / name)) for k in (1, 3))
        assert a.shape == (8, 8, 3) and np.array_equal(a, b)

    # eval: KID against statistics of the training images, with a random-weight Inception (FID would spend most of
    # this test's time in the 2048 x 2048 matrix square root; the plumbing is the same).
    weights = tmp_path / 'inception.pth'
    torch.save(fid.InceptionV3().state_dict(), weights)
    monkeypatch.setenv('FID_WEIGHTS', str(weights))
    with np.load(small_data) as npz:
        ref = fid.compute_stats([torch.from_numpy(npz['x'][:8]).permute(0, 3, 1, 2)], progress=False)
    fid.save_ref(str(tmp_path / 'ref.npz'), ref)
    assert run_main(['eval', f'--network={network}', f'--ref={tmp_path}/ref.npz', '--num=4', '--batch=4',
                     '--timestep_respacing=5', '--metrics=kid']) == 0
    record = json.loads(open(os.path.join(run_dir, 'metrics-ddpm_ip.jsonl')).readlines()[-1])
    assert record['num'] == 4 and math.isfinite(record['kid']) and record['timestep_respacing'] == '5'
    assert 'protocol' in record and 'preprocess' in record  # fid.resolve_protocol's choice, in the metrics JSON
    # fid.resolve_protocol's checks run before sampling: an unknown protocol is one line, exit 2.
    assert run_main(['eval', f'--network={network}', f'--ref={tmp_path}/ref.npz', '--protocol=bogus']) == 2
    assert 'unknown protocol' in capsys.readouterr().err

    # exposure: delta_t per step of 5-step chains started from real images.
    assert run_main(['exposure', f'--network={network}', f'--data={small_data}', '--num=8', '--batch=4',
                     '--timestep_respacing=5', '--forward_t=3']) == 0
    record = json.loads(open(os.path.join(run_dir, 'exposure-ddpm_ip.jsonl')).readlines()[-1])
    assert [row['t'] for row in record['per_step']] == [500, 250, 0]  # '5' keeps 0 250 500 749 999
    assert all(math.isfinite(row['delta']) for row in record['per_step']) and record['num'] == 8


def test_training_step_feeds_gamma_and_independent_noises_to_the_ip_loss(small_data, tmp_path, monkeypatch):
    seen = []

    def spy(net, diffusion, x0, t, eps, xi, gamma, rescale_learned_sigmas=True, class_labels=None):
        seen.append((gamma, eps, xi))
        return ip_loss(net, diffusion, x0, t, eps, xi, gamma, rescale_learned_sigmas, class_labels)
    ip_loss = ddpm_ip.ip_loss
    monkeypatch.setattr(ddpm_ip, 'ip_loss', spy)
    assert run_main([f'--data={small_data}', f'--outdir={tmp_path}', *TINY_NET, '--kimg=0.008', '--input_pertub=0.15',
                     '--batch_gpu=4']) == 0
    assert [gamma for gamma, _, _ in seen] == [0.15, 0.15]  # one step, two accumulation rounds, official alias
    eps, xi = (torch.cat([s[k] for s in seen]) for k in (1, 2))
    assert eps.shape == (8, 3, 8, 8) and abs(torch.corrcoef(torch.stack([eps.flatten(), xi.flatten()]))[0, 1]) < 0.1


def test_resume_reproduces_the_uninterrupted_run_bitwise(small_data, tmp_path):
    args = [f'--data={small_data}', *TINY_NET, '--schedule_sampler=loss-second-moment', '--dropout=0.1']
    assert run_main([*args, f'--outdir={tmp_path}/a', '--kimg=0.048']) == 0
    assert run_main([*args, f'--outdir={tmp_path}/b', '--kimg=0.032', '--resume=auto']) == 0  # nothing to resume
    # As if killed (kill -9) after one more tick but before the next state: a progress line the state does not
    # cover, a line cut short and a half-written temporary file. None may leak into the resumed run.
    run_b = only_run_dir(tmp_path / 'b')
    with open(os.path.join(run_b, 'stats.jsonl'), 'a') as f:
        f.write(json.dumps(dict(nimg=48, kimg=0.048, loss=123.0)) + '\n{"kimg": 0.0')
    open(os.path.join(run_b, 'training-state-000000.pt.tmp999'), 'wb').write(b'partial')
    assert run_main([*args, f'--outdir={tmp_path}/b', '--kimg=0.048', '--resume=auto']) == 0
    run_a = only_run_dir(tmp_path / 'a')
    assert only_run_dir(tmp_path / 'b') == run_b  # resumed in the same folder
    state_a, state_b = (torch.load(os.path.join(r, 'training-state-000000.pt'), weights_only=True)
                        for r in (run_a, run_b))
    assert state_a['cur_nimg'] == state_b['cur_nimg'] == 48
    for key, weights in (('model', lambda s: s['model']), ('ema', lambda s: s['emas'][0])):
        for name, value in weights(state_a).items():
            assert torch.equal(value, weights(state_b)[name]), f'{key}.{name}'
    assert torch.equal(state_a['sampler_history'], state_b['sampler_history'])
    stats_a, stats_b = ([json.loads(line) for line in open(os.path.join(r, 'stats.jsonl'))] for r in (run_a, run_b))
    assert [s['loss'] for s in stats_a] == [s['loss'] for s in stats_b] and len(stats_a) == 3
    # Resuming a finished run trains no further step.
    assert run_main([*args, f'--outdir={tmp_path}/a', '--kimg=0.048', '--resume=auto']) == 0
    assert len(open(os.path.join(run_a, 'stats.jsonl')).readlines()) == 3
    assert torch.equal(torch.load(os.path.join(run_a, 'training-state-000000.pt'), weights_only=True)['model'][name],
                       state_a['model'][name])


def test_two_process_ddp_matches_one_process(small_data, tmp_path):
    args = [f'--data={small_data}', *TINY_NET, '--kimg=0.032', '--batch_gpu=2']  # 2 accumulation rounds per GPU
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               os.path.join(ROOT, 'ddpm_ip.py'), f'--outdir={tmp_path}/ddp', *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_main([f'--outdir={tmp_path}/single', *args]) == 0
    states = [torch.load(os.path.join(only_run_dir(tmp_path / name), 'training-state-000000.pt'), weights_only=True)
              for name in ('ddp', 'single')]
    for name, value in states[0]['model'].items():
        torch.testing.assert_close(value, states[1]['model'][name], rtol=1e-4, atol=1e-5, msg=name)
    assert len(states[0]['cpu_rng']) == 2  # each rank's dropout stream is saved for resume
    # The timestep sampler saw the gathered losses in the same (global) order as the single process.
    torch.testing.assert_close(states[0]['sampler_history'], states[1]['sampler_history'], rtol=1e-4, atol=1e-6)
    assert states[0]['sampler_history'].abs().sum() > 0
    losses = [[json.loads(line)['loss'] for line in open(os.path.join(only_run_dir(tmp_path / name), 'stats.jsonl'))]
              for name in ('ddp', 'single')]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_bad_input_gives_one_error_line_and_writes_nothing(small_data, tmp_path, capsys):
    outdir = tmp_path / 'runs'
    cases = [
        (['--input_perturbation=-0.1'], 2, '--input_perturbation must be >= 0'),
        (['--input_pertub=nan'], 2, '--input_perturbation must be >= 0'),
        (['--batch=7', '--batch_gpu=2'], 2, '--batch_gpu must divide'),
        (['--timestep_respacing=ddim999'], 2, '--timestep_respacing'),
        (['--noise_schedule=quadratic'], 2, '--noise_schedule'),
        (['--preset=huge'], 2, '--preset'),
        (['--learn_sigma=maybe'], 2, 'expected True or False'),
        (['--arch=tiny'], 2, '--arch must be one of'),  # an EDM network: wrong time input, not the official UNet
    ]
    for flags, code, message in cases:
        assert run_main([f'--data={small_data}', f'--outdir={outdir}', *flags]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('ddpm_ip.py: error:') and message in err[0], (flags, err)
    assert not outdir.exists()

    # Missing data, a corrupt image, mixed sizes, negative labels, a truncated .npz: exit 2, one line, nothing written.
    folder = tmp_path / 'images'
    folder.mkdir()
    ddpm_ip.PIL.Image.new('RGB', (8, 8)).save(folder / 'a.png')
    (folder / 'b.png').write_bytes(b'not a png')
    mixed = tmp_path / 'mixed'
    mixed.mkdir()
    ddpm_ip.PIL.Image.new('RGB', (8, 8)).save(mixed / 'a.png')
    ddpm_ip.PIL.Image.new('RGB', (16, 16)).save(mixed / 'b.png')
    labels = tmp_path / 'labels.npz'
    np.savez(labels, x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, -1, 2]))
    truncated = tmp_path / 'truncated.npz'
    truncated.write_bytes(open(small_data, 'rb').read()[:500])
    for data, message in ((tmp_path / 'missing', 'no image folder, zip or .npz'), (folder, 'cannot read image'),
                          (mixed, 'b.png is 16x16'), (labels, 'labels must be integers'),
                          (truncated, 'cannot read images from')):
        assert run_main([f'--data={data}', f'--outdir={outdir}', '--class_cond', *TINY_NET]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not outdir.exists()

    # A truncated training state to resume from.
    (tmp_path / 'state.pt').write_bytes(b'partial')
    assert run_main([f'--data={small_data}', f'--outdir={tmp_path}/resumed', f'--resume={tmp_path}/state.pt',
                     *TINY_NET]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('ddpm_ip.py: error: --resume: cannot load'), err

    # Sampling commands: a missing network, a missing reference, an unknown metric.
    assert run_main(['generate', '--network=missing.pt', f'--outdir={tmp_path}/gen']) == 2
    assert 'no file missing.pt' in capsys.readouterr().err
    released = tmp_path / 'released.pt'
    torch.save(nets.UNet(**nets.UNET_PRESETS['tiny-adm']).state_dict(), released)
    assert run_main(['eval', f'--network={released}', f'--ref={tmp_path}/missing.npz', '--num_head_channels=32']) == 2
    assert 'reference not found' in capsys.readouterr().err
    assert run_main(['eval', f'--network={released}', '--ref=ref.npz', '--metrics=fid,bogus']) == 2
    assert '--metrics must be among' in capsys.readouterr().err
    assert not (tmp_path / 'gen').exists()


# ----------------------------------------------------------------------------------------------------------------------
# Drop-in for forever208/DDPM-IP: respacing, the README commands, official checkpoints, failure paths, --help


def official_rule(steps, section_counts):
    """guided-diffusion respace.py space_timesteps, written out: equal sections (the first ones one longer), each
    walked with a fractional stride added up step by step and rounded (half to even) at every step."""
    counts = [int(n) for n in section_counts.split(',')]
    kept, start = set(), 0
    for i, count in enumerate(counts):
        size = steps // len(counts) + (i < steps % len(counts))
        stride, position = ((size - 1) / (count - 1) if count > 1 else 1), 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position = position + stride
        start += size
    return sorted(kept)


def test_space_timesteps_equals_the_official_rule_for_every_count():
    for count in range(1, 1001):
        assert ddpm_ip.space_timesteps(1000, str(count)) == official_rule(1000, str(count)), count
    assert ddpm_ip.space_timesteps(1000, '21') == [0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 499, 549, 599, 649,
                                                   699, 749, 799, 849, 899, 949, 999]  # the official function's
    for text in ('10,15,20', '7,0,3', '1,1,1,1', '334,333,333', '250,0,250,0'):
        assert ddpm_ip.space_timesteps(1000, text) == official_rule(1000, text), text
    assert ddpm_ip.space_timesteps(4000, '1999,1') == official_rule(4000, '1999,1')
    assert ddpm_ip.space_timesteps(1000, '0,10')[0] == 500  # an empty first section is accepted, as official
    for bad in ('0', '0,0', '-1', '1001', 'ddim0'):
        with pytest.raises(ValueError):
            ddpm_ip.space_timesteps(1000, bad)


# The seed repository's README commands, verbatim (forever208/DDPM-IP README.md).
README_TRAIN = {
    'cifar10': """--input_pertub 0.15 --data_dir PATH_TO_DATASET --image_size 32 --use_fp16 True --num_channels 128
        --num_head_channels 32 --num_res_blocks 3 --attention_resolutions 16,8 --resblock_updown True
        --use_new_attention_order True --learn_sigma True --dropout 0.3 --diffusion_steps 1000 --noise_schedule cosine
        --use_scale_shift_norm True --rescale_learned_sigmas True --schedule_sampler loss-second-moment --lr 1e-4
        --batch_size 64""",
    'imagenet32': """--input_pertub 0.1 --data_dir PATH_TO_DATASET --image_size 32 --use_fp16 True --num_channels 128
        --num_head_channels 32 --num_res_blocks 3 --attention_resolutions 16,8 --resblock_updown True
        --use_new_attention_order True --learn_sigma True --dropout 0.3 --diffusion_steps 1000 --noise_schedule cosine
        --rescale_learned_sigmas True --schedule_sampler loss-second-moment --lr 1e-4 --batch_size 128""",
    'lsun64': """--input_pertub 0.1 --data_dir PATH_TO_DATASET --image_size 64 --use_fp16 True --num_channels 192
        --num_head_channels 64 --num_res_blocks 3 --attention_resolutions 32,16,8 --resblock_updown True
        --use_new_attention_order True --learn_sigma True --dropout 0.1 --diffusion_steps 1000 --noise_schedule cosine
        --use_scale_shift_norm True --rescale_learned_sigmas True --schedule_sampler loss-second-moment --lr 1e-4
        --batch_size 16""",
    'celeba64': """--input_pertub 0.1 --data_dir PATH_TO_DATASET --image_size 64 --use_fp16 True --num_channels 192
        --num_head_channels 64 --num_res_blocks 3 --attention_resolutions 32,16,8 --resblock_updown True
        --use_new_attention_order True --learn_sigma True --dropout 0.1 --diffusion_steps 1000 --noise_schedule cosine
        --use_scale_shift_norm True --rescale_learned_sigmas True --schedule_sampler loss-second-moment --lr 1e-4
        --batch_size 16""",
    'ffhq128': """--input_pertub 0.1 --data_dir PATH_TO_DATASET --image_size 128 --use_fp16 True --num_channels 256
        --num_head_channels 64 --num_res_blocks 3 --attention_resolutions 32,16,8 --resblock_updown True
        --use_new_attention_order True --learn_sigma True --dropout 0.1 --diffusion_steps 1000 --noise_schedule cosine
        --use_scale_shift_norm True --rescale_learned_sigmas True --schedule_sampler loss-second-moment --lr 1e-4
        --batch_size 8""",
}
README_SAMPLE = """--image_size 32 --timestep_respacing 100 --model_path PATH_TO_CHECKPOINT --num_channels 128
    --num_head_channels 32 --num_res_blocks 3 --attention_resolutions 16,8 --resblock_updown True
    --use_new_attention_order True --learn_sigma True --dropout 0.3 --diffusion_steps 1000 --noise_schedule cosine
    --use_scale_shift_norm True --batch_size 256 --num_samples 50000"""
OFFICIAL_PARAMETERS = dict(cifar10=57_094_662, imagenet32=57_094_662, lsun64=295_136_454, celeba64=295_136_454,
                           ffhq128=542_811_398)
SMALL = ['--image_size=4', '--channel_mult=1,2', '--num_channels=32', '--num_res_blocks=1', '--attention_resolutions=2',
         '--num_head_channels=32']  # sizes for CPU runs, appended to the official command lines


@pytest.fixture(scope='module')
def data4(small_data, tmp_path_factory):
    """The 8x8 images box-downsampled to 4x4, for runs of a few thousand images."""
    with np.load(small_data) as npz:
        x, y = npz['x'], npz['y']
    path = tmp_path_factory.mktemp('data4') / 'data4.npz'
    np.savez(path, x=x.reshape(-1, 4, 2, 4, 2, 3).mean((2, 4)).round().astype(np.uint8), y=y)
    return str(path)


def test_readme_commands_build_the_official_networks_and_run_as_written(data4, tmp_path):
    # The networks the commands resolve to, counted on the meta device.
    for name, text in README_TRAIN.items():
        command, c = ddpm_ip.parse_args(text.split())
        c = ddpm_ip.check_config(c, command, 1)
        with torch.device('meta'):
            net = nets.UNet(**ddpm_ip.net_config(c, c.image_size, 3, 0))
        assert command == 'train' and sum(p.numel() for p in net.parameters()) == OFFICIAL_PARAMETERS[name], name
        assert c.rescale_learned_sigmas and c.use_scale_shift_norm is not False and c.precision == 'bf16'
    command, c = ddpm_ip.parse_args(README_SAMPLE.split())  # no command word: image_sample.py's flags mean sample
    assert command == 'sample' and (c.batch, c.seeds, c.timestep_respacing) == (256, '0-49999', '100')

    # Each training command as written, on 8x8 data, one step (official --lr_anneal_steps).
    for name, text in README_TRAIN.items():
        argv = text.replace('PATH_TO_DATASET', data4).split() + SMALL + [
            '--batch_size=4', '--lr_anneal_steps=1', f'--outdir={tmp_path}/{name}', '--grid=2', '--grid_steps=2']
        assert run_main(argv) == 0, name
        state = torch.load(os.path.join(only_run_dir(tmp_path / name), 'training-state-000000.pt'), weights_only=True)
        assert state['cur_nimg'] == 4 and state['config']['input_perturbation'] == (0.15 if name == 'cifar10' else 0.1)

    # The sampling command as written, with a released-layout checkpoint (a plain state dict), class-conditional too.
    for label_dim in (0, 10):
        torch.manual_seed(0)
        net = nets.UNet(**ddpm_ip.net_config(ddpm_ip.parse_args(SMALL)[1], 4, 3, label_dim))
        torch.save(net.state_dict(), tmp_path / f'model{label_dim}.pt')
        outdir = tmp_path / f'samples{label_dim}'
        argv = README_SAMPLE.replace('PATH_TO_CHECKPOINT', str(tmp_path / f'model{label_dim}.pt')).split() + SMALL + [
            '--num_samples=3', '--batch_size=2', '--timestep_respacing=4', f'--outdir={outdir}']
        assert run_main(argv) == 0
        with np.load(outdir / 'samples_3x4x4x3.npz') as npz:
            assert sorted(npz.files) == (['arr_0', 'arr_1'] if label_dim else ['arr_0'])
            assert npz['arr_0'].dtype == np.uint8 and npz['arr_0'].shape == (3, 4, 4, 3)
            for k in range(3):  # the per-seed PNGs hold the same images
                png = np.asarray(ddpm_ip.PIL.Image.open(outdir / f'{k:06d}.png'))
                assert np.array_equal(png, npz['arr_0'][k])
            if label_dim:
                assert npz['arr_1'].shape == (3,) and ((0 <= npz['arr_1']) & (npz['arr_1'] < 10)).all()


def official_checkpoint_files(folder, net, step, fp16):
    """modelNNNNNN.pt, ema_0.9999_NNNNNN.pt and optNNNNNN.pt as guided-diffusion train_util.py writes them; with
    fp16 the AdamW state is over two flat master tensors (vectors, then matrices as (1, n)), as fp16_util.py."""
    model = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(model, folder / f'model{step:06d}.pt')
    torch.save({k: v + 1 for k, v in model.items()}, folder / f'ema_0.9999_{step:06d}.pt')
    names = list(model)
    moments = {n: torch.full_like(model[n], 1000.0 + i) for i, n in enumerate(names)}  # distinct per parameter
    if fp16:
        groups = [[n for n in names if model[n].ndim <= 1], [n for n in names if model[n].ndim > 1]]
        flat = [torch.cat([moments[n].flatten() for n in g]).view(shape) for g, shape in zip(groups, ((-1,), (1, -1)))]
        state = {i: dict(step=torch.tensor(float(step)), exp_avg=f, exp_avg_sq=f.square()) for i, f in enumerate(flat)}
    else:
        state = {i: dict(step=torch.tensor(float(step)), exp_avg=moments[n], exp_avg_sq=moments[n].square())
                 for i, n in enumerate(names)}
    group = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, params=list(range(len(state))))
    torch.save(dict(state=state, param_groups=[group]), folder / f'opt{step:06d}.pt')
    return model, moments


def test_official_resume_checkpoint_continues_at_its_step(data4, tmp_path, capsys):
    args = [f'--data_dir={data4}', *SMALL, '--batch_size=4', '--grid=2', '--grid_steps=2', '--dropout=0']
    net = nets.UNet(**ddpm_ip.net_config(ddpm_ip.parse_args(SMALL)[1], 4, 3, 0))
    for fp16 in (False, True):
        folder = tmp_path / f'official{fp16}'
        folder.mkdir()
        model, moments = official_checkpoint_files(folder, net, 5, fp16)
        outdir = tmp_path / f'runs{fp16}'
        # One step: 5 -> 6. Without --lr_anneal_steps the lr is the optimizer file's (1e-4), not --lr, as official.
        length = ['--lr_anneal_steps=6'] if not fp16 else ['--kimg=0.024', '--lr=0.005']
        assert run_main([*args, f'--resume_checkpoint={folder}/model000005.pt', *length,
                         f'--outdir={outdir}']) == 0
        assert 'resumed from the official' in capsys.readouterr().out
        run_dir = only_run_dir(outdir)
        state = torch.load(os.path.join(run_dir, 'training-state-000000.pt'), weights_only=True)
        assert state['cur_nimg'] == 24  # step 6 x 4 images
        ours = nets.UNet(**state['net_kwargs'])
        names = [n for n, _ in ours.named_parameters()]
        for i, name in enumerate(names):  # Adam's first moment: 0.9 x the official one + 0.1 x a small gradient
            assert state['optimizer']['state'][i]['step'].item() == 6
            torch.testing.assert_close(state['optimizer']['state'][i]['exp_avg'], 0.9 * moments[name], rtol=1e-3,
                                       atol=0.5)
        assert state['optimizer']['param_groups'][0]['lr'] == pytest.approx(1e-4 if fp16 else 1e-4 / 6)  # annealed
        ema = torch.load(os.path.join(run_dir, 'network-snapshot-000000.pt'), weights_only=True)['ema']
        torch.testing.assert_close(ema[names[0]], model[names[0]] + 1, rtol=0, atol=1e-3)  # the official EMA file

    # Unusable files: one line, exit 2, before a run folder exists.
    bad = tmp_path / 'bad'
    bad.mkdir()
    torch.save({k: v[:1] for k, v in model.items()}, bad / 'model000003.pt')
    (tmp_path / 'official0').mkdir()
    official_checkpoint_files(tmp_path / 'official0', net, 3, False)
    (tmp_path / 'official0' / 'opt000003.pt').write_bytes(b'')
    for path, message in ((bad / 'model000003.pt', 'does not hold the weights of this network'),
                          (tmp_path / 'official0' / 'model000003.pt', 'opt000003.pt is empty (0 bytes)')):
        assert run_main([*args, f'--resume_checkpoint={path}', f'--outdir={tmp_path}/never']) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / 'never').exists()


def test_failure_paths_one_line_and_nothing_lost(small_data, data4, tmp_path, monkeypatch, capsys):
    def fails(argv, code, message):
        assert run_main(argv) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('ddpm_ip.py: error: ') and message in err[0], err

    # Bad input, before anything is written: exit 2.
    huge = tmp_path / 'huge.npz'
    np.savez(huge, x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, 10 ** 6, 2]))
    fails([f'--data={huge}', '--class_cond', *TINY_NET, f'--outdir={tmp_path}/out'], 2, 'label 1000000')
    chw = tmp_path / 'chw.npz'
    np.savez(chw, x=np.zeros((4, 3, 8, 8), np.uint8))
    fails([f'--data={chw}', *TINY_NET, f'--outdir={tmp_path}/out'], 2, 'channels first')
    (tmp_path / 'empty.pt').write_bytes(b'')
    fails([f'--data={small_data}', *TINY_NET, f'--resume={tmp_path}/empty.pt', f'--outdir={tmp_path}/out'], 2,
          'is empty (0 bytes)')
    fails(['generate', f'--network={tmp_path}/empty.pt', '--seeds=5-1'], 2, 'the range 5-1 is empty')
    (tmp_path / 'file').write_bytes(b'')
    fails([f'--data={small_data}', *TINY_NET, f'--outdir={tmp_path}/file/runs'], 2, 'is a file, not a folder')
    fails([f'--data={small_data}', '--use_checkpoint', 'True'], 2, '--use_checkpoint=True (official flag) is not '
          'supported: gradient checkpointing is not implemented; use --batch_gpu')
    fails([f'--data={small_data}', '--num_head_channels=-1', '--num_heads_upsample=2'], 2, '--num_heads_upsample')
    fails([f'--data={small_data}', '--sigma_small', 'True'], 2, 'unrecognized arguments')
    fails([f'--data={small_data}', '--lr_anneal', '5'], 2, 'unrecognized arguments')  # no prefix matching
    assert not (tmp_path / 'out').exists()

    # A full disk at the second training state: exit 1, one line, no partial file, no snapshot newer than the state.
    args = [f'--data={data4}', *SMALL, '--batch=250', '--tick=1', '--snap=1', '--dump=2', '--kimg=3', '--grid=1',
            '--grid_steps=2', '--ema_rate=0.99,0.9', f'--outdir={tmp_path}/runs']
    real_write, writes = nets.write_atomic, []

    def full_disk_write(path, data):
        if 'training-state-000002' in str(path):
            writes.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_write(path, data)
    monkeypatch.setattr(nets, 'write_atomic', full_disk_write)
    fails(args, 1, 'training-state-000002.pt: No space left on device')
    monkeypatch.undo()
    run_dir = only_run_dir(tmp_path / 'runs')
    assert '-gpus' not in run_dir and writes
    assert sorted(f for f in os.listdir(run_dir) if f.endswith('.pt')) == [
        'network-snapshot-000001-ema0.9.pt', 'network-snapshot-000001.pt', 'training-state-000001.pt']
    open(os.path.join(run_dir, 'network-snapshot-000009.pt.tmp'), 'wb').write(b'partial')  # as after a kill -9

    # --resume=auto continues there (even from a state saved by another process count), keeps every --dump-th state.
    state = torch.load(os.path.join(run_dir, 'training-state-000001.pt'), weights_only=True)
    state['cpu_rng'].append(state['cpu_rng'][0])
    torch.save(state, os.path.join(run_dir, 'training-state-000001.pt'))
    assert run_main([*args, '--resume=auto']) == 0
    assert 'with 1 processes instead of 2' in capsys.readouterr().out
    assert only_run_dir(tmp_path / 'runs') == run_dir
    states = sorted(f for f in os.listdir(run_dir) if f.startswith('training-state'))
    assert states == ['training-state-000002.pt', 'training-state-000003.pt']  # 1 replaced, no .tmp left
    assert len([f for f in os.listdir(run_dir) if f.startswith('network-snapshot')]) == 6  # kimg 1 to 3, two EMAs
    assert not [f for f in os.listdir(run_dir) if '.tmp' in f]

    # A network snapshot where a training state is expected, and the other way round: say which file is which.
    snapshot, state = (os.path.join(run_dir, f'{kind}-000003.pt') for kind in ('network-snapshot', 'training-state'))
    fails([*args, f'--resume={snapshot}'], 2, 'is a network snapshot (EMA weights only); give a training-state')
    fails(['generate', f'--network={state}', f'--outdir={tmp_path}/gen'], 2, 'is a training state')
    fails(['generate', f'--network={snapshot}', '--num_channels=64'], 2, '--num_channels 64 contradicts')


def test_help_layout_and_official_flag_spellings(capsys, monkeypatch):
    assert run_main(['--help']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == 'usage: ddpm_ip.py [COMMAND] [--flag=value ...]' and 'Input Perturbation' in out[1]
    assert out[2] == 'commands:' and [line.split()[0] for line in out[3:8]] == ['train', 'sample', 'generate', 'eval',
                                                                                  'exposure']
    assert out[-1] == "Run 'python ddpm_ip.py COMMAND --help' for the flags of a command."
    titles = ['data and corruption', 'network', 'optimisation', 'run', 'sampling', 'evaluation']
    for command in ('train', 'sample', 'generate', 'eval', 'exposure'):
        assert run_main([command, '--help']) == 0
        text = capsys.readouterr().out
        found = [t for t in titles if f'\n{t}:\n' in text]
        assert found == sorted(found, key=titles.index) and len(found) >= 3, (command, found)
        body = text.split(f'\n{found[0]}:\n', 1)[1]
        flags = '\n'.join(line for line in body.splitlines() if line.startswith('  '))
        entries = [e for e in re.split(r'\n  (?=-)', '\n' + flags)[1:] if not e.startswith('-h')]
        assert len(entries) >= 20, command
        for entry in entries:
            assert re.search(r'\((default: [^)]*|required)\)$', ' '.join(entry.split())), (command, entry)
    assert 'official: --input_pertub' in ' '.join(text.split())

    # Official step-counted intervals, per-GPU batches, comma lists of EMA rates, accepted values of refused flags.
    monkeypatch.setenv('WORLD_SIZE', '2')
    _, c = ddpm_ip.parse_args(['--data=x', '--batch_size=8', '--log_interval=10', '--save_interval=30',
                               '--ema_rate=0.9999,0.999', '--use_checkpoint', 'False', '--microbatch=-1'])
    checked = ddpm_ip.check_config(c, 'train', 2)
    assert (checked.batch, checked.tick, checked.snap, checked.batch_gpu, checked.ema_rate) == \
        (16, 0.16, 3, 8, '0.9999,0.999')
    assert (c.tick, c.snap, c.batch_gpu) == (50, 25, -1)  # check_config returns a new config, c is unchanged


def test_official_flag_table_covers_every_official_flag_and_the_docs_show_it():
    """Every flag of image_train.py / image_sample.py (guided-diffusion script_util.py + --input_pertub) has a row,
    and docs/ddpm_ip.md holds the table generated from OFFICIAL_FLAGS."""
    model = ('image_size num_channels num_res_blocks num_heads num_heads_upsample num_head_channels '
             'attention_resolutions channel_mult dropout class_cond use_checkpoint use_scale_shift_norm '
             'resblock_updown use_fp16 use_new_attention_order learn_sigma diffusion_steps noise_schedule '
             'timestep_respacing use_kl predict_xstart rescale_timesteps rescale_learned_sigmas input_pertub').split()
    train = ('data_dir schedule_sampler lr weight_decay lr_anneal_steps batch_size microbatch ema_rate log_interval '
             'save_interval resume_checkpoint fp16_scale_growth').split()
    sample = 'clip_denoised num_samples batch_size use_ddim model_path'.split()
    assert set(ddpm_ip.OFFICIAL_FLAGS['train']) == {f'--{f}' for f in model + train}
    assert set(ddpm_ip.OFFICIAL_FLAGS['sample']) == {f'--{f}' for f in model + sample}
    doc = open(os.path.join(ROOT, 'docs', 'ddpm_ip.md')).read()
    table = doc.split('<!-- official-flags:start -->\n')[1].split('<!-- official-flags:end -->')[0]
    assert table.strip() == ddpm_ip.official_flags_markdown(ddpm_ip.OFFICIAL_FLAGS).strip()


def test_dry_run_shows_the_resolved_network_and_touches_nothing(tmp_path, capsys):
    """The official 64 px command: the network it builds (295,136,454 parameters, channel_mult 1,2,3,4), printed
    without reading the data, downloading or writing."""
    argv = README_TRAIN['celeba64'].replace('PATH_TO_DATASET', str(tmp_path / 'absent')).split()
    assert run_main([*argv, f'--outdir={tmp_path}/runs', '--dry_run']) == 0
    printed = json.loads(capsys.readouterr().out)
    network = printed['resolved_network']
    assert (network['arch'], network['channel_mult'], network['parameters']) == \
        ('adm-lsun64 = adm-celeba64', [1, 2, 3, 4], 295_136_454)
    assert os.listdir(tmp_path) == []


def test_resume_auto_continues_only_the_same_experiment_and_the_lr_is_the_configs(small_data, tmp_path, capsys):
    """Issue 23 item 5: --resume=auto continues a run only when its saved config equals ours (apart from length and
    logging); another data set of the same name or another --lr starts a new folder and says why. A run continued
    from a state (--resume=PATH) trains at the config's lr, not the one in the optimizer state."""
    other = tmp_path / 'other' / os.path.basename(small_data)
    other.parent.mkdir()
    with np.load(small_data) as npz:
        np.savez(other, x=255 - npz['x'], y=npz['y'])
    args = [*TINY_NET, f'--outdir={tmp_path}/runs', '--kimg=0.016']
    assert run_main([f'--data={small_data}', *args]) == 0
    first = only_run_dir(tmp_path / 'runs')
    for changed in ([f'--data={other}'], [f'--data={small_data}', '--lr=0.005']):
        capsys.readouterr()
        assert run_main([*changed, *args, '--kimg=0.032', '--resume=auto']) == 0
        out = capsys.readouterr().out
        assert 'nothing to continue' in out and 'differs' in out, out
    runs = sorted(os.listdir(tmp_path / 'runs'))
    assert len(runs) == 3
    # The same experiment, longer: continued in its folder.
    assert run_main([f'--data={small_data}', *args, '--kimg=0.032', '--resume=auto']) == 0
    assert sorted(os.listdir(tmp_path / 'runs')) == runs and 'continuing' in capsys.readouterr().out
    # --resume=PATH with another lr: the optimizer takes the config's lr.
    state = os.path.join(first, 'training-state-000000.pt')
    assert run_main([f'--data={small_data}', *args, '--kimg=0.048', '--lr=0.005', f'--resume={state}',
                     f'--outdir={tmp_path}/lr']) == 0
    resumed = torch.load(os.path.join(only_run_dir(tmp_path / 'lr'), 'training-state-000000.pt'), weights_only=True)
    assert resumed['optimizer']['param_groups'][0]['lr'] == 0.005 and resumed['config']['lr'] == 0.005


def test_grey_npz_without_labels_keeps_one_channel(tmp_path):
    # An .npz keeps its stored channels (the loader before the shared reader did; grey digits train a 1-channel
    # ADM), and an unlabelled set loads without touching labels.
    x = np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / 'grey.npz', x=x)
    images, labels = ddpm_ip.load_dataset(str(tmp_path / 'grey.npz'))
    assert images.shape == (6, 1, 8, 8) and labels is None
    assert np.array_equal(images[:, 0], x)
