"""Stochastic sampling of a flow-matching model: one Gaussian policy per denoising step, with log-probs.

GRPO needs a policy with a density. A flow-matching model is an ODE; this file turns each Euler step of
that ODE into a Gaussian step x_{t+1} ~ N(mu_t, V_t I) whose mean keeps the marginals of the path
(reverse-time SDE) and whose variance V_t is what the papers disagree about (SPEC §2).

Conventions (SPEC §1)
---------------------
- Time runs from noise to data: step t = 0..K-1 goes from sigma_t to sigma_{t+1} < sigma_t, so along a
  rollout dsigma < 0, and Delta_t = sigma_t - sigma_{t+1} > 0 is the step length. The transformer sees
  timestep = 1000 sigma (caller's business).
- The network predicts v = eps - x0 (it points toward noise); the ODE is dx = v dsigma.
- sigma may be a float or a per-sample tensor (N,); it broadcasts over the remaining dims, so the same
  code serves a toy batch (N, D) and a video latent batch (N, C, F, H, W).
- logp is the *mean* over the non-batch elements of the Gaussian log-density (every reference code does
  this; it is why the PPO clip range is 1e-4 rather than 0.2).
- mu, std and logp are float32 whatever dtype the model runs in (bf16 overflows in mu).
- A step with V = 0 (ode, cps at its last step, eta = 0) is deterministic: it has no log-prob and is
  never trained (its logp is stored as 0 and masked by `is_stochastic`).

Equations (SPEC §1-3)
---------------------
Path and model:   x_sigma = (1 - sigma) x0 + sigma eps,   v = eps - x0,   dx = v dsigma (sigma 1 -> 0)
                  x0_hat = x - sigma v,   eps_hat = x + (1 - sigma) v,   score = grad log p = -eps_hat / sigma
Reverse-time SDE with the same marginals as the ODE, for any diffusion coefficient g(sigma):
                  dx = [v - (g^2 / 2) score] dsigma + g dW,      dW of variance |dsigma|
(adding noise of variance g^2 |dsigma| blurs p; the score term pulls x uphill by half that variance, which
undoes the blur to first order). One Euler step from sigma_t, the velocity and the score held at x_t:
                  mu  = x - Delta v + (V / 2) score
                      = x - Delta v - (V / (2 sigma)) (x + (1 - sigma) v)                 [FlowGRPO], [SAGE] Eq. 4
                  V   = integral over [sigma_{t+1}, sigma_t] of g(s)^2 ds
Both the noise and the score correction are integrals of g^2 over the step, so the mean uses the same V as
the variance, not g(sigma_t)^2 Delta: the correction must undo exactly the noise that is added; a mean
built on g(sigma_t)^2 Delta with a variance built on the exact V would drift off the path's marginals by
(V - g^2 Delta) / 2 times the score at every step.
The kinds differ in g and in how the integral is evaluated:
    ode    g = 0                                V = 0
    dance  g = eta                              V = eta^2 Delta                                  [Dance]
    flow   g = eta sqrt(s / (1 - s))            V = eta^2 sigma_t / (1 - sigma_t) Delta           [FlowGRPO]
    sage   g = eta sqrt(s / (1 - s))            V = eta^2 (-Delta + log((1 - sigma_{t+1}) / (1 - sigma_t)))  [SAGE] Eq. 5
    cps    (not an SDE discretisation)          V = s_t^2, s_t = sigma_{t+1} sin(eta pi / 2)     [CPS]
           mu = (1 - sigma_{t+1}) x0_hat + sigma_{t+1} cos(eta pi / 2) eps_hat
              (= sqrt(sigma_{t+1}^2 - s_t^2) eps_hat, written without the cancellation)

Why sage. flow and sage share the same continuous SDE; they differ only in the quadrature of
g^2 = eta^2 s / (1 - s). Writing s / (1 - s) = -1 + 1 / (1 - s) gives the exact integral
    eta^2 [ -(sigma_t - sigma_{t+1}) + log((1 - sigma_{t+1}) / (1 - sigma_t)) ],
whose log term is [SAGE]'s "logarithmic curvature correction". flow evaluates the integrand at the
left (noisier) endpoint; s / (1 - s) is increasing, so the left endpoint is its maximum on the step and
flow injects more noise than the SDE asks for, by the most where sigma is large and the integrand
steep. That surplus is what pushes rollouts off the data manifold ([SAGE] Fig. 1).

Gradient norm equalizer ([SAGE] Eq. 8-9). |d logp / d v| = |d mu / d v| / std up to the residual, so
    N_t = |d mu_t / d v| / std_t,   S_t = median_tau N_tau / N_t,
with d mu / d v = -(Delta + V (1 - sigma) / (2 sigma)) (SDE kinds) or
-sigma_t (1 - sigma_{t+1}) + (1 - sigma_t) sigma_{t+1} cos(eta pi / 2) (cps). S_t is analytic: it
depends on the schedule only, never on measured gradients.

Deviations / choices
--------------------
1. The sigma = 1 singularity. flow evaluates sigma / (1 - sigma) with the denominator's sigma replaced
   by sigma_{t+1} at sigma_t = 1, as [FlowGRPO]'s code does (it uses the scheduler's sigma_1). sage
   clamps sigma_t to 1 - SAGE_SIGMA_GUARD inside the log only, as the [SAGE] code does; this makes
   step 0 its noisiest step. If the schedule's sigma_1 lies above the guard the clamped integral turns
   negative, so we raise a ValueError instead of returning a negative variance.
2. cps uses the full Gaussian log-density (SPEC §2 choice); the reference CPS code drops the constants
   and the 1 / (2 s^2) factor, which changes the scale of the ratio but not its sign.
3. The equalizer takes the median over stochastic steps only and gives deterministic steps S_t = 0.
   The median is torch.median, the lower of the two middle values for an even count, as in [SAGE]'s
   scheduler code (torch.median too), not the mean of the two: with a window of W = 2 steps the weights
   are [1, N_small / N_large] (e.g. [1.0, 0.60]), not [1.33, 0.80]. The two differ by one constant factor.
   It is computed in float64 from the float64 V_t: rounding V to float32 first, as an earlier version
   did, put a 1.8e-4 relative error into cps's S_t at eta = 1 through sqrt(sigma_{t+1}^2 - V).
4. `generator` may be one torch.Generator or a list of N (one per sample), so that a sample's noise
   depends on its own seed only, not on how samples are batched or split across processes.
5. The SDE window (`window`, FlowGRPO's `sde_window`, MixGRPO's sliding window): only the steps in the
   window are stochastic; every other step is a plain Euler step of the ODE (kind "ode"; for cps this also
   replaces its deterministic last step). What changes in the policy: the rollout policy is the product of
   the window's Gaussians, each conditioned on its stored x_t; the ODE steps are deterministic maps with no
   density, so they carry no log-prob, no ratio and no gradient. x_t at the window's start is a function
   of x_T and the rollout weights only, exactly as a stored x_t is for every trained step without a window:
   the per-step ratio pi_theta(x_{t+1} | x_t) / pi_old(x_{t+1} | x_t) is the same quantity, and it is
   exactly 1 at unchanged weights. The equalizer's median is taken over the window's steps.
6. A higher-order solver outside the window (`ode_solver`, `ode_steps`; MixGRPO-Flash's idea): the runs of
   deterministic steps (before the window, after it) are integrated by `ode_solver` in `ode_steps` model calls
   in all instead of one call per step. The solver visits a subset of the training grid (`solver_grid`), so the
   window's sigmas are the training schedule's exactly, the state entering the window is the solver's, and the
   window's steps are sampled, stored and trained as in 5 (the on-policy ratio stays exactly 1). The calls are
   shared among the runs in proportion to their lengths (`ode_calls`).
   - Which points: quadratically spaced in step index, denser toward the run's end (DDIM's "quad" skip). The
     shifted training grid takes its largest steps at low noise, where the path bends most; evenly spaced points
     (the pipeline's own spacing) left UniPC at M = K/3 1.7-4x less accurate than Euler with K steps, the quadratic
     ones make it about as accurate or better (bench/ode_accuracy.py; README table).
   - "euler" is the plain Euler step of the ODE on that coarser grid (with one call per step it is today's
     rollout exactly); "unipc" is diffusers' UniPCMultistepScheduler (Wan2.1's own sampler, flow sigmas, shift
     1 because our sigmas are already shifted), driven step by step with our velocity at our sigmas. The
     scheduler ends its grid at sigma 0; a run that ends at the window (sigma_s > 0) gets its last sigma
     replaced by sigma_s, the only thing we set by hand (UniPC's update is written for any target sigma).
     It keeps diffusers' own guard at sigma = 1 (sigma_0 - 1e-6, there log alpha = -inf).
   - The states the solver does not visit do not exist: their latents and means are stored as NaN, so any
     read of them is loud; they carry no log-prob (0) and std 0, as every deterministic step.
   - Each generator still draws once per replaced step (as sde_step draws on every step), so the window's
     noise is the same draws whatever the solver: runs with and without it are paired sample by sample.

Run: `python -m pytest tests/test_sde.py -q`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

KINDS = ("ode", "dance", "flow", "sage", "cps")
ODE_SOLVERS = ("euler", "unipc")  # for the deterministic steps (Deviations 6)
SAGE_SIGMA_GUARD = 3e-3  # [SAGE] code: sigma_t is clamped to 1 - 3e-3 inside the log


def sigma_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """K + 1 noise levels from 1 to 0 with the SD3 shift s sigma / (1 + (s - 1) sigma)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    # Built in float64 and rounded once: rollout and training both index this one tensor, so any
    # rounding is shared and cannot make a recomputed log-prob differ from the stored one.
    sigma = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)  # (K+1,)
    # The shift spends more steps at high noise, where the layout of a video is decided.
    return (shift * sigma / (1 + (shift - 1) * sigma)).float()  # (K+1,)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown SDE kind {kind!r}; choose one of {KINDS}")


