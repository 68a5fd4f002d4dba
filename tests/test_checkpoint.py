"""checkpoint.py under faults: a crash at every point of a save, kill -9 of a real training process, full disks
(OSError, and the RuntimeError / SafetensorError of a real file-size limit), damaged checkpoints (a flipped
byte, a state of another step, no manifest), non-finite parameters, the output folder's own files and the
options that must fail before any model loads. (logs.py's jsonl files: tests/test_logs.py.)

The fault matrix runs checkpoint.save on a small model (milliseconds per case); the end-to-end tests run
train.py on the tiny backbone. Whole file: about 60 s on 2 idle cores."""
import contextlib
import copy
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import time
import warnings

import pytest
import safetensors.torch
import torch
from accelerate import Accelerator
from peft.utils import get_peft_model_state_dict

import curriculum
import launcher  # tests/
import train
import trust_region
from models import backbones
from training import checkpoint, export, logs, options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Crash(BaseException):
    """A simulated kill: BaseException, so no `except Exception` on the way can swallow it."""


# ----------------------------------------------------------------------------------------------------
# The fault matrix on checkpoint.save itself


class Setup:
    """A full fine-tuning 'run' small enough to save in milliseconds: its weights, its anchor and its curriculum
    all encode the step they were saved at, so a load shows exactly which checkpoint it came from."""

    def __init__(self, out):
        self.out = str(out)
        self.accelerator = Accelerator(cpu=True)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.anchor = trust_region.MovingAnchor(self.model, 2)
        self.cur = curriculum.build_curriculum("self_paced", tau=(0.7, 0.7), k=20.0, beta=0.3)
        self.identity = {"eta": 0.5}

    def advance_to(self, step: int):
        self.model(torch.ones(1, 4)).sum().backward()
        self.optimizer.step(), self.optimizer.zero_grad()
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(float(step))
        self.anchor.step()
        self.cur.update(torch.full((3,), 0.1 * step))

    def save(self, step: int, keep: int = 2) -> str:
        return checkpoint.save(self.out, step, self.accelerator, self.model, self.anchor, self.cur,
                               {"step": step, "updates": self.anchor.num_updates},
                               self.identity, full=True, keep=keep)

    def load(self, path: str) -> int:
        state = checkpoint.load(path, self.accelerator, self.model, self.anchor, self.cur, self.identity, full=True,
                                output_dir=self.out)
        weights = {float(p.detach().flatten()[0]) for p in self.model.parameters()}
        assert weights == {float(state["step"])}, (weights, state["step"])  # the weights of that step, whole
        assert self.anchor.num_updates == state["updates"]
        return state["step"]


