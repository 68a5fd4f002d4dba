"""The 2-D toy as a controlled experiment: the project's own sde / grpo / trust_region / curriculum code,
one factor changed at a time, several seeds per row.

    python toy/run.py            # the ablation: 19 rows x 3 seeds, 9 figures + summary.json in toy/out/
    python toy/run.py --quick    # 5 rows, 30 iterations: what tests/test_toy.py runs
    python toy/run.py --rows window_euler,window_unipc   # only these rows (the others' numbers do not move)

Setting (SPEC §7)
-----------------
A "video" is F frames of 2-D points (default F = 4). Data videos move along the unit ring at a constant
angular speed and end near the target arc of their prompt p (one of four directions u_p). The base policy
is an MLP velocity v(x, sigma, p) trained by flow matching on data whose prompt label is right only 30 %
of the time, so it obeys the prompt weakly and alignment has room to improve. Its three reward components
play the roles of VideoAlign's VQ / MQ / TA:
    visual   = exp(-mean_f | |x_f| - 1 | / 0.15)                      every frame close to the ring
    temporal = exp(-(std_f dtheta_f + mean_f |d|x_f||) / 0.15)        steady angular step, steady radius
    semantic = sigmoid(4 (mean_f <x_f, u_p> - 0.5))                   the clip sits on the prompt's arc
semantic is hackable on purpose: pushing points *off* the ring along u_p keeps raising it, which is what
the trust region has to prevent.

The ablation (`ablation_rows`)
------------------------------
The reference row is sage SDE, eta 0.5, equalizer on, dual trust region (beta_pos 1, beta_vel 0.1,
anchor every 10 updates), static equal reward weights. Every other row changes exactly one factor from
the row named in its `compare_to` (the reference, except the reward-hacking pair, which differ from each
other in the trust region only). All rows share lr, iterations, batch, schedule (K = 10, shift 3) and
seeds; seed s of every row sees the same prompts and initial noise at every iteration (common random
numbers), so row differences are not sampling luck. Every number is measured on ODE samples (eta = 0) of
fixed prompts and noise, as the papers evaluate, never on the SDE rollouts the policy trains on:
    visual / temporal / semantic / total   mean component scores; total = equal-weight mean
    offring      mean | |x_f| - 1 | over frames: distance from the data manifold
    kl_init      KL from the initial policy, sum over the K steps of gaussian_kl, measured with the
                 reference kind (sage, eta 0.5) at fixed states of a base-policy rollout, so that rows with
                 different SDEs are compared on one scale (each step's share: `kl_init_per_step` in summary.json)
    diversity    circular std (radians) of the last frame's angle over a prompt's samples, mean over
                 prompts; it falls when the policy collapses onto one point of the prompt's arc

Figures (fixed axes, fixed seeds; the schedule K = 10, shift 3 is the training one, used everywhere):
    1_fan.png           one x_T, many rollouts of each SDE kind at eta 0.5, exact ring velocity
    2_frontier.png      exploration spread vs off-manifold distance across eta; the matched etas
    3_variance.png      V_t flow vs sage, their ratio, the equalizer weights S_t per kind
    4_offmanifold.png   distance of the x0 estimate from the ring along the trajectory, per kind
    5_gradnorm.png      measured per-step gradient norms of the policy loss without / with S_t
    6_ablation.png      ODE reward of every row over training (mean +- std over seeds), reward vs KL
    7_trust_region.png  none / fixed / step-wise / moving / dual ([SAGE] Fig. 8)
    8_curriculum.png    weights, stage, Hoyer sparsity, within-group std per component ([SPG] Fig. 2)
    9_samples.png       ODE samples: base, reference, and the two reward-hacking rows

Deviations / choices
--------------------
1. The exploration figures use the closed-form velocity of a ring of 8 Gaussians (toy/manifold.py), not
   the MLP, so they show the samplers and not a network's errors. The "matched" etas are read off that
   frontier: the eta at which each kind's spread equals sage's at eta 0.5.
2. The trust-region coefficient is scaled to the toy: the KL is a mean over 2F numbers, not millions, so
   lambda_KL ramps from 0.01 to 1.0 (trust_region.kl_coefficient) instead of 1e-7 to 1e-5.
3. clip_range = 0.01 instead of 1e-4: the per-element mean log-prob over 8 numbers moves far more per
   update than over a video latent, and 1e-4 would clip almost every sample after the first update.
4. Curriculum thresholds are set relative to the base policy's own rollout scores (tau_j = base mean
   + 0.05, steepness 30), since the toy's score scale has nothing to do with VideoAlign's.
5. Each rollout batch feeds `updates_per_rollout` = 2 optimizer updates (the trained timestep columns are
   split in two). With one update per rollout the policy equals the rollout policy at its only update, so
   KL_vel and its gradient are exactly 0 and the step-wise row would equal "none".
6. The seeds of a row run as one batched model: every weight has a leading seed dim E, the batch is E
   blocks of B x G samples, and each seed's gradient is clipped by its own norm, so the E copies train
   exactly as E separate runs would (Adam is elementwise); only the speed differs.
7. The rollout pair (issue 22): `window_euler` makes only the first W = 2 stochastic steps stochastic and
   trained (sde.py Deviations 5; train.py's --sde_window 2 --sde_window_start 0) with one Euler call per step
   outside the window; `window_unipc` integrates the 8 steps after the window with UniPC in M = K // 3 = 3 calls
   (sde.py Deviations 6; --ode_solver unipc --ode_steps 3): 2 + 3 = 5 model calls per rollout against 10. The
   window sits at the first steps, not at train.py's default random place in the first half, so that the pair
   differs in the solver only. Every row's metrics use the same K-step Euler ODE: the solver changes the
   rollouts the policy trains on, not how the policy is judged. The rows count their rollout calls.

The update phase calls the same functions as train.py: grpo.select_timesteps, trust_region.anchor_means,
trust_region.kl_coefficient, grpo.trained_step_loss, MovingAnchor.step.

Names: an iteration (`iteration`, `--iters`) is one rollout batch and `updates_per_rollout` optimizer updates;
a denoising step is one of the K = `--num_steps` steps of the schedule, indexed by t (`timesteps` holds the
indices each sample trains); `--pretrain_steps` counts the base policy's optimizer updates. The figures
(toy/figures.py) receive everything they draw as arguments and never import this script.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import curriculum  # noqa: E402
import grpo  # noqa: E402
import sde  # noqa: E402
import trust_region  # noqa: E402
from toy.manifold import mixture_velocity, ring_distance, ring_means  # noqa: E402

NUM_PROMPTS = 4
SDE_KINDS = ("flow", "sage", "cps", "dance")  # the kinds the toy compares: sde.KINDS without "ode", figure order
METRICS = ("visual", "temporal", "semantic", "total", "total_own_weights", "offring", "kl_init", "diversity")


# ----------------------------------------------------------------------------------------------------
# Data, rewards, base policy


def target_direction(p: torch.Tensor) -> torch.Tensor:
    """(N, 2) u_p, the unit direction of prompt p's arc: four prompts at 45, 135, 225 and 315 degrees."""
    angle = p.float() * (2 * math.pi / NUM_PROMPTS) + math.pi / 4
    return torch.stack([angle.cos(), angle.sin()], -1)  # (N, 2) u_p


