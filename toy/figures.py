"""The toy's figures (toy/run.py computes, this file only draws): fixed axes, a legend per panel, and the
schedule and eta in every title, so a figure read alone says what it shows.

What a figure draws from the toy's runs arrives as an argument of `write_all` (the prompt directions u_p
included); only figure 3 computes, from sde, the schedule's closed-form variances. So this file's only
project imports are sde and curriculum (COMPONENTS), never toy/run.py: the script depends on its figures,
not the other way round.
"""
from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import sde  # noqa: E402
from curriculum import COMPONENTS  # noqa: E402  the order of the score columns and the curriculum's stats

COLORS = {"flow": "tab:red", "sage": "tab:blue", "cps": "tab:green", "dance": "tab:orange", "ode": "k"}
ROW_COLORS = {
    "reference": "tab:blue", "sde_flow": "tab:red", "sde_cps": "tab:green", "sde_dance": "tab:orange",
    "sde_flow_matched": "tab:red", "sde_cps_matched": "tab:green", "sde_dance_matched": "tab:orange",
    "sde_flow_eta0.7": "darkred", "no_equalizer": "tab:purple", "tr_none": "tab:gray", "tr_fixed": "tab:brown",
    "tr_moving": "tab:cyan", "tr_stepwise": "tab:olive", "curriculum_self_paced": "tab:pink",
    "curriculum_taros": "tab:purple", "hack_dual_tr": "tab:blue", "hack_no_tr": "tab:red",
    "window_euler": "tab:green", "window_unipc": "darkgreen",
}


def _ring(ax, lim=1.8):
    t = torch.linspace(0, 2 * math.pi, 200)
    ax.plot(t.cos(), t.sin(), color="k", lw=1, alpha=0.6)
    ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])


def _paths(ax, paths, color, lw=0.6, alpha=0.35):
    """Many polylines (n, T, 2) in one plot call, NaN-separated: one artist instead of n."""
    n, T, _ = paths.shape
    joined = torch.cat([paths, torch.full((n, 1, 2), float("nan"))], 1).reshape(-1, 2)
    ax.plot(joined[:, 0], joined[:, 1], color=color, lw=lw, alpha=alpha)


def _save(fig, out, name, dpi=80):
    fig.savefig(os.path.join(out, name), dpi=dpi)
    plt.close(fig)


def _band(ax, run, key, label=None, **kw):
    """Mean over seeds with a +- std band, against the iteration."""
    h = run["history"]
    v = torch.tensor(h[key])  # (T, E)
    mean, std = v.mean(1), (v.std(1) if v.shape[1] > 1 else torch.zeros(len(v)))
    color = ROW_COLORS.get(run["row"].name)
    ax.plot(h["iter"], mean, label=label or run["row"].name, color=color, **kw)
    ax.fill_between(h["iter"], mean - std, mean + std, color=color, alpha=0.15)


