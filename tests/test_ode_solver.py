"""The solver outside the SDE window (sde.py Deviations 6) against oracles: the closed-form flow of a Gaussian,
diffusers' own UniPC loop, the on-policy identity, call counts, and the plain rollout it must reduce to.

The Gaussian: data N(m, c^2 I), x_sigma = (1 - sigma) m + s(sigma) z with s = sqrt((1 - sigma)^2 c^2 + sigma^2) and
z = x_T, so the exact state at every sigma is known (bench/ode_accuracy.py has the same case)."""
import math
from dataclasses import replace

import pytest
import torch

import sde
from toy import run as toy_run

C = 0.5  # the data's std
M_DATA = torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # (D,) the data's mean


def gaussian_velocity(x, sigma):
    """The exact flow-matching velocity of N(M_DATA, C^2 I): v = -m + s'/s (x - (1 - sigma) m)."""
    s = torch.as_tensor(sigma).double().view(-1, *[1] * (x.dim() - 1))  # (N, 1)
    return (-M_DATA + (s - (1 - s) * C**2) / ((1 - s) ** 2 * C**2 + s**2) * (x.double() - (1 - s) * M_DATA)).float()


def exact_state(x_T, sigma: float):
    """Where the ODE from x_T is at sigma: (1 - sigma) m + s(sigma) x_T."""
    return (1 - sigma) * M_DATA + math.sqrt((1 - sigma) ** 2 * C**2 + sigma**2) * x_T.double()


def rel_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def x_T(n=32, seed=1):
    return torch.randn(n, len(M_DATA), generator=torch.Generator().manual_seed(seed))


def counted(velocity):
    """velocity with a call counter (.calls)."""
    def v(x, sigma):
        v.calls += 1
        return velocity(x, sigma)
    v.calls = 0
    return v


def test_unipc_converges_at_a_higher_order_than_euler_to_the_state_entering_the_window():
    """The run before a window ends at sigma_s > 0 (sde.py replaces the scheduler's last sigma by sigma_s and keeps
    the full order to the end there): doubling M cuts Euler's error by about 2 (first order) and UniPC's by far
    more. Measured, K = 32, window from step 16 (sigma 0.75), M = 2, 4, 8 before it: Euler 6.6e-3, 3.5e-3, 1.7e-3
    (1.9, 2.1); UniPC 1.9e-3, 1.0e-4, 1.3e-5 (18.6, 7.8)."""
    K, s = 32, 16
    sigmas = sde.sigma_schedule(K, 3.0)
    window = torch.arange(K) >= s  # (K,) the last 16 steps are stochastic: the solver runs [0, 16) only
    exact = exact_state(x_T(), float(sigmas[s]))
    ratios = {}
    for solver in ("euler", "unipc"):
        errs = []
        for M in (2, 4, 8):
            traj = sde.rollout(gaussian_velocity, x_T(), sigmas, "sage", 0.5, torch.Generator().manual_seed(2), window,
                               ode_solver=solver, ode_steps=M)
            errs.append(rel_error(traj.latents[:, s], exact))
        ratios[solver] = [a / b for a, b in zip(errs, errs[1:])]
    assert all(1.7 < r < 2.3 for r in ratios["euler"]), ratios
    assert all(r > 6 for r in ratios["unipc"]), ratios


def test_unipc_final_latent_converges_at_a_higher_order_than_euler_once_the_last_steps_are_small():
    """The final latent (a run that ends at sigma 0): UniPC's last step is first order (diffusers' lower_order_final,
    needed at sigma 0) and the shifted grid's last steps shrink slowly, so its order shows only at large M.
    Measured, K = M = 96 -> 192, shift 3: Euler 1.18e-2 -> 5.93e-3 (2.0); UniPC 8.9e-4 -> 2.6e-4 (3.4)."""
    errs = {}
    for solver in ("euler", "unipc"):
        errs[solver] = [rel_error(sde.rollout(gaussian_velocity, x_T(), sde.sigma_schedule(M, 3.0), "ode", 0.0,
                                              ode_solver=solver, ode_steps=M).latents[:, -1], exact_state(x_T(), 0.0))
                        for M in (96, 192)]
    assert 1.8 < errs["euler"][0] / errs["euler"][1] < 2.2, errs
    assert errs["unipc"][0] / errs["unipc"][1] > 2.8, errs
    assert errs["unipc"][1] < 0.1 * errs["euler"][1], errs  # and far more accurate at equal calls