def _as_tensor(sigma, like: torch.Tensor | None = None) -> torch.Tensor:
    """Floats and tensors alike become float32 tensors (on `like`'s device)."""
    device = like.device if like is not None else None
    return torch.as_tensor(sigma, dtype=torch.float32, device=device)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample (N,) -> (N, 1, ..., 1) so it broadcasts over x's non-batch dims; scalars pass."""
    return t.reshape(t.shape + (1,) * (x.dim() - t.dim())) if t.dim() == 1 else t


def _variance64(s: torch.Tensor, sn: torch.Tensor, kind: str, eta: float) -> torch.Tensor:
    """V_t in float64 for float64 sigma_t, sigma_{t+1} (SPEC §2 table)."""
    # V_t is the variance injected between sigma_t and sigma_{t+1}: the integral of the squared
    # diffusion coefficient g(s)^2 over the step. The kinds differ only in g and in how they integrate it.
    # float64 for the log and the near-cancellation -Delta + log(...).
    delta = s - sn
    if kind == "ode" or eta == 0:
        return torch.zeros_like(s)
    if kind == "dance":
        return eta**2 * delta  # [Dance]: constant diffusion coefficient eta
    if kind == "flow":
        # g^2 = eta^2 s / (1 - s) grows without bound as s -> 1, so the left end of the step is where the
        # integrand is largest: this rule over-injects noise at high sigma, which pushes samples off the data
        # manifold (the "extra energy" of [SAGE] Fig. 1).
        # [FlowGRPO]: left-endpoint Euler of the integral; at sigma = 1 the denominator uses sigma_{t+1}.
        denom_sigma = torch.where(s >= 1, sn, s)
        return eta**2 * s / (1 - denom_sigma) * delta
    if kind == "sage":
        # The same g^2, integrated exactly: s / (1 - s) = -1 + 1 / (1 - s) gives -Delta + log(...), the
        # logarithmic curvature correction. Exact at every step, so no step gets more noise than the SDE asks.
        s_clamped = s.clamp(max=1 - SAGE_SIGMA_GUARD)  # [SAGE] code guard, inside the log only
        return eta**2 * (-delta + torch.log((1 - sn) / (1 - s_clamped)))  # [SAGE] Eq. 5
    # cps is not a discretised SDE: it re-noises the predicted x0 to sigma_{t+1}, and eta sets how much
    # of that noise is fresh. The last step (sigma_{t+1} = 0) is therefore deterministic.
    return (sn * math.sin(eta * math.pi / 2)) ** 2  # [CPS]: s_t = sigma_{t+1} sin(eta pi / 2)


