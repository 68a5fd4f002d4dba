"""ODE accuracy of the solvers for the deterministic steps (sde.py Deviations 6), from the same x_T: the final
latent of Euler with K steps against the solver in M model calls on the same K-step training grid.

    python bench/ode_accuracy.py                          # the README's table, K = 12 and 24 (~17 s on 2 cores)
    python bench/ode_accuracy.py --cases gaussian,ring    # the closed forms only (no model is built)

Every row is `sde.rollout(velocity, x_T, sigma_schedule(K, shift), "ode", 0.0, ode_solver=..., ode_steps=M)` on
the same x_T: the whole trajectory is one run of deterministic steps, integrated in M calls at M + 1 of the K + 1
training sigmas (`sde.solver_grid`). The rows per K: Euler with K steps (today's rollout), Euler with M = K / 2,
UniPC (diffusers' UniPCMultistepScheduler, Wan2.1's sampler) with M = K, K / 2, K / 3, K / 4. The calls are
counted, not computed.

The cases (each its velocity, its x_T and its shift):
    gaussian   data N(m, c^2 I) in 16 dims, c = 0.5, 64 samples, shift 3. Its flow is known in closed form:
               x_sigma = (1 - sigma) m + s(sigma) z,  s(sigma) = sqrt((1 - sigma)^2 c^2 + sigma^2),  z = x_T,
               so v = dx/dsigma = -m + s'(sigma) / s(sigma) (x - (1 - sigma) m), s' = (sigma - (1 - sigma) c^2) / s,
               and the exact endpoint is m + c x_T: its errors are against that endpoint (and the 200-step Euler
               reference gets a row of its own: how far the other cases' reference is from the truth).
    ring       the toy's data (toy/manifold.py): 8 Gaussians of std 0.05 on the unit ring, the exact mixture
               velocity the toy's figures use, 256 points, the toy's shift 3.
    tiny       the tiny HunyuanVideo-1.5 backbone (random weights, no download) at its preset's clip size, latent
               (4, 3, 8, 8), 2 prompts, guidance 1 (no CFG), its shift 3.
    tiny-wan   the tiny Wan2.1 backbone, latent (16, 2, 4, 4), likewise.
The errors of ring, tiny and tiny-wan are against 200 Euler steps on sigma_schedule(200, shift) from the same x_T.

Errors of the final latent x against the reference r, over the whole batch:
    rel. RMS = |x - r|_2 / |r|_2,   max abs = max |x - r| over every element.

Deviations / choices
--------------------
1. The 200-step Euler reference has an error of its own (first order): 6e-3 relative on the Gaussian, where the
   exact endpoint is known. Errors at that level or below are not resolved in the columns that use it.
2. The tiny backbones have random weights: their velocity fields are smooth, not those of a trained model, so
   their columns show how the solvers handle a transformer's field on the training grid, not a trained video
   model's error. The closed forms are the checks with a known answer.
3. The rollout runs in float32 (as sde.rollout does), so no error below ~1e-6 relative is meaningful.

Test: `python -m pytest tests/test_ode_solver.py -q` (the solver through sde.rollout against the closed form and
against diffusers' own UniPC loop).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import sde  # noqa: E402
from toy.manifold import mixture_velocity, ring_means  # noqa: E402

CASES = ("gaussian", "ring", "tiny", "tiny-wan")
REFERENCE_STEPS = 200
PROMPTS = ["a red ball rolling across a wooden table", "a cat walking along a garden wall"]


def gaussian_case(n: int = 64, dim: int = 16, c: float = 0.5, seed: int = 0):
    """(velocity, x_T, shift, exact endpoint) of data N(m, c^2 I): the closed form in the docstring."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, generator=g, dtype=torch.float64)  # (D,) the data mean

    def velocity(x, sigma):
        s = sigma.double().view(-1, *[1] * (x.dim() - 1))  # (N, 1)
        # d/dsigma of (1 - sigma) m + s(sigma) z, with z read back from x; float64 inside, x's dtype out.
        ds_over_s = (s - (1 - s) * c**2) / ((1 - s) ** 2 * c**2 + s**2)
        return (-m + ds_over_s * (x.double() - (1 - s) * m)).to(x.dtype)  # (N, D)

    x_T = torch.randn(n, dim, generator=g)  # (N, D)
    return velocity, x_T, 3.0, m + c * x_T.double()


def ring_case(n: int = 256, seed: int = 0):
    """(velocity, x_T, shift, None): the toy's ring of 8 Gaussians and its exact velocity (toy/manifold.py)."""
    means = ring_means(8, 1.0)
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))  # (N, 2)
    return (lambda x, sigma: mixture_velocity(x, sigma, means, 0.05)), x_T, 3.0, None


def backbone_case(name: str, seed: int = 0):
    """(velocity, x_T, shift, None): a tiny backbone (random weights drawn from `seed`) at its preset's clip size,
    PROMPTS without CFG, as train.py builds its velocity."""
    from models import backbones  # here: the closed-form cases need neither diffusers nor transformers

    family, preset = backbones.module(name), backbones.preset(name)
    backbone = family.load_backbone(name, seed=seed)
    latent = family.latent_shape(backbone, preset["num_frames"], preset["height"], preset["width"])  # (C, F', H', W')
    embeds = family.PromptCache(backbone)(PROMPTS)
    velocity = backbones.velocity_fn(family, backbone.transformer, embeds, negative=None, guidance=1.0)
    x_T = torch.randn(len(PROMPTS), *latent, generator=torch.Generator().manual_seed(seed))  # (N, C, F', H', W')
    shift = preset["shift"] if preset["shift"] is not None else backbone.shift
    return velocity, x_T, shift, None