@pytest.mark.parametrize("K,M", [(12, 12), (12, 4), (24, 8)])
def test_unipc_rollout_equals_diffusers_own_unipc_loop(K, M):
    """An ODE rollout with ode_solver="unipc" is diffusers' UniPCMultistepScheduler as a pipeline drives it: its
    timesteps in order, step(model output, t, x), on the sigmas the solver visits (the model at our sigmas)."""
    from diffusers import UniPCMultistepScheduler

    sigmas = sde.sigma_schedule(K, 3.0)
    visited = sigmas[sde.solver_grid(0, K, M)]  # (M+1,) ends at 0, which set_timesteps appends itself
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    scheduler.set_timesteps(sigmas=visited[:-1].numpy().copy())
    x = x_T()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(gaussian_velocity(x, visited[i].expand(len(x))), t, x).prev_sample
    ours = sde.rollout(gaussian_velocity, x_T(), sigmas, "ode", 0.0, ode_solver="unipc", ode_steps=M).latents[:, -1]
    torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6)


def test_window_steps_stay_on_policy_with_a_solver_outside_the_window():
    """The window's stored steps are recomputed exactly (torch.equal) by policy_step: the ratio is exactly 1 at
    unchanged weights, whatever the solver did before and after the window."""
    K, N = 10, 16
    sigmas = sde.sigma_schedule(K, 3.0)
    window = sde.window_mask(sde.step_variances(sigmas, "sage", 0.5) > 0, 3, 2)  # steps 3, 4; runs [0, 3), [5, 10)
    gens = [torch.Generator().manual_seed(i) for i in range(N)]
    traj = sde.rollout(gaussian_velocity, x_T(N), sigmas, "sage", 0.5, gens, window, ode_solver="unipc", ode_steps=3)
    for t in (3, 4):
        step = sde.policy_step(gaussian_velocity, traj, torch.full((N,), t), "sage", 0.5)
        assert torch.equal(step.logp, traj.logp[:, t]) and torch.equal(step.mu, traj.mu[:, t]), t
    assert torch.isfinite(traj.latents[:, 3:6]).all()  # the window's states exist ...
    assert traj.latents[:, 2].isnan().all()  # ... one the solver stepped over does not (one call before: grid [0, 3])
    assert (traj.logp[:, ~window] == 0).all() and traj.is_stochastic.tolist() == window.tolist()


@pytest.mark.parametrize("solver", ["euler", "unipc"])
@pytest.mark.parametrize("K,W,start,M", [(10, 2, 0, 3), (10, 2, 3, 3), (20, 2, 0, 6), (12, 4, 4, 2), (12, 2, 5, 10)])
def test_velocity_calls_are_the_window_plus_the_solver_calls(solver, K, W, start, M):
    sigmas = sde.sigma_schedule(K, 3.0)
    window = sde.window_mask(sde.step_variances(sigmas, "sage", 0.5) > 0, start, W)
    v = counted(gaussian_velocity)
    sde.rollout(v, x_T(4), sigmas, "sage", 0.5, torch.Generator().manual_seed(0), window, ode_solver=solver,
                ode_steps=M)
    assert v.calls == W + M
    v = counted(gaussian_velocity)  # without a window (kind "ode"): the whole trajectory is one run of M calls
    sde.rollout(v, x_T(4), sigmas, "ode", 0.0, ode_solver=solver, ode_steps=M)
    assert v.calls == M
    v = counted(gaussian_velocity)  # the default: one call per step
    sde.rollout(v, x_T(4), sigmas, "sage", 0.5, torch.Generator().manual_seed(0), window)
    assert v.calls == K


