"""Crash-safe checkpoints of a GRPO run: who owns the output folder, how a checkpoint is written so that a
kill at any moment leaves only complete ones, how a damaged one is recognised, which checkpoint `latest` means,
and what a resume must match.

A checkpoint `checkpoints/checkpoint-<step>/` holds
    optimizer.bin, random_states_<rank>.pkl, ...   accelerate's `save_state` (full fine-tuning: the weights too)
    pytorch_lora_weights.safetensors                LoRA runs: the adapter, the only weights that change, in
                                                    diffusers' format (export.py; lora.safetensors before)
    anchor.pt  (anchor_rank<i>.pt under FSDP)       the moving anchor's snapshot and counters
    trainer_state.json                              step, curriculum, base validation scores, the run's identity
    manifest.json                                   written last: every file above with its size and sha256

How a save survives a crash (POSIX rename is atomic; fsync makes the bytes durable before the rename)
    0. every process checks its trained parameters: a NaN or an infinity stops the save before anything is
       written (Deviations 6);
    1. every process writes into `checkpoint-<step>.incomplete/` beside the final place;
    2. the main process fsyncs the run's jsonl files (a checkpoint never outlives the metrics rows it covers),
       fsyncs and hashes every file, writes manifest.json, fsyncs the folder, renames it to `checkpoint-<step>`
       and fsyncs the parent folder;
    3. rotation renames each checkpoint beyond `--checkpoints_total_limit` to `<name>.deleted` first and only
       then removes it.
So a folder named `checkpoint-<int>` is always complete: a kill during 1-2 leaves a `.incomplete` folder that
`latest` skips (with a warning) and the next save removes; a kill during 3 leaves a `.deleted` one, likewise.
A full disk fails the save the same way, whatever the writer raises (OSError, torch's RuntimeError,
safetensors' SafetensorError): the `.incomplete` folder goes, the previous checkpoints are untouched, and the
SaveError names the output folder and its disk's free space. The final export (`export_final`) likewise.

Which checkpoint is intact (`damage`)
    its manifest parses; every file it lists has the recorded size and sha256; trainer_state.json parses and
    holds the step of the folder's name. `latest` skips, with a warning naming the file, every checkpoint that
    fails and every one without a manifest (Deviations 2), and takes the newest intact one; a checkpoint named
    by --resume_from_checkpoint that fails is refused (CheckpointError).

The output folder: what is the run's own (Deviations 3)
    `run_files.json` (RECORD) names what a run of ours writes there, as patterns (OUTPUTS: config.json, the jsonl
    files, metrics.png, samples/base_<i>.gif ..., checkpoints/checkpoint-<step>, tracker/*, the final export),
    and is written before any of them. A path that matches OUTPUTS but no record is foreign: a run refuses the
    folder and names it (it would write over it). A file that matches nothing a run writes (notes.txt,
    samples/my_clip.mp4) is left alone, never deleted. `--overwrite_output_dir` deletes what the record covers
    and nothing else.

The rules of a resume
    - A fresh run refuses an output folder that holds another run (checkpoints, metrics or a final export),
      unless `--overwrite_output_dir` (which deletes that run's files, and only those) or
      `--resume_from_checkpoint`.
    - `latest` takes the newest intact checkpoint; with none, it starts fresh only in a folder holding no run.
    - A resumed run must be the same run: every option that changes what is computed (RUN_FIELDS), the process
      count, the mixed precision, and the contents of the prompt lists and the rubric file (by hash) must equal
      the checkpoint's. Anything else (max_steps, logging and checkpoint frequency, micro-batch size, paths
      of the output) may change. Then the resumed steps equal those of an uninterrupted run, bit for bit.

Deviations / choices
1. Checkpoints are written by the main process and read by all (FSDP: each process also writes and reads its
   own anchor shard), so several nodes need a shared filesystem. The fsyncs are the main process's; on a
   network filesystem the writers' close() is what publishes their files (close-to-open consistency).
2. A checkpoint without manifest.json (from before manifests, or whose manifest was lost) cannot be verified:
   `latest` skips it with a warning that says how to load it anyway, by naming it (--resume_from_checkpoint
   <folder>); named, it loads when its trainer_state.json parses and holds the folder's step. A manifest from
   before hashes (sizes only) is checked by size.
3. The run's own files are known by a record of patterns, written before the files, not by a list of every file:
   the trackers name theirs (TensorBoard puts a timestamp, host and pid in each) and every process writes its
   own validation videos. So a file a user puts into a run's folder under a name the run writes (its own
   samples/base_0.gif) counts as the run's. A folder from before records (no run_files.json) whose checkpoints/
   holds a checkpoint of ours is taken as a run of ours. `--output_dir .` deletes no repository either way.
4. The manifest's hash is sha256, chosen by measurement (bench/hash_checkpoint.py on the 2-core dev machine,
   whose CPU has SHA-NI; the files just written, so read from the page cache): sha256 1.4 GB/s, blake2b 0.82,
   md5 0.66, sha1 1.5 (broken), zlib.crc32 3.0 (32 bits: a checksum, not a content hash); hashlib.file_digest
   is no faster than 1 MiB reads. Per save: `small` backbone (4.2 MB) 3 ms; HunyuanVideo-1.5 LoRA (56.6 M
   float32: adapter 226 MB, optimizer.bin 453 MB, anchor.pt 226 MB) 0.65 s in one thread, 0.32-0.36 s in two
   (hashlib releases the GIL, so large checkpoints hash one file per thread), against 3.8-4.0 s to write and
   fsync those files. A resume reads the checkpoint once more to verify it (every process, claim_output_dir).
5. A resume keeps the run's previous final export at the root until the resumed run has written its own:
   nothing finished is removed before its replacement is complete (meanwhile a run folder given to sample.py
   means that export; name a checkpoint for a newer policy).
6. Non-finite parameters: a save or the final export refuses (CheckpointError naming the first bad parameter and
   what to do) and writes nothing. Every process checks the parameters it holds (FSDP: its shards; DeepSpeed
   ZeRO-3 partitions are not seen) and all learn the verdict, so none is left waiting at a collective.

Test: `python -m pytest tests/test_checkpoint.py -q` (crash injection at every point of a save, kill -9, full
disks, damaged checkpoints, the output-folder rules).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from accelerate.utils import DistributedType, gather_object
from safetensors import SafetensorError

from training import export, logs

CHECKPOINTS = "checkpoints"          # sub-folder of the output folder
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
RECORD = "run_files.json"            # the run's record of what it writes (Deviations 3)
NAME = re.compile(r"checkpoint-(\d+)")
# What the end of a run writes at the output folder's root: every name export.save_weights writes
FINAL_EXPORT = (export.LORA_FILE, export.PEFT, export.TRANSFORMER)
# Everything a run writes into its output folder, as patterns (logs.OUTPUTS): what the record covers, what a
# foreign file must not match, what --overwrite_output_dir deletes. `checkpoint-[0-9]*` takes the interrupted
# saves and deletions (`.incomplete`, `.deleted`) too, but not a user's `checkpoint-best`.
OUTPUTS = (*logs.OUTPUTS, f"{CHECKPOINTS}/checkpoint-[0-9]*", "export.incomplete", *FINAL_EXPORT,
           *(f"{name}.deleted" for name in FINAL_EXPORT))
OWN_FOLDERS = (CHECKPOINTS, logs.SAMPLES, *logs.TRACKERS)  # removed by --overwrite_output_dir if the run made them
# The part that shows a run has made progress: the files written before the first step (config.json, the base
# validation videos) do not make a folder "hold a run", so a run killed while loading can simply be started again.
PROGRESS_FILES = (CHECKPOINTS, "metrics.jsonl", "samples.jsonl", *FINAL_EXPORT)
# What a full disk raises on the way: OSError from Python's own writes, RuntimeError from torch.save ("unexpected
# pos 52032 vs 51924", "PytorchStreamWriter failed writing file"), SafetensorError from safetensors.
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)

# Options that define what a run computes: a resume must not change them.
RUN_FIELDS = ("backbone", "pretrained", "full", "lora_rank", "lora_alpha", "lora_targets", "num_frames", "height",
              "width", "fps", "sde", "eta", "num_steps", "shift", "guidance", "group_size", "batch_size", "equalizer",
              "timestep_fraction", "clip_range", "adv_clip", "anchor_every", "beta_pos", "beta_vel", "kl_start",
              "kl_end", "kl_ramp_steps", "updates_per_rollout", "reward", "reward_model", "curriculum",
              "curriculum_tau", "curriculum_k", "curriculum_beta", "static_weights", "learning_rate", "weight_decay",
              "lr_scheduler", "lr_warmup_steps", "max_grad_norm", "seed", "optimizer",
              "sde_window", "sde_window_start", "sde_window_range", "shared_prefix", "ode_solver", "ode_steps",
              "ulysses_degree", "ring_degree")


class CheckpointError(ValueError):
    """A problem with the output folder or a checkpoint that the user resolves by choosing an option."""


class SaveError(OSError):
    """A checkpoint or the final export could not be written (most often a full disk); nothing half-written is
    left, and the message names the output folder and its disk's free space."""