def half_then_crash(real, n, safetensors_format=False, where=lambda path: True):
    """A writer whose n-th call (counting the calls whose target path satisfies `where`) writes half of its
    bytes and then 'dies'."""
    calls = {"k": 0}

    def writer(obj, f, *args, **kwargs):
        calls["k"] += where(str(f))
        if calls["k"] != n or not where(str(f)):
            return real(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        buffer.write(safetensors.torch.save(obj)) if safetensors_format else real(obj, buffer, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise Crash()

    return writer


def crash_on_call(real, n):
    calls = {"k": 0}

    def wrapper(*args, **kwargs):
        calls["k"] += 1
        if calls["k"] == n:
            raise Crash()
        return real(*args, **kwargs)

    return wrapper


def torn_text(n):
    real, calls = logs.write_text_atomic, {"k": 0}

    def writer(path, text):
        calls["k"] += 1
        if calls["k"] != n:
            return real(path, text)
        with open(path, "w") as f:  # as if the process died inside the write, without the rename's protection
            f.write(text[: len(text) // 2])
        raise Crash()

    return writer


# (what to patch, how): every write, fsync, rename and delete of a save of checkpoint-3 with two older ones.
FAULTS = ([("torch.save", n) for n in (1, 2, 3)]            # optimizer.bin, random_states_0.pkl, anchor.pt
          + [("safetensors", 1)]                            # model.safetensors (accelerate, full fine-tuning)
          + [("write_text", n) for n in (1, 2)]             # trainer_state.json, manifest.json
          + [("fsync", n) for n in range(1, 9)]             # after each file, the folder, the parent after rename
          + [("replace", n) for n in (1, 2, 3, 4)]          # trainer_state and manifest renames, the folder's, rotation
          + [("rmtree", 1)])                                # the rotation's delete


@pytest.mark.slow
@pytest.mark.parametrize("what, n", FAULTS)
def test_a_crash_at_any_point_of_a_save_leaves_only_complete_checkpoints(tmp_path, monkeypatch, what, n):
    run = Setup(tmp_path)
    for step in (1, 2):
        run.advance_to(step)
        run.save(step)
    run.advance_to(3)
    patches = {"torch.save": (torch, "save", lambda: half_then_crash(torch.save, n)),
               "safetensors": (safetensors.torch, "save_file", None),
               "write_text": (logs, "write_text_atomic", lambda: torn_text(n)),
               "fsync": (checkpoint, "_fsync", lambda: crash_on_call(checkpoint._fsync, n)),
               "replace": (os, "replace", lambda: crash_on_call(os.replace, n)),
               "rmtree": (checkpoint.shutil, "rmtree", lambda: crash_on_call(checkpoint.shutil.rmtree, n))}
    module, name, make = patches[what]
    if what == "safetensors":  # accelerate binds its own name for safetensors' writer
        import accelerate.utils.other as other

        monkeypatch.setattr(other, "safe_save_file", half_then_crash(other.safe_save_file, n, safetensors_format=True))
    else:
        monkeypatch.setattr(module, name, make())
    with pytest.raises(Crash):
        run.save(3)
    monkeypatch.undo()

    root = os.path.join(run.out, checkpoint.CHECKPOINTS)
    assert all(checkpoint.is_complete(p) for p in checkpoint.list_checkpoints(root))  # never a half one by name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped .incomplete folder is reported; checked below
        newest = checkpoint.latest(root)
    step = run.load(newest)
    assert step in (2, 3)  # 3 only when the crash came after the rename
    # The run goes on: the next save cleans up what the crash left and rotates as usual.
    run.advance_to(4)
    run.save(4)
    assert sorted(os.listdir(root))[-1] == "checkpoint-4" and len(os.listdir(root)) == 2
    assert run.load(checkpoint.latest(root)) == 4


def test_latest_skips_and_reports_incomplete_checkpoints_and_ignores_other_names(tmp_path):
    run = Setup(tmp_path)
    run.advance_to(1)
    run.save(1)
    root = tmp_path / "checkpoints"
    (root / "checkpoint-best").mkdir()  # not a checkpoint of this run: ignored, and saving still works
    (root / "checkpoint-7.incomplete").mkdir()
    damaged = root / "checkpoint-9"
    damaged.mkdir()
    (damaged / checkpoint.MANIFEST).write_text(json.dumps({"files": {"optimizer.bin": 100}}))
    with pytest.warns(UserWarning) as record:
        assert checkpoint.latest(str(root)) == str(root / "checkpoint-1")
    messages = " ".join(str(w.message) for w in record)
    assert "checkpoint-9: incomplete" in messages and "checkpoint-7.incomplete: a save that was interrupted" in messages
    run.advance_to(2)
    run.save(2, keep=5)
    assert not (root / "checkpoint-7.incomplete").exists() and (root / "checkpoint-best").is_dir()


def test_a_checkpoint_without_a_manifest_from_older_versions_still_loads(tmp_path):
    run = Setup(tmp_path)
    run.advance_to(1)
    path = run.save(1)
    os.remove(os.path.join(path, checkpoint.MANIFEST))
    assert checkpoint.is_complete(path) and run.load(path) == 1
    with open(os.path.join(path, checkpoint.STATE), "w") as f:
        f.write('{"step": 1, "curr')  # the old code's last file, torn
    assert not checkpoint.is_complete(path)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = Setup(tmp_path)
    run.advance_to(1)
    run.save(1)
    run.advance_to(2)

    def no_space(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OSError, match=r"checkpoint-2 failed \(No space left on device\).*newest intact checkpoint "
                                      r"is .*checkpoint-1.*--resume_from_checkpoint latest"):
        run.save(2)
    monkeypatch.undo()
    assert run.load(checkpoint.latest(str(tmp_path / "checkpoints"))) == 1


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """A real write failure from every writer at once (Python's, torch's C++ stream, safetensors' Rust): the
    process may not grow a file past `nbytes` (RLIMIT_FSIZE; with SIGXFSZ ignored a write fails with EFBIG
    instead of killing the process). torch.save then raises RuntimeError ("unexpected pos ..."), safetensors a
    SafetensorError: what a full disk gives too."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


# model.safetensors (408 bytes) is accelerate's first file, optimizer.bin (4.7 kB, torch.save) its second
@pytest.mark.parametrize("limit, raised_by", [(200, "SafetensorError"), (1000, "RuntimeError")])
def test_a_write_failure_that_is_not_an_oserror_cleans_up_and_names_the_disk(tmp_path, limit, raised_by):
    """issue 18.18: torch and safetensors do not raise OSError on a full disk, so the clean-up and the message
    never ran and the `.incomplete` folder stayed."""
    run = Setup(tmp_path)
    run.advance_to(1)
    run.save(1)
    run.advance_to(2)
    with file_size_limit(limit), pytest.raises(checkpoint.SaveError) as failure:
        run.save(2)
    message = str(failure.value)
    assert f"checkpoint-2 failed ({raised_by}: " in message and type(failure.value.__cause__).__name__ == raised_by
    assert f"the disk of {tmp_path} has " in message and " GiB free of " in message
    assert re.search(r"newest intact checkpoint is .*checkpoint-1.*--resume_from_checkpoint latest", message)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-1"]  # no .incomplete left
    assert run.load(checkpoint.latest(str(tmp_path / "checkpoints"))) == 1


def flip_byte(path, offset=None):
    """One bit of one byte flipped (an exponent bit if it falls in a float32's top byte); the size stays."""
    data = bytearray(open(path, "rb").read())
    offset = len(data) * 3 // 4 if offset is None else offset
    data[offset] ^= 0x40
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors", "anchor.pt"])
def test_latest_skips_a_checkpoint_with_one_flipped_byte_naming_the_file(tmp_path, name):
    """issue 18.1: the manifest held sizes only, so a flipped byte went unnoticed and the resume loaded it."""
    run = Setup(tmp_path)
    for step in (1, 2):
        run.advance_to(step)
        run.save(step)
    damaged = tmp_path / "checkpoints" / "checkpoint-2"
    size = os.path.getsize(damaged / name)
    flip_byte(damaged / name)
    assert os.path.getsize(damaged / name) == size
    with pytest.warns(UserWarning, match=rf"skipping .*checkpoint-2: .*{re.escape(name)} does not match the "
                                         rf"sha256 in its manifest") as record:
        newest = checkpoint.latest(str(tmp_path / "checkpoints"))
    assert newest == str(tmp_path / "checkpoints" / "checkpoint-1") and len(record) == 1
    assert run.load(newest) == 1
    with pytest.raises(checkpoint.CheckpointError, match=rf"--resume_from_checkpoint .*checkpoint-2: .*"
                                                         rf"{re.escape(name)} does not match the sha256"):
        checkpoint.claim_output_dir(str(tmp_path), str(damaged), False)


def test_a_checkpoint_whose_state_holds_another_step_is_damaged(tmp_path):
    """issue 18.16: checkpoint-6 whose trainer_state.json says step 2 resumed "step 2" with step-6 weights. Here
    the whole checkpoint-1 sits under the name checkpoint-6, so every hash matches: the step must be checked."""
    run = Setup(tmp_path)
    run.advance_to(1)
    first = run.save(1)
    shutil.copytree(first, tmp_path / "checkpoints" / "checkpoint-6")
    with pytest.warns(UserWarning, match=r"checkpoint-6: .*trainer_state.json holds step 1, but the folder is "
                                         r"checkpoint-6"):
        assert checkpoint.latest(str(tmp_path / "checkpoints")) == first
    with pytest.raises(checkpoint.CheckpointError, match="holds step 1, but the folder is checkpoint-6"):
        checkpoint.claim_output_dir(str(tmp_path), str(tmp_path / "checkpoints" / "checkpoint-6"), False)


def test_latest_skips_a_checkpoint_without_manifest_and_says_how_to_load_it(tmp_path):
    """issue 18.16 (Deviations 2): without a manifest a checkpoint cannot be verified, and a damaged file in it
    crashed the resume instead of falling back. `latest` skips it, saying how to load it anyway (by name)."""
    run = Setup(tmp_path)
    for step in (1, 2):
        run.advance_to(step)
        run.save(step)
    second = tmp_path / "checkpoints" / "checkpoint-2"
    os.remove(second / checkpoint.MANIFEST)
    with pytest.warns(UserWarning, match=rf"skipping {re.escape(str(second))}: it has no manifest.json.*To use it "
                                         rf"anyway, name it: --resume_from_checkpoint {re.escape(str(second))}"):
        newest = checkpoint.latest(str(tmp_path / "checkpoints"))
    assert run.load(newest) == 1
    assert checkpoint.claim_output_dir(str(tmp_path), str(second), False) == str(second)  # named: loads
    assert run.load(str(second)) == 2
    with open(second / "optimizer.bin", "r+b") as f:  # and damaged: `latest` still falls back to checkpoint-1
        f.truncate(100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run.load(checkpoint.latest(str(tmp_path / "checkpoints"))) == 1


def test_a_manifest_from_before_hashes_is_checked_by_size(tmp_path):
    run = Setup(tmp_path)
    run.advance_to(1)
    path = run.save(1)
    files = json.load(open(os.path.join(path, checkpoint.MANIFEST)))["files"]
    logs.write_json(os.path.join(path, checkpoint.MANIFEST), {"files": {k: v["bytes"] for k, v in files.items()}})
    assert checkpoint.latest(os.path.dirname(path)) == path and run.load(path) == 1
    with open(os.path.join(path, "anchor.pt"), "ab") as f:
        f.write(b"x")
    assert checkpoint.damage(path) == f"{path}/anchor.pt has {files['anchor.pt']['bytes'] + 1} bytes, its manifest " \
                                      f"says {files['anchor.pt']['bytes']}"


def test_non_finite_parameters_are_never_saved_and_every_file_is_left_as_it_was(tmp_path):
    """issue 18.17: a diverged run (--learning_rate 1e308) wrote NaN checkpoints and an all-NaN export and exited
    0. The save refuses, naming the first bad parameter and what to do, and writes nothing."""
    run = Setup(tmp_path)
    run.advance_to(1)
    run.save(1)
    run.advance_to(2)
    with torch.no_grad():
        run.model[1].bias[1] = float("inf")
        run.model[1].weight[0, 0] = float("nan")
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(checkpoint.CheckpointError, match=r"not writing checkpoint-2: parameter 1.weight holds NaN or "
                                                         r"infinite values.*Lower --learning_rate and resume from the "
                                                         r"last checkpoint, .*checkpoint-1"):
        run.save(2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before == ["checkpoint-1"]
    with pytest.raises(checkpoint.CheckpointError, match="not writing the final export: parameter 1.weight"):
        checkpoint.export_final(run.accelerator, run.model, run.out, full=True)
    assert not (tmp_path / "export.incomplete").exists() and not (tmp_path / export.TRANSFORMER).exists()


def test_a_checkpoint_is_sealed_only_after_the_rows_it_covers_are_on_disk(tmp_path, monkeypatch):
    """issue 18.15: a metrics row not yet on disk when its checkpoint was (a power loss after the save) was lost
    for good: the resume starts after it. The save fsyncs the jsonl files before the checkpoint is renamed in."""
    run = Setup(tmp_path)
    run.advance_to(1)
    for name in ("metrics", "samples"):
        logs.append_jsonl(str(tmp_path / f"{name}.jsonl"), {"step": 1})
    events, fsync, replace = [], checkpoint._fsync, os.replace
    monkeypatch.setattr(checkpoint, "_fsync", lambda path: (events.append(("fsync", os.path.basename(path))),
                                                            fsync(path)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("rename", os.path.basename(dst))),
                                                         replace(src, dst)))
    run.save(1)
    sealed = events.index(("rename", "checkpoint-1"))
    assert ("fsync", "metrics.jsonl") in events[:sealed] and ("fsync", "samples.jsonl") in events[:sealed]


def test_the_resume_line_lists_only_the_options_it_compared(tmp_path, capsys):
    """issue 18.23: with a constant schedule --max_steps is not part of the run (None in the identity), yet the
    resume line listed it among the options checked equal."""
    run = Setup(tmp_path)
    run.identity = {"eta": 0.5, "max_steps": None}
    run.advance_to(1)
    run.load(run.save(1))
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("resume: ")][-1]
    assert line.endswith("checked 1 run options equal: --eta"), line


# ----------------------------------------------------------------------------------------------------
# A LoRA run's final export (the tiny backbone's transformer)


@pytest.fixture(scope="module")
def lora_model():
    family = backbones.module("tiny")
    transformer = family.load_backbone("tiny", seed=0).transformer
    params = family.add_lora(transformer, 4, 8)
    for p in params:
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return transformer


def test_the_final_export_replaces_the_old_one_only_once_it_is_complete(tmp_path, lora_model):
    """issue 18.14: over a finished run's adapter (a file) the export failed with NotADirectoryError, leaving the
    old adapter as `.deleted` and the new one in export.incomplete/. A resume removed the root adapter as soon as
    it loaded. Now the old export stays until the new one replaces it, and everything written is listed in
    FINAL_EXPORT (so the run's record covers it)."""
    accelerator = Accelerator(cpu=True)
    (tmp_path / export.LORA_FILE).write_bytes(b"the adapter of the run that finished here")
    checkpoint.export_final(accelerator, lora_model, str(tmp_path), full=False)
    assert set(os.listdir(tmp_path)) <= set(checkpoint.FINAL_EXPORT)
    saved = export.read_adapter(str(tmp_path))
    expected = get_peft_model_state_dict(lora_model)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    # A resume leaves the export in place (a resume that then fails keeps the finished run's adapter)
    run = Setup(tmp_path / "resumed")
    run.advance_to(1)
    path = run.save(1)
    shutil.copy(tmp_path / export.LORA_FILE, tmp_path / "resumed" / export.LORA_FILE)
    run.load(path)
    assert (tmp_path / "resumed" / export.LORA_FILE).is_file()


def test_a_failed_or_refused_export_keeps_the_previous_one(tmp_path, lora_model):
    """issue 18.17 and 18.18 for export_final: a full disk (here a file-size limit: safetensors raises
    SafetensorError) removes the half-written export and names the disk; non-finite LoRA weights are refused by
    name. Either way the previous export is untouched."""
    accelerator = Accelerator(cpu=True)
    old = b"the previous export"
    (tmp_path / export.LORA_FILE).write_bytes(old)
    with file_size_limit(1000), pytest.raises(checkpoint.SaveError, match=rf"saving the final export .* failed "
                                                                          rf"\(SafetensorError: .*the disk of "
                                                                          rf"{re.escape(str(tmp_path))} has"):
        checkpoint.export_final(accelerator, lora_model, str(tmp_path), full=False)
    assert os.listdir(tmp_path) == [export.LORA_FILE] and (tmp_path / export.LORA_FILE).read_bytes() == old
    broken = copy.deepcopy(lora_model)
    name, param = next((n, p) for n, p in broken.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match=rf"not writing the final export: parameter "
                                                         rf"{re.escape(name)} holds NaN"):
        checkpoint.export_final(accelerator, broken, str(tmp_path), full=False)
    assert os.listdir(tmp_path) == [export.LORA_FILE] and (tmp_path / export.LORA_FILE).read_bytes() == old


# ----------------------------------------------------------------------------------------------------
# The output folder: what is the run's own


def write(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


RUN_OUTPUT = ["config.json", "metrics.jsonl", "samples.jsonl", "metrics.png", "samples/base_0.gif",
              "samples/step000002_1.mp4", "checkpoints/checkpoint-2/trainer_state.json",
              "checkpoints/checkpoint-3.incomplete/optimizer.bin", "tracker/events.out.tfevents.1765000000.host.42.0",
              "tracker/1765000000.5/hparams.yml", export.LORA_FILE]
USER_FILES = ["notes.txt", "samples/my_clip.mp4", "checkpoints/checkpoint-best/weights.bin", "config.yaml"]


def test_overwrite_deletes_only_what_a_run_of_ours_wrote(tmp_path):
    """issue 18.13: --overwrite_output_dir deleted config.json, samples/, tracker/, metrics.png by name, a user's
    samples/my_clip.mp4 with them. Now the run's record (written before its files) decides: the user's files
    stay, and so do the folders that hold them."""
    for name in USER_FILES:
        write(tmp_path / name, "mine")
    assert checkpoint.claim_output_dir(str(tmp_path), None, False) is None  # nothing here collides: accepted
    checkpoint.record_run(str(tmp_path), overwrite=False)  # train.py: main process, before anything is written
    for name in RUN_OUTPUT:
        write(tmp_path / name)
    with pytest.raises(checkpoint.CheckpointError, match="already holds a run"):
        checkpoint.claim_output_dir(str(tmp_path), None, False)
    checkpoint.claim_output_dir(str(tmp_path), None, True)
    checkpoint.record_run(str(tmp_path), overwrite=True)
    left = sorted(os.path.relpath(os.path.join(d, n), tmp_path) for d, _, ns in os.walk(tmp_path) for n in ns)
    assert left == sorted(USER_FILES + [checkpoint.RECORD])
    assert not (tmp_path / "tracker").exists()  # the run made it and it is empty now
    assert all((tmp_path / name).read_text() == "mine" for name in USER_FILES)


def test_a_fresh_run_refuses_a_finished_run_whose_logs_were_pruned(tmp_path):
    """issue 18.14: with only the finished run's adapter and config.json left, a fresh run was accepted, trained
    to the end and then failed to replace the adapter. A final export is a run's result: the folder holds a run."""
    checkpoint.record_run(str(tmp_path), overwrite=False)
    for name in ("config.json", export.LORA_FILE):
        write(tmp_path / name)
    with pytest.raises(checkpoint.CheckpointError, match=rf"already holds a run \({re.escape(export.LORA_FILE)}\)"):
        checkpoint.claim_output_dir(str(tmp_path), None, False)


@pytest.mark.parametrize("theirs", ["config.json", "metrics.jsonl", "samples/base_0.gif", export.LORA_FILE,
                                    "tracker/events.out.tfevents.1.other.1.0", "checkpoints/checkpoint-4/a.bin"])
def test_a_run_refuses_a_folder_holding_files_it_would_write_over_naming_them(tmp_path, theirs):
    """issue 18.13: a fresh run into a folder holding no run of ours but its own config.json (or samples/base_0.gif,
    ...) overwrote it silently; --overwrite_output_dir deleted it. Both refuse now, naming the file, and leave
    it as it was."""
    write(tmp_path / theirs, "theirs")
    for resume, overwrite in ((None, False), (None, True), ("latest", False)):
        with pytest.raises(checkpoint.CheckpointError, match=rf"holds {re.escape(theirs.split('/')[0])}.*which no "
                                                             rf"run of ours recorded writing"):
            checkpoint.claim_output_dir(str(tmp_path), resume, overwrite)
    assert (tmp_path / theirs).read_text() == "theirs"


def test_a_run_folder_from_before_records_is_taken_as_ours(tmp_path):
    """Deviations 3: a folder whose checkpoints/ holds a checkpoint of ours but no run_files.json (written before
    records existed) resumes, and --overwrite_output_dir deletes its files, not a user's."""
    run = Setup(tmp_path)
    run.advance_to(1)
    run.save(1)
    for name in ("config.json", "metrics.jsonl", "samples/base_0.gif", "samples/my_clip.mp4"):
        write(tmp_path / name)
    assert not (tmp_path / checkpoint.RECORD).exists()
    assert checkpoint.claim_output_dir(str(tmp_path), "latest", False) == str(tmp_path / "checkpoints" / "checkpoint-1")
    checkpoint.claim_output_dir(str(tmp_path), None, True)
    checkpoint.record_run(str(tmp_path), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [checkpoint.RECORD, "samples"]
    assert os.listdir(tmp_path / "samples") == ["my_clip.mp4"]


# ----------------------------------------------------------------------------------------------------
# End to end on the tiny backbone


def run(out, *args) -> list[dict]:
    return train.main(options.parse_args(["--backbone", "tiny", "--output_dir", str(out), *map(str, args)]))


RUN = ("--max_steps", 3, "--checkpointing_steps", 1, "--validation_steps", 0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return out, run(out, *RUN)


def same_run(out, reference_out, history=None):
    """Metrics (wall times aside) and the final adapter equal the uninterrupted run's."""
    rows = logs.read_jsonl(os.path.join(out, "metrics.jsonl"))
    expected = logs.read_jsonl(os.path.join(reference_out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    for got, want in zip(rows, expected):
        for key, value in want.items():
            if not key.startswith("time/"):
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    a = export.read_adapter(os.path.join(out, "checkpoints", "checkpoint-3"))
    b = export.read_adapter(os.path.join(reference_out, "checkpoints", "checkpoint-3"))
    assert all(torch.allclose(a[k], b[k], atol=1e-7, rtol=0) for k in b)


@pytest.mark.slow
def test_a_crash_during_a_save_and_a_full_disk_during_an_append_resume_to_the_same_end(reference, tmp_path,
                                                                                    monkeypatch):
    ref_out, _ = reference
    monkeypatch.setattr(torch, "save", half_then_crash(torch.save, 1, where=lambda path: "checkpoint-3" in path and
                                                       "random_states" in path))
    with pytest.raises(Crash):
        run(tmp_path, *RUN)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "checkpoint-3.incomplete").is_dir()
    real_append = logs.append_jsonl

    def full_disk(path, row):  # the metrics row of step 3 is torn by ENOSPC
        if path.endswith("metrics.jsonl") and row["step"] == 3:
            with open(path, "a") as f:
                f.write(json.dumps(row)[:40])
            raise OSError(28, "No space left on device")
        real_append(path, row)

    monkeypatch.setattr(logs, "append_jsonl", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path, *RUN, "--resume_from_checkpoint", "latest")
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["step"] for r in logs.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2]
    run(tmp_path, *RUN, "--resume_from_checkpoint", "latest")
    same_run(tmp_path, ref_out)


def test_a_flipped_byte_in_the_newest_checkpoint_resumes_from_the_one_before_to_the_same_end(reference, tmp_path):
    """issue 18.1, done when: one flipped byte in checkpoint-3's adapter (an exponent bit of a lora weight, the
    size unchanged) is reported naming the file, `latest` resumes from checkpoint-2, and the replayed step 3 ends
    where the uninterrupted run did, bit for bit."""
    ref_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    adapter = out / "checkpoints" / "checkpoint-3" / export.LORA_FILE
    header = 8 + int.from_bytes(adapter.read_bytes()[:8], "little")  # safetensors: u64 header size, header, data
    flip_byte(adapter, header + 3)  # the top byte of the first float32: its exponent
    with pytest.warns(UserWarning, match=rf"skipping .*checkpoint-3: incomplete or damaged checkpoint: .*"
                                         rf"{re.escape(export.LORA_FILE)} does not match the sha256"):
        rows = run(out, *RUN, "--resume_from_checkpoint", "latest")
    assert [r["step"] for r in rows] == [1, 2, 3]
    same_run(out, ref_out)


@pytest.mark.slow
def test_three_kill_9_during_saves_each_resume_with_latest_to_the_end(reference, tmp_path):
    """Real SIGKILLs of a training process at random moments inside its checkpoint saves (each fsync is slowed
    down so that a save lasts about a second), then `--resume_from_checkpoint latest` each time."""
    ref_out, _ = reference
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = ["--backbone", "tiny", "--output_dir", str(tmp_path), *map(str, RUN)]
    rng = random.Random(0)
    root = tmp_path / "checkpoints"
    for kill in range(3):  # each a real process (forked from tests/launcher.py's forkserver), killed for real
        extra = ["--resume_from_checkpoint", "latest"] if kill else []
        proc = launcher.Popen("train", [*args, *extra], env, before=launcher.slow_fsync)
        target = root / f"checkpoint-{kill + 1}.incomplete"
        deadline = time.time() + 240
        while not target.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))  # somewhere inside the save (or just after it)
        proc.send_signal(signal.SIGKILL)
        err = proc.communicate()[1]
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
    done = launcher.Popen("train", [*args, "--resume_from_checkpoint", "latest"], env)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-3000:]
    assert "resume: " in out
    same_run(tmp_path, ref_out)


def test_an_update_without_signal_is_skipped_and_counted(tmp_path):
    """No colour word, semantic proxy only: every sample scores 0.5, every advantage is 0 and, with the KL terms
    off, nothing in the update carries signal. AdamW would still move the adapter (weight decay on A); the
    update is skipped instead, counted, and the adapter stays exactly as initialised."""
    prompts = tmp_path / "plain.txt"
    prompts.write_text("a ball bouncing\n")
    rows = run(tmp_path / "out", "--max_steps", 2, "--checkpointing_steps", 1, "--validation_steps", 0, "--prompts",
               prompts, "--curriculum", "static", "--static_weights", "0,0,1", "--beta_pos", 0, "--beta_vel", 0)
    assert [r["health/skipped_updates"] for r in rows] == [1, 1]
    assert [r["adv/abs_mean"] for r in rows] == [0.0, 0.0]
    first = export.read_adapter(tmp_path / "out" / "checkpoints" / "checkpoint-1")
    last = export.read_adapter(tmp_path / "out" / "checkpoints" / "checkpoint-2")
    assert all(torch.equal(first[k], last[k]) for k in first)
    assert all(not v.any() for k, v in last.items() if "lora_B" in k)


@pytest.mark.slow
def test_a_run_records_every_file_it_writes_and_overwrite_keeps_a_users(tmp_path):
    """issue 18.13 end to end: train.py records its files before writing them (checkpoint.record_run), every file
    a real run writes (validation videos, TensorBoard's event files, checkpoints, the export) is covered by the
    record, and --overwrite_output_dir then deletes them all but none of the user's."""
    for name in USER_FILES:
        write(tmp_path / name, "mine")
    args = ("--max_steps", 1, "--validation_steps", 1, "--report_to", "tensorboard")
    run(tmp_path, *args)
    record = json.load(open(tmp_path / checkpoint.RECORD))
    written = [os.path.relpath(os.path.join(d, n), tmp_path) for d, _, ns in os.walk(tmp_path) for n in ns]
    ours = [name for name in written if name not in USER_FILES + [checkpoint.RECORD]]
    assert any(name.startswith("samples/base_") for name in ours) and any(name.startswith("tracker/") for name in ours)
    for name in ours:  # each file, or the folder it lies in, matches a pattern of the record
        parts = name.split("/")
        assert any(checkpoint._covered("/".join(parts[:i]), record["patterns"]) for i in range(1, len(parts) + 1)), name
    run(tmp_path, *args, "--overwrite_output_dir")
    assert all((tmp_path / name).read_text() == "mine" for name in USER_FILES)


def test_output_folder_rules(reference, tmp_path):
    ref_out, _ = reference
    with pytest.raises(checkpoint.CheckpointError, match="already holds a run.*--resume_from_checkpoint latest.*"
                                                         "--overwrite_output_dir"):
        run(ref_out, *RUN)
    with pytest.raises(checkpoint.CheckpointError, match="pass one of them"):
        run(ref_out, *RUN, "--overwrite_output_dir", "--resume_from_checkpoint", "latest")
    # a checkpoint of another folder may seed an empty one, never one that holds a run
    elsewhere = str(ref_out / "checkpoints" / "checkpoint-2")
    assert checkpoint.claim_output_dir(str(tmp_path / "fresh"), elsewhere, False) == elsewhere
    (tmp_path / "other").mkdir()
    checkpoint.record_run(str(tmp_path / "other"), overwrite=False)  # as train.py does before a run writes
    logs.append_jsonl(str(tmp_path / "other" / "metrics.jsonl"), {"step": 1})
    with pytest.raises(checkpoint.CheckpointError, match="belongs to another folder.*already holds a run"):
        checkpoint.claim_output_dir(str(tmp_path / "other"), elsewhere, False)
    # latest with nothing to resume: a fresh start in an empty folder, a refusal in a folder with a run's logs
    empty = tmp_path / "empty"
    assert checkpoint.claim_output_dir(str(empty), "latest", False) is None
    checkpoint.record_run(str(empty), overwrite=False)
    logs.append_jsonl(str(empty / "metrics.jsonl"), {"step": 1})
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint.*--overwrite_output_dir"):
        checkpoint.claim_output_dir(str(empty), "latest", False)
    # --overwrite_output_dir deletes the run's files (those its record covers) and nothing else
    (empty / "notes.txt").write_text("mine")
    (empty / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    checkpoint.clear_run(str(empty))
    assert sorted(os.listdir(empty)) == ["notes.txt"]


# ----------------------------------------------------------------------------------------------------
# Options that make a run what it is: part of its identity


def test_a_sliding_window_makes_the_run_length_part_of_the_resume_check():
    """The sliding window is laid out over --max_steps, so extending such a run would move the window: refused."""
    make = lambda **kw: options.resolve(options.parse_args(["--backbone", "tiny", "--sde_window", "2", *[
        a for k, v in kw.items() for a in (f"--{k}", str(v))]]))
    identity = lambda cfg: checkpoint.run_identity(cfg, 1, "no", ["p"], ["v"])
    assert identity(make(max_steps=4)) == identity(make(max_steps=8))  # random window: the length may change
    sliding = dict(sde_window_start="sliding")
    assert identity(make(max_steps=4, **sliding)) != identity(make(max_steps=8, **sliding))


def test_the_lora_targets_and_the_window_range_are_part_of_the_run_identity():
    make = lambda *argv: options.resolve(options.parse_args(["--backbone", "tiny", "--sde_window", "1", *argv]))
    identity = lambda cfg: checkpoint.run_identity(cfg, 1, "no", ["p"], ["v"])
    assert identity(make("--lora_targets", "attn")) != identity(make("--lora_targets", "attn_ffn"))
    assert identity(make("--sde_window_range", "0,2")) != identity(make("--sde_window_range", "1,3"))


def test_scores_read_through_a_chat_api_are_part_of_the_run_identity_and_a_reward_servers_url_is_not():
    from dataclasses import replace

    cfg = options.parse_args(["--backbone", "tiny", "--reward", "vlm"])
    identity = lambda **kw: checkpoint.run_identity(replace(cfg, **kw), 1, "no", ["p"], ["v"])  # noqa: E731
    assert identity() == identity(reward_url="http://a:8008") == identity(reward_url="http://b:9000")
    assert identity() != identity(reward_url="http://judge:8000/v1")  # top-20 log-probs: other scores
