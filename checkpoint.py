"""Crash-safe checkpoints of a GRPO run: who owns the output folder, how a checkpoint is written so that a
kill at any moment leaves only complete ones, which checkpoint `latest` means, and what a resume must match.

A checkpoint `checkpoints/checkpoint-<step>/` holds
    optimizer.bin, random_states_<rank>.pkl, ...   accelerate's `save_state` (full fine-tuning: the weights too)
    pytorch_lora_weights.safetensors                LoRA runs: the adapter, the only weights that change, in
                                                    diffusers' format (export.py; lora.safetensors before)
    anchor.pt  (anchor_rank<i>.pt under FSDP)       the moving anchor's snapshot and counters
    trainer_state.json                              step, curriculum, base validation scores, the run's identity
    manifest.json                                   written last: every file above with its size in bytes

How a save survives a crash (POSIX rename is atomic; fsync makes the bytes durable before the rename)
    1. every process writes into `checkpoint-<step>.incomplete/` beside the final place;
    2. the main process fsyncs every file, writes manifest.json, fsyncs the folder, renames it to
       `checkpoint-<step>` and fsyncs the parent folder;
    3. rotation renames each checkpoint beyond `--checkpoints_total_limit` to `<name>.deleted` first and only
       then removes it.
So a folder named `checkpoint-<int>` is always complete: a kill during 1-2 leaves a `.incomplete` folder that
`latest` skips (with a warning) and the next save removes; a kill during 3 leaves a `.deleted` one, likewise.
A full disk (ENOSPC) fails the save the same way; the previous checkpoints are untouched.

The rules of a resume
    - A fresh run refuses an output folder that holds another run (checkpoints or metrics), unless
      `--overwrite_output_dir` (which deletes that run's files, and only those) or `--resume_from_checkpoint`.
    - `latest` takes the newest complete checkpoint; with none, it starts fresh only in a folder holding no run.
    - A resumed run must be the same run: every option that changes what is computed (RUN_FIELDS), the process
      count, the mixed precision, and the contents of the prompt lists and the rubric file (by hash) must equal
      the checkpoint's. Anything else (max_steps, logging and checkpoint frequency, micro-batch size, paths
      of the output) may change. Then the resumed steps equal those of an uninterrupted run, bit for bit.

Deviations / choices
1. Checkpoints are written by the main process and read by all (FSDP: each process also writes and reads its
   own anchor shard), so several nodes need a shared filesystem. The fsyncs are the main process's; on a
   network filesystem the writers' close() is what publishes their files (close-to-open consistency).
2. A checkpoint from before manifests (no manifest.json) counts as complete when its trainer_state.json, which
   the old code wrote after every other file, parses.
3. `--overwrite_output_dir` deletes only the names listed in RUN_FILES, never the whole folder: a mistyped
   `--output_dir .` must not delete a repository.

Test: `python -m pytest tests/test_checkpoint.py -q` (crash injection at every point of a save, kill -9, ENOSPC).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings

import torch
from accelerate.utils import DistributedType, gather_object

import export
import logs

CHECKPOINTS = "checkpoints"          # sub-folder of the output folder
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
NAME = re.compile(r"checkpoint-(\d+)")
# Everything a run writes into its output folder (what --overwrite_output_dir deletes), and the part that
# shows a run has made progress: the files written before the first step (config.json, the base validation
# videos) do not make a folder "hold a run", so a run killed while loading can simply be started again.
RUN_FILES = (CHECKPOINTS, "metrics.jsonl", "samples.jsonl", "profile.jsonl", "metrics.png", "config.json", "samples",
             "tracker", "wandb", export.LORA_FILE, export.TRANSFORMER)
FINAL_EXPORT = (export.LORA_FILE, export.TRANSFORMER)  # what the end of a run writes at the output folder's root
PROGRESS_FILES = (CHECKPOINTS, "metrics.jsonl", "samples.jsonl")

# Options that define what a run computes: a resume must not change them.
RUN_FIELDS = ("backbone", "pretrained", "full", "lora_rank", "lora_alpha", "num_frames", "height", "width", "fps",
              "sde", "eta", "num_steps", "shift", "guidance", "group_size", "batch_size", "equalizer",
              "timestep_fraction", "clip_range", "adv_clip", "anchor_every", "beta_pos", "beta_vel", "kl_start",
              "kl_end", "kl_ramp_steps", "updates_per_rollout", "reward", "reward_model", "curriculum",
              "curriculum_tau", "curriculum_k", "curriculum_beta", "static_weights", "learning_rate", "weight_decay",
              "lr_scheduler", "lr_warmup_steps", "max_grad_norm", "seed", "optimizer",
              "sde_window", "sde_window_start", "shared_prefix")


class CheckpointError(ValueError):
    """A problem with the output folder or a checkpoint that the user resolves by choosing an option."""


# ----------------------------------------------------------------------------------------------------
# The output folder


def claim_output_dir(output_dir: str, resume: str | None, overwrite: bool, identity: dict | None = None) -> str | None:
    """Checks the output folder before any model loads and returns the checkpoint to resume from (or None).

    `latest` without a complete checkpoint starts fresh in a folder that holds no run, or one that holds this
    very run (config.json records the same identity) killed before its first checkpoint was complete; any
    other run there is refused. Read-only, so every process may call it; `clear_run` (main process) deletes."""
    if overwrite and resume:
        raise CheckpointError("--overwrite_output_dir deletes the run that --resume_from_checkpoint would continue: "
                              "pass one of them")
    _check_writable(output_dir)
    held = [name for name in PROGRESS_FILES if _holds(os.path.join(output_dir, name))]
    if resume is None:
        if held and not overwrite:
            raise CheckpointError(
                f"--output_dir {output_dir} already holds a run ({', '.join(held)}). Pass --resume_from_checkpoint "
                f"latest to continue it, --overwrite_output_dir to delete it and start again, or choose another "
                f"--output_dir")
        return None
    if resume != "latest":
        own = os.path.dirname(os.path.abspath(resume)) == os.path.abspath(os.path.join(output_dir, CHECKPOINTS))
        if held and not own:
            raise CheckpointError(
                f"--resume_from_checkpoint {resume} belongs to another folder, and --output_dir {output_dir} already "
                f"holds a run ({', '.join(held)}): resuming would overwrite it. Choose an empty --output_dir to "
                f"continue that checkpoint there")
        if not is_complete(resume):
            raise CheckpointError(f"--resume_from_checkpoint {resume}: not a complete checkpoint (no valid {MANIFEST} "
                                  f"or {STATE}); pick one under {os.path.join(output_dir, CHECKPOINTS)} or 'latest'")
        return resume
    found = latest(os.path.join(output_dir, CHECKPOINTS))
    if found is None and held and identity is not None and _saved_identity(output_dir) == identity:
        print(f"resume: no complete checkpoint in {output_dir}; the run there has the same options and was stopped "
              f"before its first checkpoint: starting it again from step 0")
        return None
    if found is None and held:
        raise CheckpointError(
            f"--resume_from_checkpoint latest: no complete checkpoint under {os.path.join(output_dir, CHECKPOINTS)}, "
            f"but --output_dir {output_dir} holds a run ({', '.join(held)}). Pass --overwrite_output_dir to delete "
            f"it and start again, or choose another --output_dir")
    if found is None:
        print(f"resume: no checkpoint in {output_dir} yet; starting a new run")
    return found


def _saved_identity(output_dir: str) -> dict | None:
    try:
        with open(os.path.join(output_dir, "config.json")) as f:
            return json.load(f).get("run_identity")
    except (OSError, ValueError, AttributeError):
        return None


def clear_run(output_dir: str, names=RUN_FILES) -> None:
    """--overwrite_output_dir: delete the files a run writes (RUN_FILES), nothing else (Deviations 3)."""
    for name in names:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _holds(path: str) -> bool:
    return os.path.isfile(path) or (os.path.isdir(path) and bool(os.listdir(path)))


def _check_writable(output_dir: str) -> None:
    """A read-only or full output folder fails here, in milliseconds, not after the models load."""
    probe = os.path.join(output_dir, f".write_test_{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise CheckpointError(f"--output_dir {output_dir} is not writable ({err.strerror}): choose a folder you can "
                              f"write to") from err


# ----------------------------------------------------------------------------------------------------
# Listing: which folders are checkpoints, which are complete


def list_checkpoints(root: str) -> list[str]:
    """The `checkpoint-<step>` folders under root, oldest step first; other names (`checkpoint-best`,
    `checkpoint-5.incomplete`) are not checkpoints of this run and are ignored."""
    if not os.path.isdir(root):
        return []
    found = sorted((int(m.group(1)), d) for d in os.listdir(root) if (m := NAME.fullmatch(d)))
    return [os.path.join(root, d) for _, d in found]


def is_complete(path: str) -> bool:
    """True when the manifest parses and every file it lists has its recorded size (Deviations 2 for older ones)."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
        return all(os.path.getsize(os.path.join(path, name)) == size for name, size in manifest["files"].items())
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:  # a checkpoint written before manifests existed
        with open(os.path.join(path, STATE)) as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def latest(root: str) -> str | None:
    """The newest complete checkpoint under root; each incomplete one met on the way is reported and skipped."""
    if os.path.isdir(root):
        for d in sorted(os.listdir(root)):
            if d.endswith(".incomplete"):
                warnings.warn(f"skipping {os.path.join(root, d)}: a save that was interrupted (removed at the next save)")
    for path in reversed(list_checkpoints(root)):
        if is_complete(path):
            return path
        warnings.warn(f"skipping {path}: incomplete checkpoint (missing or truncated files)")
    return None