# ----------------------------------------------------------------------------------------------------
# The output folder


def claim_output_dir(output_dir: str, resume: str | None, overwrite: bool, identity: dict | None = None) -> str | None:
    """Checks the output folder before any model loads and returns the checkpoint to resume from (or None).

    A folder holding a file that matches what the run writes (OUTPUTS) but that no run of ours recorded is
    refused, naming the files. `latest` without an intact checkpoint starts fresh in a folder that holds no run,
    or one that holds this very run (config.json records the same identity) killed before its first checkpoint
    was complete; any other run there is refused. Read-only, so every process may call it; then the main
    process calls `record_run`."""
    if overwrite and resume:
        raise CheckpointError("--overwrite_output_dir deletes the run that --resume_from_checkpoint would continue: "
                              "pass one of them")
    _check_writable(output_dir)
    ours = _owned(output_dir)[0]
    foreign = [name for name in _matching(output_dir, OUTPUTS) if not _covered(name, ours)]
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise CheckpointError(
            f"--output_dir {output_dir} holds {shown}, which no run of ours recorded writing (in {RECORD}) and "
            f"which this run would write over or delete. Move them elsewhere, or choose another --output_dir "
            f"(--overwrite_output_dir deletes only what a run of ours wrote)")
    held = [name for name in PROGRESS_FILES if _holds(output_dir, name)]
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
        problem = damage(resume)
        if problem is not None:
            raise CheckpointError(f"--resume_from_checkpoint {resume}: {problem}. Pick another checkpoint under "
                                  f"{os.path.join(output_dir, CHECKPOINTS)} or 'latest' (the newest intact one)")
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