def step_variance(sigma, sigma_next, kind: str, eta: float) -> torch.Tensor:
    """V_t of one step (SPEC §2 table), float32; same shape as sigma (scalar or (N,))."""
    _check_kind(kind)
    sigma = _as_tensor(sigma)
    sigma_next = _as_tensor(sigma_next).to(sigma.device)
    return _variance64(sigma.double(), sigma_next.double(), kind, eta).float()


def step_variances(sigmas: torch.Tensor, kind: str, eta: float) -> torch.Tensor:
    """(K,) V_t for a whole schedule, checked once: finite and >= 0, and > 0 wherever the kind is
    stochastic (a negative sage variance means sigma_1 lies above the guard; see Deviations 1)."""
    # Checked once per schedule, on the host, before any model call: a bad schedule is an input error,
    # better reported at start-up than as NaN log-probs in the middle of training.
    V = step_variance(sigmas[:-1], sigmas[1:], kind, eta)  # (K,)
    if not bool(torch.isfinite(V).all()) or bool((V < 0).any()):
        raise ValueError(
            f"{kind} step variances are not finite and non-negative (first: {V[:3].tolist()}). For sage this means the "
            f"schedule's first step lands above 1 - SAGE_SIGMA_GUARD ({SAGE_SIGMA_GUARD}): use fewer "
            f"steps or a smaller shift, or lower sde.SAGE_SIGMA_GUARD."
        )
    return V


