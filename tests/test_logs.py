"""logs.py: strict jsonl that survives torn and damaged lines, atomic rewrites, what the trackers receive after a
resume, the metrics plot's layout, and warnings on one line. Unit tests on files in a temporary folder (the
trackers are accelerate's real TensorBoard tracker); the whole file takes a few seconds."""
import inspect
import json
import os
import warnings

import pytest
import torch
from accelerate import Accelerator

from training import logs


class Crash(BaseException):
    """A simulated kill: BaseException, so no `except Exception` on the way can swallow it."""


def crash_on_call(real, n):
    calls = {"k": 0}

    def wrapper(*args, **kwargs):
        calls["k"] += 1
        if calls["k"] == n:
            raise Crash()
        return real(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------------
# jsonl files


def test_jsonl_is_strict_json_and_survives_a_torn_last_line(tmp_path):
    path = str(tmp_path / "m.jsonl")
    logs.append_jsonl(path, {"step": 1, "x": float("nan"), "y": [1.0, float("inf")], "z": {"w": -float("inf")}})
    logs.append_jsonl(path, {"step": 2, "x": 0.5})
    text = open(path).read()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text.splitlines()[0], parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    with open(path, "a") as f:
        f.write('{"step": 3, "x": 0.')  # a crash (or ENOSPC) inside an append
    with pytest.warns(UserWarning, match="torn last line"):
        rows = logs.read_jsonl(path)
    assert rows == [{"step": 1, "x": None, "y": [1.0, None], "z": {"w": None}}, {"step": 2, "x": 0.5}]
    with pytest.warns(UserWarning, match="torn last line"):
        assert logs.truncate_jsonl(path, 1) == rows[:1]
    assert logs.read_jsonl(path) == rows[:1]  # the rewrite dropped the torn line too


def test_a_damaged_middle_line_is_skipped_with_a_warning_naming_it(tmp_path):
    """Deviations 1 (issue 18.15): a power loss leaves NUL bytes where unsynced data was, in the middle of the
    file. The resume used to end with a traceback there; the line is skipped like a torn last one, the rows
    around it are kept, and the rewrite of the resume drops it."""
    path = str(tmp_path / "m.jsonl")
    logs.append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write("\0" * 12 + "\n")
    for step in (3, 4):
        logs.append_jsonl(path, {"step": step})
    with pytest.warns(UserWarning, match=r"m.jsonl: skipping line 2, which is not JSON") as record:
        assert logs.read_jsonl(path) == [{"step": 1}, {"step": 3}, {"step": 4}]
    assert len(record) == 1
    with pytest.warns(UserWarning, match="skipping line 2"):
        assert logs.truncate_jsonl(path, 3) == [{"step": 1}, {"step": 3}]
    assert open(path).read() == '{"step": 1}\n{"step": 3}\n'


def test_a_rewrite_interrupted_before_its_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "m.jsonl")
    for step in (1, 2):
        logs.append_jsonl(path, {"step": step})
    monkeypatch.setattr(os, "replace", crash_on_call(os.replace, 1))
    with pytest.raises(Crash):
        logs.truncate_jsonl(path, 1)
    monkeypatch.undo()
    assert logs.read_jsonl(path) == [{"step": 1}, {"step": 2}]


def paths_in(folder) -> dict:
    return {name: str(folder / f"{name}.jsonl") for name in ("metrics", "samples", "profile")}


def test_a_resume_that_finds_rows_missing_names_them_and_the_checkpoint_that_remakes_them(tmp_path):
    """issue 18.15: row 6 lost (here: deleted by hand) while checkpoint-6 exists. The resume cannot re-make it
    from step 6, so it says which rows are missing and from which checkpoint a resume replays them."""
    paths = paths_in(tmp_path)
    for step in (1, 2, 3, 4, 5, 7):
        logs.append_jsonl(paths["metrics"], {"step": step})
    accelerator = Accelerator(cpu=True)
    with pytest.warns(UserWarning, match=r"no row for step\(s\) 6, which the resumed checkpoint \(step 6\) covers.*"
                                         r"checkpoint of step 5 or earlier"):
        history = logs.start(accelerator, paths, 6, str(tmp_path / "config.json"), {})
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rows missing: no warning
        logs.start(accelerator, paths, 5, str(tmp_path / "config.json"), {})


# ----------------------------------------------------------------------------------------------------
# Trackers after a resume


