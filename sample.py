"""Videos from a trained policy (or the base model): the training code's prompt cache, sampling loop and decoder,
written as MP4 (and GIF) files plus one contact-sheet PNG.

    python sample.py --backbone tiny --lora outputs/grpo --prompt "a red fox running through snow" --output_dir out
    python sample.py --backbone hunyuan15 --pretrained <dir> --lora <run> --prompts prompts/eval_prompts.txt \
        --num_videos_per_prompt 2 --output_dir out
    accelerate launch --num_processes 8 sample.py ...   # the videos are split across the processes

Which video is which: video k of the list (prompt-major: prompt p, copy j is k = p n + j) starts from the noise
of backbones.rollout_generators(seed, VALIDATION, k, 1), the convention of train.py's validation. So passing a
run's validation prompts in their order with the run's --seed reproduces its `samples/step<N>_<k>.gif` (tested).

Deviations / choices
1. Settings come from the command line, else from the run the weights belong to (its recorded num_steps,
   guidance, shift, clip size, fps, and the solver its validation used: --ode_solver, W + M calls), else from
   the backbone preset: `--lora RUN` alone samples as the run validated. The random-weight backbones (tiny,
   small, tiny-wan) are drawn from the run's --seed, the base the adapter was trained on; without a run, from
   --seed.
2. One writer for all videos (logs.save_videos): a GIF always, an MP4 beside it when imageio-ffmpeg is
   installed, so sample.py's files compare exactly with the run's own validation GIFs.
3. Weights are bf16 under `--mixed_precision bf16` (accelerate's setting) and float32 otherwise, the rule of
   train.py, except a LoRA adapter, which holds the file's float32 values as in training (export.py
   Deviations 5); sampling runs inside accelerate's autocast, as the prepared model does in training, so the
   velocity is the training forward's bit for bit (tested on CPU, tests/test_export.py).
4. Several processes split the videos (video k goes to process k mod P) and each writes its own files and
   its own contact sheet; nothing is gathered. With `--ulysses_degree U` (training/parallel.py) the P / U
   groups split them, the U processes of a group compute each video together and one of them writes it.
5. `--batch_size` videos are sampled per call, so the stored trajectory and the decoded clips stay bounded;
   each forward takes the preset's micro-batch (one video for the real backbones).
6. Which sampler (`--ode_solver`): by default the one train.py's validation used (Euler on the training grid,
   one call per step, unless the run set --ode_solver / --ode_steps), so a run's validation videos are
   reproduced; `unipc` integrates that grid in `--ode_steps` calls (sde.py Deviations 6); `pipeline` samples as
   the backbone's diffusers pipeline does out of the box (its folder's scheduler config, shift included, and its
   set_timesteps(K) grid: UniPC on WanPipeline's own grid for Wan2.1, Euler on the training grid for
   HunyuanVideo-1.5), for videos comparable with other papers' (tested against both pipelines). Training keeps
   its grid: the SDE, its window and log-probs are defined on it.

Test: `python -m pytest tests/test_sample_evaluate.py -q`.
"""
from __future__ import annotations

import argparse
import math
import os
import re

import torch

import sde
from models import backbones
from training import checkpoint, export, parallel
from training.options import ConfigError, read_prompts, run_command, validation_calls