def record_run(output_dir: str, overwrite: bool) -> None:
    """Main process, after claim_output_dir and before anything is written: with --overwrite_output_dir the
    previous run's own files go (clear_run); then RECORD names everything this run writes (OUTPUTS), so a crash
    at any later moment leaves no file of ours unrecorded. A resume keeps what the record held."""
    if overwrite:
        clear_run(output_dir)
    patterns, folders = _owned(output_dir)
    folders = folders + [d for d in OWN_FOLDERS if not os.path.exists(os.path.join(output_dir, d))]
    logs.write_json(os.path.join(output_dir, RECORD), {
        "about": "what GRPO runs wrote into this folder (train.py): --overwrite_output_dir deletes the paths that "
                 "match these patterns and the folders listed once empty, nothing else",
        "patterns": sorted(set(patterns) | set(OUTPUTS)), "folders": sorted(set(folders))})


def clear_run(output_dir: str) -> None:
    """--overwrite_output_dir: deletes what the record covers, then the folders the run made if they are empty,
    then the record itself (last: a crash on the way leaves the rest still covered). Nothing else (Deviations 3)."""
    patterns, folders = _owned(output_dir)
    for name in _matching(output_dir, [p for p in patterns if p in OUTPUTS]):  # a pattern edited in: ignored
        _remove(os.path.join(output_dir, name))
    for folder in folders:
        if folder in OWN_FOLDERS and os.path.isdir(os.path.join(output_dir, folder)) \
                and not os.listdir(os.path.join(output_dir, folder)):
            os.rmdir(os.path.join(output_dir, folder))
    if os.path.exists(os.path.join(output_dir, RECORD)):
        os.remove(os.path.join(output_dir, RECORD))