@pytest.mark.parametrize("start", [0, 3])
def test_euler_with_one_call_per_step_is_the_default_rollout_exactly(start):
    K, N = 10, 8
    sigmas = sde.sigma_schedule(K, 3.0)
    window = sde.window_mask(sde.step_variances(sigmas, "sage", 0.5) > 0, start, 2)
    plain = sde.rollout(gaussian_velocity, x_T(N), sigmas, "sage", 0.5, torch.Generator().manual_seed(0), window)
    solved = sde.rollout(gaussian_velocity, x_T(N), sigmas, "sage", 0.5, torch.Generator().manual_seed(0), window,
                         ode_solver="euler", ode_steps=K - 2)
    assert torch.equal(plain.latents, solved.latents) and torch.equal(plain.logp, solved.logp)
    assert torch.equal(plain.std, solved.std) and torch.equal(plain.mu[:, window], solved.mu[:, window])
    # Euler in K/2 calls is the plain rollout on the sub-grid the solver visits (sde.solver_grid)
    grid = sde.solver_grid(0, K, K // 2)
    coarse = sde.rollout(gaussian_velocity, x_T(N), sigmas[grid], "ode", 0.0)
    solved = sde.rollout(gaussian_velocity, x_T(N), sigmas, "ode", 0.0, ode_solver="euler", ode_steps=K // 2)
    assert torch.equal(coarse.latents[:, -1], solved.latents[:, -1])
    assert torch.equal(coarse.latents, solved.latents[:, grid])  # and the states it visits are stored


def test_the_window_draws_the_same_noise_whatever_the_solver():
    """Each replaced step still draws once, so a sample's window noise z = (x_next - mu) / std is the same draw
    with or without the solver: exactly the same steps when the window starts at step 0, the same z (to
    rounding) when a solved run comes before it."""
    K, N = 10, 8
    sigmas = sde.sigma_schedule(K, 3.0)
    stochastic = sde.step_variances(sigmas, "sage", 0.5) > 0

    def pair(start):
        window = sde.window_mask(stochastic, start, 2)
        gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(N)]  # noqa: E731
        return window, [sde.rollout(gaussian_velocity, x_T(N), sigmas, "sage", 0.5, gens(), window, **solver)
                        for solver in ({}, {"ode_solver": "unipc", "ode_steps": 3})]

    window, (plain, solved) = pair(0)
    assert torch.equal(plain.latents[:, :3], solved.latents[:, :3])  # x_T and the window's two samples
    assert torch.equal(plain.mu[:, window], solved.mu[:, window]) and torch.equal(plain.logp, solved.logp)
    assert not torch.equal(plain.latents[:, -1], solved.latents[:, -1])  # after the window the solvers differ
    window, (plain, solved) = pair(4)  # 4 solved steps before the window (UniPC visits steps 0, 2, 4 of them)
    z = [(traj.latents[:, 5:7] - traj.mu[:, window]) / traj.std[window].view(1, -1, 1) for traj in (plain, solved)]
    assert not torch.equal(plain.latents[:, 4], solved.latents[:, 4])  # different states enter the window
    torch.testing.assert_close(z[0], z[1], rtol=0, atol=1e-4)


def test_the_toys_window_rows_are_on_policy_and_count_their_rollout_calls():
    """toy/run.py's rollout pair (its Deviations 7) through train_row: W = 2 of K = 10 with Euler outside the window
    makes 10 calls per rollout, with UniPC in K // 3 = 3 calls 5; both recompute logp_old exactly."""
    torch.manual_seed(0)
    base = toy_run.VelocityMLP(8)  # random weights: the plumbing, not the learning, is tested here
    args = toy_run.parse_args(["--iters", "2", "--seeds", "1", "--prompts_per_iter", "2", "--group_size", "4",
                               "--eval_per_prompt", "4", "--eval_every", "2"])
    rows = {r.name: r for r in toy_run.ablation_rows(dict.fromkeys(toy_run.SDE_KINDS), args.num_steps)}
    eval_set = toy_run.make_evaluation(base, args)
    runs = {}
    for name, calls in (("reference", 10), ("window_euler", 10), ("window_unipc", 5)):
        runs[name] = toy_run.train_row(base, rows[name], args, (0.5, 0.5), eval_set)
        assert runs[name]["first_ratio_dev"] == 0.0 and runs[name]["rollout_calls"] == calls, name
    # A window of all K steps is no window: the same numbers as the reference, to the last bit.
    whole = toy_run.train_row(base, replace(rows["reference"], window=args.num_steps), args, (0.5, 0.5), eval_set)
    assert whole["history"] == runs["reference"]["history"]
    assert whole["history"] != runs["window_euler"]["history"]  # (and a real window is not)