# ----------------------------------------------------------------------------------------------------
# Save


def run_identity(cfg, num_processes: int, mixed_precision: str, train_prompts: list[str],
                 val_prompts: list[str]) -> dict:
    """What a resume must match: RUN_FIELDS, the process count, precision and the hashed inputs."""
    rubric = None
    if cfg.reward_prompt_template:
        with open(cfg.reward_prompt_template, "rb") as f:
            rubric = _sha(f.read())
    # A decaying learning-rate schedule and a sliding SDE window are laid out over --max_steps: there the
    # length defines the run too.
    laid_out = cfg.lr_scheduler not in ("constant", "constant_with_warmup") or (
        cfg.sde_window and cfg.sde_window_start == "sliding")
    length = cfg.max_steps if laid_out else None
    return {**{k: getattr(cfg, k) for k in RUN_FIELDS}, "max_steps": length, "num_processes": num_processes,
            "mixed_precision": mixed_precision, "prompts_sha256": _sha("\n".join(train_prompts).encode()),
            "validation_prompts_sha256": _sha("\n".join(val_prompts).encode()), "rubric_sha256": rubric}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def sharded_anchor(accelerator) -> bool:
    """Under FSDP every process holds a different shard of the anchor; otherwise all hold the same copy."""
    return accelerator.distributed_type == DistributedType.FSDP


