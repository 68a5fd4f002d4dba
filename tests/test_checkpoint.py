"""checkpoint.py and logs.py under faults: a crash at every point of a save, kill -9 of a real training process,
a full disk, torn jsonl lines, the output-folder rules, and the options that must fail before any model loads.

The fault matrix runs checkpoint.save on a small model (milliseconds per case); the end-to-end tests run
train.py on the tiny backbone. Whole file: about 60 s on 2 idle cores."""
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import pytest
import safetensors.torch
import torch
from accelerate import Accelerator

import backbones
import checkpoint
import export
import curriculum
import logs
import train
import trust_region

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
    with open(path, "a") as f:
        f.write("garbage\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(ValueError, match="line 2 is not JSON and is not the last line"):
        logs.read_jsonl(path)


def test_a_rewrite_interrupted_before_its_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "m.jsonl")
    for step in (1, 2):
        logs.append_jsonl(path, {"step": step})
    monkeypatch.setattr(os, "replace", crash_on_call(os.replace, 1))
    with pytest.raises(Crash):
        logs.truncate_jsonl(path, 1)
    monkeypatch.undo()
    assert logs.read_jsonl(path) == [{"step": 1}, {"step": 2}]


# ----------------------------------------------------------------------------------------------------
# End to end on the tiny backbone


def run(out, *args) -> list[dict]:
    return train.main(train.parse_args(["--backbone", "tiny", "--output_dir", str(out), *map(str, args)]))


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


