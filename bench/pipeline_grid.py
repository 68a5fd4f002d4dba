"""How far sample.py's default sampler (Euler on the training grid) is from the backbone's diffusers pipeline out
of the box (`--ode_solver pipeline`), on tiny-wan (CPU, seconds): the two sigma grids, and the final latents of
the same x_T with Euler and with UniPC on the training grid against the pipeline's.

    python bench/pipeline_grid.py
"""
import os
import sys

import torch
from diffusers import UniPCMultistepScheduler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sde  # noqa: E402
from models import backbones, wan  # noqa: E402


def main():
    b = wan.load_backbone("tiny-wan", seed=0)
    cache = wan.PromptCache(b)
    embeds, negative = cache(["a red ball", "a blue car at night"]), cache.negative(1)
    x_T = torch.randn((2, *wan.latent_shape(b, 5, 32, 32)), generator=torch.Generator().manual_seed(0))
    print("| K | max sigma gap, pipeline grid vs training grid | Euler on the training grid vs pipeline | "
          "UniPC on the training grid vs pipeline |\n|---|---|---|---|")
    for K in (4, 8, 20):
        scheduler = UniPCMultistepScheduler.from_config(wan.HUB_SCHEDULER)
        scheduler.set_timesteps(K)
        gap = (scheduler.sigmas.double() - sde.sigma_schedule(K, b.shift).double()).abs().max().item()
        pipe = backbones.pipeline_sample(wan, b, b.transformer, embeds, negative, x_T, 5.0, K, 2)
        ours = {}
        for solver in ("euler", "unipc"):
            gens = [torch.Generator() for _ in range(2)]
            with torch.no_grad():
                ours[solver] = backbones.sample(wan, b.transformer, embeds, negative, x_T, gens,
                                                sde.sigma_schedule(K, b.shift), "ode", 0.0, 5.0, 2,
                                                ode_solver=solver).latents[:, -1]
        print(f"| {K} | {gap:.4f} | {(ours['euler'] - pipe).abs().max():.3f} | {(ours['unipc'] - pipe).abs().max():.4f} |")


if __name__ == "__main__":
    main()
