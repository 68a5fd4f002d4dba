"""What a run writes as it goes: one row of metrics per iteration (every key defined in README "Metrics"),
jsonl files that survive a crash, the metrics plot and the validation videos.

Files (all in the output folder)
    metrics.jsonl   one row per iteration, the source of truth for every plot and tracker
    samples.jsonl   per iteration, every sample's prompt, component scores, mixed reward and advantage
    profile.jsonl   with --profile, the per-phase table of profiling.py
Every line is strict JSON: a non-finite number is written as null (it was reported where it arose, and the
`health/*` counts say how often), never as NaN or Infinity, which JSON does not have.

Deviations / choices
1. A crash or a full disk during an append can leave a torn last line. Readers skip a torn *last* line with a
   warning (the resume then rewrites the file without it); a bad line elsewhere is not a crash signature and
   is an error.
2. Rewrites (the truncation to the resumed step, config.json, trainer_state.json) go through a temporary file,
   fsync and rename, so a crash leaves either the old or the new file, never half of one.
3. Every row is built on every process (the reductions are collective calls) and written by the main one.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings

import torch

import rewards


def strict(value):
    """The value with every non-finite float replaced by None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def append_jsonl(path: str, row: dict) -> None:
    line = json.dumps(strict(row), allow_nan=False) + "\n"
    with open(path, "a") as f:
        f.write(line)  # one write call: a crash tears at most this line (Deviations 1)


def read_jsonl(path: str) -> list[dict]:
    """The rows of a jsonl file; a torn last line is reported and skipped (Deviations 1)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if any(rest.strip() for rest in lines[i + 1 :]):
                raise ValueError(f"{path}: line {i + 1} is not JSON and is not the last line; the file was edited "
                                 f"or damaged by something other than a crash") from None
            warnings.warn(f"{path}: skipping a torn last line (written when the run was interrupted)")
    return rows


def write_text_atomic(path: str, text: str) -> None:
    """Deviations 2: write beside, flush to disk, then rename over the old file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(strict(obj), allow_nan=False, indent=1))


def truncate_jsonl(path: str, last_step: int) -> list[dict]:
    """Keeps the rows of steps <= last_step (a resume replays the rest) and returns them."""
    if not os.path.exists(path):
        return []
    rows = [r for r in read_jsonl(path) if r["step"] <= last_step]
    write_text_atomic(path, "".join(json.dumps(strict(r), allow_nan=False) + "\n" for r in rows))
    return rows


def training_row(accelerator, step: int, lr: float, lam: float, anchor, all_scores, all_mixed, all_A, stats: list,
                 grad_norms: list, cstats: dict, diagnostics: dict, wall: dict, health: dict) -> dict:
    """The metrics row of one iteration (README "Metrics"); collective: call it on every process."""
    row = {"step": step, "lr": lr, "lambda_kl": lam, "anchor/refreshes": anchor.num_refreshes}
    comp = all_scores.nanmean(0)
    row.update({f"reward/{c}": comp[j].item() for j, c in enumerate(rewards.COMPONENTS)})
    row["reward/mixed"] = all_mixed.nanmean().item()
    # the scorer's own per-sample diagnostics (e.g. the judge's off-format probability), batch means
    row.update({f"reward/{k}": accelerator.gather(v).nanmean().item() for k, v in sorted(diagnostics.items())})  # [dist]
    row["adv/abs_mean"] = all_A.abs().mean().item()
    mean_st = {k: accelerator.reduce(torch.stack([s[k] for s in stats]).mean(), "mean").item()  # [dist]
               for k in stats[0]}
    first_dev = accelerator.gather(stats[0]["ratio_dev_max"].reshape(1)).max().item()  # [dist] every process
    row.update({"train/ratio_mean": mean_st["ratio_mean"], "train/first_ratio_dev": first_dev,
                "train/clipfrac_high": mean_st["clipfrac_high"], "train/clipfrac_low": mean_st["clipfrac_low"],
                "train/approx_kl": mean_st["approx_kl"], "train/policy_loss": mean_st["policy_loss"],
                "kl/pos": mean_st["kl_pos"], "kl/vel": mean_st["kl_vel"],
                # the largest finite norm, or a non-finite one if an update had one
                "train/grad_norm": max(grad_norms, key=lambda g: g if math.isfinite(g) else math.inf)})
    device = all_scores.device
    cvals = accelerator.reduce(torch.tensor(list(cstats.values()), device=device), "mean")  # [dist] all groups
    row.update({f"curriculum/{k.replace('/', '_')}": v for k, v in zip(cstats, cvals.tolist())})
    row.update({f"health/{k}": v for k, v in health.items()})
    row.update({f"time/{phase}": seconds for phase, seconds in wall.items()})
    return row


