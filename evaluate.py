"""Scores of trained policies against their base model on held-out prompts: every row (the base, then each
run) samples the same prompts with the same seeds from the same initial noise, so rows differ only by their
weights, and each run is compared with the base video by video.

    python evaluate.py --backbone tiny --runs outputs/grpo --prompts prompts/eval_prompts.txt --seeds 2 \
        --output_dir eval
    accelerate launch --num_processes 8 evaluate.py --backbone hunyuan15 --pretrained <dir> --runs <run> ... \
        --reward videoalign --reward_prompt_template <rubric.txt> --output_dir eval

Writes eval.json (everything, per-video scores included), eval.md (the table a paper prints) and eval.png
(bar chart with 95 % intervals).

Statistics (one reward, one component; P prompts x S seeds; x_ps the score of prompt p with seed s)
    mean      m = (1 / P S) sum_ps x_ps
    SE        sd_p(xbar_p) / sqrt(P),  xbar_p = (1 / S) sum_s x_ps     (prompts are the sampled unit)
    95 % CI   m -+ 1.96 SE                                               (normal approximation)
    total     the mean of the three components (train.py's val/total: equal weights)
    vs base   d_ps = x_ps(run) - x_ps(base): its mean, SE and interval as above;
              win rate = mean of w_ps, w = 1 if x(run) > x(base), 0.5 if equal, 0 otherwise
A policy equal to the base (a zero adapter) gives identical videos, so every pair ties: win rate 0.5, d = 0.

Deviations / choices
1. SE over prompts, not over videos: the S seeds of one prompt are not independent draws of the prompt
   distribution, and treating the P S videos as independent would understate the SE.
2. Every row samples with the backbone preset's settings (ODE, K, guidance, shift, clip size) and one sampler
   (`--ode_solver`, `--ode_steps`, as sample.py's: by default Euler on the training grid; `pipeline` as the
   backbone's diffusers pipeline samples), the one protocol for all rows, whatever each run was trained with;
   the base weights are the runs' (their --pretrained, or for the random tiny backbones their --seed, which must
   agree). eval.json records these settings; with `pipeline` the scheduler config the pipeline sampled with (its
   folder's, its shift included) replaces the preset's shift, which the pipeline does not read.
3. Video (p, s) starts from rollout_generators(s, VALIDATION, p, 1): the video `sample.py --seed s` makes
   for prompt p of the same file.
4. Videos are scored as they are made (`--batch_size` at a time) and dropped: memory stays bounded whatever
   the number of prompts. Processes take every P-th video and the scores are gathered.
5. `--reward_model` and `--reward_prompt_template` belong to the one model-based reward in `--reward`
   (several model-based rewards take their default models).

Test: `python -m pytest tests/test_sample_evaluate.py -q`.
"""
from __future__ import annotations

import argparse
import math
import os

import torch

import rewards
import sample
from models import backbones
from training import export, parallel
from training.options import ConfigError, read_prompts, run_command

DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "eval_prompts.txt")
COLUMNS = (*rewards.COMPONENTS, "total")
Z95 = 1.959964  # standard normal 97.5 % quantile


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--backbone", required=True, help=f"one of {backbones.NAMES}")
    p.add_argument("--pretrained", help="Diffusers folder or cached hub id (default: the runs', else the preset's)")
    p.add_argument("--runs", nargs="+", required=True, help="run folders, checkpoint folders or adapter files")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, help="text file, one prompt per line (default: held-out set)")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per prompt")
    p.add_argument("--reward", nargs="+", help=f"one or more of {rewards.REWARDS} (default: the backbone preset's)")
    p.add_argument("--reward_model", help="folder or hub id of the model-based reward ('tiny': random tiny one)")
    p.add_argument("--reward_prompt_template", help="VideoAlign rubric (or judge template) file")
    p.add_argument("--batch_size", type=int, default=4, help="videos per sampling and scoring call (bounds memory)")
    sample.add_solver_options(p)
    p.add_argument("--ulysses_degree", type=int, default=1,
                   help="context parallelism, as train.py's: U processes share each video (training/parallel.py)")
    p.add_argument("--ring_degree", type=int, default=1,
                   help="context parallelism by ring attention (training/parallel.py Deviations 6)")
    p.add_argument("--output_dir", required=True)
    return p.parse_args(argv)