def step_mean_std(x, v, sigma, sigma_next, kind: str, eta: float):
    """(mu, std) of the Gaussian step from x at sigma to sigma_next given the velocity v.

    Differentiable in v: this is the function training calls on a fresh velocity to get mu_theta.
    Returns mu with x's shape (float32) and std with sigma's shape (scalar or (N,)).
    """
    _check_kind(kind)
    # The transformer may run in bf16, but mu, V and logp are computed in float32: V/(2 sigma) is large
    # at low sigma, and the log-density of a 1e5-element latent needs more than 8 mantissa bits.
    x, v = x.float(), v.float()  # float32 island: bf16 overflows in mu at low sigma
    sigma, sigma_next = _as_tensor(sigma, x), _as_tensor(sigma_next, x)
    V = step_variance(sigma, sigma_next, kind, eta).to(x.device)  # () or (N,)
    s, sn, Vb = _bcast(sigma, x), _bcast(sigma_next, x), _bcast(V, x)
    if kind == "cps":
        # x = (1 - s) x0 + s eps and v = eps - x0 invert to the model's predictions of the clean sample and
        # of the noise; both samplers are written in terms of them.
        x0_hat, eps_hat = x - s * v, x + (1 - s) * v
        # [CPS]: the x0 and noise coefficients of the path at sigma_{t+1} are kept exactly:
        # (1 - sigma_{t+1}) for x0 and sqrt(sigma_{t+1}^2 - s_t^2) + s_t (the fresh noise) for eps.
        # sqrt(sigma_{t+1}^2 - s_t^2) = sigma_{t+1} cos(eta pi / 2): written so, it has no cancellation (at
        # eta = 1 the difference of two rounded squares would leave a sqrt(ulp) ~ 1e-4 instead of 0).
        mu = (1 - sn) * x0_hat + sn * math.cos(eta * math.pi / 2) * eps_hat
    else:
        # Reverse-SDE Euler drift: the ODE step plus the score correction -V/(2 sigma) eps_hat.
        # (ode and eta = 0 give V = 0, so mu is the plain Euler step x - Delta v.)
        mu = x - (s - sn) * v - Vb / (2 * s) * (x + (1 - s) * v)  # [FlowGRPO], [SAGE] Eq. 4
    return mu, V.sqrt()


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like x; one generator per sample if a list is given."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in generator]).to(x.device)
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device).to(x.device)


