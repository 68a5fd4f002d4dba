"""Oracle tests for sde.py: closed forms, quadrature, torch.distributions, and an exact-velocity data set."""
import math

import pytest
import torch

import sde
from toy.manifold import mixture_velocity, ring_distance, ring_means, sample_mixture

SCHEDULES = [(10, 1.0), (20, 5.0), (16, 3.0), (50, 5.0)]


def _simpson(f, a, b, n=20000):
    """Composite Simpson quadrature in float64 (n even)."""
    s = torch.linspace(a, b, n + 1, dtype=torch.float64)
    w = torch.ones(n + 1, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return float((w * f(s)).sum() * (b - a) / (3 * n))


@pytest.mark.parametrize("num_steps,shift", SCHEDULES)
@pytest.mark.parametrize("eta", [0.3, 0.7])
def test_sage_variance_is_the_exact_integral(num_steps, shift, eta):
    sigmas = sde.sigma_schedule(num_steps, shift).double()
    V = sde.step_variances(sigmas, "sage", eta)
    V_flow = sde.step_variances(sigmas, "flow", eta)
    for t in range(num_steps):
        hi, lo = float(sigmas[t]), float(sigmas[t + 1])
        if hi >= 1:  # step 0 is guarded; checked separately below
            continue
        exact = _simpson(lambda s: eta**2 * s / (1 - s), lo, hi)
        assert abs(V[t].item() - exact) <= 1e-6 * exact, (t, V[t].item(), exact)
        # The left-endpoint (flow) rule over-injects noise at every unguarded step.
        assert V_flow[t] > V[t]


@pytest.mark.parametrize("kind", ["dance", "flow", "sage", "cps"])
@pytest.mark.parametrize("num_steps,shift", SCHEDULES)
def test_variances_finite_and_positive_including_sigma_one(kind, num_steps, shift):
    V = sde.step_variances(sde.sigma_schedule(num_steps, shift), kind, 0.5)
    assert torch.isfinite(V).all()
    last = num_steps - 1 if kind == "cps" else num_steps  # cps is deterministic at its last step
    assert (V[:last] > 0).all()
    if kind == "cps":
        assert V[-1] == 0


def test_sigma_one_guards_follow_the_reference_code():
    sigmas = sde.sigma_schedule(20, 5.0)
    s1 = float(sigmas[1])
    eta = 0.5
    # [FlowGRPO]: sigma / (1 - sigma_1) at sigma = 1; [SAGE]: clamp to 1 - guard inside the log only.
    assert sde.step_variance(1.0, s1, "flow", eta).item() == pytest.approx(eta**2 / (1 - s1) * (1 - s1), rel=1e-6)
    g = sde.SAGE_SIGMA_GUARD
    expected = eta**2 * (-(1 - s1) + math.log((1 - s1) / g))
    assert sde.step_variance(1.0, s1, "sage", eta).item() == pytest.approx(expected, rel=1e-6)
    # The sage guard makes step 0 the noisiest step ([SAGE] code behaviour, SPEC §2).
    assert sde.step_variances(sigmas, "sage", eta).argmax() == 0
    # A schedule whose sigma_1 lands above the guard is refused, not given a negative variance.
    with pytest.raises(ValueError, match="SAGE_SIGMA_GUARD"):
        sde.step_variances(sde.sigma_schedule(200, 5.0), "sage", eta)


def test_schedule_shift_and_bad_kind():
    s = sde.sigma_schedule(4, 3.0)
    raw = torch.linspace(1, 0, 5)
    assert torch.allclose(s, 3 * raw / (1 + 2 * raw))
    assert s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()
    with pytest.raises(ValueError, match="unknown SDE kind"):
        sde.step_variance(0.5, 0.4, "euler", 0.5)


@pytest.mark.parametrize("kind", sde.KINDS)
def test_eta_zero_is_the_euler_ode_step(kind):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(6, 3, 4, generator=g), torch.randn(6, 3, 4, generator=g)
    sigma, sigma_next = torch.tensor([0.9, 0.8, 0.5, 0.3, 0.2, 0.1]), torch.tensor([0.7, 0.6, 0.4, 0.1, 0.05, 0.0])
    x_next, mu, std = sde.sde_step(x, v, sigma, sigma_next, kind, 0.0, generator=g)
    euler = x - (sigma - sigma_next).view(-1, 1, 1) * v
    assert torch.allclose(mu, euler, atol=1e-6) and torch.equal(x_next, mu) and (std == 0).all()


def test_cps_keeps_the_path_coefficients():
    """With the exact velocity of a single point, cps lands exactly on the path at sigma_{t+1}."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    sigma, sigma_next, eta = 0.8, 0.5, 0.6
    x = (1 - sigma) * x0 + sigma * eps
    mu, std = sde.step_mean_std(x, eps - x0, sigma, sigma_next, "cps", eta)
    s_t = sigma_next * math.sin(eta * math.pi / 2)
    assert std.item() == pytest.approx(s_t, rel=1e-6)
    assert torch.allclose(mu, (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - s_t**2) * eps, atol=1e-5)
    # Noise coefficient: sqrt(sn^2 - s^2)^2 + s^2 = sn^2, the path's own noise level.
    assert (sigma_next**2 - s_t**2) + std.item() ** 2 == pytest.approx(sigma_next**2, rel=1e-6)


def test_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(2)
    mu, x = torch.randn(4, 2, 3, 5, generator=g), torch.randn(4, 2, 3, 5, generator=g)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0])
    ref = torch.distributions.Normal(mu, std.view(-1, 1, 1, 1)).log_prob(x).flatten(1).mean(1)
    assert torch.allclose(sde.log_prob(x, mu, std), ref, atol=1e-5)
    ref_scalar = torch.distributions.Normal(mu, 0.3).log_prob(x).flatten(1).mean(1)
    assert torch.allclose(sde.log_prob(x, mu, torch.tensor(0.3)), ref_scalar, atol=1e-5)


def _mlp_velocity():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 32), torch.nn.SiLU(), torch.nn.Linear(32, 6))
    return net, lambda x, sigma: net(torch.cat([x, sigma.view(-1, 1).expand(-1, 1)], 1))


@pytest.mark.parametrize("kind", ["flow", "sage", "cps", "dance"])
def test_recomputed_logp_of_a_stored_rollout_gives_ratio_exactly_one(kind):
    net, velocity = _mlp_velocity()
    sigmas = sde.sigma_schedule(8, 3.0)
    traj = sde.rollout(velocity, torch.randn(6, 6), sigmas, kind, 0.7, torch.Generator().manual_seed(3))
    stochastic = traj.is_stochastic
    # Training mixes timesteps inside one batch: every sample at its own step.
    t = torch.tensor([0, 3, 5, 1, 7 if stochastic[7] else 6, 2])
    rows = torch.arange(6)
    x_t, x_next = traj.latents[rows, t], traj.latents[rows, t + 1]
    mu, std = sde.step_mean_std(x_t, velocity(x_t, sigmas[t]), sigmas[t], sigmas[t + 1], kind, 0.7)
    ratio = torch.exp(sde.log_prob(x_next, mu, std) - traj.logp[rows, t])
    assert torch.equal(ratio, torch.ones(6))
    assert torch.equal(mu, traj.mu[rows, t])


def test_per_sample_generators_make_samples_independent_of_batching():
    net, velocity = _mlp_velocity()
    sigmas = sde.sigma_schedule(5, 3.0)
    x_T = torch.randn(4, 6)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(4)]
    full = sde.rollout(velocity, x_T, sigmas, "sage", 0.5, gens())
    half = sde.rollout(velocity, x_T[2:], sigmas, "sage", 0.5, gens()[2:])
    assert torch.allclose(full.latents[2:], half.latents, atol=1e-6)


def _ring_rollout(num_steps, shift, kind, eta, n=4000):
    means = ring_means(8, 1.0)
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    traj = sde.rollout(lambda x, s: mixture_velocity(x, s, means, 0.05), x_T, sde.sigma_schedule(num_steps, shift),
                       kind, eta, torch.Generator().manual_seed(2))
    return traj.latents[:, -1]


@pytest.mark.parametrize("kind", ["flow", "sage", "cps", "dance"])
def test_rollouts_reproduce_the_data_distribution_as_steps_grow(kind):
    data = sample_mixture(4000, ring_means(8, 1.0), 0.05, torch.Generator().manual_seed(0))

    def error(x):  # radial mean and spread, plus occupancy of the 8 modes
        r, r_data = x.norm(dim=-1), data.norm(dim=-1)
        mode = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (2 * math.pi / 8)) % 8
        occupancy = torch.bincount(mode.long(), minlength=8).float() / len(x)
        return abs(r.mean() - r_data.mean()) + abs(r.std() - r_data.std()) + (occupancy - 1 / 8).abs().max()

    coarse, fine = error(_ring_rollout(10, 1.0, kind, 0.5)), error(_ring_rollout(160, 1.0, kind, 0.5))
    assert fine < coarse
    assert fine < 0.03, f"{kind} at 160 steps is still {fine:.4f} from the data"


def test_sage_lands_closer_to_the_manifold_than_flow():
    sage_d = ring_distance(_ring_rollout(20, 3.0, "sage", 0.5)).mean()
    flow_d = ring_distance(_ring_rollout(20, 3.0, "flow", 0.5)).mean()
    assert sage_d < 0.85 * flow_d, (sage_d, flow_d)  # measured 0.047 vs 0.063


def test_equalizer_matches_spec_numbers():
    S = sde.equalizer_weights(sde.sigma_schedule(20, 5.0), "sage", 0.5)
    assert 7 < S[0] < 9 and 0.04 < S[-1] < 0.07  # SPEC §3: about 8 down to about 0.05
    S_cps = sde.equalizer_weights(sde.sigma_schedule(20, 5.0), "cps", 0.5)
    assert S_cps[-1] == 0  # deterministic last step is not trained


@pytest.mark.parametrize("kind", ["flow", "sage", "cps", "dance"])
def test_equalizer_flattens_per_step_gradient_norms(kind):
    """|d(policy loss)/d v| per step, measured by autograd on a rollout, with and without S_t."""
    means = ring_means(8, 1.0)
    sigmas = sde.sigma_schedule(20, 5.0)
    velocity = lambda x, s: mixture_velocity(x, s, means, 0.05)
    traj = sde.rollout(velocity, torch.randn(512, 2, generator=torch.Generator().manual_seed(4)), sigmas, kind,
                       0.5, torch.Generator().manual_seed(5))
    S = sde.equalizer_weights(sigmas, kind, 0.5)
    A = torch.ones(512)
    norms = []
    for t in torch.nonzero(traj.is_stochastic).flatten().tolist():
        x_t = traj.latents[:, t]
        v = velocity(x_t, sigmas[t].expand(512)).requires_grad_(True)
        mu, std = sde.step_mean_std(x_t, v, sigmas[t].expand(512), sigmas[t + 1].expand(512), kind, 0.5)
        ratio = torch.exp(sde.log_prob(traj.latents[:, t + 1], mu, std) - traj.logp[:, t])
        (grad,) = torch.autograd.grad((-A * ratio).mean(), v)
        norms.append((grad.norm().item(), S[t].item()))
    raw = torch.tensor([n for n, _ in norms])
    eq = torch.tensor([n * s for n, s in norms])
    spread_raw, spread_eq = (raw.max() / raw.min()).item(), (eq.max() / eq.min()).item()
    print(f"{kind}: max/min per-step grad norm {spread_raw:.1f} without S_t, {spread_eq:.1f} with")
    assert spread_eq < spread_raw / 4


@pytest.mark.parametrize("kind,eta", [("cps", 1.0), ("cps", 0.8), ("sage", 0.5), ("flow", 0.7), ("dance", 1.0)])
def test_equalizer_weights_equal_the_float64_closed_form(kind, eta):
    """S_t written out in float64 from the SPEC §3 formulas; issue 14: rounding V to float32 before
    sqrt(sigma_{t+1}^2 - V) put a 1.8e-4 relative error into cps's S_t at eta = 1."""
    sigmas = sde.sigma_schedule(20, 5.0)
    s, sn = sigmas[:-1].double(), sigmas[1:].double()
    if kind == "cps":
        std = sn * math.sin(eta * math.pi / 2)
        dmu_dv = -s * (1 - sn) + (1 - s) * sn * math.cos(eta * math.pi / 2)
    else:
        V = torch.tensor([_simpson(lambda x: (eta**2 if kind == "dance" else eta**2 * x / (1 - x)), float(b), float(a))
                          if not (kind == "sage" and a >= 1) else float("nan") for a, b in zip(s, sn)], dtype=torch.float64)
        if kind == "flow":
            V = eta**2 * s / (1 - torch.where(s >= 1, sn, s)) * (s - sn)  # left endpoint, [FlowGRPO] guard
        if kind == "sage":  # step 0 uses the guard; the rest are the exact integral
            g = sde.SAGE_SIGMA_GUARD
            V[0] = eta**2 * (-(s[0] - sn[0]) + math.log((1 - sn[0]) / g))
        std = V.sqrt()
        dmu_dv = -((s - sn) + V * (1 - s) / (2 * s))
    on = std > 0
    N = dmu_dv.abs()[on] / std[on]
    expected = torch.zeros(20, dtype=torch.float64)
    expected[on] = N.median() / N
    S = sde.equalizer_weights(sigmas, kind, eta).double()
    assert torch.allclose(S, expected, rtol=2e-7 if kind != "sage" else 1e-6, atol=0), (S / expected - 1).abs().max()


def test_cps_at_eta_one_keeps_no_old_noise():
    """At eta = 1 cps re-noises x0_hat with fresh noise only: the mean is exactly (1 - sigma_{t+1}) x0_hat."""
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mu, std = sde.step_mean_std(x, v, 0.7, 0.4, "cps", 1.0)
    assert torch.allclose(mu, 0.6 * (x - 0.7 * v), atol=1e-6) and std.item() == pytest.approx(0.4, rel=1e-6)


@pytest.mark.parametrize("width", [2, 3, 4])
def test_equalizer_median_is_the_lower_middle_value_as_in_sage_code(width):
    """Deviations 3: S_t = median(N) / N_t with torch.median, the lower of the two middle values for an even
    count ([SAGE]'s code), so exactly one window step has weight 1 and (W - 1) // 2 steps (those with a smaller
    N_t) weigh more than 1. The mean of the two middle values would give no weight exactly 1 at even W."""
    sigmas = sde.sigma_schedule(20, 5.0)
    stochastic = sde.step_variances(sigmas, "sage", 0.5) > 0
    window = sde.window_mask(stochastic, 3, width)
    S = sde.equalizer_weights(sigmas, "sage", 0.5, window)[window].double()
    assert (S == 1).sum() == 1 and (S > 1).sum() == (width - 1) // 2
    N = 1 / S  # N_t up to the common factor median(N)
    assert torch.allclose(N.sort().values[(width - 1) // 2], torch.tensor(1.0, dtype=torch.float64))