def check(args: argparse.Namespace):
    """Every option checked before any model loads. Returns (weights per run, prompts, reward names, model seed,
    pretrained)."""
    if args.backbone not in backbones.NAMES:
        raise ConfigError(f"--backbone {args.backbone!r}: unknown backbone; choose one of {backbones.NAMES}")
    if min(args.seeds, args.batch_size, args.ulysses_degree, args.ring_degree) < 1:
        raise ConfigError("--seeds, --batch_size, --ulysses_degree and --ring_degree must be integers >= 1")
    prompts = read_prompts(args.prompts, [], "--prompts")
    weights = [sample.resolve_weights("--runs", path, args.backbone) for path in args.runs]
    names = args.reward or [backbones.preset(args.backbone)["reward"]]
    model_based = [r for r in names if r != "proxy"]
    if len(set(names)) != len(names):
        raise ConfigError(f"--reward {' '.join(names)}: each reward once")
    if (args.reward_model or args.reward_prompt_template) and len(model_based) != 1:
        raise ConfigError(f"--reward_model / --reward_prompt_template go to the one model-based reward; --reward "
                          f"{' '.join(names)} has {len(model_based)}: evaluate them in separate calls")
    for r in names:
        try:
            model, template = (args.reward_model, args.reward_prompt_template) if r != "proxy" else (None, None)
            rewards.check_reward(r, model, template)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(str(err)) from None
    # Deviations 2: one base model for every row
    seeds = {w.run["seed"] for w in weights if "seed" in w.run}
    pretrained = {w.run.get("pretrained") for w in weights if w.run} - {None}
    if args.backbone not in backbones.module(args.backbone).HUB_IDS and len(seeds) > 1:
        raise ConfigError(f"--runs were trained on different random {args.backbone} models (--seed {sorted(seeds)}): "
                          f"they share no base model; evaluate them separately")
    if args.pretrained is None and len(pretrained) > 1:
        raise ConfigError(f"--runs were trained from different --pretrained {sorted(pretrained)}: pass --pretrained")
    pretrained = args.pretrained or next(iter(pretrained), None)
    settings = sample.resolve_settings(args.backbone, {}, {})
    args.ode_solver = args.ode_solver or "euler"  # Deviations 2: one protocol for every row, not each run's own
    sample.check_solver(args, settings["num_steps"])
    try:
        folder = backbones.check_request(args.backbone, pretrained,
                                         *(settings[k] for k in ("num_frames", "height", "width")))
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"--backbone {args.backbone}: {err}") from None
    try:  # context parallelism: the family has a plan, U divides the heads, U x R the video tokens
        backbones.check_context_parallel(args.backbone, folder, **{k: settings[k] for k in ("num_frames", "height",
                                         "width")}, ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return weights, prompts, names, next(iter(seeds), 0), pretrained


def summarize(x: torch.Tensor) -> dict:
    """Mean, SE over prompts and 95 % interval of scores x (P, S) (module docstring, Deviations 1)."""
    per_prompt = x.double().mean(1)  # (P,)
    mean = per_prompt.mean().item()
    se = per_prompt.std().item() / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else float("nan")
    return {"mean": mean, "se": se, "ci95": [mean - Z95 * se, mean + Z95 * se]}


def compare(x: torch.Tensor, base: torch.Tensor) -> dict:
    """Paired by prompt and seed: win rate (ties 0.5) and the difference to the base, each summarized."""
    wins = (x > base).double() + 0.5 * (x == base).double()  # (P, S)
    win = summarize(wins)
    return {"win_rate": win["mean"], "win_rate_se": win["se"], "diff": summarize(x - base)}


def with_total(scores: torch.Tensor) -> torch.Tensor:
    """(..., 3) components -> (..., 4) with their mean appended (COLUMNS)."""
    return torch.cat([scores, scores.mean(-1, keepdim=True)], -1)


def main(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from training import logs

    weights, prompts, names, model_seed, pretrained = check(args)
    accelerator = Accelerator()  # [dist]
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    # [dist] with --ulysses_degree / --ring_degree, groups of U x R processes sample and score the same videos
    lay = parallel.layout(rank, world, args.ulysses_degree, args.ring_degree)
    problem = parallel.launch_problem(world, args.ulysses_degree, args.ring_degree, device.type,
                                      backbones.module(args.backbone).CP_PLAN)
    if problem:
        raise ConfigError(problem)
    os.makedirs(args.output_dir, exist_ok=True)
    family, backbone, base = sample.load(args.backbone, pretrained, None, model_seed, accelerator)
    split = lambda model: parallel.enable(model, args.ulysses_degree, args.ring_degree, world, device,  # noqa: E731
                                          family.CP_PLAN)
    group = parallel.group(split(base)) if lay.cp_size > 1 else None  # [dist] the base's tokens over the group
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" and device.type == "cuda" else torch.float32
    scorers = {r: rewards.build_reward(r, path=args.reward_model if r != "proxy" else None,
                                       prompt_template_file=args.reward_prompt_template if r != "proxy" else None,
                                       device=device, dtype=dtype, batch_size=args.batch_size) for r in names}
    settings = sample.resolve_settings(args.backbone, {}, {})  # Deviations 2
    P, S = len(prompts), args.seeds
    items = [(prompts[p], s, p) for p in range(P) for s in range(S)]  # flat index p S + s; Deviations 3
    mine = list(range(len(items)))[lay.dp_rank::lay.dp_size]  # [dist] Deviations 4
    cache = family.PromptCache(backbone)
    cache(list(dict.fromkeys(prompts[i // S] for i in mine)))
    negative = cache.negative(1)
    cache.offload_encoders()  # the (7B) text encoders leave the GPU; only the cache is read from here on
    chunks = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    bar = tqdm(total=len(chunks) * (1 + len(weights)), desc="evaluate", disable=not accelerator.is_local_main_process)

    rows = []
    for name, w in [("base", None), *zip(args.runs, weights)]:
        try:
            model = base if w is None else export.load_policy(family, backbone, w)
            if model is not base and lay.cp_size > 1:  # a full fine-tuned transformer: split it too
                split(model)
        except ValueError as err:  # an adapter whose keys do not fit this transformer's layers
            bar.close()  # the error gets a line of its own
            raise ConfigError(f"--runs {name}: {err}") from None
        local = []
        for chunk in chunks:
            videos = sample.generate(family, backbone, model, cache, negative, [items[i] for i in chunk], settings,
                                     "ode", 0.0, accelerator, args.ode_solver, args.ode_steps)
            chunk_prompts = [items[i][0] for i in chunk]
            score_all = lambda v, p: (torch.stack([rewards.score_batched(  # noqa: E731  (n, R x 3)
                scorers[r], v, p, settings["fps"], args.batch_size)[0] for r in names], 1).flatten(1), {})
            scores = parallel.share_scores(score_all, videos, chunk_prompts, lay, group)[0].view(-1, len(names), 3)
            local += list(zip(chunk, scores.cpu().tolist()))
            bar.update(1)
        gathered = sorted(dict(gather_object(local)).items())  # [dist] every (index, scores), once per group
        rows.append((name, w, with_total(torch.tensor([s for _, s in gathered]).view(P, S, len(names), 3))))
        if w is not None and w.kind == "lora":  # back to the base for the next row
            base.delete_adapters(export.ADAPTER)
        backbone.transformer = base
    bar.close()

    result = {"backbone": args.backbone, "pretrained": pretrained, "prompts": args.prompts, "num_prompts": P,
              "seeds": list(range(S)), "rewards": names, "columns": list(COLUMNS),
              "settings": {**settings, "ode_solver": args.ode_solver, "ode_steps": args.ode_steps,
                           # the pipeline samples with its folder's scheduler (its shift), not the preset's shift
                           **({"shift": None, "pipeline_scheduler": dict(backbone.scheduler)}
                              if args.ode_solver == "pipeline" else {})},
              "statistics": "mean; SE over prompts (seeds averaged first); ci95 = mean -+ 1.96 SE; win rate vs base "
                            "paired by prompt and seed, ties 0.5",
              "items": [{"prompt": p, "seed": s} for p, s, _ in items], "rows": []}
    base_scores = rows[0][2]
    for name, w, x in rows:  # x: (P, S, R, 4)
        row = {"name": name, "weights": w.source if w else None, "kind": w.kind if w else None,
               "scores": {r: {c: summarize(x[:, :, i, j]) for j, c in enumerate(COLUMNS)} for i, r in enumerate(names)},
               "per_video": {r: x[:, :, i].reshape(P * S, -1).tolist() for i, r in enumerate(names)}}
        if w is not None:
            row["vs_base"] = {r: {c: compare(x[:, :, i, j], base_scores[:, :, i, j]) for j, c in enumerate(COLUMNS)}
                              for i, r in enumerate(names)}
        result["rows"].append(row)
    if accelerator.is_main_process:  # [dist]
        logs.write_json(os.path.join(args.output_dir, "eval.json"), result)
        with open(os.path.join(args.output_dir, "eval.md"), "w") as f:
            f.write(markdown(result))
        bar_chart(result, os.path.join(args.output_dir, "eval.png"))
        print(markdown(result))
        print(f"evaluate.py: wrote eval.json, eval.md and eval.png to {args.output_dir}")
    return result


def markdown(result: dict) -> str:
    """The paper table: per reward, mean +- SE per component, the total's difference to the base with its 95 %
    interval, and the win rate against the base."""
    lines = []
    for r in result["rewards"]:
        lines += [f"**{r}** ({result['backbone']}, {result['num_prompts']} prompts x {len(result['seeds'])} seeds; "
                  f"mean +- SE over prompts)", "",
                  "| policy | " + " | ".join(COLUMNS) + " | total - base [95 % CI] | win rate vs base |",
                  "|---" * (len(COLUMNS) + 3) + "|"]
        for row in result["rows"]:
            cells = [f"{row['scores'][r][c]['mean']:.4f} +- {row['scores'][r][c]['se']:.4f}" for c in COLUMNS]
            if "vs_base" in row:
                d = row["vs_base"][r]["total"]
                lo, hi = d["diff"]["ci95"]
                cells += [f"{d['diff']['mean']:+.3g} [{lo:+.3g}, {hi:+.3g}]", f"{d['win_rate']:.3f}"]
            else:
                cells += ["-", "-"]
            lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def bar_chart(result: dict, path: str) -> None:
    """One panel per reward: a bar per (column, row), whiskers at the 95 % interval; fixed y axis [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, names = result["rows"], result["rewards"]
    fig, axes = plt.subplots(1, len(names), figsize=(2 + 1.2 * len(COLUMNS) * len(names), 3.6), squeeze=False)
    width = 0.8 / len(rows)
    for ax, r in zip(axes[0], names):
        for k, row in enumerate(rows):
            s = [row["scores"][r][c] for c in COLUMNS]
            err = [0 if math.isnan(x["se"]) else Z95 * x["se"] for x in s]
            ax.bar([j + k * width for j in range(len(COLUMNS))], [x["mean"] for x in s], width, yerr=err,
                   capsize=2, label=os.path.basename(row["name"].rstrip("/")) or row["name"])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(COLUMNS))], COLUMNS)
        ax.set_ylim(0, 1), ax.set_title(r), ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.9, wspace=0.25)
    fig.savefig(path, dpi=80), plt.close(fig)


def cli(argv=None) -> None:
    """A bad option is a usage error (exit 2, one line, no traceback), as in train.py."""
    run_command("evaluate.py", main, parse_args(argv))


if __name__ == "__main__":
    cli()