def sde_step(x, v, sigma, sigma_next, kind: str, eta: float, generator=None):
    """One stochastic step: (x_next, mu, std) with x_next = mu + std z, z ~ N(0, I)."""
    mu, std = step_mean_std(x, v, sigma, sigma_next, kind, eta)
    # Noise is drawn even where std = 0 (then x_next == mu exactly) so that the random stream, and
    # hence every later sample, does not depend on which steps happen to be deterministic.
    x_next = mu + _bcast(std, mu) * _randn_like(mu, generator)
    return x_next, mu, std


def log_prob(x_next, mu, std) -> torch.Tensor:
    """(N,) Gaussian log-density of x_next under N(mu, std^2), averaged over non-batch elements.

    x_next is the stored rollout sample (no gradient); gradients flow through mu only. std > 0 is
    required: deterministic steps have no density and must be masked out before calling this.
    """
    # Mean, not sum, over elements: logp is O(1) whatever the latent size, so one clip range (1e-4)
    # means the same for a 2-D toy and a video. The price is that the ratio moves ~1/D as fast as with a
    # sum; SPEC §4 keeps the references' convention.
    x_next, mu = x_next.detach().float(), mu.float()
    std = _bcast(_as_tensor(std, mu), mu)
    # -(x - mu)^2 / (2 V) - log std - log sqrt(2 pi), then the mean (not the sum) over elements.
    logp = -((x_next - mu) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).mean(dim=1)  # (N,)


