"""What a run writes as it goes: one row of metrics per iteration (every key is defined in docs/training.md,
"Metrics"), jsonl files that survive a crash, the metrics plot, the validation videos and what the trackers
receive.

Files (all in the output folder; OUTPUTS lists them as patterns, which checkpoint.py records as the run's own)
    config.json     the run's options and identity
    metrics.jsonl   one row per iteration, the source of truth for every plot and tracker
    samples.jsonl   per iteration, every sample's prompt, component scores, mixed reward and advantage
    profile.jsonl   with --profile, the per-phase table of profiling.py
    metrics.png     the plot of metrics.jsonl: a fixed 3 x 2 grid of panels
    samples/        the validation videos, base_<i> and step<NNNNNN>_<i> (.gif, and .mp4 with imageio-ffmpeg);
                    other files there are not the run's and are left alone
    tracker/, wandb/  the trackers' own files (TensorBoard, wandb)
Every line is strict JSON: a non-finite number is written as null (it was reported where it arose, and the
`health/*` counts say how often), never as NaN or Infinity, which JSON does not have.

Deviations / choices
1. A crash or a full disk during an append can leave a torn last line; a power loss can also leave a damaged
   line in the middle (data the disk never received). Readers skip every line that is not JSON with a warning
   naming it (the resume then rewrites the file without it), so the run goes on without that row. A row can
   only be lost that way before the checkpoint covering it exists: checkpoint.save fsyncs these files before it
   seals a checkpoint. A resume that finds rows missing anyway (the file edited or damaged later) says which,
   and which checkpoint re-makes them (a resumed run replays its steps bit for bit).
2. Rewrites (the truncation to the resumed step, config.json, trainer_state.json) go through a temporary file,
   fsync and rename, so a crash leaves either the old or the new file, never half of one.
3. Every row is built on every process (the reductions are collective calls) and written by the main one.
4. After a resume the trackers receive only steps they have not received: those in metrics.jsonl before the
   resume cut it back were sent already, and the resumed run replays them bit for bit, so skipping them loses
   nothing (`History.logged_until`; the validation frames likewise). A step whose row the crash tore reaches a
   tracker twice.
5. A warning is printed on one line, `warning: [step N: ]message (file.py:line)`: Python's default adds the
   source line that raised it, which for an f-string repeats the message (`one_line_warnings`).
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings

import torch

import rewards

JSONL = ("metrics.jsonl", "samples.jsonl", "profile.jsonl")
SAMPLES = "samples"                  # the validation videos (train.validation names them, save_videos writes them)
TRACKERS = ("tracker", "wandb")      # train.TRACKER_RUN (TensorBoard) and wandb's folder: files the libraries name
# What a run writes into its output folder, as fnmatch patterns relative to it; the folder part is literal.
# checkpoint.py adds its own (checkpoints/, the final export) and records them all before the run writes.
OUTPUTS = ("config.json", *JSONL, "metrics.png", "metrics.png.tmp.png",
           *(f"{name}.tmp[0-9]*" for name in ("config.json", *JSONL)),  # write_text_atomic's temporary files
           *(f"{SAMPLES}/{stem}_[0-9]*.{ext}" for stem in ("base", "step[0-9]*") for ext in ("gif", "mp4")),
           *(f"{folder}/*" for folder in TRACKERS))


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
    """The rows of a jsonl file; a line that is not JSON is reported and skipped (Deviations 1)."""
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
            if any(rest.strip() for rest in lines[i + 1 :]):  # not a crash's torn append: a damaged file
                warnings.warn(f"{path}: skipping line {i + 1}, which is not JSON (damaged, e.g. by a power loss "
                              f"or an edit); the row it held is lost")
            else:
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
    return _truncate(path, last_step)[1]


def _truncate(path: str, last_step: int) -> tuple[list[dict], list[dict]]:
    """(every row the file held, the rows kept), the file rewritten with the kept ones."""
    if not os.path.exists(path):
        return [], []
    rows = read_jsonl(path)
    kept = [r for r in rows if r["step"] <= last_step]
    write_text_atomic(path, "".join(json.dumps(strict(r), allow_nan=False) + "\n" for r in kept))
    return rows, kept


def training_row(accelerator, step: int, lr: float, lam: float, anchor, all_scores, all_mixed, all_A, stats: list,
                 grad_norms: list, cstats: dict, diagnostics: dict, wall: dict, health: dict) -> dict:
    """The metrics row of one iteration (docs/training.md "Metrics"); collective: call it on every process."""
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


class History(list):
    """The metrics rows of the run so far (the plot's data) and `logged_until`, the last step the trackers have
    already received (Deviations 4)."""

    def __init__(self, rows=(), logged_until: int = 0):
        super().__init__(rows)
        self.logged_until = logged_until


def start(accelerator, paths: dict, start_step: int, config_path: str, config: dict) -> History:
    """At the start of a run or a resume: config.json written, every jsonl file cut back to the resumed step (the
    rest is replayed). Returns the metrics rows kept (the plot's history), with the last step the trackers got."""
    history = History()
    if accelerator.is_main_process:  # [dist]
        write_json(config_path, config)
        cut = {name: _truncate(path, start_step) for name, path in paths.items()}
        rows, kept = cut["metrics"]
        # the rows beyond start_step were sent to the trackers before the crash; the replay recomputes them
        history = History(kept, logged_until=max((r["step"] for r in rows), default=0))
        steps = {r["step"] for r in kept}
        missing = [s for s in range(min(steps, default=start_step + 1), start_step + 1) if s not in steps]
        if missing:  # Deviations 1: only an edit or a damaged disk can do this; say how to get them back
            warnings.warn(f"{paths['metrics']}: no row for step(s) {', '.join(map(str, missing))}, which the resumed "
                          f"checkpoint (step {start_step}) covers; they stay missing. To re-make them, resume from a "
                          f"checkpoint of step {missing[0] - 1} or earlier (--resume_from_checkpoint <folder>)")
    return history


def write_step(accelerator, paths: dict, history: History, row: dict, samples: dict, max_steps: int) -> None:
    """One iteration's records: the per-sample line, the metrics row (also to the trackers, unless they have this
    step already: Deviations 4) and, every 10 steps, at validation and at the end, the plot. Main process only;
    the trackers get the finite numbers."""
    if row["step"] > history.logged_until:
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


PANELS = [("reward", ["reward/mixed", "reward/visual", "reward/temporal", "reward/semantic"]),
          ("KL", ["kl/pos", "kl/vel", "train/approx_kl"]),
          ("clip fraction", ["train/clipfrac_high", "train/clipfrac_low"]),
          ("grad norm", ["train/grad_norm"]),
          ("curriculum weights", ["curriculum/w_visual", "curriculum/w_temporal", "curriculum/w_semantic"]),
          ("validation (ODE) vs base", ["val/total", "val/base_total"])]
PLOT_SIZE = (12.0, 7.0)  # inches at PLOT_DPI: 1200 x 700 pixels whatever the run length
PLOT_DPI = 100


def metrics_figure(rows: list[dict]):
    """The panels of PANELS as a 3 x 2 grid of fixed size. Every tick label carries its own value ('%.4g'): no
    shared offset or '1e-9' multiplier above the axis, which collided with the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(2, 3, figsize=PLOT_SIZE)
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key.split("/")[-1], marker="." if title.startswith("val") else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
        if ax.lines:
            ax.legend(fontsize=7)
    # fixed margins, wide enough for '%.4g' labels and a title per row: tight_layout measures every tick
    # label, a large part of a plot's cost
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.95, wspace=0.28, hspace=0.38)
    return fig


def plot_metrics(rows: list[dict], path: str) -> None:
    import matplotlib.pyplot as plt

    fig = metrics_figure(rows)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=PLOT_DPI), plt.close(fig)
    os.replace(tmp, path)


def save_validation(accelerator, videos, names: list[str], fps: int, logged_until: int = 0) -> None:
    """This process's validation videos as files, and (main process) to the trackers: wandb gets the videos,
    TensorBoard a strip of each video's first, middle and last frame (its add_video needs moviepy). The trackers
    get nothing for a step <= logged_until, which they received before a resume (Deviations 4)."""
    if videos is None:
        return
    os.makedirs(os.path.dirname(names[0]), exist_ok=True)
    save_videos(videos, names, fps)
    if not accelerator.is_main_process:  # [dist] trackers live on the main process
        return
    for tracker in accelerator.trackers:
        for video, name in zip(videos, names):
            tag, step = "val/" + os.path.basename(name), _step_of(name)
            if step and step <= logged_until:  # a replayed validation (base_<i> is never replayed)
                continue
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


def one_line(message, filename: str, lineno: int, step: int | None = None) -> str:
    """`warning: [step N: ]message (file.py:line)`: one line per warning (Deviations 5)."""
    where = f"step {step}: " if step is not None else ""
    return f"warning: {where}{message} ({os.path.basename(filename)}:{lineno})"


def one_line_warnings() -> None:
    """Every warning of this process printed by one_line, also those raised outside an iteration (a checkpoint
    that `latest` skips, a torn jsonl line): Python's default adds the source line, which repeats the message."""
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: \
        one_line(message, filename, lineno) + "\n"


# Warnings a library raises on every call of a code path it runs for us, which say nothing about the run: diffusers
# 0.42.1's context-parallel hooks and ring attention call torch's deprecated functional all-gather (one warning per
# forward with --ulysses_degree / --ring_degree). Not printed, not counted.
LIBRARY_NOISE = (r"`torch\.distributed\._functional_collectives\.all_gather_tensor` is deprecated",)


class StepWarnings:
    """Reports every warning raised during one iteration with that iteration's number, on one line each, however
    often the same text repeats (Python's default filter prints a given text once per call site, so a NaN reward
    on step 40 would vanish after the one on step 3). Counts them for the metrics row."""

    def __init__(self, step: int):
        self.step, self.count = step, 0

    def __enter__(self):
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        for message in LIBRARY_NOISE:
            warnings.filterwarnings("ignore", message=message)
        return self

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)
        for w in self._caught:  # also when the iteration failed: what it warned about may explain why
            self.count += 1
            print(one_line(w.message, w.filename, w.lineno, self.step), file=sys.stderr, flush=True)
        return False
