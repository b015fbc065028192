"""DDIM and classifier-free guidance: reference replay and independent derivations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close_rel

from featinv.checkpoint.load import load_into
from featinv.config import PRESETS, DiffusionConfig
from featinv.diffusion.guidance import guided_eps_fn
from featinv.diffusion.samplers import ddim_sample, ddim_schedule, ddim_timesteps, dpmpp_2m_sample, randn_like, sample
from featinv.diffusion.schedule import alphas_cumprod, betas, q_sample
from featinv.nets.model import FeatInv
from featinv.registry import SAMPLERS, STOCHASTIC_SAMPLERS

AC = alphas_cumprod(DiffusionConfig())


def test_timesteps_and_schedule_match_reference(tiny_io):
    ts = ddim_timesteps(10)
    assert torch.equal(ts, tiny_io["ddim_timesteps"])
    assert ddim_timesteps(50)[[0, 1, -1]].tolist() == [1, 21, 981]
    alphas, alphas_prev, sigmas = ddim_schedule(AC, ts, 0.5)
    assert_close_rel(alphas, tiny_io["ddim_alphas"], tol=1e-6, name="alphas")
    assert_close_rel(alphas_prev, tiny_io["ddim_alphas_prev"], tol=1e-6, name="alphas_prev")
    assert_close_rel(sigmas, tiny_io["ddim_eta0p5_sigmas"], tol=1e-6, name="sigmas")
    assert alphas_prev[0] == AC[0]  # the last step lands on ᾱ[0], not 1


@pytest.mark.parametrize("eta, key", [(0.0, "ddim_eta0"), (0.5, "ddim_eta0p5")])
def test_guided_ddim_replays_reference(tiny_sd, tiny_io, eta, key):
    io = tiny_io
    model = FeatInv(PRESETS["tiny"].model).eval()
    load_into(model, tiny_sd)
    calls = []

    def model_fn(x, t, **kw):
        calls.append(x.shape[0])
        return model(x, t, **kw)

    eps_fn = guided_eps_fn(model_fn, dict(context=io["in_context"], feats=io["in_hint"]),
                           dict(context=io["in_uncond_context"], feats=io["in_hint"]), 1.75)
    xs, x0s = [], []
    out = ddim_sample(eps_fn, io["in_x_T"], AC, ddim_timesteps(10), eta=eta,
                      generator=torch.Generator().manual_seed(4321),
                      callback=lambda i, x, x0: (xs.append(x), x0s.append(x0)))
    assert calls == [4] * 10  # both guidance branches in ONE forward per step
    assert_close_rel(out, io[f"{key}_final"], name="final")
    assert_close_rel(torch.stack(xs), io[f"{key}_xs"], name="xs")
    if eta == 0:
        assert_close_rel(torch.stack(x0s), io["ddim_eta0_pred_x0s"], name="pred_x0s")
    else:
        g = torch.Generator().manual_seed(4321)
        assert torch.equal(torch.stack([randn_like(io["in_x_T"], g) for _ in range(10)]), io["ddim_eta0p5_noise"])


def test_ddim_eta0_equals_euler_on_scaled_variable():
    """DDIM(η=0) is an Euler step of dx̃/dσ = ε on x̃ = x/√ᾱ with σ = √((1-ᾱ)/ᾱ)."""
    torch.manual_seed(0)
    w = torch.randn(4, 4)
    eps_fn = lambda x, t: torch.tanh(x @ w) * (t.float()[:, None] / 1000)  # noqa: E731
    x_T, ts = torch.randn(3, 4), ddim_timesteps(5)
    out = ddim_sample(eps_fn, x_T, AC, ts)
    alphas, alphas_prev, _ = ddim_schedule(AC, ts, 0.0)
    sigma = lambda a: ((1.0 - a) / a).sqrt()  # noqa: E731  the VE noise level of x/√ᾱ (k-diffusion's)
    x = x_T
    for i in reversed(range(5)):
        t = torch.full((3,), int(ts[i]))
        s, s_prev = sigma(alphas[i]), sigma(alphas_prev[i])
        x_tilde = x / alphas[i].sqrt() + (s_prev - s) * eps_fn(x, t)
        x = x_tilde * alphas_prev[i].sqrt()
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_oracle_eps_recovers_x0():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ts = ddim_timesteps(20)
    x_T = q_sample(x0, torch.full((2,), int(ts[-1])), noise, AC)
    out = ddim_sample(lambda x, t: noise, x_T, AC, ts)
    # the last step stops at ᾱ[0] = 0.99915, i.e. a tiny amount of the true noise remains
    expected = AC[0].sqrt() * x0 + (1 - AC[0]).sqrt() * noise
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_per_sample_generators_make_samples_independent_of_batch():
    eps_fn = lambda x, t: 0.1 * x  # noqa: E731
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    ts = ddim_timesteps(4)
    x_T = torch.randn(3, 2, 4, 4)
    batch = ddim_sample(eps_fn, x_T, AC, ts, eta=1.0, generator=gens([7, 8, 9]))
    single = ddim_sample(eps_fn, x_T[1:2], AC, ts, eta=1.0, generator=gens([8]))
    assert torch.equal(batch[1:2], single)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        ddim_sample(eps_fn, x_T, AC, ts, eta=1.0, generator=gens([1, 2]))


def test_guidance_scale_one_runs_only_conditional_branch():
    seen = []
    fn = guided_eps_fn(lambda x, t, c: (seen.append(x.shape[0]), x * c)[1], dict(c=torch.tensor(2.0).view(1, 1)),
                       dict(c=torch.tensor(0.0).view(1, 1)), 1.0)
    assert torch.equal(fn(torch.ones(1, 1), torch.zeros(1)), torch.full((1, 1), 2.0)) and seen == [1]


def test_bad_step_count():
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(0)


@pytest.mark.parametrize("steps", [6, 7, 11, 12, 30, 50])
def test_reference_spacing_is_the_reference_list(steps):
    """Issue 10 bug 7: S that does not divide 1000 keeps all ceil(1000 / (1000 // S)) reference steps."""
    expected = np.arange(0, 1000, 1000 // steps) + 1  # the reference's formula, written independently
    assert ddim_timesteps(steps).tolist() == expected.tolist()


def test_reference_spacing_pinned_and_clamped():
    ts = ddim_timesteps(12)
    assert (len(ts), ts[0].item(), ts[-1].item()) == (13, 1, 997)
    assert (len(ddim_timesteps(6)), ddim_timesteps(6)[-1].item()) == (7, 997)
    # S=3, 9: the reference's last entry is t=1000 (out of range); it becomes 999, the rest stay
    assert ddim_timesteps(3).tolist() == [1, 334, 667, 999]
    nine = ddim_timesteps(9)
    assert nine[:-1].tolist() == (np.arange(0, 1000, 111)[:-1] + 1).tolist() and nine[-1] == 999
    assert ddim_timesteps(1000).tolist() == list(range(1, 1000))  # 1..1000 listed; 1000 merges into 999
    out = ddim_sample(lambda x, t: 0.1 * x, torch.ones(1, 2), AC, nine)  # ᾱ[t] indexable: no crash
    assert torch.isfinite(out).all()


def test_trailing_spacing():
    for steps in (1, 3, 7, 12, 50, 1000):
        ts = ddim_timesteps(steps, spacing="trailing")
        assert len(ts) == steps and ts[-1] == 999 and (ts.diff() > 0).all() and ts[0] >= 0
    assert ddim_timesteps(50, spacing="trailing").tolist() == list(range(19, 1000, 20))
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(10, spacing="leading")


def _gaussian_problem(n_train: int = 800):
    """Data x0 ~ N(μ, s²) per dimension on a float64 schedule (the SD schedule from t=200 on, where
    λ(t) is smooth, so the asymptotic order shows at few steps). Returns (ᾱ, exact ε, exact ODE flow)."""
    ac = torch.cumprod(1 - betas(DiffusionConfig()), 0)[-n_train:]
    mu = torch.tensor([0.7, -0.3, 1.2, 0.0], dtype=torch.float64)
    s2 = torch.tensor([0.4, 0.6, 0.8, 1.2], dtype=torch.float64) ** 2

    def eps_fn(x, t):  # E[ε | x_t], x_t = √ᾱ x0 + √(1-ᾱ) ε: √(1-ᾱ)(x - √ᾱ μ) / (ᾱ s² + 1 - ᾱ)
        a = ac[t][:, None]
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s2 + 1 - a)

    def flow(x, a_from, a_to):  # the probability-flow ODE keeps (x - √ᾱ μ)/√(ᾱ s² + 1 - ᾱ) constant
        z = (x - a_from.sqrt() * mu) / (a_from * s2 + 1 - a_from).sqrt()
        return a_to.sqrt() * mu + (a_to * s2 + 1 - a_to).sqrt() * z

    return ac, eps_fn, flow


@pytest.mark.parametrize("name, order", [("ddim", 1), ("dpmpp_2m", 2)])
def test_solvers_converge_at_their_order_on_gaussian_data(name, order):
    ac, eps_fn, flow = _gaussian_problem()
    x_T = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    steps, errors = [10, 20, 40], []
    for n in steps:
        ts = ddim_timesteps(n, len(ac), spacing="trailing")
        out = sample(name, eps_fn, x_T, ac, ts)
        assert out.dtype == torch.float64
        errors.append((out - flow(x_T, ac[ts[-1]], ac[0])).pow(2).mean().sqrt().item())
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope >= 0.8 * order, (errors, slope)
    assert errors[-1] < (0.05 if order == 1 else 1e-3)


def test_dpmpp_first_step_is_ddim_and_lower_order_final():
    torch.manual_seed(0)
    w = torch.randn(4, 4)
    eps_fn = lambda x, t: torch.tanh(x @ w) * (t.float()[:, None] / 1000)  # noqa: E731
    x_T = torch.randn(3, 4)
    one = ddim_timesteps(1, spacing="trailing")
    torch.testing.assert_close(dpmpp_2m_sample(eps_fn, x_T, AC, one), ddim_sample(eps_fn, x_T, AC, one))
    # the first two steps by hand, in the paper's notation (Algorithm 2), float64, uneven steps
    ac = torch.cumprod(1 - betas(DiffusionConfig()), 0)
    x, ts2 = x_T.double(), torch.tensor([100, 400, 900])
    a, s = ac[[900, 400, 100]].sqrt(), (1 - ac[[900, 400, 100]]).sqrt()
    lam, w2 = (a / s).log(), w.double()
    x0 = lambda x, i, t: (x - s[i] * torch.tanh(x @ w2) * t / 1000) / a[i]  # noqa: E731
    x1 = s[1] / s[0] * x - a[1] * torch.expm1(lam[0] - lam[1]) * x0(x, 0, 900)
    h1, h2 = lam[1] - lam[0], lam[2] - lam[1]
    d = (1 + h2 / (2 * h1)) * x0(x1, 1, 400) - h2 / (2 * h1) * x0(x, 0, 900)  # 1/(2r), r = h1/h2
    x2 = s[2] / s[1] * x1 - a[2] * torch.expm1(lam[1] - lam[2]) * d
    steps = []
    dpmpp_2m_sample(lambda x, t: torch.tanh(x @ w2) * (t.double()[:, None] / 1000), x, ac, ts2,
                    callback=lambda i, x, x0: steps.append(x))
    torch.testing.assert_close(steps[1], x2, rtol=1e-12, atol=1e-12)
    ts = ddim_timesteps(5)
    seen = []
    second = dpmpp_2m_sample(eps_fn, x_T, AC, ts, callback=lambda i, x, x0: seen.append(i))
    first = dpmpp_2m_sample(eps_fn, x_T, AC, ts, lower_order_final=True)
    assert seen == list(range(5)) and not torch.allclose(second, ddim_sample(eps_fn, x_T, AC, ts))
    assert not torch.equal(first, second)


def test_sample_dispatch():
    eps_fn = lambda x, t: 0.1 * x  # noqa: E731
    x_T, ts = torch.randn(3, 2, 4, 4), ddim_timesteps(4)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    assert torch.equal(sample("ddim", eps_fn, x_T, AC, ts, eta=1.0, generator=gens),
                       ddim_sample(eps_fn, x_T, AC, ts, eta=1.0,
                                   generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)]))
    batch = sample("dpmpp_2m", eps_fn, x_T, AC, ts)
    assert torch.equal(batch[1:2], sample("dpmpp_2m", eps_fn, x_T[1:2], AC, ts))  # per sample: x_T alone
    assert set(SAMPLERS) == {"ddim", "dpmpp_2m"}
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample("euler", eps_fn, x_T, AC, ts)
    with pytest.raises(ValueError, match="deterministic"):
        sample("dpmpp_2m", eps_fn, x_T, AC, ts, eta=0.5)