def test_three_kill_9_during_saves_each_resume_with_latest_to_the_end(reference, tmp_path):
    """Real SIGKILLs of a training process at random moments inside its checkpoint saves (each fsync is slowed
    down so that a save lasts about a second), then `--resume_from_checkpoint latest` each time."""
    ref_out, _ = reference
    slow = ("import time, checkpoint, train; real = checkpoint._fsync; "
            "checkpoint._fsync = lambda p: (time.sleep(0.15), real(p)); train.cli()")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = ["--backbone", "tiny", "--output_dir", str(tmp_path), *map(str, RUN)]
    rng = random.Random(0)
    root = tmp_path / "checkpoints"
    for kill in range(3):
        extra = ["--resume_from_checkpoint", "latest"] if kill else []
        proc = subprocess.Popen([sys.executable, "-c", slow, *args, *extra], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        target = root / f"checkpoint-{kill + 1}.incomplete"
        deadline = time.time() + 240
        while not target.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))  # somewhere inside the save (or just after it)
        proc.send_signal(signal.SIGKILL)
        err = proc.communicate()[1].decode()
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, "--resume_from_checkpoint", "latest"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resume: " in done.stdout
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
    logs.append_jsonl(str(tmp_path / "other" / "metrics.jsonl"), {"step": 1})
    with pytest.raises(checkpoint.CheckpointError, match="belongs to another folder.*already holds a run"):
        checkpoint.claim_output_dir(str(tmp_path / "other"), elsewhere, False)
    # latest with nothing to resume: a fresh start in an empty folder, a refusal in a folder with a run's logs
    empty = tmp_path / "empty"
    assert checkpoint.claim_output_dir(str(empty), "latest", False) is None
    logs.append_jsonl(str(empty / "metrics.jsonl"), {"step": 1})
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint.*--overwrite_output_dir"):
        checkpoint.claim_output_dir(str(empty), "latest", False)
    # --overwrite_output_dir deletes the run's files and nothing else
    (empty / "notes.txt").write_text("mine")
    (empty / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    checkpoint.clear_run(str(empty))
    assert sorted(os.listdir(empty)) == ["notes.txt"]


# ----------------------------------------------------------------------------------------------------
# Options: every bad one fails before any model is built, naming itself


BAD_OPTIONS = [
    (["--checkpointing_steps", "-1"], "--checkpointing_steps -1: must be an integer >= 0"),
    (["--validation_steps", "-1"], "--validation_steps -1: must be an integer >= 0"),
    (["--batch_size", "0"], "--batch_size 0: must be an integer >= 1"),
    (["--batch_size", "-4"], "--batch_size -4: must be an integer >= 1"),
    (["--micro_batch_size", "-1"], "--micro_batch_size -1: must be an integer >= 1"),
    (["--reward_batch_size", "0"], "--reward_batch_size 0: must be an integer >= 1"),
    (["--fps", "0"], "--fps 0: must be an integer >= 1"),
    (["--num_steps", "0"], "--num_steps 0: must be an integer >= 1"),
    (["--learning_rate", "-1"], "--learning_rate -1.0: must be a finite number > 0"),
    (["--lora_rank", "0"], "--lora_rank 0: must be an integer >= 1"),
    (["--eta", "nan"], "--eta nan: must be a finite number > 0"),
    (["--dist_timeout", "0"], "--dist_timeout 0: must be an integer >= 1"),
    (["--sde", "cps", "--eta", "1.5"], "--sde cps --eta 1.5"),
    (["--curriculum_tau", "0.7,1.7"], "--curriculum_tau '0.7,1.7': every number must be in"),
    (["--static_weights", "0,0,0"], "--static_weights '0,0,0': at least one weight must be > 0"),
    (["--prompts", "{tmp}/binary.txt"], "--prompts '{tmp}/binary.txt' is not a UTF-8 text file"),
    (["--reward_prompt_template", "{tmp}/none.txt"], "--reward_prompt_template '{tmp}/none.txt' does not exist"),
    (["--output_dir", "{tmp}/readonly/run"], "--output_dir {tmp}/readonly/run is not writable"),
    (["--num_steps", "200"], "--sde sage --eta 0.5 --num_steps 200: sage step variances"),  # with tiny's shift 3
    (["--lr_warmup_steps", "5"], "--lr_warmup_steps 5 does nothing with --lr_scheduler constant"),
    (["--sde_window", "2", "--sde_window_start", "\u00b2"], "--sde_window_start '\u00b2': 'random', 'sliding' or an index"),
    (["--sde_window", "5"], "--sde_window 5: must be in 0..4"),
    (["--shared_prefix"], "--shared_prefix needs --sde_window"),
    (["--optimizer", "sgd"], "--optimizer 'sgd': choose adamw or muon"),
    (["--report_to", "comet"], "--report_to 'comet': choose one of"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS)
def test_each_bad_option_fails_in_milliseconds_before_any_model(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "readonly").mkdir()
    os.chmod(tmp_path / "readonly", 0o500)
    if os.access(tmp_path / "readonly", os.W_OK):  # root ignores permission bits: use a file in the way instead
        os.chmod(tmp_path / "readonly", 0o700)
        os.rmdir(tmp_path / "readonly")
        (tmp_path / "readonly").write_text("a file where a folder should be")
    for name in ("tiny", "tiny-wan"):  # building any model now is the failure this test guards against
        monkeypatch.setattr(backbones.module(name), "load_backbone", lambda *a, **k: pytest.fail("a model was built"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    argv = ["--backbone", "tiny", "--max_steps", "1", "--output_dir", str(tmp_path / "out"), *args]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        train.cli(argv)
    assert time.perf_counter() - start < 5
    assert exit_info.value.code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


def test_a_sliding_window_makes_the_run_length_part_of_the_resume_check():
    """The sliding window is laid out over --max_steps, so extending such a run would move the window: refused."""
    make = lambda **kw: train.resolve(train.parse_args(["--backbone", "tiny", "--sde_window", "2", *[
        a for k, v in kw.items() for a in (f"--{k}", str(v))]]))
    identity = lambda cfg: checkpoint.run_identity(cfg, 1, "no", ["p"], ["v"])
    assert identity(make(max_steps=4)) == identity(make(max_steps=8))  # random window: the length may change
    sliding = dict(sde_window_start="sliding")
    assert identity(make(max_steps=4, **sliding)) != identity(make(max_steps=8, **sliding))


def test_unknown_and_abbreviated_options_are_usage_errors(capsys):
    for argv in (["--max_step", "3"], ["--no_such_option"]):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(argv)
        assert exit_info.value.code == 2
        assert f"unrecognized arguments: {argv[0]}" in capsys.readouterr().err
    assert train.parse_args(["--gradient_checkpointing"]).gradient_checkpointing is True  # a bare flag
    assert train.parse_args(["--gradient_checkpointing", "False"]).gradient_checkpointing is False
