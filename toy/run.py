"""The 2-D toy: the project's own sde / grpo / trust_region / curriculum code on a problem small enough to see.

    python toy/run.py            # ~1-2 min on a 2-core laptop CPU; figures + summary.json in toy/out/
    python toy/run.py --quick    # ~20 s, for tests

Setting (SPEC §7)
-----------------
A "video" is F frames of 2-D points (default F = 4; F = 1 gives plain points). Data videos move along
the unit ring at a constant angular speed and end near the target arc of their prompt p (one of four
directions u_p). The base policy is an MLP velocity v(x, sigma, p) trained by flow matching on data whose
prompt label is right only 30 % of the time, so it obeys the prompt weakly and alignment has room to
improve. Its three reward components play the roles of VideoAlign's VQ / MQ / TA:
    visual   = exp(-mean_f | |x_f| - 1 | / 0.15)                      every frame close to the ring
    temporal = exp(-(std_f dtheta_f + mean_f |d|x_f||) / 0.15)        steady angular step, steady radius
    semantic = sigmoid(4 (mean_f <x_f, u_p> - 0.5))                   the clip sits on the prompt's arc
semantic is hackable on purpose: pushing points *off* the ring along u_p keeps raising it, which is
what the trust region has to prevent. The scales are wide enough to stay informative on SDE rollouts,
whose last step still adds noise of std ~0.1; final quality is measured on ODE samples (eta = 0), as
the papers evaluate.

Figures (fixed axes and seeds), written to --out:
    1_fan.png        one x_T, many rollouts of each SDE kind at the same eta, exact ring velocity
    2_frontier.png   exploration spread vs off-manifold distance across eta, per kind
    3_variance.png   V_t of flow vs sage against sigma, and the equalizer weights S_t per kind
    4_training.png   reward, components, off-manifold distance, KL to the initial policy, curriculum
    5_samples.png    ODE samples per prompt: base policy vs the SAGE variant

Deviations / choices
--------------------
1. The exploration figures use the closed-form velocity of a ring of 8 Gaussians (toy/manifold.py), not
   the MLP, so they show the samplers and not a network's errors. Training uses the MLP.
2. The trust-region coefficient is scaled to the toy: the KL is a mean over 2F numbers, not millions, so
   lambda_KL ramps from 0.01 to 1.0 (trust_region.kl_coefficient) instead of 1e-7 to 1e-5.
3. clip_range = 0.01 instead of 1e-4: the per-element mean log-prob over 8 numbers moves far more per
   update than over a video latent, and 1e-4 would clip almost every sample after the first update.
4. Curriculum thresholds are set relative to the base policy's own rollout scores (tau_j = base mean
   + 0.05, steepness 30), since the toy's score scale has nothing to do with VideoAlign's.
5. Each rollout batch feeds 2 optimizer steps (the trained steps are split in two halves), so the
   step-wise KL and the on-policy check (first ratio exactly 1) are both exercised.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import curriculum  # noqa: E402
import grpo  # noqa: E402
import sde  # noqa: E402
import trust_region  # noqa: E402
from toy.manifold import mixture_velocity, ring_distance, ring_means  # noqa: E402

NUM_PROMPTS = 4
KINDS = ("flow", "sage", "cps", "dance")
COLORS = {"flow": "tab:red", "sage": "tab:blue", "cps": "tab:green", "dance": "tab:orange"}


# ----------------------------------------------------------------------------------------------------
# Data, rewards, base policy


def target_direction(p: torch.Tensor) -> torch.Tensor:
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
    """v(x, sigma, p) for flattened clips x (N, 2F); a prompt embedding and sigma are concatenated."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(NUM_PROMPTS, 16)
        self.net = nn.Sequential(nn.Linear(dim + 3 + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, sigma, prompts):
        sigma = sigma.view(-1, 1).expand(len(x), 1)
        feats = torch.cat([x, sigma, torch.sin(math.pi * sigma), torch.cos(math.pi * sigma), self.embed(prompts)], 1)
        return self.net(feats)


def pretrain(frames: int, steps: int, cache: str | None, seed: int = 0) -> VelocityMLP:
    """Flow matching on clips whose prompt label is right 30 % of the time; cached on disk (safetensors-free
    plain state dict, loaded with weights_only=True)."""
    torch.manual_seed(seed)  # the MLP's initial weights: before building it, so a fresh pretrain is reproducible
    net = VelocityMLP(2 * frames)
    if cache and os.path.exists(cache):
        net.load_state_dict(torch.load(cache, weights_only=True))
        return net
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        true_p = torch.randint(NUM_PROMPTS, (512,), generator=g)
        x0 = sample_videos(true_p, frames, g).flatten(1)  # (512, 2F)
        shown = torch.where(torch.rand(512, generator=g) < 0.3, true_p, torch.randint(NUM_PROMPTS, (512,), generator=g))
        eps, sigma = torch.randn(x0.shape, generator=g), torch.rand(512, generator=g)
        x = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        loss = (net(x, sigma, shown) - (eps - x0)).pow(2).mean()  # flow-matching regression onto v = eps - x0
        opt.zero_grad(), loss.backward(), opt.step(), sched.step()
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        torch.save(net.state_dict(), cache)
    return net


# ----------------------------------------------------------------------------------------------------
# GRPO on the toy: the same phases as train.py, on the same module functions


@dataclass
class Variant:
    name: str
    kind: str = "sage"
    eta: float = 0.5
    equalizer: bool = True
    curriculum: str = "static"
    weights: tuple = (1.0, 1.0, 1.0)
    anchor_every: int = 10
    beta_pos: float = 1.0
    beta_vel: float = 0.1
    lam: float = 1.0


VARIANTS = [
    Variant("flowgrpo", kind="flow", eta=0.7, equalizer=False, anchor_every=0, beta_vel=0.0),
    Variant("sage"),
    Variant("sage_no_tr", beta_pos=0.0, beta_vel=0.0),
    Variant("sage_fixed_anchor", anchor_every=0),
    Variant("sage_curriculum", curriculum="self_paced"),
    # Reward hacking demo: semantic-heavy weights, as the curriculum's last stage gives.
    Variant("hack_no_tr", weights=(0.1, 0.1, 0.8), beta_pos=0.0, beta_vel=0.0),
    Variant("hack_dual_tr", weights=(0.1, 0.1, 0.8)),
]


def ode_eval(net, frames, num_steps, shift, n_per_prompt=64, seed=123):
    """Mean component scores and ring distance of ODE samples (eta = 0) on fixed prompts and noise."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.arange(NUM_PROMPTS).repeat_interleave(n_per_prompt)
    x_T = torch.randn(len(prompts), 2 * frames, generator=g)
    traj = sde.rollout(lambda x, s: net(x, s, prompts), x_T, sde.sigma_schedule(num_steps, shift), "ode", 0.0)
    x = traj.latents[:, -1].view(-1, frames, 2)
    return toy_scores(x, prompts).mean(0), ring_distance(x).mean().item(), x, prompts


def train_variant(base: VelocityMLP, v: Variant, args, tau) -> dict:
    torch.manual_seed(args.seed)
    net, initial = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    anchor = trust_region.MovingAnchor(net, v.anchor_every)
    cur = (curriculum.SelfPacedCurriculum(tau=tau, k=30.0) if v.curriculum == "self_paced"
           else curriculum.StaticCurriculum(v.weights))
    sigmas = sde.sigma_schedule(args.num_steps, args.shift)
    S = sde.equalizer_weights(sigmas, v.kind, v.eta) if v.equalizer else torch.ones(args.num_steps)
    N, G = args.prompts_per_iter * args.group_size, args.group_size
    hist = {k: [] for k in ["iter", "reward", "visual", "temporal", "semantic", "offring", "kl_init", "first_ratio",
                            "w_visual", "w_temporal", "w_semantic", "stage"]}
    start = time.time()
    for it in range(args.iters):
        g = torch.Generator().manual_seed(args.seed * 100003 + it)
        # 1. sample: B prompts x G rollouts with the chosen SDE, log-probs stored
        prompts = torch.randint(NUM_PROMPTS, (args.prompts_per_iter,), generator=g).repeat_interleave(G)
        velocity = lambda x, s: net(x, s, prompts)  # noqa: E731
        traj = sde.rollout(velocity, torch.randn(N, 2 * args.frames, generator=g), sigmas, v.kind, v.eta, g)
        # 2. reward: three components, mixed by the curriculum
        x_final = traj.latents[:, -1].view(N, args.frames, 2)
        scores = toy_scores(x_final, prompts)  # (N, 3)
        cur.update(scores.mean(0))  # competence includes this batch, then the weights follow (as train.py)
        reward, cstats = cur.reward(scores, G)
        # 3. advantage within each prompt's group
        A = grpo.group_advantages(reward, G)
        # 4. update: every stochastic step, a random order per sample, split over 2 optimizer steps
        steps = grpo.select_timesteps(N, traj.is_stochastic, 1.0, g)  # (N, K_s)
        lam = trust_region.kl_coefficient(anchor.num_updates, 0.01 * v.lam, v.lam, args.iters // 2)
        mu_anchor = [None] * steps.shape[1]
        if v.beta_pos > 0 and not anchor.is_current:  # anchor means at rollout time, never in the inner loop
            with torch.no_grad(), anchor.swapped_in():
                mu_anchor = [sde.policy_step(velocity, traj, steps[:, j], v.kind, v.eta)[0] for j in range(steps.shape[1])]
        first_ratio = None
        for chunk in torch.arange(steps.shape[1]).chunk(2):
            opt.zero_grad()
            for j in chunk.tolist():
                loss, st = grpo.trained_step_loss(velocity, traj, steps[:, j], A, v.kind, v.eta, S, mu_anchor[j],
                                                  lam, v.beta_pos, v.beta_vel, args.clip_range)
                first_ratio = st["ratio_dev_max"].item() if first_ratio is None else first_ratio
                (loss / steps.shape[1]).backward()  # mean over trained (i, t)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            anchor.step()
        # 5. log
        if it % args.log_every == 0 or it == args.iters - 1:
            with torch.no_grad():  # KL of the current policy to the initial one on this batch's states
                kl = 0.0
                for t in torch.nonzero(traj.is_stochastic).flatten().tolist():
                    tt = torch.full((N,), t)
                    mu, std, _ = sde.policy_step(velocity, traj, tt, v.kind, v.eta)
                    mu0, _, _ = sde.policy_step(lambda x, s: initial(x, s, prompts), traj, tt, v.kind, v.eta)
                    kl += trust_region.gaussian_kl(mu, mu0, std**2).mean().item() / args.num_steps
            values = [it, reward.mean().item(), *scores.mean(0).tolist(), ring_distance(x_final).mean().item(), kl,
                      first_ratio, cstats["w/visual"], cstats["w/temporal"], cstats["w/semantic"], cstats["stage"]]
            for key, val in zip(hist, values):
                hist[key].append(val)
    final_scores, final_offring, _, _ = ode_eval(net, args.frames, args.num_steps, args.shift)
    w = torch.tensor(v.weights) / sum(v.weights)
    return {"variant": asdict(v), "history": hist, "net": net, "wall_s": time.time() - start,
            "final": {"visual": final_scores[0].item(), "temporal": final_scores[1].item(),
                      "semantic": final_scores[2].item(), "total_equal_weights": final_scores.mean().item(),
                      "total_own_weights": (final_scores * w).sum().item(), "offring": final_offring,
                      "kl_init": hist["kl_init"][-1]}}


# ----------------------------------------------------------------------------------------------------
# Exploration measurements with the exact ring velocity


def exploration(kind, eta, n=512, num_steps=20, shift=3.0, seed=7):
    """Rollouts from ONE shared x_T: spread = mean distance of endpoints to their centroid; off = mean |r - 1|."""
    means = ring_means(8, 1.0)
    x_T = torch.randn(1, 2, generator=torch.Generator().manual_seed(seed)).expand(n, 2)
    traj = sde.rollout(lambda x, s: mixture_velocity(x, s, means, 0.05), x_T, sde.sigma_schedule(num_steps, shift),
                       kind, eta, torch.Generator().manual_seed(seed + 1))
    end = traj.latents[:, -1]
    spread = (end - end.mean(0)).norm(dim=-1).mean().item()
    return traj, spread, ring_distance(end).mean().item()


def ring_offring_many(kind, eta, n=4000, num_steps=20, shift=3.0):
    """Mean |r - 1| of endpoints from independent x_T (the SPEC §7 measurement)."""
    means = ring_means(8, 1.0)
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    traj = sde.rollout(lambda x, s: mixture_velocity(x, s, means, 0.05), x_T, sde.sigma_schedule(num_steps, shift),
                       kind, eta, torch.Generator().manual_seed(2))
    return ring_distance(traj.latents[:, -1]).mean().item()


# ----------------------------------------------------------------------------------------------------
# Figures


def _ring(ax, lim=1.8):
    t = torch.linspace(0, 2 * math.pi, 200)
    ax.plot(t.cos(), t.sin(), color="k", lw=1, alpha=0.6)
    ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])


def figures(out, fan, frontier, etas, runs, base_eval, best):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 1. exploration fan
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.3))
    for ax, kind in zip(axes, KINDS):
        traj, spread, off = fan[kind]
        _ring(ax)
        for path in traj.latents[:48]:
            ax.plot(path[:, 0], path[:, 1], color=COLORS[kind], lw=0.6, alpha=0.35)
        ax.scatter(traj.latents[:, -1, 0], traj.latents[:, -1, 1], s=4, color=COLORS[kind])
        ax.scatter(*traj.latents[0, 0], marker="*", s=150, color="k", zorder=5)
        ax.set_title(f"{kind}, eta 0.5: mean |r-1| {off:.3f}, spread {spread:.2f}", fontsize=10)
    fig.suptitle(f"One x_T (star), {len(fan['sage'][0].latents)} rollouts per SDE kind, exact ring velocity, K = 20, shift 3")
    fig.tight_layout(), fig.savefig(os.path.join(out, "1_fan.png"), dpi=90), plt.close(fig)

    # 2. frontier
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for kind in KINDS:
        pts = [frontier[kind][e] for e in etas]
        ax.plot([p["spread"] for p in pts], [p["offring"] for p in pts], "o-", color=COLORS[kind], label=kind)
        for e, p in zip(etas, pts):
            ax.annotate(f"{e:g}", (p["spread"], p["offring"]), fontsize=7, color=COLORS[kind])
    ax.set_xlabel("exploration: mean endpoint distance to centroid (one x_T)")
    ax.set_ylabel("off-manifold: mean |r - 1|"), ax.set_xlim(0, 1.4), ax.set_ylim(0, 0.3)
    ax.set_title("Exploration vs manifold across eta (labels)"), ax.legend()
    fig.tight_layout(), fig.savefig(os.path.join(out, "2_frontier.png"), dpi=90), plt.close(fig)

    # 3. variance per step and equalizer weights
    sig = sde.sigma_schedule(20, 5.0)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.3))
    for kind in KINDS:
        V = sde.step_variances(sig, kind, 0.5)
        a1.semilogy(sig[:-1], V.clamp(min=1e-6), "o-", color=COLORS[kind], ms=3, label=kind)
        a2.semilogy(sig[:-1], sde.equalizer_weights(sig, kind, 0.5).clamp(min=1e-3), "o-", color=COLORS[kind], ms=3,
                    label=kind)
    a1.set_xlabel("sigma_t (1 = noise)"), a1.set_ylabel("V_t"), a1.invert_xaxis(), a1.legend()
    a1.set_title("Per-step variance, eta 0.5, K 20, shift 5 (flow > sage below sigma = 1)")
    a2.set_xlabel("sigma_t"), a2.set_ylabel("S_t"), a2.invert_xaxis(), a2.legend()
    a2.set_title("Gradient norm equalizer S_t = median(N) / N_t")
    fig.tight_layout(), fig.savefig(os.path.join(out, "3_variance.png"), dpi=90), plt.close(fig)

    # 4. training curves
    keys = [("reward", "mixed reward (rollouts)"), ("visual", "visual"), ("temporal", "temporal"),
            ("semantic", "semantic"), ("offring", "off-manifold |r-1| (rollouts)"), ("kl_init", "KL to initial policy")]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    for ax, (key, title) in zip(axes.flat, keys):
        for name, run in runs.items():
            ax.plot(run["history"]["iter"], run["history"][key], label=name, lw=1.2)
        ax.set_title(title), ax.set_xlabel("iteration")
    axes.flat[4].set_yscale("log"), axes.flat[5].set_yscale("log")
    axes.flat[0].legend(fontsize=7)
    h = runs["sage_curriculum"]["history"]
    ax = axes.flat[6]
    for name in curriculum.COMPONENTS:
        ax.plot(h["iter"], h[f"w_{name}"], label=f"w {name}")
    ax.set_ylim(0, 1), ax.set_title("sage_curriculum: weights"), ax.legend(fontsize=8)
    axes.flat[7].plot(h["iter"], h["stage"]), axes.flat[7].set_ylim(0.9, 3.1)
    axes.flat[7].set_title("sage_curriculum: stage (1 vis, 2 temp, 3 sem)")
    fig.tight_layout(), fig.savefig(os.path.join(out, "4_training.png"), dpi=80), plt.close(fig)

    # 5. before / after samples
    fig, axes = plt.subplots(2, NUM_PROMPTS, figsize=(4 * NUM_PROMPTS, 8.3))
    for row, (label, (scores, off, x, prompts)) in enumerate([("base", base_eval), (best[0], best[1])]):
        for p in range(NUM_PROMPTS):
            ax = axes[row, p]
            _ring(ax, 1.6)
            clips = x[prompts == p][:40]
            for clip in clips:
                ax.plot(clip[:, 0], clip[:, 1], "-", color="tab:blue", alpha=0.4, lw=0.8)
                ax.scatter(clip[-1, 0], clip[-1, 1], s=6, color="tab:blue")
            u = target_direction(torch.tensor([p]))[0]
            ax.annotate("", xy=(1.45 * u[0], 1.45 * u[1]), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="r"))
            ax.set_title(f"{label}, prompt {p}")
        axes[row, 0].set_ylabel(f"{label}: visual {scores[0]:.2f} temporal {scores[1]:.2f} semantic {scores[2]:.2f}")
    fig.suptitle("ODE samples (F frames joined, dot = last frame); red arrow = the prompt's target arc")
    fig.tight_layout(), fig.savefig(os.path.join(out, "5_samples.png"), dpi=80), plt.close(fig)


# ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    p.add_argument("--cache", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache"))
    p.add_argument("--quick", action="store_true", help="small run for tests (~20 s on 2 cores)")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--prompts_per_iter", type=int, default=16)
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--num_steps", type=int, default=10)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip_range", type=float, default=0.01, help="Deviations 3")
    p.add_argument("--pretrain_steps", type=int, default=3000)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.explore_samples = 512
    if args.quick:
        args.iters, args.prompts_per_iter, args.pretrain_steps, args.log_every = 60, 8, 800, 10
        args.explore_samples = 256
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # The toy's tensors are tiny: one thread is faster, and immune to OpenMP threads spinning against
    # whatever else runs on a laptop (we measured 10x slowdowns with 2 threads under load).
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    cache = os.path.join(args.cache, f"base_F{args.frames}_{args.pretrain_steps}.pt") if args.cache else None
    base = pretrain(args.frames, args.pretrain_steps, cache, args.seed)
    t_pretrain = time.time() - t0

    etas = [0.1, 0.3, 0.5, 0.7, 1.0]
    n = args.explore_samples
    frontier = {k: {e: dict(zip(("spread", "offring"), exploration(k, e, n)[1:])) for e in etas} for k in KINDS}
    fan = {k: exploration(k, 0.5, n) for k in KINDS}
    offring_20 = {k: ring_offring_many(k, 0.5, 8 * n) for k in KINDS}

    # Curriculum thresholds relative to the base policy's own rollout scores (Deviations 4).
    g = torch.Generator().manual_seed(999)
    prompts = torch.arange(NUM_PROMPTS).repeat_interleave(64)
    traj = sde.rollout(lambda x, s: base(x, s, prompts), torch.randn(len(prompts), 2 * args.frames, generator=g),
                       sde.sigma_schedule(args.num_steps, args.shift), "sage", 0.5, g)
    base_rollout = toy_scores(traj.latents[:, -1].view(-1, args.frames, 2), prompts).mean(0)
    tau = (base_rollout[0].item() + 0.05, base_rollout[1].item() + 0.05)

    runs = {v.name: train_variant(base, v, args, tau) for v in VARIANTS}
    base_eval = ode_eval(base, args.frames, args.num_steps, args.shift)
    best = ("sage", ode_eval(runs["sage"]["net"], args.frames, args.num_steps, args.shift))
    figures(args.out, fan, frontier, etas, runs, base_eval, best)

    summary = {
        "args": vars(args),
        "pretrain_s": t_pretrain,
        "exploration": {k: {str(e): frontier[k][e] for e in etas} for k in KINDS},
        "offring_eta0.5_K20_shift3": offring_20,
        "base_ode": {"visual": base_eval[0][0].item(), "temporal": base_eval[0][1].item(),
                     "semantic": base_eval[0][2].item(), "total_equal_weights": base_eval[0].mean().item(),
                     "offring": base_eval[1]},
        "curriculum_tau": tau,
        "variants": {name: {**run["final"], "wall_s": run["wall_s"], "first_ratio_dev": run["history"]["first_ratio"][0],
                            "history": run["history"]} for name, run in runs.items()},
        "total_s": time.time() - t0,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    print(f"pretrain {t_pretrain:.1f}s (cached: {cache is not None and t_pretrain < 1})")
    print(f"exact ring velocity, K=20, shift 3, eta 0.5, mean |r-1| over {8 * n} endpoints:",
          ", ".join(f"{k} {offring_20[k]:.3f}" for k in KINDS))
    print(f"{'variant':<18} {'visual':>7} {'tempor':>7} {'semant':>7} {'total':>7} {'|r-1|':>7} {'KL_init':>8} {'wall':>6}")
    b = summary["base_ode"]
    print(f"{'base (ODE)':<18} {b['visual']:7.3f} {b['temporal']:7.3f} {b['semantic']:7.3f} "
          f"{b['total_equal_weights']:7.3f} {b['offring']:7.3f}")
    for name, s in summary["variants"].items():
        print(f"{name:<18} {s['visual']:7.3f} {s['temporal']:7.3f} {s['semantic']:7.3f} {s['total_equal_weights']:7.3f} "
              f"{s['offring']:7.3f} {s['kl_init']:8.2e} {s['wall_s']:5.1f}s")
    print(f"total {summary['total_s']:.1f}s; figures and summary.json in {args.out}")
    return summary


if __name__ == "__main__":
    main()