def window_mask(stochastic: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """(K,) bool: the SDE window (Deviations 5), the `width` stochastic steps from the `start`-th one on."""
    steps = torch.nonzero(stochastic.cpu(), as_tuple=True)[0]  # (K_s,)
    if not (1 <= width and 0 <= start <= len(steps) - width):
        raise ValueError(f"an SDE window of {width} steps from stochastic step {start} does not fit the {len(steps)} "
                         f"stochastic steps (start must be in 0..{len(steps) - width})")
    mask = torch.zeros(len(stochastic), dtype=torch.bool)
    mask[steps[start : start + width]] = True
    return mask


def equalizer_weights(sigmas: torch.Tensor, kind: str, eta: float, window: torch.Tensor | None = None) -> torch.Tensor:
    """(K,) [SAGE] gradient norm equalizer S_t = median(N) / N_t with N_t = |d mu / d v| / std_t, over the
    stochastic steps, or over the window's steps when a window (K,) bool is given (Deviations 5)."""
    _check_kind(kind)
    # The policy gradient of step t w.r.t. v is (x_next - mu) / V * d mu / d v; the residual x_next - mu
    # is O(std), so its size is N_t = |d mu / d v| / std_t. Low-noise steps have tiny std and dominate;
    # S_t divides each step by its N_t.
    step_variances(sigmas, kind, eta)  # validates the schedule (raises on a negative sage variance)
    s, sn = sigmas[:-1].double(), sigmas[1:].double()  # (K,)
    # float64 end to end (Deviations 3): V is not rounded to float32 before it enters N_t.
    V = _variance64(s, sn, kind, eta)  # (K,)
    if kind == "cps":
        dmu_dv = -s * (1 - sn) + (1 - s) * sn * math.cos(eta * math.pi / 2)
    else:
        dmu_dv = -((s - sn) + V * (1 - s) / (2 * s))  # [SAGE] Eq. 8
    stochastic = V > 0
    if window is not None:
        stochastic = stochastic & window.to(stochastic.device)
    S = torch.zeros_like(s)  # deterministic steps are not trained: weight 0
    if stochastic.any():
        N = dmu_dv.abs()[stochastic] / V[stochastic].sqrt()
        # Normalised by the median, not the mean, so one extreme step cannot rescale all the others, and a
        # typical step keeps weight ~1 (the learning rate keeps its meaning).
        S[stochastic] = N.median() / N  # [SAGE] Eq. 9; the lower median for an even count, as [SAGE]'s code
    return S.float()


class StoredStep(NamedTuple):
    """One stored step per sample, as `Trajectory.at` reads it; every field is (N, ...) or (N,)."""

    x_t: torch.Tensor  # (N, ...) the state the step started from
    x_next: torch.Tensor  # (N, ...) the sampled action x_{t+1}
    sigma: torch.Tensor  # (N,) sigma_t
    sigma_next: torch.Tensor  # (N,) sigma_{t+1}
    mu_old: torch.Tensor  # (N, ...) the rollout policy's mean
    logp_old: torch.Tensor  # (N,) the rollout policy's log-prob of x_next


class PolicyStep(NamedTuple):
    """The current policy's Gaussian at stored steps: mean (N, ...), std (N,), logp of x_next (N,)."""

    mu: torch.Tensor
    std: torch.Tensor
    logp: torch.Tensor


@dataclass
class Trajectory:
    """What a rollout stores for training (all detached, float32)."""

    latents: torch.Tensor  # (N, K+1, ...) x_0 = x_T (noise) ... x_K (sample)
    mu: torch.Tensor  # (N, K, ...) the rollout policy's means, mu_old for the step-wise KL
    std: torch.Tensor  # (K,) per-step std (0 for deterministic steps)
    logp: torch.Tensor  # (N, K) logp_old; 0 where the step is deterministic
    sigmas: torch.Tensor  # (K+1,) on the latents' device, so training indexes it without a host copy

    @property
    def is_stochastic(self) -> torch.Tensor:
        return self.std > 0  # (K,)

    def rows(self, idx) -> "Trajectory":
        """The trajectories of samples idx (a slice or index tensor): a micro-batch."""
        return Trajectory(self.latents[idx], self.mu[idx], self.std, self.logp[idx], self.sigmas)

    @staticmethod
    def cat(parts: Sequence["Trajectory"]) -> "Trajectory":
        """Micro-batch rollouts joined along the sample dim (they share the schedule)."""
        return Trajectory(torch.cat([p.latents for p in parts]), torch.cat([p.mu for p in parts]), parts[0].std,
                          torch.cat([p.logp for p in parts]), parts[0].sigmas)

    def then(self, rest: "Trajectory") -> "Trajectory":
        """This trajectory (steps 0..s-1) followed by `rest`, which starts from this one's last state."""
        return Trajectory(torch.cat([self.latents[:, :-1], rest.latents], 1), torch.cat([self.mu, rest.mu], 1),
                          torch.cat([self.std, rest.std]), torch.cat([self.logp, rest.logp], 1),
                          torch.cat([self.sigmas[:-1], rest.sigmas]))

    def at(self, t: torch.Tensor) -> StoredStep:
        """Sample i's stored step t[i], for t (N,) one step index per sample."""
        rows = torch.arange(len(t), device=t.device)
        sigmas = self.sigmas.to(self.latents.device)  # a no-op for rollout() output (already there)
        return StoredStep(x_t=self.latents[rows, t], x_next=self.latents[rows, t + 1], sigma=sigmas[t],
                          sigma_next=sigmas[t + 1], mu_old=self.mu[rows, t], logp_old=self.logp[rows, t])


def policy_step(velocity_fn: Callable, traj: Trajectory, t: torch.Tensor, kind: str, eta: float) -> PolicyStep:
    """Recompute (mu, std, logp) of stored steps t (N,), one step per sample, with the current model.

    This is the training forward, and (under no_grad, anchor swapped in) the anchor's forward. It goes
    through the same velocity_fn / step_mean_std / log_prob as the rollout, with per-sample sigmas as
    the rollout passes them, so unchanged weights give exactly logp_old.
    """
    s = traj.at(t)
    mu, std = step_mean_std(s.x_t, velocity_fn(s.x_t, s.sigma), s.sigma, s.sigma_next, kind, eta)
    return PolicyStep(mu, std, log_prob(s.x_next, mu, std))


def check_solver(ode_solver: str, ode_steps: int | None) -> None:
    if ode_solver not in ODE_SOLVERS:
        raise ValueError(f"ode_solver {ode_solver!r}: one of {', '.join(ODE_SOLVERS)}")
    if ode_steps is not None and (isinstance(ode_steps, bool) or not isinstance(ode_steps, int) or ode_steps < 1):
        raise ValueError(f"ode_steps {ode_steps!r}: a number of model calls >= 1")


def ode_runs(deterministic: Sequence[bool]) -> list[tuple[int, int]]:
    """The maximal runs [a, b) of consecutive deterministic steps, in order (before the window, after it)."""
    runs, a = [], None
    for t, det in enumerate(list(deterministic) + [False]):
        if det and a is None:
            a = t
        elif not det and a is not None:
            runs.append((a, t))
            a = None
    return runs


def ode_calls(lengths: Sequence[int], calls: int) -> list[int]:
    """`calls` model calls shared among runs of `lengths` steps in proportion to their lengths (each run gets
    1..length; the largest remainders get the rounding), Deviations 6."""
    total = sum(lengths)
    if not len(lengths) <= calls <= total:
        raise ValueError(f"{calls} solver calls for {len(lengths)} run(s) of {total} deterministic steps: the calls "
                         f"must be in {len(lengths)}..{total} (at least one per run, at most one per step)")
    share = [min(n, max(1, calls * n // total)) for n in lengths]
    while sum(share) != calls:  # hand out (or take back) one call at a time, where the rounding was largest
        more = sum(share) < calls
        room = [i for i, n in enumerate(lengths) if (share[i] < n if more else share[i] > 1)]
        gap = lambda i: calls * lengths[i] / total - share[i]  # noqa: E731  what run i is owed
        i = max(room, key=gap) if more else min(room, key=gap)
        share[i] += 1 if more else -1
    return share


def solver_grid(a: int, b: int, calls: int) -> list[int]:
    """calls + 1 step indices from a to b: the points of the training grid a solver visits (Deviations 6).
    Quadratically spaced (DDIM's "quad" skip), denser toward b: index a + (b - a)(1 - (1 - i / calls)^2), rounded
    half up, kept strictly increasing; all of a..b when calls = b - a."""
    grid = [a]
    for i in range(1, calls):
        point = a + math.floor((b - a) * (1 - (1 - i / calls) ** 2) + 0.5)
        grid.append(min(max(point, grid[-1] + 1), b - (calls - i)))  # room for the calls still to come
    return grid + [b]


def _unipc(sigmas: torch.Tensor):
    """diffusers' UniPC (Wan2.1's sampler) on exactly these sigmas (Deviations 6): flow prediction, shift 1 (our
    sigmas are shifted already), driven one step at a time from the first."""
    from diffusers import UniPCMultistepScheduler  # here: the Euler path and the toy do not need diffusers

    # A first-order last step (lower_order_final) is diffusers' guard at sigma 0, where the log-SNR is infinite; a
    # run that ends at the window (sigma_s > 0) keeps the full order to its end.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                        lower_order_final=bool(sigmas[-1] == 0))
    scheduler.set_timesteps(sigmas=sigmas[:-1].double().numpy())  # it appends sigma 0, guards sigma = 1
    scheduler.sigmas[-1] = sigmas[-1]  # a run that ends at the window ends at sigma_s > 0
    scheduler.set_begin_index(0)
    return scheduler


def ode_run(velocity_fn: Callable, x: torch.Tensor, sigmas: torch.Tensor, solver: str,
            host_sigmas: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The states at sigmas[0..M] (M + 1 of them, the first x) of the ODE from x, integrated by `solver` in M model
    calls, each at one of these sigmas (Deviations 6). `host_sigmas`: the same on the host, for the scheduler
    (saves a device-to-host copy)."""
    N, states = x.shape[0], [x]
    scheduler = _unipc(sigmas.cpu() if host_sigmas is None else host_sigmas) if solver == "unipc" else None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].expand(N), sigmas[i + 1].expand(N)  # (N,), (N,)
        v = velocity_fn(x, sigma).float()  # the model at our sigma (the scheduler's first one is 1 - 1e-6)
        if scheduler is None:
            x = step_mean_std(x, v, sigma, sigma_next, "ode", 0.0)[0]
        else:
            x = scheduler.step(v, scheduler.timesteps[i], x).prev_sample.float()
        states.append(x)
    return states


@torch.no_grad()
def rollout(velocity_fn: Callable, x_T, sigmas, kind: str, eta: float, generator=None,
            window: torch.Tensor | None = None, ode_solver: str = "euler", ode_steps: int | None = None) -> Trajectory:
    """Sample K stochastic steps from x_T, storing latents, means, stds and log-probs. With a window (K,)
    bool, only its steps are stochastic and the others are ODE steps (Deviations 5).

    velocity_fn(x, sigma) -> v is all it knows of a model; sigma is passed as a per-sample tensor (N,)
    so that training, which mixes timesteps within a batch, recomputes exactly the same numbers.

    ode_solver / ode_steps: the runs of deterministic steps are integrated by that solver in ode_steps calls in
    all (Deviations 6); the default, Euler with one call per step, is the loop below alone.
    """
    x = x_T.float()
    N, K = x.shape[0], len(sigmas) - 1
    # Which steps carry a log-prob is a property of the schedule: decided once on the host, so the loop
    # below never reads a device value back.
    sigmas = sigmas.cpu()
    stochastic = step_variances(sigmas, kind, eta) > 0  # (K,) decided once, on the host: no syncs below
    kinds = [kind if window is None or window[t] else "ode" for t in range(K)]  # Deviations 5
    stochastic = stochastic & (torch.ones(K, dtype=torch.bool) if window is None else window.cpu())
    sigmas_dev = sigmas.to(x.device)
    # Everything training needs is stored here: x_t and x_{t+1} (the sampled action), mu_old for the
    # step-wise KL and logp_old for the ratio. Training recomputes only mu_theta.
    latents, mus, stds, logps = [x], [], [], []
    check_solver(ode_solver, ode_steps)
    runs = ode_runs([k == "ode" for k in kinds]) if ode_solver != "euler" or ode_steps is not None else []
    calls = ode_calls([b - a for a, b in runs], ode_steps or sum(b - a for a, b in runs)) if runs else []
    solved = {a: (b, m) for (a, b), m in zip(runs, calls)}  # run start -> (run end, its model calls)
    t = 0
    while t < K:
        if t in solved:  # a run of deterministic steps, by the solver (Deviations 6)
            end, m = solved[t]
            grid = solver_grid(t, end, m)
            states = iter(ode_run(velocity_fn, x, sigmas_dev[grid], ode_solver, sigmas[grid])[1:])
            nan = torch.full_like(x, float("nan"))  # states the solver does not visit do not exist
            for u in range(t, end):
                _randn_like(x, generator)  # the draw this step would have made: the window's noise is unchanged
                latents.append(next(states) if u + 1 in grid else nan), mus.append(nan)
                stds.append(torch.zeros((), device=x.device)), logps.append(torch.zeros(N, device=x.device))
            x, t = latents[-1], end
            continue
        sigma, sigma_next = sigmas_dev[t].expand(N), sigmas_dev[t + 1].expand(N)  # (N,), (N,)
        x_next, mu, std = sde_step(x, velocity_fn(x, sigma), sigma, sigma_next, kinds[t], eta, generator)
        logps.append(log_prob(x_next, mu, std) if stochastic[t] else torch.zeros(N, device=x.device))
        latents.append(x_next), mus.append(mu), stds.append(std[0])
        x = x_next
        t += 1
    return Trajectory(
        latents=torch.stack(latents, 1),  # (N, K+1, ...)
        mu=torch.stack(mus, 1),  # (N, K, ...)
        std=torch.stack(stds).cpu(),  # (K,)  one device-to-host copy per rollout
        logp=torch.stack(logps, 1),  # (N, K)
        sigmas=sigmas_dev,
    )