def start(accelerator, paths: dict, start_step: int, config_path: str, config: dict) -> list[dict]:
    """At the start of a run or a resume: config.json written, every jsonl file cut back to the resumed step (the
    rest is replayed). Returns the metrics rows kept (the plot's history)."""
    history = []
    if accelerator.is_main_process:  # [dist]
        write_json(config_path, config)
        history = [truncate_jsonl(path, start_step) for path in paths.values()][0]  # paths["metrics"] first
    return history


def write_step(accelerator, paths: dict, history: list, row: dict, samples: dict, max_steps: int) -> None:
    """One iteration's records: the per-sample line, the metrics row (also to the trackers) and, every 10 steps,
    at validation and at the end, the plot. Main process only; the trackers get the finite numbers."""
    accelerator.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))  # [dist]
                     and math.isfinite(v)}, step=row["step"])
    if not accelerator.is_main_process:  # [dist]
        return
    append_jsonl(paths["samples"], samples)
    append_jsonl(paths["metrics"], row)
    history.append(row)
    if "val/total" in row or row["step"] % 10 == 0 or row["step"] == max_steps:
        plot_metrics(history, os.path.join(os.path.dirname(paths["metrics"]), "metrics.png"))


def tracker_config(config: dict) -> dict:
    """The run's options as trackers take them (TensorBoard's hparams accept numbers, strings and bools only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


def plot_metrics(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward", ["reward/mixed", "reward/visual", "reward/temporal", "reward/semantic"]),
              ("KL", ["kl/pos", "kl/vel", "train/approx_kl"]), ("grad norm", ["train/grad_norm"]),
              ("curriculum weights", ["curriculum/w_visual", "curriculum/w_temporal", "curriculum/w_semantic"]),
              ("validation (ODE) vs base", ["val/total", "val/base_total"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key.split("/")[-1], marker="." if title.startswith("val") else None)
        ax.set_title(title), ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    # fixed margins: tight_layout measures every tick label, a large part of a plot's cost
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.14, top=0.91, wspace=0.3)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80), plt.close(fig)
    os.replace(tmp, path)


def save_validation(accelerator, videos, names: list[str], fps: int) -> None:
    """This process's validation videos as files, and (main process) to the trackers: wandb gets the videos,
    TensorBoard a strip of each video's first, middle and last frame (its add_video needs moviepy)."""
    if videos is None:
        return
    os.makedirs(os.path.dirname(names[0]), exist_ok=True)
    save_videos(videos, names, fps)
    if not accelerator.is_main_process:  # [dist] trackers live on the main process
        return
    for tracker in accelerator.trackers:
        for video, name in zip(videos, names):
            tag, step = "val/" + os.path.basename(name), _step_of(name)
            frames = (video.clamp(0, 1) * 255).round().byte().cpu()  # (F, 3, H, W)
            if tracker.name == "wandb":
                import wandb

                tracker.log({tag: wandb.Video(frames.numpy(), fps=fps)}, step=step)
            elif tracker.name == "tensorboard":
                strip = torch.cat([frames[i] for i in (0, len(frames) // 2, len(frames) - 1)], dim=2)  # (3, H, 3W)
                tracker.writer.add_image(tag, strip, global_step=step)


def _step_of(name: str) -> int:
    """'.../step000025_1' -> 25; 'base_1' -> 0."""
    stem = os.path.basename(name).split("_")[0]
    return int(stem[4:]) if stem.startswith("step") else 0


def save_videos(videos: torch.Tensor, paths: list[str], fps: int) -> None:
    """GIFs always; MP4 too when imageio-ffmpeg is installed. videos: (N, F, 3, H, W) in [0, 1]."""
    import imageio.v3 as iio  # lazy: only the main process writes videos

    for video, path in zip(videos, paths):
        frames = (video.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().cpu().numpy()  # (F, H, W, 3)
        iio.imwrite(path + ".gif", frames, extension=".gif", duration=1000 / fps, loop=0)
        try:
            iio.imwrite(path + ".mp4", frames, extension=".mp4", fps=fps)
        except Exception:  # no video writer installed: the GIF is enough
            pass


class StepWarnings:
    """Reports every warning raised during one iteration with that iteration's number, however often the same
    text repeats (Python's default filter prints a given text once per call site, so a NaN reward on step 40
    would vanish after the one on step 3). Counts them for the metrics row."""

    def __init__(self, step: int):
        self.step, self.count = step, 0

    def __enter__(self):
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)
        for w in self._caught:  # also when the iteration failed: what it warned about may explain why
            self.count += 1
            print(f"warning: step {self.step}: {w.message} ({os.path.basename(w.filename)}:{w.lineno})",
                  file=sys.stderr, flush=True)
        return False