def anchor_file(accelerator) -> str:
    return f"anchor_rank{accelerator.process_index}.pt" if sharded_anchor(accelerator) else "anchor.pt"


def save(output_dir: str, step: int, accelerator, model, anchor, cur, state: dict, identity: dict,
         full: bool, keep: int) -> str:
    """Writes checkpoint-<step> by the protocol of the module docstring and rotates to the newest `keep`."""
    root = os.path.join(output_dir, CHECKPOINTS)
    final = os.path.join(root, f"checkpoint-{step}")
    tmp = final + ".incomplete"

    def prepare():  # main process: the leftovers of interrupted saves and deletions go, the new folder comes
        for d in os.listdir(root) if os.path.isdir(root) else []:
            if d.endswith((".incomplete", ".deleted")):
                shutil.rmtree(os.path.join(root, d))
        os.makedirs(tmp)

    def write():  # every process its part: accelerate's state (RNG per process, FSDP shards), its anchor shard
        accelerator.save_state(tmp)  # [dist] optimizer, LR schedule, RNG states and (full fine-tuning) the weights
        if not full:  # the adapter is the whole model delta, written as diffusers loads it (export.py)
            export.save_weights(accelerator, model, tmp, full)
        if accelerator.is_main_process or sharded_anchor(accelerator):  # [dist] FSDP: each process its own shard
            torch.save(anchor.state_dict(), os.path.join(tmp, anchor_file(accelerator)))
        if accelerator.is_main_process:  # [dist]
            logs.write_json(os.path.join(tmp, STATE), {**state, "curriculum": cur.state_dict(), "config": identity})

    def publish():  # main process: seal, rename into place, rotate
        _seal(tmp)
        _rename(tmp, final)
        old = [p for p in list_checkpoints(root) if p != final]
        for path in old[: max(len(old) + 1 - keep, 0)]:
            _rename(path, path + ".deleted")  # atomic: never a half-deleted checkpoint-<int>
            shutil.rmtree(path + ".deleted")

    try:
        _everywhere(accelerator, prepare, main_only=True)
        _everywhere(accelerator, write)
        _everywhere(accelerator, publish, main_only=True)
    except OSError as err:  # e.g. ENOSPC: the run stops, the previous checkpoints are intact
        if accelerator.is_main_process:  # [dist] give the space back
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for p in list_checkpoints(root) if p != final]
        raise OSError(err.errno, f"saving {final} failed ({err.strerror}); the newest intact checkpoint is "
                                 f"{previous[-1] if previous else 'none'}: fix the cause and rerun with "
                                 f"--resume_from_checkpoint latest") from err
    return final