def tensorboard_events(folder) -> dict:
    """{(tag, step): how many events} over every event file in `folder` (not its sub-folders), read raw: the
    EventAccumulator would hide a replay, since it purges the events after an out-of-order step."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    counts = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("events.out.tfevents"):
            for event in EventFileLoader(os.path.join(folder, name)).Load():
                for value in event.summary.value:
                    counts[value.tag, event.step] = counts.get((value.tag, event.step), 0) + 1
    return counts


def tracked_run(out, start_step: int, last_step: int, validation=None):
    """A run's logging from start_step + 1 to last_step through accelerate's TensorBoard tracker, as train.py
    drives it (rows of step s have reward/mixed = s / 10); `validation` = {step: video} saves those too."""
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(out))
    accelerator.init_trackers("tracker")
    paths = paths_in(out)
    history = logs.start(accelerator, paths, start_step, str(out / "config.json"), {})
    for step in range(start_step + 1, last_step + 1):
        if validation and step in validation:
            logs.save_validation(accelerator, validation[step][None], [str(out / "samples" / f"step{step:06d}_0")], 4,
                                 logged_until=history.logged_until)
        logs.write_step(accelerator, paths, history, {"step": step, "reward/mixed": step / 10}, {"step": step}, 100)
    for tracker in accelerator.trackers:
        tracker.finish()
    return history


def test_after_a_resume_the_trackers_receive_only_new_steps(tmp_path):
    """issue 18.11: a run logs steps 1-4 (validation at 2 and 4), is killed, and resumes from checkpoint-1: it
    replays steps 2-4 bit for bit and goes on to 5. TensorBoard holds each step once, at its value, and each
    validation strip once."""
    video = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # (F, 3, H, W)
    tracked_run(tmp_path, 0, 4, validation={2: video, 4: video})
    history = tracked_run(tmp_path, 1, 5, validation={2: video, 4: video})
    assert history.logged_until == 4 and [r["step"] for r in history] == [1, 2, 3, 4, 5]
    events = tensorboard_events(tmp_path / "tracker")
    assert {step: n for (tag, step), n in events.items() if tag == "reward/mixed"} == {s: 1 for s in range(1, 6)}
    assert {step: n for (tag, step), n in events.items() if tag.startswith("val/")} == {2: 1, 4: 1}
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------------------------------
# The plot and the warnings


def test_the_metrics_plot_is_a_fixed_size_grid_with_every_title_inside_and_no_axis_offset(tmp_path):
    """issue 18.23: metrics.png was one 2000 x 288 strip of five panels whose titles were clipped, with a shared
    '1e-9' offset above the KL axis. Now: a 3 x 2 grid of fixed size, whatever the run length; every title lies
    inside the figure, and each tick label carries its own value."""
    import matplotlib.image
    import matplotlib.pyplot as plt

    rows = [{"step": s, "reward/mixed": 0.5 + 1e-4 * s, "kl/pos": 1e-9 * s, "kl/vel": 2e-9 * s,
             "train/grad_norm": 1e3 + s, "train/clipfrac_high": 0.01 * s, "val/total": 0.4} for s in range(1, 51)]
    for n in (3, 50):
        path = tmp_path / f"m{n}.png"
        logs.plot_metrics(rows[:n], str(path))
        height, width = matplotlib.image.imread(str(path)).shape[:2]
        assert (width, height) == (1200, 700)
    fig = logs.metrics_figure(rows)
    fig.canvas.draw()
    box = fig.bbox
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == len(logs.PANELS) == 6
    assert len({round(ax.get_position().y0, 3) for ax in titled}) == 2  # two rows of panels
    for ax in titled:
        title = ax.title.get_window_extent()
        assert box.x0 <= title.x0 and title.x1 <= box.x1 and box.y0 <= title.y0 and title.y1 <= box.y1, ax.get_title()
        assert ax.yaxis.get_offset_text().get_text() == "", ax.get_title()
        neighbours = [other.get_window_extent() for other in titled if other is not ax]
        assert not any(title.overlaps(n) for n in neighbours), ax.get_title()  # no title over another panel
    kl = next(ax for ax in titled if ax.get_title() == "KL")
    assert any("e-0" in t.get_text() for t in kl.get_yticklabels())  # the 1e-9 scale is on the labels
    plt.close(fig)


def test_warnings_print_one_line_each(capsys):
    """issue 18.23: outside an iteration Python printed a warning and then the source line that raised it,
    which for an f-string repeats the message (`checkpoint.latest`'s skip). one_line_warnings installs the same
    one-line format StepWarnings uses."""
    old = warnings.formatwarning
    try:
        logs.one_line_warnings()
        text = warnings.formatwarning(UserWarning("skipping checkpoints/checkpoint-3: damaged"), UserWarning,
                                      "/repo/checkpoint.py", 290, line='    warnings.warn(f"skipping {path}: ...")')
    finally:
        warnings.formatwarning = old
    assert text == "warning: skipping checkpoints/checkpoint-3: damaged (checkpoint.py:290)\n"
    with logs.StepWarnings(7) as caught:
        line = inspect.currentframe().f_lineno + 1
        warnings.warn("reward is NaN")
        warnings.warn("reward is NaN")  # the same text again: reported again
    assert caught.count == 2
    assert capsys.readouterr().err.splitlines() == [f"warning: step 7: reward is NaN (test_logs.py:{n})"
                                                    for n in (line, line + 1)]
    # the deprecation diffusers' context-parallel code raises on every forward is neither printed nor counted
    with logs.StepWarnings(8) as caught:
        warnings.warn("`torch.distributed._functional_collectives.all_gather_tensor` is deprecated. Please use "
                      "`torch.distributed._functional_collectives.all_gather_single` instead.", FutureWarning)
    assert caught.count == 0 and capsys.readouterr().err == ""