SETTINGS = ("num_frames", "height", "width", "fps", "num_steps", "guidance", "shift", "micro_batch_size")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--backbone", required=True, help=f"one of {backbones.NAMES}")
    p.add_argument("--pretrained", help="Diffusers folder or cached hub id (default: the run's, else the preset's)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--lora", help="a LoRA run folder, checkpoint folder or adapter .safetensors file")
    weights.add_argument("--transformer", help="a full fine-tuning run or checkpoint folder (holding transformer/)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); before --prompts' ones")
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--seed", type=int, default=0, help="noise seed (train.py's --seed reproduces its validation)")
    p.add_argument("--num_videos_per_prompt", type=int, default=1)
    p.add_argument("--num_steps", type=int, help="K (default: the run's, else the preset's)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the run's, else the preset's)")
    p.add_argument("--sde", default="ode", choices=sde.KINDS, help="ode (deterministic) or an SDE kind of sde.py")
    p.add_argument("--eta", type=float, help="noise level of an SDE kind (default 0.5, train.py's; ode: 0)")
    p.add_argument("--batch_size", type=int, default=4, help="videos per sampling call (bounds memory)")
    add_solver_options(p)
    p.add_argument("--ulysses_degree", type=int, default=1,
                   help="context parallelism, as train.py's: U processes share each video (training/parallel.py)")
    p.add_argument("--ring_degree", type=int, default=1,
                   help="context parallelism by ring attention (training/parallel.py Deviations 6)")
    p.add_argument("--output_dir", required=True)
    return p.parse_args(argv)


def add_solver_options(p: argparse.ArgumentParser) -> None:
    """--ode_solver / --ode_steps, shared with evaluate.py (Deviations 6)."""
    p.add_argument("--ode_solver", default=None, choices=(*sde.ODE_SOLVERS, "pipeline"),
                   help="euler: the training grid, one call per step; unipc: UniPC on that grid in --ode_steps calls; "
                        "pipeline: the backbone's diffusers pipeline, its scheduler and grid (default: as the run "
                        "validated, else euler)")
    p.add_argument("--ode_steps", type=int, help="model calls of euler / unipc (default: as the run validated, else K)")


def check_solver(args: argparse.Namespace, num_steps: int) -> None:
    """The solver options against the sampling they would change (Deviations 6)."""
    if args.ode_solver == "euler" and args.ode_steps is None:
        return
    if getattr(args, "sde", "ode") != "ode":
        raise ConfigError(f"--ode_solver {args.ode_solver} / --ode_steps integrate the ODE; --sde {args.sde} samples "
                          f"every step stochastically: use --sde ode")
    if args.ode_steps is not None and args.ode_solver == "pipeline":
        raise ConfigError(f"--ode_solver pipeline samples --num_steps {num_steps} steps as the pipeline does: drop "
                          f"--ode_steps, or set --num_steps")
    if args.ode_steps is not None and not 1 <= args.ode_steps <= num_steps:
        raise ConfigError(f"--ode_steps {args.ode_steps}: model calls in 1..{num_steps} (--num_steps K, the grid the "
                          f"solver visits a subset of)")


def resolve_settings(name: str, run: dict, overrides: dict) -> dict:
    """SETTINGS from `overrides` (non-None), else `run` (a run's recorded options), else the backbone preset."""
    preset = backbones.preset(name)
    return {k: next((v for v in (overrides.get(k), run.get(k), preset[k]) if v is not None), None) for k in SETTINGS}


def resolve_weights(option: str, path: str | None, name: str) -> export.Weights | None:
    """checkpoint.resolve_weights with the option's name in every error, and the backbone checked against the run's."""
    if path is None:
        return None
    try:
        weights = checkpoint.resolve_weights(path)
    except ValueError as err:
        raise ConfigError(f"{option} {path}: {err}") from None
    trained_on = weights.run.get("backbone")
    if trained_on is not None and trained_on != name:
        raise ConfigError(f"{option} {path} was trained on --backbone {trained_on}, not {name}: pass --backbone "
                          f"{trained_on} (an adapter only fits the model it was trained on)")
    return weights


def check(args: argparse.Namespace):
    """Every option checked before any model loads. Returns (weights, prompts, settings, eta)."""
    if args.backbone not in backbones.NAMES:
        raise ConfigError(f"--backbone {args.backbone!r}: unknown backbone; choose one of {backbones.NAMES}")
    for option in ("num_videos_per_prompt", "batch_size", "num_steps", "ulysses_degree", "ring_degree"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ConfigError(f"--{option} {getattr(args, option)}: must be an integer >= 1")
    if args.seed < 0 or (args.guidance is not None and not 0 <= args.guidance < math.inf):
        raise ConfigError("--seed must be >= 0 and --guidance a finite number >= 0")
    eta = (0.0 if args.sde == "ode" else 0.5) if args.eta is None else args.eta
    if args.sde == "ode" and eta != 0:
        raise ConfigError(f"--sde ode is deterministic: drop --eta {args.eta} or pick an SDE kind")
    weights = (resolve_weights("--lora", args.lora, args.backbone)
               or resolve_weights("--transformer", args.transformer, args.backbone))
    if weights is not None and (weights.kind == "full") != (args.transformer is not None):
        given, other = ("--lora", "--transformer") if args.lora else ("--transformer", "--lora")
        held = "a full transformer" if weights.kind == "full" else "a LoRA adapter"
        raise ConfigError(f"{given} {args.lora or args.transformer} holds {held}: pass it as {other}")
    prompts = list(args.prompt) + (read_prompts(args.prompts, [], "--prompts") if args.prompts else [])
    if not prompts:
        raise ConfigError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    run = weights.run if weights is not None else {}
    settings = resolve_settings(args.backbone, run, {"num_steps": args.num_steps, "guidance": args.guidance})
    try:  # the clip size and, for real models, the weights folder (no weights are read)
        folder = backbones.check_request(args.backbone, args.pretrained or run.get("pretrained"),
                                         settings["num_frames"], settings["height"], settings["width"])
        shift = settings["shift"] if settings["shift"] is not None else backbones.default_shift(args.backbone, folder)
    except (ValueError, RuntimeError, OSError) as err:
        raise ConfigError(f"--backbone {args.backbone}: {err}") from None
    try:  # context parallelism: the family has a plan, U divides the heads, U x R the video tokens
        backbones.check_context_parallel(args.backbone, folder, num_frames=settings["num_frames"],
                                         height=settings["height"], width=settings["width"],
                                         ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:  # the schedule's own rules, on K numbers
        sde.step_variances(sde.sigma_schedule(settings["num_steps"], shift), args.sde, eta)
    except ValueError as err:
        raise ConfigError(f"--sde {args.sde} --eta {eta} --num_steps {settings['num_steps']}: {err}") from None
    if args.ode_solver is None and args.sde == "ode":  # Deviations 1: as the run validated (its solver, W + M calls)
        args.ode_solver = run.get("ode_solver") or "euler"
        if args.ode_steps is None and settings["num_steps"] == run.get("num_steps"):
            args.ode_steps = validation_calls(run)
    args.ode_solver = args.ode_solver or "euler"
    check_solver(args, settings["num_steps"])
    return weights, prompts, settings, eta


def load(name: str, pretrained, weights: export.Weights | None, seed: int, accelerator):
    """(family, backbone, policy transformer); the tiny models are drawn from the run's seed (Deviations 1), the
    dtype follows accelerate's mixed precision (Deviations 3)."""
    if accelerator.mixed_precision not in ("no", "bf16"):
        raise ConfigError(f"--mixed_precision {accelerator.mixed_precision}: use bf16 or no (train.py's rule)")
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    run = weights.run if weights is not None else {}
    family = backbones.module(name)
    backbone = family.load_backbone(name, pretrained or run.get("pretrained"), device=accelerator.device, dtype=dtype,
                                    seed=run.get("seed", seed))
    try:
        policy = export.load_policy(family, backbone, weights) if weights is not None else backbone.transformer
    except ValueError as err:  # an adapter whose keys do not fit this transformer's layers
        option = "--lora" if weights.kind == "lora" else "--transformer"
        raise ConfigError(f"{option} {weights.source}: {err}") from None
    return family, backbone, policy


def generate(family, backbone, model, cache, negative, items: list[tuple[str, int, int]], settings: dict,
             kind: str, eta: float, accelerator, ode_solver: str = "euler", ode_steps: int | None = None) -> torch.Tensor:
    """Videos (N, F, 3, H, W) in [0, 1] for items (prompt, seed, index): the noise of item (p, s, k) comes from
    rollout_generators(s, VALIDATION, k, 1), as in train.py's validation; then backbones.sample (the one
    sampling loop; backbones.pipeline_sample for --ode_solver pipeline) and the family's decoder."""
    device = accelerator.device
    latent = family.latent_shape(backbone, settings["num_frames"], settings["height"], settings["width"])
    shift = settings["shift"] if settings["shift"] is not None else backbone.shift
    sigmas = sde.sigma_schedule(settings["num_steps"], shift)  # (K+1,) as train.py's
    gens = [backbones.rollout_generators(s, backbones.VALIDATION, k, 1, device)[0] for _, s, k in items]
    x_T = backbones.initial_noise(gens, latent, device)  # (N, C, F', H', W')
    embeds = cache([p for p, _, _ in items])
    micro_batch = settings["micro_batch_size"] or len(items)
    with torch.no_grad(), accelerator.autocast():  # [dist] Deviations 3
        if ode_solver == "pipeline":  # Deviations 6
            final = backbones.pipeline_sample(family, backbone, model, embeds, negative, x_T, settings["guidance"],
                                              settings["num_steps"], micro_batch)
        else:
            final = backbones.sample(family, model, embeds, negative, x_T, gens, sigmas, kind, eta, settings["guidance"],
                                     micro_batch, ode_solver=ode_solver, ode_steps=ode_steps).latents[:, -1]
    with torch.no_grad():
        return family.decode(backbone, final)


def contact_sheet(videos: torch.Tensor, labels: list[str], path: str, columns: int = 8, height: int = 128) -> None:
    """One PNG: a row per video, `columns` evenly spaced frames, each scaled to `height` pixels, its label left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N, F = videos.shape[:2]
    frames = videos[:, torch.linspace(0, F - 1, min(columns, F)).round().long()]  # (N, c, 3, H, W)
    width = max(1, round(height * videos.shape[-1] / videos.shape[-2]))
    cells = torch.nn.functional.interpolate(frames.flatten(0, 1).float(), size=(height, width), mode="bilinear",
                                            antialias=True, align_corners=False).clamp(0, 1)  # (N c, 3, h, w)
    grid = cells.view(N, -1, 3, height, width).permute(0, 3, 1, 4, 2).reshape(N * height, -1, 3)  # (N h, c w, 3)
    fig = plt.figure(figsize=(grid.shape[1] / 100 + 3, grid.shape[0] / 100 + 0.2), dpi=100)
    ax = fig.add_axes((3 / (grid.shape[1] / 100 + 3), 0, 1 - 3 / (grid.shape[1] / 100 + 3), 1))
    ax.imshow((grid * 255).round().byte().numpy())
    ax.set_xticks([]), ax.set_yticks([height * (i + 0.5) for i in range(N)], [label[:45] for label in labels],
                                      fontsize=8)
    fig.savefig(path), plt.close(fig)


def main(args: argparse.Namespace) -> list[str]:
    """Writes the videos and the contact sheet of this process; returns the video paths (without extension)."""
    from accelerate import Accelerator

    from training import logs

    weights, prompts, settings, eta = check(args)
    accelerator = Accelerator()  # [dist]
    rank, world = accelerator.process_index, accelerator.num_processes
    # [dist] with --ulysses_degree / --ring_degree, groups of U x R processes sample the same videos together
    lay = parallel.layout(rank, world, args.ulysses_degree, args.ring_degree)
    problem = parallel.launch_problem(world, args.ulysses_degree, args.ring_degree, accelerator.device.type,
                                      backbones.module(args.backbone).CP_PLAN)
    if problem:
        raise ConfigError(problem)
    os.makedirs(args.output_dir, exist_ok=True)
    family, backbone, model = load(args.backbone, args.pretrained, weights, args.seed, accelerator)
    if lay.cp_size > 1:  # [dist] one video's tokens over the group, as in training
        parallel.enable(model, args.ulysses_degree, args.ring_degree, world, accelerator.device, family.CP_PLAN)
    n = args.num_videos_per_prompt
    every = [(p, args.seed, i * n + j) for i, p in enumerate(prompts) for j in range(n)]  # (prompt, seed, index)
    items = every[lay.dp_rank::lay.dp_size]  # [dist] Deviations 4
    writes = lay.cp_rank == 0  # [dist] a group's videos are written once
    cache = family.PromptCache(backbone)
    cache([p for p, _, _ in items])  # each distinct prompt encoded once, in batches of the cache's chunk
    negative = cache.negative(1)
    cache.offload_encoders()  # the (7B) text encoders leave the GPU; only the cache is read from here on
    paths, videos = [], []
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        clips = generate(family, backbone, model, cache, negative, chunk, settings, args.sde, eta, accelerator,
                         args.ode_solver, args.ode_steps)
        chunk_paths = [os.path.join(args.output_dir, f"{k:04d}_{slug(p)}") for p, _, k in chunk]
        if writes:
            logs.save_videos(clips, chunk_paths, settings["fps"])
        paths += chunk_paths
        videos.append(clips.cpu())
    sheet = os.path.join(args.output_dir, "contact_sheet.png" if lay.dp_size == 1 else
                         f"contact_sheet_rank{lay.dp_rank}.png")
    if items and writes:
        contact_sheet(torch.cat(videos), [f"{k}: {p}" for p, _, k in items], sheet)
    if not writes:
        return paths
    ext = ".mp4" if paths and os.path.isfile(paths[0] + ".mp4") else ".gif"
    print(f"sample.py: process {rank}: {len(paths)} videos in {args.output_dir}/ (*{ext}"
          f"{', and .gif' if ext == '.mp4' else ''}), contact sheet {sheet}; "
          f"weights: {weights.source if weights else 'base model'}")
    return paths


def slug(prompt: str, length: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:length] or "prompt"


def cli(argv=None) -> None:
    """A bad option is a usage error (exit 2, one line, no traceback), as in train.py."""
    run_command("sample.py", main, parse_args(argv))


if __name__ == "__main__":
    cli()