def sample_videos(prompts: torch.Tensor, frames: int, generator) -> torch.Tensor:
    """(N, F, 2) clips moving along the ring at +-0.35 rad per frame, ending near the prompt's arc."""
    n = len(prompts)
    u = target_direction(prompts)
    end = torch.atan2(u[:, 1], u[:, 0]) + 0.35 * torch.randn(n, generator=generator)  # (N,)
    omega = 0.35 * torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)  # (N,)
    theta = end[:, None] - omega[:, None] * torch.arange(frames - 1, -1, -1.0)  # (N, F)
    radius = 1 + 0.02 * torch.randn(n, 1, generator=generator)  # (N, 1) one radius per clip
    return radius[..., None] * torch.stack([theta.cos(), theta.sin()], -1)  # (N, F, 2)


def toy_scores(x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """(N, 3) visual / temporal / semantic in [0, 1] for clips x (N, F, 2); formulas in the docstring."""
    r = x.norm(dim=-1)  # (N, F)
    visual = torch.exp(-(r - 1).abs().mean(1) / 0.15)
    if x.shape[1] > 1:
        theta = torch.atan2(x[..., 1], x[..., 0])
        dtheta = torch.remainder(theta[:, 1:] - theta[:, :-1] + math.pi, 2 * math.pi) - math.pi  # (N, F-1)
        spread = dtheta.std(1, unbiased=False) if x.shape[1] > 2 else torch.zeros(len(x))
        temporal = torch.exp(-(spread + (r[:, 1:] - r[:, :-1]).abs().mean(1)) / 0.15)
    else:
        temporal = torch.ones(len(x))
    proj = (x * target_direction(prompts)[:, None]).sum(-1).mean(1)  # (N,)
    semantic = torch.sigmoid(4 * (proj - 0.5))
    return torch.stack([visual, temporal, semantic], 1)


class VelocityMLP(nn.Module):
    """E independent copies of v(x, sigma, p), one per seed (Deviations 6).

    Inputs are (E n, 2F) rows, copy e owning rows e n .. (e + 1) n - 1; a prompt embedding and sigma
    features are concatenated to x. Each layer is one batched matmul over the copies.
    """

    def __init__(self, dim: int, copies: int = 1, hidden: int = 128):
        super().__init__()
        sizes = [dim + 3 + 16, hidden, hidden, hidden, dim]
        self.embed = nn.Parameter(torch.randn(copies, NUM_PROMPTS, 16))  # (E, P, 16)
        # nn.Linear's default init: uniform in +-1/sqrt(fan_in) for weights and biases.
        bounds = [1 / math.sqrt(a) for a in sizes[:-1]]
        self.weights = nn.ParameterList(
            [nn.Parameter((torch.rand(copies, a, b) * 2 - 1) * k) for a, b, k in zip(sizes[:-1], sizes[1:], bounds)])
        self.biases = nn.ParameterList(
            [nn.Parameter((torch.rand(copies, 1, b) * 2 - 1) * k) for b, k in zip(sizes[1:], bounds)])

    @property
    def copies(self) -> int:
        return self.embed.shape[0]

    def forward(self, x, sigma, prompts):
        E = self.copies
        sigma = sigma.view(-1, 1).expand(len(x), 1)
        copy = torch.arange(E).repeat_interleave(len(x) // E)  # (E n,) which copy owns each row
        feats = torch.cat([x, sigma, torch.sin(math.pi * sigma), torch.cos(math.pi * sigma),
                           self.embed[copy, prompts]], 1)  # (E n, 2F + 3 + 16)
        h = feats.view(E, len(x) // E, -1)  # (E, n, in)
        for i, (W, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, W)  # (E, n, out)
            h = nn.functional.silu(h) if i < len(self.weights) - 1 else h
        return h.reshape(len(x), -1)  # (E n, 2F)

    def replicate(self, copies: int) -> "VelocityMLP":
        """A model of `copies` identical copies of this one's first copy (every seed starts from the base)."""
        out = VelocityMLP(self.weights[-1].shape[-1], copies, self.weights[0].shape[-1])
        with torch.no_grad():
            for p_out, p_in in zip(out.parameters(), self.parameters()):
                p_out.copy_(p_in[:1].expand_as(p_out))
        return out


def pretrain(frames: int, num_updates: int, cache: str | None, seed: int = 0) -> VelocityMLP:
    """Flow matching on clips whose prompt label is right 30 % of the time, `num_updates` Adam updates of 512
    clips each; cached on disk (a plain state dict, loaded with weights_only=True)."""
    torch.manual_seed(seed)  # the MLP's initial weights: before building it, so a fresh pretrain is reproducible
    net = VelocityMLP(2 * frames)
    if cache and os.path.exists(cache):
        net.load_state_dict(torch.load(cache, weights_only=True))
        return net
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, num_updates)
    for _ in range(num_updates):
        true_p = torch.randint(NUM_PROMPTS, (512,), generator=g)
        x0 = sample_videos(true_p, frames, g).flatten(1)  # (512, 2F)
        shown = torch.where(torch.rand(512, generator=g) < 0.3, true_p, torch.randint(NUM_PROMPTS, (512,), generator=g))
        eps, sigma = torch.randn(x0.shape, generator=g), torch.rand(512, generator=g)
        x = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        loss = (net(x, sigma, shown) - (eps - x0)).pow(2).mean()  # flow-matching regression onto v = eps - x0
        optimizer.zero_grad(), loss.backward(), optimizer.step(), lr_schedule.step()
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        torch.save(net.state_dict(), cache)
    return net


# ----------------------------------------------------------------------------------------------------
# Exploration measurements with the exact ring velocity (Deviations 1)


def exact_rollout(kind, eta, x_T, num_steps, shift, seed):
    means = ring_means(8, 1.0)
    return sde.rollout(lambda x, s: mixture_velocity(x, s, means, 0.05), x_T, sde.sigma_schedule(num_steps, shift),
                       kind, eta, torch.Generator().manual_seed(seed))


def exploration(kind, eta, num_steps, shift, starts=8, per_start=128, seed=7):
    """Rollouts from `starts` shared x_T, `per_start` each: (trajectory of the first start, spread, offring).

    spread = mean distance of the endpoints from their own start's centroid: how far one x_T's rollouts
    fan out, the exploration GRPO compares within a group. offring = mean | |x| - 1 | of all endpoints.
    """
    x_T = torch.randn(starts, 2, generator=torch.Generator().manual_seed(seed)).repeat_interleave(per_start, 0)
    traj = exact_rollout(kind, eta, x_T, num_steps, shift, seed + 1)
    end = traj.latents[:, -1].view(starts, per_start, 2)
    spread = (end - end.mean(1, keepdim=True)).norm(dim=-1).mean().item()
    return traj.rows(slice(0, per_start)), spread, ring_distance(end).mean().item()


def matched_etas(frontier: dict, etas: list, target: float) -> dict:
    """Per kind, the eta whose spread equals `target`, by linear interpolation on the frontier (eta 0 has
    spread 0); None where even the largest eta spreads less (the kind cannot explore that much)."""
    out = {}
    for kind, points in frontier.items():
        xs, ys = [0.0] + etas, [0.0] + [points[e]["spread"] for e in etas]
        out[kind] = None
        for (e0, s0), (e1, s1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if s0 <= target <= s1:
                out[kind] = round(e0 + (target - s0) / (s1 - s0) * (e1 - e0), 3)
                break
    return out


def offmanifold_along(kind, eta, num_steps, shift, n=2048):
    """Along K steps from independent x_T, per t = 0..K: (sigma_t, mean distance of the x0 estimate
    x_t - sigma_t v from the ring, E|x_t|^2 over the path marginal's (1 - sigma)^2 E|x0|^2 + 2 sigma^2 - 1).

    The second is the "extra energy" of [SAGE] Fig. 1 in its plainest form: the exact path has a known
    second moment at every sigma, and a sampler that injects more noise than the path carries shows it
    as a positive excess where it injects it."""
    means = ring_means(8, 1.0)
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    traj = exact_rollout(kind, eta, x_T, num_steps, shift, 2)
    sig = traj.sigmas
    second_moment = 1 + 2 * 0.05**2  # E|x0|^2 of the ring mixture: R^2 + 2 c^2
    energy = (traj.latents.double().pow(2).sum(-1).mean(0) / ((1 - sig.double()) ** 2 * second_moment
                                                                 + 2 * sig.double() ** 2) - 1).tolist()
    dist = []
    for t in range(num_steps + 1):
        x = traj.latents[:, t]
        # x0_hat is where the exact posterior mean says the sample is heading; at sigma = 0 it is x itself.
        x0_hat = x - sig[t] * mixture_velocity(x, sig[t].expand(n), means, 0.05) if sig[t] > 0 else x
        dist.append(ring_distance(x0_hat).mean().item())
    return sig.tolist(), dist, energy


# ----------------------------------------------------------------------------------------------------
# The ablation


@dataclass
class Row:
    """One ablation row: the reference configuration with one factor changed (from `compare_to`)."""

    name: str
    factor: str = ""  # what it changes from `compare_to`; empty only for the reference itself
    compare_to: str = "reference"
    kind: str = "sage"
    eta: float = 0.5
    equalizer: bool = True
    curriculum: str = "static"
    weights: tuple = (1.0, 1.0, 1.0)
    anchor_every: int = 10
    beta_pos: float = 1.0
    beta_vel: float = 0.1
    # The rollout (Deviations 7): only the first `window` stochastic steps are stochastic and trained (0: all K,
    # sde.py Deviations 5), and `ode_solver` integrates the steps after them in `ode_steps` calls (None: one
    # Euler call per step, sde.py Deviations 6).
    window: int = 0
    ode_solver: str = "euler"
    ode_steps: int | None = None


def ablation_rows(matched: dict, num_steps: int = 10) -> list[Row]:
    """The rows in table order; num_steps (K) sets the solver row's calls M = K // 3 (Deviations 7)."""
    ref = Row("reference")
    rows = [ref]
    for kind in ("flow", "cps", "dance"):
        rows.append(replace(ref, name=f"sde_{kind}", factor=f"SDE {kind} (eta 0.5)", kind=kind))
    for kind in ("flow", "cps", "dance"):
        eta = matched[kind] if matched[kind] is not None else 1.0  # None: cannot match; its largest eta
        rows.append(replace(ref, name=f"sde_{kind}_matched", kind=kind, eta=eta,
                            factor=f"SDE {kind} at sage's spread (eta {eta:g})"))
    rows += [
        replace(ref, name="sde_flow_eta0.7", factor="SDE flow at its paper's eta 0.7", kind="flow", eta=0.7),
        replace(ref, name="no_equalizer", factor="equalizer off (S_t = 1)", equalizer=False),
        replace(ref, name="tr_none", factor="trust region: none", beta_pos=0.0, beta_vel=0.0),
        replace(ref, name="tr_fixed", factor="trust region: fixed anchor only", anchor_every=0, beta_vel=0.0),
        replace(ref, name="tr_moving", factor="trust region: moving anchor only (beta_vel 0)", beta_vel=0.0),
        replace(ref, name="tr_stepwise", factor="trust region: step-wise only (beta_pos 0)", beta_pos=0.0),
        replace(ref, name="curriculum_self_paced", factor="curriculum: self_paced", curriculum="self_paced"),
        replace(ref, name="curriculum_taros", factor="curriculum: taros", curriculum="taros"),
        # The reward-hacking pair: semantic-heavy weights, as the curriculum's last stage gives; the two rows
        # differ from each other in the trust region only.
        replace(ref, name="hack_dual_tr", factor="reward weights 0.1/0.1/0.8", weights=(0.1, 0.1, 0.8)),
        replace(ref, name="hack_no_tr", factor="trust region: none, with weights 0.1/0.1/0.8",
                compare_to="hack_dual_tr", weights=(0.1, 0.1, 0.8), beta_pos=0.0, beta_vel=0.0),
    ]
    # The rollout pair (issue 22, Deviations 7): an SDE window of W = 2 with Euler outside it, then the same window
    # with UniPC outside it in M = K // 3 calls (MixGRPO-Flash). Appended last, so every row above keeps its numbers.
    window = replace(ref, name="window_euler", factor="SDE window W = 2 (first 2 steps), Euler outside it", window=2)
    calls = num_steps // 3
    rows += [window, replace(window, name="window_unipc", compare_to="window_euler", ode_solver="unipc",
                             ode_steps=calls, factor=f"UniPC outside the window in M = {calls} calls")]
    return rows


# --quick keeps the rows whose claims show within 30 iterations (tests/test_toy.py); the curriculum needs
# the full run to move its stage.
QUICK_ROWS = ("reference", "tr_none", "tr_fixed", "hack_dual_tr", "hack_no_tr")


def make_evaluation(base: VelocityMLP, args) -> dict:
    """Fixed ODE noise and prompts for the quality metrics, and fixed states for kl_init (see docstring)."""
    g = torch.Generator().manual_seed(123)
    prompts = torch.arange(NUM_PROMPTS).repeat_interleave(args.eval_per_prompt)  # (M,)
    x_T = torch.randn(len(prompts), 2 * args.frames, generator=g)  # (M, 2F)
    sigmas = sde.sigma_schedule(args.num_steps, args.shift)
    # kl_init is measured on one sage, eta 0.5 rollout of the base policy, whatever the row's SDE.
    with torch.no_grad():
        base_v = lambda x, s: base(x, s, prompts)  # noqa: E731
        states = sde.rollout(base_v, torch.randn(len(prompts), 2 * args.frames, generator=g), sigmas, "sage", 0.5, g)
        mu0 = torch.stack([sde.policy_step(base_v, states, torch.full((len(prompts),), t), "sage", 0.5).mu
                           for t in range(args.num_steps)], 1)  # (M, K, 2F)
    return {"prompts": prompts, "x_T": x_T, "sigmas": sigmas, "states": states, "mu0": mu0}


@torch.no_grad()
def evaluate(net: VelocityMLP, eval_set: dict, args, weights=(1.0, 1.0, 1.0)) -> dict:
    """Per-copy metrics (each an (E,) tensor) on ODE samples of make_evaluation's fixed prompts and noise."""
    E, M = net.copies, len(eval_set["prompts"])
    prompts = eval_set["prompts"].repeat(E)  # (E M,)
    velocity = lambda x, s: net(x, s, prompts)  # noqa: E731
    traj = sde.rollout(velocity, eval_set["x_T"].repeat(E, 1), eval_set["sigmas"], "ode", 0.0)
    x = traj.latents[:, -1].view(E, M, args.frames, 2)
    scores = toy_scores(x.flatten(0, 1), prompts).view(E, M, 3)  # (E, M, 3)
    w = torch.tensor(weights) / sum(weights)
    # Circular std of the last frame's angle per prompt: sqrt(-2 log R), R the mean resultant length.
    angle = torch.atan2(x[:, :, -1, 1], x[:, :, -1, 0]).view(E, NUM_PROMPTS, -1)  # (E, P, M / P)
    R = torch.stack([angle.cos().mean(-1), angle.sin().mean(-1)], -1).norm(dim=-1).clamp(1e-6, 1)  # (E, P)
    states = sde.Trajectory.cat([eval_set["states"]] * E)
    kl, kl_steps = torch.zeros(E), []
    for t in range(args.num_steps):  # t: a denoising step
        policy = sde.policy_step(velocity, states, torch.full((E * M,), t), "sage", 0.5)
        kl_steps.append(trust_region.gaussian_kl(policy.mu, eval_set["mu0"][:, t].repeat(E, 1), policy.std**2
                                                 ).view(E, M).mean(1))  # (E,) step t's share of kl_init
        kl += kl_steps[-1]
    return {"visual": scores[..., 0].mean(1), "temporal": scores[..., 1].mean(1), "semantic": scores[..., 2].mean(1),
            "total": scores.mean((1, 2)), "total_own_weights": (scores * w).sum(-1).mean(1),
            "offring": ring_distance(x).mean((1, 2)), "kl_init": kl, "diversity": (-2 * R.log()).sqrt().mean(1),
            "kl_init_steps": torch.stack(kl_steps, 1), "samples": x}  # kl_init_steps (E, K): where the drift is


def clip_grad_norm_per_copy_(net: VelocityMLP, max_norm: float) -> torch.Tensor:
    """Clip each seed's gradient by its own norm (Deviations 6), as clip_grad_norm_ does for one run."""
    params = [p for p in net.parameters() if p.grad is not None]
    norm = torch.stack([p.grad.flatten(1).pow(2).sum(1) for p in params]).sum(0).sqrt()  # (E,)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # the same formula as torch's clip_grad_norm_
    for p in params:
        p.grad.mul_(scale.view(-1, *[1] * (p.dim() - 1)))
    return norm


def row_curriculum(row: Row, tau):
    """A fresh curriculum for one seed of `row`: its fixed weights when static, else curriculum.build_curriculum's
    competence-driven kind with the toy's thresholds tau (Deviations 4)."""
    if row.curriculum == "static":
        return curriculum.build_curriculum("static", weights=row.weights)
    return curriculum.build_curriculum(row.curriculum, tau=tau, k=30.0)  # Deviations 4


def train_row(base: VelocityMLP, row: Row, args, tau, eval_set) -> dict:
    """GRPO on the toy for one row, its seeds batched (Deviations 6); the same phases as train.py."""
    torch.manual_seed(args.seed)
    E, G = args.seeds, args.group_size
    n = args.prompts_per_iter * G  # samples per seed
    net = base.replicate(E)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    anchor = trust_region.MovingAnchor(net, row.anchor_every)
    curricula = [row_curriculum(row, tau) for _ in range(E)]  # each seed keeps its own competence
    sigmas = sde.sigma_schedule(args.num_steps, args.shift)
    stochastic = sde.step_variances(sigmas, row.kind, row.eta) > 0  # (K,)
    # As train.py: the window (K,) bool is the steps that are stochastic and trained; None without one, so a row
    # without a window makes exactly the calls it made before windows existed.
    window = sde.window_mask(stochastic, 0, row.window) if row.window else None
    trained = stochastic if window is None else window  # (K,)
    S = sde.equalizer_weights(sigmas, row.kind, row.eta, window) if row.equalizer else trained.float()  # as train.py
    rollout_calls = 0  # model calls of all the row's rollouts (each on the whole batch of E n samples)
    history = {"iter": [], **{k: [] for k in METRICS}}  # ODE metrics, one list per seed at each evaluation
    curriculum_history = {"iter": []}  # the curriculum's stats of the training batches, mean over seeds
    first_ratio_dev = None
    start = time.time()
    for iteration in range(args.iters + 1):
        if iteration % args.eval_every == 0 or iteration == args.iters:  # ODE evaluation, before this update
            metrics = evaluate(net, eval_set, args, row.weights)
            history["iter"].append(iteration)
            for k in METRICS:
                history[k].append(metrics[k].tolist())  # one value per seed
        if iteration == args.iters:
            break
        # Common random numbers: iteration i of seed e draws the same prompts and noise in every row.
        g = torch.Generator().manual_seed(args.seed * 100003 + iteration)
        # 1. sample: per seed, B prompts x G rollouts with the row's SDE, log-probs stored
        prompts = torch.randint(NUM_PROMPTS, (E, args.prompts_per_iter), generator=g).repeat_interleave(G, 1).flatten()
        velocity = lambda x, s: net(x, s, prompts)  # noqa: E731

        def counted(x, s):  # the rollout's velocity, counted: the calls column of the table
            nonlocal rollout_calls
            rollout_calls += 1
            return velocity(x, s)

        traj = sde.rollout(counted, torch.randn(E * n, 2 * args.frames, generator=g), sigmas, row.kind, row.eta, g,
                           window, ode_solver=row.ode_solver, ode_steps=row.ode_steps)
        # 2. reward: three components, mixed by each seed's curriculum
        scores = toy_scores(traj.latents[:, -1].view(E * n, args.frames, 2), prompts)  # (E n, 3)
        rewards, curriculum_stats = [], []  # per seed: (n,) mixed rewards, the curriculum's stats dict
        for e, seed_curriculum in enumerate(curricula):
            seed_scores = scores[e * n:(e + 1) * n]  # (n, 3)
            # As train.py: the competence includes this batch first, then the weights follow.
            seed_curriculum.update(seed_scores.mean(0))
            seed_rewards, seed_stats = seed_curriculum.reward(seed_scores, G)  # (n,), dict
            rewards.append(seed_rewards), curriculum_stats.append(seed_stats)
        # 3. advantage within each prompt's group (groups never straddle two seeds: n is a multiple of G)
        A = grpo.group_advantages(torch.cat(rewards), G)  # (E n,)
        # 4. update: anchor means once, then updates_per_rollout optimizer updates over the timestep columns
        timesteps = grpo.select_timesteps(E * n, trained, 1.0, g)  # (E n, K_train) denoising-step indices
        lambda_kl = trust_region.kl_coefficient(anchor.num_updates, start=0.01, end=1.0,
                                                ramp_steps=args.iters // 2)  # Deviations 2
        mu_anchor = trust_region.anchor_means(anchor, lambda mb: velocity, traj, timesteps, row.kind, row.eta,
                                              [slice(None)], row.beta_pos)  # (E n, K_s, 2F) or None
        for columns in torch.arange(timesteps.shape[1]).chunk(args.updates_per_rollout):  # Deviations 5
            optimizer.zero_grad()
            for j in columns.tolist():
                loss, loss_stats = grpo.trained_step_loss(
                    velocity, traj, timesteps[:, j], A, kind=row.kind, eta=row.eta, weight=S,
                    mu_anchor=None if mu_anchor is None else mu_anchor[:, j], lambda_kl=lambda_kl,
                    beta_pos=row.beta_pos, beta_vel=row.beta_vel, clip_range=args.clip_range)
                if first_ratio_dev is None:
                    first_ratio_dev = loss_stats["ratio_dev_max"].item()  # the on-policy check: exactly 0
                # x E: the loss is a mean over all E n samples; each seed's own mean is what one run would use.
                # / len(columns): the mean over the update's trained timesteps, as train.py's accumulation divides.
                (loss * E / len(columns)).backward()
            clip_grad_norm_per_copy_(net, 1.0)
            optimizer.step()
            anchor.step()  # counts the optimizer update; refreshes the anchor every row.anchor_every of them
        # 5. log the curriculum's view of this batch (mean over seeds)
        if iteration % args.log_every == 0:
            curriculum_history["iter"].append(iteration)
            for k in curriculum_stats[0]:
                curriculum_history.setdefault(k, []).append(sum(stats[k] for stats in curriculum_stats) / E)
    final = {k: history[k][-1] for k in METRICS}
    seeds = [{k: final[k][e] for k in METRICS} for e in range(E)]
    return {"row": row, "seeds": seeds, "history": history, "curriculum_history": curriculum_history,
            "first_ratio_dev": first_ratio_dev, "rollout_calls": rollout_calls / args.iters,
            "kl_init_per_step": metrics["kl_init_steps"].mean(0).tolist(),  # (K,) final, mean over seeds
            "wall_s": time.time() - start, "samples": metrics["samples"][0]}


def _train_row_job(job) -> dict:
    """One row in a worker process (--workers): rebuilt from plain tensors, one thread per process."""
    base_state, row, args, tau = job
    torch.set_num_threads(1)
    base = VelocityMLP(2 * args.frames)
    base.load_state_dict(base_state)
    return train_row(base, row, args, tau, make_evaluation(base, args))


def mean_std(seeds: list[dict]) -> tuple[dict, dict]:
    t = {k: torch.tensor([s[k] for s in seeds]) for k in METRICS}
    # Sample std (n - 1) over seeds: the spread a reader should expect from another seed.
    return ({k: v.mean().item() for k, v in t.items()},
            {k: (v.std().item() if len(v) > 1 else 0.0) for k, v in t.items()})


def gradient_norms(base: VelocityMLP, args) -> dict:
    """[SAGE] Fig. 4 measured: per denoising step, |d policy loss / d theta| of the base MLP, without and with
    S_t (policy term only: no anchor, lambda_KL = 0)."""
    out = {}
    sigmas = sde.sigma_schedule(args.num_steps, args.shift)
    for kind in SDE_KINDS:
        g = torch.Generator().manual_seed(5)
        prompts = torch.arange(NUM_PROMPTS).repeat_interleave(32)
        velocity = lambda x, s: base(x, s, prompts)  # noqa: E731
        traj = sde.rollout(velocity, torch.randn(len(prompts), 2 * args.frames, generator=g), sigmas, kind, 0.5, g)
        scores = toy_scores(traj.latents[:, -1].view(-1, args.frames, 2), prompts)
        A = grpo.group_advantages(scores.mean(1), 8)
        S = sde.equalizer_weights(sigmas, kind, 0.5)
        rows = {"sigma": [], "without": [], "with": []}
        for t in torch.nonzero(traj.is_stochastic).flatten().tolist():
            t_per_sample = torch.full((len(prompts),), t)  # (N,) every sample trains denoising step t
            norms = []
            for weight in (torch.ones_like(S), S):
                loss, _ = grpo.trained_step_loss(velocity, traj, t_per_sample, A, kind=kind, eta=0.5, weight=weight,
                                                 mu_anchor=None, lambda_kl=0.0, beta_pos=0.0, beta_vel=0.0,
                                                 clip_range=args.clip_range)
                grads = torch.autograd.grad(loss, list(base.parameters()))
                norms.append(torch.sqrt(sum(gr.pow(2).sum() for gr in grads)).item())
            rows["sigma"].append(sigmas[t].item()), rows["without"].append(norms[0]), rows["with"].append(norms[1])
        out[kind] = rows
    return out


# ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    p.add_argument("--cache", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache"))
    p.add_argument("--quick", action="store_true", help="5 rows, 30 iterations: what tests/test_toy.py runs")
    p.add_argument("--rows", default=None, help="NAME,NAME: train only these ablation rows (each row's numbers do "
                                                 "not depend on which others run)")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3, help="seeds per row, trained as one batched model")
    p.add_argument("--iters", type=int, default=200, help="iterations: rollout batches per row")
    p.add_argument("--prompts_per_iter", type=int, default=8)
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--num_steps", type=int, default=10, help="denoising steps K of the schedule")
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip_range", type=float, default=0.01, help="Deviations 3")
    p.add_argument("--updates_per_rollout", type=int, default=2, help="Deviations 5")
    p.add_argument("--pretrain_steps", type=int, default=3000, help="optimizer updates of the base policy")
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--eval_per_prompt", type=int, default=64)
    p.add_argument("--log_every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="processes training rows in parallel (1 = no fork)")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.pretrain_steps, args.eval_every = 30, 400, 10
    if min(args.seeds, args.updates_per_rollout, args.iters, args.workers, args.eval_every, args.log_every) < 1:
        p.error("--seeds, --updates_per_rollout, --iters, --workers, --eval_every and --log_every must be >= 1")
    names = [r.name for r in ablation_rows(dict.fromkeys(SDE_KINDS))]  # the names do not depend on the matched etas
    unknown = sorted(set(args.rows.split(",")) - set(names)) if args.rows is not None else []
    if unknown:
        p.error(f"--rows: unknown row(s) {', '.join(unknown)}; the rows are {', '.join(names)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # The toy's tensors are tiny: one thread is faster, and immune to OpenMP threads spinning against
    # whatever else runs on a laptop (we measured 10x slowdowns with 2 threads under load).
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    cache = os.path.join(args.cache, f"base_F{args.frames}_{args.pretrain_steps}_stacked.pt") if args.cache else None
    base = pretrain(args.frames, args.pretrain_steps, cache, args.seed)
    t_pretrain = time.time() - t0

    # Exploration with the exact ring velocity, on the training schedule (K, shift) (Deviations 1).
    K, shift = args.num_steps, args.shift
    etas = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    explore = {k: {e: exploration(k, e, K, shift) for e in etas} for k in SDE_KINDS}
    frontier = {k: {e: {"spread": explore[k][e][1], "offring": explore[k][e][2]} for e in etas} for k in SDE_KINDS}
    matched = matched_etas(frontier, etas, frontier["sage"][0.5]["spread"])
    along = {k: offmanifold_along(k, 0.5, K, shift) for k in ("ode",) + SDE_KINDS}  # ode: the no-noise reference
    along_matched = {"ode": along["ode"], **{k: offmanifold_along(k, matched[k] or 1.0, K, shift) for k in SDE_KINDS}}
    # The SPEC §7 measurement: many independent x_T, K = 20 (and the training K), eta 0.5.
    offring_exact = {f"K{num_steps}_shift3_eta0.5": {
        kind: ring_distance(exact_rollout(kind, 0.5, torch.randn(4096, 2, generator=torch.Generator().manual_seed(1)),
                                          num_steps, 3.0, 2).latents[:, -1]).mean().item() for kind in SDE_KINDS}
        for num_steps in (20, K)}

    # Curriculum thresholds relative to the base policy's own rollout scores (Deviations 4).
    g = torch.Generator().manual_seed(999)
    prompts = torch.arange(NUM_PROMPTS).repeat_interleave(64)
    with torch.no_grad():
        traj = sde.rollout(lambda x, s: base(x, s, prompts), torch.randn(len(prompts), 2 * args.frames, generator=g),
                           sde.sigma_schedule(K, shift), "sage", 0.5, g)
    base_rollout = toy_scores(traj.latents[:, -1].view(-1, args.frames, 2), prompts).mean(0)
    tau = (base_rollout[0].item() + 0.05, base_rollout[1].item() + 0.05)

    t_explore = time.time() - t0 - t_pretrain
    eval_set = make_evaluation(base, args)
    base_metrics = evaluate(base, eval_set, args)
    grad_norms = gradient_norms(base, args)
    rows = [r for r in ablation_rows(matched, K) if (not args.quick or r.name in QUICK_ROWS)
            and (args.rows is None or r.name in args.rows.split(","))]
    jobs = [({k: v.clone() for k, v in base.state_dict().items()}, row, args, tau) for row in rows]
    runs = []
    # Rows are independent and each runs on one thread, so --workers processes finish the table that many
    # times sooner with the same numbers (a row's result does not depend on the process it ran in).
    pool = multiprocessing.get_context("fork").Pool(args.workers) if args.workers > 1 else None
    for run in (pool.imap(_train_row_job, jobs) if pool else map(_train_row_job, jobs)):
        runs.append(run)
        mean, std = mean_std(run["seeds"])
        print(f"{run['row'].name:<22} total {mean['total']:.3f} +- {std['total']:.3f}  offring {mean['offring']:.3f}  "
              f"kl {mean['kl_init']:.3f}  rollout calls {run['rollout_calls']:g}  {run['wall_s']:.1f}s", flush=True)
    if pool:
        pool.close(), pool.join()

    t_rows = time.time() - t0 - t_pretrain - t_explore
    from toy import figures  # matplotlib is imported only to draw

    figures.write_all(args.out, args, explore=explore, frontier=frontier, etas=etas, matched=matched, along=along,
                      along_matched=along_matched, grad_norms=grad_norms, runs=runs,
                      base_samples=base_metrics["samples"][0],
                      base_metrics={k: base_metrics[k].item() for k in METRICS}, prompts=eval_set["prompts"],
                      prompt_directions=target_direction(torch.arange(NUM_PROMPTS)))  # (P, 2) the arrows of 9_samples

    t_figures = time.time() - t0 - t_pretrain - t_explore - t_rows
    ablation = []
    for run in runs:
        mean, std = mean_std(run["seeds"])
        ablation.append({"name": run["row"].name, "factor": run["row"].factor, "compare_to": run["row"].compare_to,
                         "config": asdict(run["row"]), "seeds": run["seeds"], "mean": mean, "std": std,
                         "first_ratio_dev": run["first_ratio_dev"], "rollout_calls": run["rollout_calls"],
                         "kl_init_per_step": run["kl_init_per_step"],
                         "wall_s": run["wall_s"],
                         "history": run["history"], "curriculum_history": run["curriculum_history"]})
    summary = {
        "args": vars(args),
        "pretrain_s": t_pretrain,
        "wall_s": {"pretrain": t_pretrain, "exploration": t_explore, "rows": t_rows, "figures": t_figures},
        "exploration": {k: {str(e): frontier[k][e] for e in etas} for k in SDE_KINDS},
        "matched_eta": matched,
        "offring_exact_velocity": offring_exact,
        "offmanifold_along": {"eta0.5": along, "matched": along_matched},
        "grad_norms": grad_norms,
        "base_ode": {k: base_metrics[k].item() for k in METRICS},
        "curriculum_tau": tau,
        "ablation": ablation,
        "total_s": time.time() - t0,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_summary(summary, cache is not None and t_pretrain < 1)
    return summary


def print_summary(summary: dict, cached: bool) -> None:
    a = summary["args"]
    print(f"pretrain {summary['pretrain_s']:.1f}s (cached: {cached})")
    for key, off in summary["offring_exact_velocity"].items():
        print(f"exact ring velocity, {key}, mean |r-1| over 4096 endpoints:",
              ", ".join(f"{k} {v:.3f}" for k, v in off.items()))
    print("eta matching sage's spread at eta 0.5:", summary["matched_eta"])
    print(f"ODE metrics, mean +- std over {a['seeds']} seeds, {a['iters']} iterations, K {a['num_steps']}, "
          f"shift {a['shift']:g}:")
    cols = ("total", "visual", "temporal", "semantic", "offring", "kl_init", "diversity")
    print(f"{'row':<22} " + " ".join(f"{c:>15}" for c in cols) + "  rollout calls")
    b = summary["base_ode"]
    print(f"{'base':<22} " + " ".join(f"{b[c]:>15.3f}" for c in cols))
    for r in summary["ablation"]:  # rollout calls: model calls per rollout (one call = the whole batch)
        print(f"{r['name']:<22} " + " ".join(f"{r['mean'][c]:>8.3f} +-{r['std'][c]:.3f}" for c in cols)
              + f"  {r['rollout_calls']:>13g}")
    w = summary["wall_s"]
    print(f"total {summary['total_s']:.1f}s (pretrain {w['pretrain']:.1f}, exploration {w['exploration']:.1f}, "
          f"{len(summary['ablation'])} rows on {a['workers']} workers {w['rows']:.1f}, figures {w['figures']:.1f}); "
          f"figures and summary.json in {a['out']}")


if __name__ == "__main__":
    main()