def export_final(accelerator, model, output_dir: str, full: bool) -> None:
    """The end of a run: the policy at the output folder's root in diffusers' format (export.py), LoRA as
    pytorch_lora_weights.safetensors, full fine-tuning as transformer/. Written beside and renamed into place,
    so a kill leaves the old export or the new one, never half of one. Collective: call on every process."""
    tmp = os.path.join(output_dir, "export.incomplete")

    def publish():
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            _seal(path, manifest=False) if os.path.isdir(path) else _fsync(path)
            _rename(path, os.path.join(output_dir, name))
        os.rmdir(tmp)

    _everywhere(accelerator, lambda: shutil.rmtree(tmp, ignore_errors=True), main_only=True)
    _everywhere(accelerator, lambda: export.save_weights(accelerator, model, tmp, full))  # FSDP: a gather inside
    _everywhere(accelerator, publish, main_only=True)


def _everywhere(accelerator, fn, main_only: bool = False) -> None:
    """Runs fn (on the main process only, or on every one) and then has every process learn whether all of them
    succeeded: a failure is raised on every process, so none is left waiting at a collective call that the
    failed one never reaches (it would otherwise wait --dist_timeout and report a hung peer)."""
    error = None
    if accelerator.is_main_process or not main_only:
        try:
            fn()
        except Exception as err:  # re-raised below, after the others have been told
            error = err
    failures = [f for f in gather_object([None if error is None else f"process {accelerator.process_index}: "
                                          f"{type(error).__name__}: {error}"]) if f]  # [dist] a barrier too
    if error is not None:
        raise error
    if failures:
        raise RuntimeError(f"stopping with the other process(es): {'; '.join(failures)}")


def _seal(folder: str, manifest: bool = True) -> None:
    """fsync every file, then write the manifest (the last file), then fsync the folder itself."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            _fsync(path)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
    if manifest:
        logs.write_json(os.path.join(folder, MANIFEST), {"files": files})
    _fsync(folder)


def _rename(src: str, dst: str) -> None:
    if os.path.exists(dst):  # a checkpoint of the same step from an earlier, replayed timeline
        os.replace(dst, dst + ".deleted")
        shutil.rmtree(dst + ".deleted")
    os.replace(src, dst)
    _fsync(os.path.dirname(dst))  # the rename itself is durable


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------
# Resume


def load(path: str, accelerator, model, anchor, cur, identity: dict, full: bool, output_dir: str) -> dict:
    """Restores everything `save` wrote after checking the run's identity; returns trainer_state.json."""
    from peft.utils import set_peft_model_state_dict

    with open(os.path.join(path, STATE)) as f:
        state = json.load(f)
    saved = state["config"]
    changed = {k: (saved.get(k), v) for k, v in identity.items() if k in saved and saved[k] != v}
    if changed:  # a resumed run must be the same run; anything else is a new run from these weights
        lines = "; ".join(f"{_option(k)}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: options differ from the checkpoint's ({lines}). Resume with the "
            f"options it was saved with, or start a new run with another --output_dir (or --overwrite_output_dir)")
    accelerator.load_state(path)  # [dist]
    if not full:
        set_peft_model_state_dict(accelerator.unwrap_model(model), export.read_adapter(path))
    if accelerator.is_main_process:  # [dist] the run goes on: its final export will be written again at its end
        clear_run(output_dir, FINAL_EXPORT)  # (it would be older than the checkpoints)
    anchor.load_state_dict(torch.load(os.path.join(path, anchor_file(accelerator)), weights_only=True))
    cur.load_state_dict(state["curriculum"])
    checked = [k for k in identity if k in saved]
    accelerator.print(f"resume: {path} (step {state['step']}); checked {len(checked)} run options equal: "
                      f"{', '.join(_option(k) for k in checked)}")
    return state


def _option(key: str) -> str:
    """The command-line name a user would change for an identity key."""
    names = {"prompts_sha256": "--prompts (file contents)", "validation_prompts_sha256": "--validation_prompts "
             "(file contents)", "rubric_sha256": "--reward_prompt_template (file contents)",
             "num_processes": "the number of processes", "mixed_precision": "--mixed_precision"}
    return names.get(key, f"--{key}")