def final_latent(velocity, x_T, sigmas, solver: str, calls: int | None) -> tuple[torch.Tensor, int]:
    """The ODE's final latent from x_T on `sigmas` by `solver` in `calls` model calls (None: one Euler call per
    step), and the calls it made, counted."""
    made = 0

    def counted(x, sigma):
        nonlocal made
        made += 1
        return velocity(x, sigma)

    traj = sde.rollout(counted, x_T, sigmas, "ode", 0.0, ode_solver=solver, ode_steps=calls)
    return traj.latents[:, -1], made


def errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative RMS, max abs) of x against ref, over the whole batch."""
    diff = x.double() - ref.double()
    return (diff.norm() / ref.double().norm()).item(), diff.abs().max().item()


def solver_rows(K: int) -> list[tuple[str, int | None]]:
    """(solver, M) per row for K steps: Euler K (M None: the plain rollout), Euler K/2, UniPC K, K/2, K/3, K/4."""
    return [("euler", None), ("euler", K // 2)] + [("unipc", K // d) for d in (1, 2, 3, 4)]


@torch.no_grad()
def measure(cases: list[str], steps: list[int]) -> dict:
    """{"errors": {case: {"reference": (rel, max) of the Euler reference against the exact endpoint, or None,
    (K, solver, M): (rel, max, calls)}}, "seconds": {case: s}, "shifts": {case: shift}}."""
    out, seconds, shifts = {}, {}, {}
    for case in cases:
        t0 = time.perf_counter()
        velocity, x_T, shift, exact = {"gaussian": gaussian_case, "ring": ring_case}.get(
            case, lambda: backbone_case(case))()
        reference, _ = final_latent(velocity, x_T, sde.sigma_schedule(REFERENCE_STEPS, shift), "euler", None)
        out[case] = {"reference": errors(reference, exact) if exact is not None else None}
        target = exact if exact is not None else reference  # the truth where it is known (Deviations 1)
        for K in steps:
            sigmas = sde.sigma_schedule(K, shift)  # (K+1,) the training grid; every solver visits a subset of it
            for solver, M in solver_rows(K):
                x, calls = final_latent(velocity, x_T, sigmas, solver, M)
                assert calls == (M or K), (case, K, solver, M, calls)  # the solver makes exactly M calls
                out[case][(K, solver, M or K)] = (*errors(x, target), calls)
        seconds[case], shifts[case] = time.perf_counter() - t0, shift
    return {"errors": out, "seconds": seconds, "shifts": shifts}


def markdown(result: dict, steps: list[int]) -> str:
    """The table: a row per (K, solver, M), a column per case, each cell "rel. RMS (max abs)"."""
    errs = result["errors"]
    cases = list(errs)
    against = {c: "exact" if errs[c]["reference"] is not None else f"Euler {REFERENCE_STEPS}" for c in cases}
    lines = ["| K | solver | model calls | " + " | ".join(f"{c} (vs {against[c]})" for c in cases) + " |",
             "| ---: | --- | ---: | " + " | ".join("---:" for _ in cases) + " |"]
    cell = lambda e: f"{e[0]:.1e} ({e[1]:.1e})"  # noqa: E731
    if any(errs[c]["reference"] is not None for c in cases):
        lines.append(f"| {REFERENCE_STEPS} | Euler (the reference) | {REFERENCE_STEPS} | " + " | ".join(
            cell(errs[c]["reference"]) if errs[c]["reference"] is not None else "-" for c in cases) + " |")
    for K in steps:
        for solver, M in solver_rows(K):
            name = {"euler": "Euler", "unipc": "UniPC"}[solver]
            lines.append(f"| {K} | {name} | {M or K} | " + " | ".join(cell(errs[c][(K, solver, M or K)])
                                                                   for c in cases) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--steps", default="12,24", help="the K of the training grids, each divisible by 12 (K/2, K/3, K/4)")
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    if not set(cases) <= set(CASES):
        p.error(f"--cases {args.cases}: choose from {', '.join(CASES)}")
    steps = [int(k) for k in args.steps.split(",") if k.isdecimal()]
    if len(steps) != len(args.steps.split(",")) or any(k < 1 or k % 12 for k in steps):
        p.error(f"--steps {args.steps}: positive multiples of 12, so that K/2, K/3 and K/4 are whole")
    t0 = time.perf_counter()
    result = measure(cases, steps)
    print("Final-latent error from the same x_T, rel. RMS (max abs); the solver visits M + 1 of the K + 1 training "
          "sigmas; shift " + ", ".join(f"{c} {s:g}" for c, s in result["shifts"].items()))
    print(markdown(result, steps))
    print(f"total {time.perf_counter() - t0:.1f}s (" + ", ".join(f"{c} {s:.1f}s" for c, s in result["seconds"].items())
          + f"), torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    return result


if __name__ == "__main__":
    main()