def _owned(output_dir: str) -> tuple[list, list]:
    """(patterns, folders) of the folder's record; for a folder from before records whose checkpoints/ holds a
    checkpoint of ours, everything a run writes (Deviations 3); else nothing."""
    path = os.path.join(output_dir, RECORD)
    try:
        with open(path) as f:
            record = json.load(f)
        return list(record["patterns"]), list(record["folders"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is damaged ({err}): it says which files of {output_dir} a run wrote. Delete "
                              f"the run's files and it by hand, or choose another --output_dir") from None
    ours = any(os.path.exists(os.path.join(p, MANIFEST)) or os.path.exists(os.path.join(p, STATE))
               for p in list_checkpoints(os.path.join(output_dir, CHECKPOINTS)))
    return (list(OUTPUTS), [d for d in OWN_FOLDERS if os.path.isdir(os.path.join(output_dir, d))]) if ours else ([], [])


def _matching(output_dir: str, patterns) -> list[str]:
    """The paths under output_dir (relative, '/'-separated) that match a pattern; only the folders that the
    patterns name are listed, so a mistyped --output_dir of a large tree costs a few listdir calls."""
    found = set()
    for pattern in patterns:
        folder, _, name = pattern.rpartition("/")
        try:
            entries = os.listdir(os.path.join(output_dir, folder))
        except OSError:  # absent, or not a folder
            continue
        found.update(f"{folder}/{e}" if folder else e for e in fnmatch.filter(entries, name))
    return sorted(found)


def _covered(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _saved_identity(output_dir: str) -> dict | None:
    try:
        with open(os.path.join(output_dir, "config.json")) as f:
            return json.load(f).get("run_identity")
    except (OSError, ValueError, AttributeError):
        return None


def _holds(output_dir: str, name: str) -> bool:
    """Whether a PROGRESS_FILES entry is there: a file, a folder of the export, or checkpoints/ holding a
    checkpoint-<step> (complete or not; a user's checkpoint-best alone is no run)."""
    if name == CHECKPOINTS:
        return bool(_matching(output_dir, [f"{CHECKPOINTS}/checkpoint-[0-9]*"]))
    path = os.path.join(output_dir, name)
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
# Listing: which folders are checkpoints, which are intact


def list_checkpoints(root: str) -> list[str]:
    """The `checkpoint-<step>` folders under root, oldest step first; other names (`checkpoint-best`,
    `checkpoint-5.incomplete`) are not checkpoints of this run and are ignored."""
    if not os.path.isdir(root):
        return []
    found = sorted((int(m.group(1)), d) for d in os.listdir(root) if (m := NAME.fullmatch(d)))
    return [os.path.join(root, d) for _, d in found]


def damage(path: str) -> str | None:
    """None when checkpoint `path` is intact, else what is wrong with it, naming the file: the manifest parses
    and every file it lists has its recorded size and sha256 (a manifest from before hashes: its size), and
    trainer_state.json parses and holds the step of the folder's name. Without a manifest only the latter is
    checked (Deviations 2)."""
    manifest = os.path.join(path, MANIFEST)
    if os.path.exists(manifest):
        try:
            with open(manifest) as f:
                files = json.load(f)["files"]
            expected = {name: (entry, None) if isinstance(entry, int) else (int(entry["bytes"]), str(entry["sha256"]))
                        for name, entry in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"{manifest} is damaged ({type(err).__name__}: {err})"
        for name, (size, _) in expected.items():  # sizes first: a truncated file is found without reading any
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                return f"{file} is missing"
            if os.path.getsize(file) != size:
                return f"{file} has {os.path.getsize(file)} bytes, its manifest says {size}"
        hashed = [name for name, (_, sha) in expected.items() if sha is not None]
        for name, got in zip(hashed, _sha256([os.path.join(path, name) for name in hashed])):
            if got != expected[name][1]:
                return f"{os.path.join(path, name)} does not match the sha256 in its manifest (changed after the save)"
    state = os.path.join(path, STATE)
    try:
        with open(state) as f:
            step = json.load(f)["step"]
    except FileNotFoundError:
        return f"{state} is missing"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{state} is damaged ({type(err).__name__}: {err})"
    named = NAME.fullmatch(os.path.basename(os.path.normpath(path)))
    if named and step != int(named.group(1)):  # its weights are those of the folder's step, or of neither
        return f"{state} holds step {step!r}, but the folder is checkpoint-{named.group(1)}"
    return None


def is_complete(path: str) -> bool:
    """True when `damage` finds nothing wrong with the checkpoint."""
    return damage(path) is None


def latest(root: str) -> str | None:
    """The newest intact checkpoint under root; each other one met on the way is reported, naming what is wrong
    with it, and skipped (a checkpoint without manifest too: Deviations 2)."""
    if os.path.isdir(root):
        for d in sorted(os.listdir(root)):
            if d.endswith(".incomplete"):
                warnings.warn(f"skipping {os.path.join(root, d)}: a save that was interrupted (removed at the next save)")
    for path in reversed(list_checkpoints(root)):
        if not os.path.exists(os.path.join(path, MANIFEST)):
            warnings.warn(f"skipping {path}: it has no {MANIFEST}, so its files cannot be verified (a checkpoint from "
                          f"before manifests, or one whose manifest was lost). To use it anyway, name it: "
                          f"--resume_from_checkpoint {path}")
            continue
        problem = damage(path)
        if problem is None:
            return path
        warnings.warn(f"skipping {path}: incomplete or damaged checkpoint: {problem}")
    return None


def _sha256(paths: list[str]) -> list[str]:
    """The sha256 of each file, hashed in parallel threads (hashlib releases the GIL): Deviations 4."""

    def one(path):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    if len(paths) <= 1 or sum(os.path.getsize(p) for p in paths) < 64 << 20:  # small: threads cost more than they save
        return [one(p) for p in paths]
    with ThreadPoolExecutor(min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(one, paths))


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
    # Where the scores come from matters where it changes them: the judge read through an OpenAI-compatible server's
    # top-20 log-probs is not the in-process one (reward_models/openai_judge.py Deviations 4); reward_server.py's
    # scores are (its URL may change between a run and its resume).
    from reward_models.openai_judge import is_openai_url

    chat_api = cfg.reward_url is not None and is_openai_url(cfg.reward_url)
    return {**{k: getattr(cfg, k) for k in RUN_FIELDS}, "max_steps": length, "reward_chat_api": chat_api,
            "num_processes": num_processes,
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
    previous = lambda: ([p for p in list_checkpoints(root) if p != final] or ["none"])[-1]
    _everywhere(accelerator, lambda: _check_finite(accelerator, model, f"checkpoint-{step}",  # [dist] all learn it
                                                   f"the last checkpoint, {previous()}"))

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

    def publish():  # main process: rows on disk, seal, rename into place, rotate
        for name in logs.JSONL:  # the rows this checkpoint covers must not be lost once it exists (logs.py Dev. 1)
            if os.path.exists(os.path.join(output_dir, name)):
                _fsync(os.path.join(output_dir, name))
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
    except SAVE_ERRORS as err:  # e.g. a full disk: the run stops, the previous checkpoints are intact
        if accelerator.is_main_process:  # [dist] give the space back
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failed(err, final, output_dir, f"The newest intact checkpoint is {previous()}") from err
    return final


def export_final(accelerator, model, output_dir: str, full: bool) -> None:
    """The end of a run: the policy at the output folder's root in diffusers' format (export.py), LoRA as
    pytorch_lora_weights.safetensors, full fine-tuning as transformer/. Written beside and renamed into place,
    so a kill leaves the old export or the new one, never half of one, and the old one stays until the new one
    is complete. Collective: call on every process."""
    tmp = os.path.join(output_dir, "export.incomplete")
    _everywhere(accelerator, lambda: _check_finite(accelerator, model, "the final export",  # [dist] all learn it
                                                   f"the last checkpoint, {_newest_name(output_dir)}"))

    def publish():
        names = sorted(os.listdir(tmp))
        unlisted = [name for name in names if name not in FINAL_EXPORT]
        if unlisted:  # no record covers them: never written over a user's file of that name
            raise CheckpointError(f"export.save_weights wrote {unlisted}, which checkpoint.FINAL_EXPORT does not "
                                  f"list; the new export is complete in {tmp}: move it into place by hand")
        for name in names:
            path = os.path.join(tmp, name)
            _seal(path, manifest=False) if os.path.isdir(path) else _fsync(path)
            _rename(path, os.path.join(output_dir, name))
        os.rmdir(tmp)

    try:
        _everywhere(accelerator, lambda: shutil.rmtree(tmp, ignore_errors=True), main_only=True)
        _everywhere(accelerator, lambda: export.save_weights(accelerator, model, tmp, full))  # FSDP: a gather inside
        _everywhere(accelerator, publish, main_only=True)
    except SAVE_ERRORS as err:
        if accelerator.is_main_process:  # [dist]
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failed(err, f"the final export ({tmp})", output_dir, f"The checkpoints are intact (the "
                           f"newest is {_newest_name(output_dir)}); the run resumes at its last step and writes the "
                           f"export") from err


def _newest_name(output_dir: str) -> str:
    """The newest checkpoint's folder by name (not verified), for messages."""
    return (list_checkpoints(os.path.join(output_dir, CHECKPOINTS)) or ["none"])[-1]


def _check_finite(accelerator, model, what: str, last: str) -> None:
    """Raises CheckpointError naming the first trained parameter of this process that holds a NaN or an
    infinity (Deviations 6). One device sync for all parameters."""
    named = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]  # [dist]
    if not named:
        return
    local = [p.to_local() if hasattr(p, "to_local") else p for _, p in named]  # [dist] FSDP2: this process's shard
    flags = [torch.isfinite(t.detach()).all() for t in local]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).cpu()  # (num_params,) bool
    if not finite.all():
        name = named[int((~finite).nonzero()[0])][0]
        raise CheckpointError(f"not writing {what}: parameter {name} holds NaN or infinite values, so training "
                              f"diverged. Lower --learning_rate and resume from {last} "
                              f"(--resume_from_checkpoint latest)")


def _save_failed(err: Exception, what: str, output_dir: str, newest: str) -> SaveError:
    """The message of a failed save: what failed and why, the disk it was written to and its free space."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
    try:
        usage = shutil.disk_usage(output_dir)
        disk = f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.1f} GiB"
    except OSError:
        disk = "an unknown amount of free space"
    return SaveError(f"saving {what} failed ({reason}); the disk of {output_dir} has {disk}. {newest}: free space "
                     f"there (or fix the cause) and rerun with --resume_from_checkpoint latest")


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
    """fsync every file, then write the manifest (the last file: sizes and sha256), then fsync the folder."""
    paths = [os.path.join(d, name) for d, _, names in os.walk(folder) for name in names]
    for path in paths:
        _fsync(path)
    if manifest:
        files = {os.path.relpath(path, folder): {"bytes": os.path.getsize(path), "sha256": sha}
                 for path, sha in zip(paths, _sha256(paths))}
        logs.write_json(os.path.join(folder, MANIFEST), {"files": files})
    _fsync(folder)


def _rename(src: str, dst: str) -> None:
    """Moves src to dst; what dst held (a checkpoint of the same step from an earlier, replayed timeline, or the
    previous export) is removed only once src is in its place. A file is replaced atomically; a folder, which a
    rename cannot replace, is first moved aside to `<dst>.deleted`."""
    aside = None
    if os.path.lexists(dst) and (os.path.isdir(dst) or os.path.isdir(src)):
        aside = dst + ".deleted"
        if os.path.lexists(aside):
            _remove(aside)
        os.replace(dst, aside)
    os.replace(src, dst)
    _fsync(os.path.dirname(dst))  # the rename itself is durable
    if aside is not None:
        _remove(aside)


def _remove(path: str) -> None:
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------
# Resume


def load(path: str, accelerator, model, anchor, cur, identity: dict, full: bool, output_dir: str) -> dict:
    """Restores everything `save` wrote after checking the run's identity; returns trainer_state.json.
    claim_output_dir has verified the checkpoint's files (`damage`). The run's final export at the root stays
    until the resumed run writes its own (Deviations 5); `output_dir` is kept for the callers."""
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
    anchor.load_state_dict(torch.load(os.path.join(path, anchor_file(accelerator)), weights_only=True))
    cur.load_state_dict(state["curriculum"])
    # max_steps is None where the run's length does not define it (run_identity): then it was not compared
    checked = [k for k in identity if k in saved and not (k == "max_steps" and identity[k] is None)]
    accelerator.print(f"resume: {path} (step {state['step']}); checked {len(checked)} run options equal: "
                      f"{', '.join(_option(k) for k in checked)}")
    return state


def _option(key: str) -> str:
    """The command-line name a user would change for an identity key."""
    names = {"prompts_sha256": "--prompts (file contents)", "validation_prompts_sha256": "--validation_prompts "
             "(file contents)", "rubric_sha256": "--reward_prompt_template (file contents)",
             "num_processes": "the number of processes", "mixed_precision": "--mixed_precision",
             "reward_chat_api": "--reward_url (an OpenAI-compatible /v1 judge server or not)"}
    return names.get(key, f"--{key}")


# ----------------------------------------------------------------------------------------------------
# A run's policy, for sample.py and evaluate.py


def resolve_weights(path: str) -> export.Weights:
    """A run folder, a checkpoint folder or an adapter .safetensors file -> what to load (export.py Deviations
    3, 4). Reads only small files (JSON, a safetensors header); raises ValueError naming what it looked for."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"{path!r} is a file but not a .safetensors adapter")
        return export.lora_file(path, recorded_options(os.path.dirname(path)), source=path)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} does not exist (a run folder, a checkpoint folder or a .safetensors file)")
    run = recorded_options(path)
    if os.path.isfile(os.path.join(path, export.LORA_FILE)):
        return export.lora_file(os.path.join(path, export.LORA_FILE), run, source=path)
    if os.path.isfile(os.path.join(path, export.TRANSFORMER, "config.json")):
        return export.Weights("full", os.path.join(path, export.TRANSFORMER), path, run, prefix=None)
    if os.path.isfile(os.path.join(path, export.OLD_LORA_FILE)):
        return export.lora_file(os.path.join(path, export.OLD_LORA_FILE), run, source=path)
    newest = latest(os.path.join(path, CHECKPOINTS))
    if newest is not None:
        return resolve_weights(newest)
    raise ValueError(f"{path!r} holds no weights: looked for {export.LORA_FILE}, {export.TRANSFORMER}/, "
                     f"{export.OLD_LORA_FILE} and a complete {CHECKPOINTS}/checkpoint-<step>/ (a full fine-tuning "
                     f"checkpoint holds accelerate's training state only; {export.TRANSFORMER}/ is written at the end "
                     f"of the run: resume and finish it, or pass the run folder once it has finished)")


def recorded_options(folder: str) -> dict:
    """The run options recorded beside the weights: trainer_state.json's (a checkpoint) or config.json's (a run)."""
    for name, key in ((STATE, "config"), ("config.json", None)):
        file = os.path.join(folder, name)
        if os.path.isfile(file):
            with open(file) as f:
                saved = json.load(f)
            return dict(saved[key] if key else saved)
    return {}