def test_every_registered_sampler_takes_the_one_signature():
    """featinv.registry.SAMPLERS: each entry loads, runs as f(eps_fn, x_T, ᾱ, timesteps, *, eta, generator,
    callback, **options), and refuses η != 0 unless it is listed stochastic; sample() passes options through."""
    eps_fn = lambda x, t: 0.1 * x  # noqa: E731
    x_T, ts = torch.randn(2, 3), ddim_timesteps(3)
    for name, entry in SAMPLERS.items():
        fn = entry.load()
        seen = []
        out = fn(eps_fn, x_T, AC, ts, eta=0.0, generator=None, callback=lambda i, x, x0: seen.append(i))
        assert out.shape == x_T.shape and seen == list(range(len(ts))), name
        if name in STOCHASTIC_SAMPLERS:
            noisy = fn(eps_fn, x_T, AC, ts, eta=1.0, generator=torch.Generator().manual_seed(0))
            assert not torch.equal(noisy, out), name
        else:
            with pytest.raises(ValueError, match="deterministic"):
                fn(eps_fn, x_T, AC, ts, eta=0.5)
    assert torch.equal(sample("dpmpp_2m", eps_fn, x_T, AC, ts, lower_order_final=True),
                       dpmpp_2m_sample(eps_fn, x_T, AC, ts, lower_order_final=True))