def write_all(out, args, explore, frontier, etas, matched, along, along_matched, grad_norms, runs, base_samples,
              base_metrics, prompts, prompt_directions):
    """Write the nine PNGs into `out`. prompts: (M,) the prompt of each evaluation sample (rows of
    base_samples and of each run's samples); prompt_directions: (P, 2) u_p, the arc each prompt rewards."""
    schedule = f"K = {args.num_steps}, shift {args.shift:g}"
    by_name = {r["row"].name: r for r in runs}

    # 1. the fan: one x_T, many rollouts per kind at eta 0.5
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6))
    for ax, kind in zip(axes, frontier):
        traj, spread, off = explore[kind][0.5]
        _ring(ax)
        _paths(ax, traj.latents[:48], COLORS[kind])
        ax.scatter(traj.latents[:, -1, 0], traj.latents[:, -1, 1], s=4, color=COLORS[kind], label="endpoints")
        ax.scatter(*traj.latents[0, 0], marker="*", s=150, color="k", zorder=5, label="x_T")
        ax.set_title(f"{kind}, eta 0.5: spread {spread:.2f}, |r-1| {off:.3f}", fontsize=10)
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle(f"{len(traj.latents)} rollouts from one x_T (star) per SDE kind, exact ring velocity, {schedule}. "
                 "spread = mean distance of endpoints from their start's centroid (8 starts); |r-1| = mean "
                 "distance from the ring", fontsize=9)
    fig.tight_layout()
    _save(fig, out, "1_fan.png", dpi=90)

    # 2. exploration vs manifold frontier, and where each kind matches sage's spread at eta 0.5
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    target = frontier["sage"][0.5]["spread"]
    for kind in frontier:
        pts = [frontier[kind][e] for e in etas]
        m = matched[kind]
        ax.plot([p["spread"] for p in pts], [p["offring"] for p in pts], "o-", color=COLORS[kind], ms=3,
                label=f"{kind} (matched eta {m:g})" if m is not None else f"{kind} (cannot match)")
        for e, p in zip(etas, pts):
            if e in (0.1, 0.3, 0.5, 0.7, 1.0):
                ax.annotate(f"{e:g}", (p["spread"], p["offring"]), fontsize=7, color=COLORS[kind])
    ax.axvline(target, color="k", ls=":", lw=1, label=f"sage's spread at eta 0.5 ({target:.2f})")
    ax.set_xlabel("exploration: spread (mean endpoint distance from its start's centroid)")
    ax.set_ylabel("off-manifold: mean |r - 1| of endpoints"), ax.set_xlim(0, 1.2), ax.set_ylim(0, 0.5)
    ax.set_title(f"Exploration vs manifold across eta (point labels), exact ring velocity, {schedule}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out, "2_frontier.png", dpi=90)

    # 3. variance per step, the flow / sage ratio, the equalizer weights
    sig = sde.sigma_schedule(args.num_steps, args.shift)
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.6))
    for kind in frontier:
        V = sde.step_variances(sig, kind, 0.5)
        a1.semilogy(sig[:-1], V.clamp(min=1e-6), "o-", color=COLORS[kind], ms=3, label=kind)
        a3.semilogy(sig[:-1], sde.equalizer_weights(sig, kind, 0.5).clamp(min=1e-3), "o-", color=COLORS[kind], ms=3,
                    label=kind)
    ratio = sde.step_variances(sig, "flow", 0.5) / sde.step_variances(sig, "sage", 0.5)
    a2.plot(sig[:-1], ratio, "o-", color="k", ms=3, label="V_flow / V_sage")
    a2.axhline(1, color="gray", ls=":", lw=1, label="equal")
    a1.set_title(f"V_t per step, eta 0.5, {schedule}", fontsize=10), a1.set_ylabel("V_t"), a1.set_ylim(1e-4, 1)
    a2.set_title("flow's surplus: V_flow / V_sage (step 0: sage's guard\nat sigma = 1 makes it the larger)", fontsize=10)
    a2.set_ylim(0, 3)
    a3.set_title("equalizer S_t = median(N) / N_t, N_t = |d mu_t / d v| / std_t", fontsize=10)
    a3.set_ylabel("S_t (0 = not trained)"), a3.set_ylim(1e-2, 20)
    for a in (a1, a2, a3):
        a.set_xlabel("sigma_t (1 = noise)"), a.set_xlim(1.02, 0), a.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out, "3_variance.png")

    # 4. off-manifold along the trajectory ([SAGE] Fig. 1): x0 estimate's distance beyond the ODE's, and energy
    fig, axes = plt.subplots(1, 3, figsize=(19, 4.8))
    panels = ((axes[0], along, "x0_hat's distance beyond the ODE's, eta 0.5", 1),
              (axes[1], along_matched, "the same at sage's spread (matched eta)", 1),
              (axes[2], along, "energy of x_t over the exact path's, eta 0.5", 2))
    for ax, data, title, col in panels:
        for kind, rec in data.items():
            eta = 0.0 if kind == "ode" else (0.5 if data is along else (matched.get(kind) or 1.0))
            y = torch.tensor(rec[col]) - (torch.tensor(data["ode"][col]) if col == 1 else 0)
            ax.plot(rec[0], y, "o-", color=COLORS[kind], ms=3, label=f"{kind} (eta {eta:g})")
        ax.set_xlim(1.02, -0.02), ax.set_xlabel("sigma_t (1 = noise)")
        ax.set_title(f"{title}\nexact ring velocity, {schedule}", fontsize=10), ax.legend(fontsize=8)
    axes[0].set_ylabel("mean | |x0_hat| - 1 | minus the ODE's,\nx0_hat = x_t - sigma_t v(x_t)")
    axes[0].set_ylim(-0.05, 0.25), axes[1].set_ylim(-0.05, 0.25)
    axes[2].set_ylabel("E|x_t|^2 / ((1 - sigma)^2 E|x0|^2 + 2 sigma^2) - 1"), axes[2].set_ylim(-0.35, 0.2)
    fig.suptitle("Where each sampler leaves the manifold, 2048 trajectories from independent x_T", fontsize=10)
    fig.tight_layout()
    _save(fig, out, "4_offmanifold.png")

    # 5. measured per-step gradient norms without / with the equalizer ([SAGE] Fig. 4)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    for ax, key in zip(axes, ("without", "with")):
        for kind, norms in grad_norms.items():
            v = torch.tensor(norms[key])
            ax.semilogy(norms["sigma"], v, "o-", color=COLORS[kind], ms=3,
                        label=f"{kind}: max/min {(v.max() / v.min()).item():.1f}")
        ax.set_xlim(1.02, 0), ax.set_ylim(1e-3, 1e2), ax.set_xlabel("sigma_t (1 = noise)"), ax.legend(fontsize=8)
        ax.set_title(f"{key} S_t", fontsize=10)
    axes[0].set_ylabel("|d policy loss / d theta| of one step")
    fig.suptitle(f"Measured gradient norm per trained step, base MLP, one batch of 128, eta 0.5, {schedule}",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, out, "5_gradnorm.png")

    # 6. every row over training (ODE reward, mean +- std over seeds) and reward vs KL
    groups = [("SDE at eta 0.5, and flow at its paper's 0.7", ["reference", "sde_flow", "sde_cps", "sde_dance",
                                                                "sde_flow_eta0.7"], "total"),
              ("SDE at sage's spread (matched eta)", ["reference", "sde_flow_matched", "sde_cps_matched",
                                                      "sde_dance_matched"], "total"),
              ("equalizer and curriculum", ["reference", "no_equalizer", "curriculum_self_paced", "curriculum_taros"],
               "total"),
              ("trust region", ["reference", "tr_none", "tr_fixed", "tr_moving", "tr_stepwise"], "total"),
              ("reward hacking: weights 0.1/0.1/0.8 - off-ring distance", ["hack_dual_tr", "hack_no_tr"], "offring"),
              ("the rollout: SDE window W = 2, Euler or UniPC outside it", ["reference", "window_euler",
                                                                           "window_unipc"], "total")]
    fig = plt.figure(figsize=(24, 10))
    grid = fig.add_gridspec(2, 4)  # six panels of curves, then reward vs KL over the last two cells
    axes = [fig.add_subplot(grid[i // 4, i % 4]) for i in range(len(groups))] + [fig.add_subplot(grid[1, 2:])]
    for ax, (title, names, key) in zip(axes, groups):
        for name in names:
            if name in by_name:
                _band(ax, by_name[name], key)
        ax.axhline(base_metrics[key], color="k", ls=":", lw=1, label="base policy")
        ax.set_xlabel("iteration"), ax.set_title(title, fontsize=10), ax.legend(fontsize=7, loc="best")
        if key == "total":
            ax.set_ylim(0.1, 0.9), ax.set_ylabel("ODE reward, equal weights")
        else:
            ax.set_yscale("log"), ax.set_ylim(0.01, 3), ax.set_ylabel("ODE mean |r - 1|")
    ax = axes[-1]
    for run in runs:
        kl = torch.tensor([s["kl_init"] for s in run["seeds"]])
        tot = torch.tensor([s["total"] for s in run["seeds"]])
        ax.errorbar(kl.mean(), tot.mean(), xerr=kl.std() if len(kl) > 1 else 0, yerr=tot.std() if len(tot) > 1 else 0,
                    fmt="o", ms=4, color=ROW_COLORS.get(run["row"].name), label=run["row"].name)
    ax.set_xscale("symlog", linthresh=0.1), ax.set_xlim(0, 1e4), ax.set_ylim(0.1, 0.9)
    ax.set_xlabel("KL to the initial policy (sum over steps, sage eta 0.5 scale)"), ax.set_ylabel("final ODE reward")
    ax.set_title("final reward vs KL, mean +- std over seeds", fontsize=10), ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"The ablation: one factor per row, {args.seeds} seeds (band = +- std), {args.iters} iterations, "
                 f"reference = sage, eta 0.5, equalizer, dual trust region, equal weights, {schedule}", fontsize=10)
    fig.tight_layout()
    _save(fig, out, "6_ablation.png", dpi=70)

    # 7. the trust-region variants of [SAGE] Fig. 8 on one axis
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    labels = {"tr_none": "none", "tr_fixed": "fixed anchor", "tr_stepwise": "step-wise only", "tr_moving": "moving only",
              "reference": "dual (moving + step-wise)"}
    for ax, key, ylabel in zip(axes, ("total", "offring", "kl_init"),
                               ("ODE reward, equal weights", "ODE mean |r - 1|", "KL to the initial policy")):
        for name, label in labels.items():
            if name in by_name:
                _band(ax, by_name[name], key, label=label)
        ax.set_xlabel("iteration"), ax.set_ylabel(ylabel), ax.legend(fontsize=8)
    axes[0].set_ylim(0.2, 0.9), axes[1].set_ylim(0, 0.3), axes[2].set_yscale("symlog", linthresh=0.1)
    axes[2].set_ylim(0, 1e3)
    fig.suptitle(f"Trust-region variants ([SAGE] Fig. 8), everything else as the reference; {args.seeds} seeds, "
                 f"{args.updates_per_rollout} updates per rollout, {schedule}", fontsize=10)
    fig.tight_layout()
    _save(fig, out, "7_trust_region.png")

    # 8. the curriculum's view of each batch ([SPG] Fig. 2 analogue)
    names = [n for n in ("reference", "curriculum_self_paced", "curriculum_taros") if n in by_name]
    fig, axes = plt.subplots(len(names), 4, figsize=(18, 3.6 * len(names)), squeeze=False)
    comp_colors = {"visual": "tab:blue", "temporal": "tab:orange", "semantic": "tab:green"}
    for r, name in enumerate(names):
        h = by_name[name]["curriculum_history"]
        for c, (prefix, title, ylim) in enumerate((("w/", "weights w_j", (0, 1)), (None, "stage (1 vis, 2 temp, 3 sem)",
                                                   (0.9, 3.1)), ("hoyer/", "Hoyer sparsity within group", (0, 0.3)),
                                                   ("group_std/", "within-group std", (0, 0.2)))):
            ax = axes[r, c]
            if prefix is None:
                ax.plot(h["iter"], h["stage"], color="k", label="stage")
            else:
                for comp in COMPONENTS:
                    ax.plot(h["iter"], h[prefix + comp], color=comp_colors[comp], label=comp)
            ax.set_ylim(*ylim), ax.set_title(f"{name}: {title}", fontsize=9), ax.legend(fontsize=7)
            ax.set_xlabel("iteration")
    fig.suptitle("Curriculum statistics of the training rollouts, mean over seeds (reference = static equal weights)",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, out, "8_curriculum.png", dpi=70)

    # 9. samples: base, reference, and the reward-hacking pair (seed 0)
    rows = [("base", base_samples, base_metrics)] + [
        (n, by_name[n]["samples"], by_name[n]["seeds"][0]) for n in ("reference", "hack_dual_tr", "hack_no_tr")
        if n in by_name]
    fig, axes = plt.subplots(len(rows), len(prompt_directions), figsize=(14, 3.6 * len(rows)), squeeze=False)
    for r, (label, x, m) in enumerate(rows):
        for p, u in enumerate(prompt_directions):  # u: (2,) the prompt's arc, drawn as an arrow
            ax = axes[r, p]
            _ring(ax, 2.2)
            clips = x[prompts == p][:40]  # (40, F, 2)
            _paths(ax, clips, "tab:blue", lw=0.8, alpha=0.4)
            ax.scatter(clips[:, -1, 0], clips[:, -1, 1], s=6, color="tab:blue")
            ax.annotate("", xy=(1.45 * u[0], 1.45 * u[1]), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="r"))
            ax.set_title(f"{label}, prompt {p}", fontsize=9)
        axes[r, 0].set_ylabel(f"vis {m['visual']:.2f} temp {m['temporal']:.2f} sem {m['semantic']:.2f}\n"
                              f"|r-1| {m['offring']:.2f} diversity {m['diversity']:.2f}", fontsize=8)
    fig.suptitle(f"ODE samples of seed 0 (4 frames joined, dot = last frame; red arrow = the prompt's arc), {schedule}",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, out, "9_samples.png", dpi=70)
