"""GRPO post-training of text-to-video generators (HunyuanVideo-1.5, Wan2.1) with the SAGE SDE, the equalizer,
the dual trust region and the self-paced reward curriculum, on any number of GPUs through Accelerate.

    accelerate launch train.py --backbone hunyuan15 --pretrained <dir> \
        --reward videoalign --reward_model <VideoReward dir> --reward_prompt_template <rubric.txt>   # [SAGE]
    accelerate launch train.py --backbone wan21-1.3b --pretrained <dir> --full --group_size 16 \
        --reward vlm --curriculum self_paced                                                          # [SPG]
    accelerate launch --config_file configs/fsdp2_full.yaml train.py --backbone hunyuan15 --full ...
    python train.py --backbone tiny --max_steps 20            # CPU, seconds: the same code on tiny models
    python train.py --backbone small --max_steps 4 --profile  # CPU profile (README "Performance")

Each iteration runs five phases (SPEC §4), each a few calls into the concept modules:
    1. sample     B/G prompts x G videos per process, K SDE steps with log-probs     backbones.sample
    2. reward     decode, score three components, mix them with the curriculum        rewards, curriculum
    3. advantage  normalise within each prompt's group of G (groups never straddle processes)     grpo
    4. update     every trained step of every sample, equalized clipped loss + dual KL  grpo, trust_region
    5. log        metrics.jsonl, metrics.png, validation videos, checkpoints
Lines that involve Accelerate or other processes are tagged `# [dist]`; each has an obvious single-process
reading (gather = the tensor itself, accumulate/backward = loss.backward(), this process = all prompts).
The model plumbing (loading, text encoding, CFG, decoding) is in the backbone's family module (hunyuan.py,
wan.py), reached through backbones.py; checkpoint.py saves and resumes, logs.py writes what a run leaves behind,
profiling.py times the phases.
Units: a "step" in the logs and `--max_steps` is an iteration (one rollout batch); `--anchor_every` and
`--kl_ramp_steps` count optimizer updates (`--updates_per_rollout` per iteration, default 1).

Deviations / choices
--------------------
1. `--batch_size` counts videos per process per step and must be a multiple of `--group_size`, so a
   group is always on one process and advantages need no gather ([dist] gathers are for the curriculum
   and the logs only).
2. Rollout noise is drawn from one generator per sample, seeded by (seed, step, global sample index):
   samples do not depend on the number of processes or on micro-batching, and resuming replays them.
3. One rollout batch feeds `--updates_per_rollout` optimizer steps (default 1, fully on-policy); the
   trained steps of each sample are split between them. With 1, the step-wise KL is 0 by construction
   (the policy is the rollout policy during its only update); it acts from the second update on. The
   anchor period must be a multiple of it, so the anchor means computed at rollout time stay valid.
4. An update whose gradient norm is not finite is reported and skipped (gradients zeroed, no optimizer
   step; the anchor still counts the slot); three in a row stop the run with advice. Not under DeepSpeed:
   its engine clips and steps inside the last backward. fp16 is refused (NaN log-probs, SPEC §8): use bf16.
   Every warning of an iteration is printed with its step number (logs.StepWarnings) and the `health/*`
   metrics count non-finite scores, dropped groups and skipped updates per step.
5. Checkpoints (checkpoint.py) are written to a temporary folder and renamed when complete, so a kill at any
   moment leaves only complete ones; `--resume_from_checkpoint latest` takes the newest complete one. LoRA
   checkpoints hold the adapter only (safetensors), not the 8.3 B frozen weights. A resume must use the
   options the checkpoint was saved with (checkpoint.RUN_FIELDS, the prompt files' contents...); it then
   replays exactly.
6. Validation samples use the ODE (eta = 0) on fixed prompts and seeds; the base policy's scores on the
   same prompts and seeds are measured once before training and stored with the checkpoints.
7. The reward of a validation video uses the raw components with equal weights (`val/total`), so it is
   comparable across curriculum stages.
8. Parameters no gradient can reach (the last block's text-stream outputs) are frozen before `prepare`
   (the family's freeze_unreachable): DDP would reject them and FSDP2 checkpoints would lack their optimizer state.
9. An update accumulates its micro-batches with `accelerator.accumulate`, so DDP syncs once per update and
   DeepSpeed steps once per update; DeepSpeed's micro-batch, accumulation steps and clipping are set from
   the options before `prepare` (there is no DataLoader to infer them from).
10. LoRA runs with DDP only; FSDP and DeepSpeed are for `--full` (they would checkpoint the whole model).
11. Every collective call waits at most `--dist_timeout` seconds (default 600) for the other processes, so a
    hung or dead peer stops the run in bounded time instead of torch's 30 minutes. The longest a process may
    legitimately wait is one phase of imbalance between processes or the main process's checkpoint save
    and validation videos; raise it if those take longer on your cluster. A timed-out collective, or a peer whose
    connection closed (killed, crashed), ends the process with one line that names the peer where it can (with two
    processes, the other one) and says how to resume, exit status 1, not the backend's pages of traceback.
12. An update in which no sample carries signal (every advantage of the batch is 0, e.g. all groups dropped
    or zero-spread, and no KL term acts) is skipped like a non-finite one and counted: AdamW's momentum and
    weight decay would otherwise move the weights by about the learning rate with no signal at all.
13. A bad option fails in `resolve` before any model, tokenizer or weight is touched, naming the option; on
    the command line that is a usage error (exit 2). Options take no abbreviations.
14. Full fine-tuning keeps the transformer's weights in float32 under bf16 mixed precision (autocast computes
    in bf16): an AdamW update below 1/256 of a bf16 weight would round away (lr 5e-6 / 1e-5). FSDP2 and
    DeepSpeed keep fp32 master weights themselves. LoRA weights are float32 always (backbones.add_lora).
15. `--optimizer muon` follows [SAGE]'s choice of optimizer, with torch.optim.Muon (Newton-Schulz
    orthogonalised momentum) where [SAGE]'s code builds its own Muon (`hyvideo.optim.muon`). Muon takes the
    hidden matrices: every LoRA matrix, and in full fine-tuning the 2-D weights inside the transformer blocks
    (`hidden_matrices`); AdamW takes the rest: biases, norms, the patch, text and time embedders, the
    `nn.Embedding`s and the output layer `proj_out`, as Muon's authors prescribe ([SAGE]'s code splits by
    ndim >= 2 and so puts the embedders on Muon too). Each has its own LR schedule, saved and restored by
    accelerate. Muon's update is scaled to AdamW's RMS (`adjust_lr_fn="match_rms_adamw"`), so
    `--learning_rate` keeps its meaning. It runs with DDP and on one process; it is refused under FSDP
    (Muon would orthogonalise each process's shard, not the matrix) and DeepSpeed (one engine optimizer).
16. A multi-process run ends with `os._exit(0)` after its last collective call instead of destroying the
    process group (accelerate's `end_training`): with gloo, torch 2.13's ProcessGroupGloo destructor joins its
    worker threads while holding the GIL, and a worker that still owns the last all_gather's Python tensors
    needs the GIL to free them, a deadlock at exit seen in about 1 of 6 two-process CPU runs (native stacks
    taken with py-spy). Checkpoints, exports and logs are complete and flushed before; trackers are finished.
17. CPU threads (train.py, sample.py, evaluate.py; `set_cpu_threads`): without CUDA and without OMP_NUM_THREADS,
    a process takes min(cores / local processes, cores - the 1-minute load average) threads, at least one, and
    says so. torch's default, one thread per core, is 5x slower per forward of the tiny transformer when one
    other process is busy on a 2-core machine (54 vs 11 ms), while a second thread gains 1.2x (tiny) to 1.9x
    (`small`) on idle cores. OMP_NUM_THREADS, when set, decides.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm
from transformers import HfArgumentParser

import curriculum
import grpo
import rewards
import sde
import trust_region
from models import backbones
from training import checkpoint, export, logs, profiling


@dataclass
class Config:
    # model
    backbone: str = field(default="hunyuan15", metadata={
        "help": f"one of {backbones.NAMES}; 'tiny', 'small' and 'tiny-wan' run on CPU (presets: backbones.py)"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "Diffusers folder or cached hub id (default: 480p t2v)"})
    full: bool = field(default=False, metadata={"help": "full fine-tuning instead of LoRA ([SAGE] trains all weights)"})
    lora_rank: int = field(default=32, metadata={"help": "[FlowGRPO] r = 32"})
    lora_alpha: int = field(default=64, metadata={"help": "[FlowGRPO] alpha = 64"})
    lora_targets: str = field(default="attn", metadata={
        "help": "attn: the DiT blocks' attention projections; attn_ffn: also their feed-forward layers (Flow-Factory's "
                "Wan default, DiffSynth-Studio), which hold most of a block's weights"})
    gradient_checkpointing: Optional[bool] = field(default=None, metadata={
        "help": "default: on for hunyuan15; a bare flag means True", "nargs": "?", "const": True})
    checkpointed_blocks: Optional[int] = field(default=None, metadata={
        "help": "with gradient checkpointing: recompute only the first N DiT blocks (default all 54; fewer is "
                "faster and needs more memory, configs/MEMORY.md)"})
    # data
    prompts: Optional[str] = field(default=None, metadata={"help": "text file, one prompt per line (default: built-in list)"})
    validation_prompts: Optional[str] = field(default=None, metadata={"help": "text file (default: built-in list)"})
    validation_prompt: Optional[list[str]] = field(default=None, metadata={
        "help": "a validation prompt; repeat the option for several (added to --validation_prompts' file, or "
                "replacing the built-in list)", "action": "append"})
    num_frames: Optional[int] = field(default=None, metadata={"help": "4k+1; [SAGE] 81 (tiny: 5)"})
    height: Optional[int] = field(default=None, metadata={"help": "[SAGE] 352 (tiny: 32)"})
    width: Optional[int] = field(default=None, metadata={"help": "[SAGE] 624 (tiny: 32)"})
    fps: Optional[int] = field(default=None, metadata={"help": "frame rate of saved and scored videos (24; tiny 8)"})
    # sampling (SPEC §2)
    sde: str = field(default="sage", metadata={"help": f"one of {sde.KINDS[1:]}"})
    eta: float = field(default=0.5, metadata={"help": "[SAGE] 0.5; [FlowGRPO] 0.7; [CPS] 0.8; [Dance] 0.25"})
    num_steps: Optional[int] = field(default=None, metadata={"help": "K; [SAGE] 20 (tiny: 4)"})
    shift: Optional[float] = field(default=None, metadata={"help": "SD3 shift; default: preset, else the scheduler config (5 at 480p)"})
    guidance: Optional[float] = field(default=None, metadata={"help": "CFG scale of the policy velocity ([SAGE] 6; Wan 5)"})
    # objective (SPEC §3-5)
    group_size: int = field(default=4, metadata={"help": "G; [SAGE] 4"})
    batch_size: Optional[int] = field(default=None, metadata={"help": "videos per process per step, a multiple of G (default G)"})
    micro_batch_size: Optional[int] = field(default=None, metadata={"help": "videos per forward (default 1; tiny: batch)"})
    equalizer: bool = field(default=True, metadata={"help": "[SAGE] gradient norm equalizer"})
    timestep_fraction: float = field(default=1.0, metadata={"help": "fraction of steps trained; [SAGE] 1.0, [Dance] 0.6"})
    sde_window: int = field(default=0, metadata={
        "help": "W > 0: only W consecutive steps of each rollout are stochastic and trained, the rest are ODE steps "
                "([FlowGRPO] sde_window, MixGRPO); 0 = all K ([SAGE])"})
    sde_window_start: str = field(default="random", metadata={
        "help": "where the window sits: 'random' (per iteration, the same for the whole batch), 'sliding' (from high "
                "to low noise over --max_steps, MixGRPO) or a fixed index among the stochastic steps"})
    sde_window_range: Optional[str] = field(default=None, metadata={
        "help": "A,B: a 'random' or 'sliding' window lies within stochastic steps A..B-1; default: the first half "
                "(at least W steps), as FlowGRPO-Fast's configs set sde_window_range, where the step noise is large "
                "enough for a group to differ"})
    shared_prefix: bool = field(default=False, metadata={
        "help": "with --sde_window: the G videos of a prompt share x_T, so the ODE prefix before the window runs once "
                "per group ([SAGE] draws x_T per video: off)"})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip on the mean-reduced ratio ([FlowGRPO] 1e-4)"})
    adv_clip: float = field(default=5.0, metadata={"help": "advantage clip ([FlowGRPO] 5)"})
    anchor_every: int = field(default=10, metadata={"help": "moving-anchor period in optimizer updates; 0 = fixed reference"})
    beta_pos: float = field(default=1.0, metadata={"help": "position KL weight ([SAGE] 1.0)"})
    beta_vel: float = field(default=0.1, metadata={"help": "step-wise KL weight ([SAGE] 0.1)"})
    kl_start: float = field(default=1e-7, metadata={"help": "lambda_KL stage 1 ([SAGE])"})
    kl_end: float = field(default=1e-5, metadata={"help": "lambda_KL stage 2 ([SAGE])"})
    kl_ramp_steps: int = field(default=100, metadata={"help": "optimizer updates over which lambda_KL ramps"})
    updates_per_rollout: int = field(default=1, metadata={"help": "optimizer steps fed by one rollout batch (train.py Deviations 3)"})
    # reward (SPEC §6)
    reward: Optional[str] = field(default=None, metadata={
        "help": "'videoalign' (default of the real backbones), 'vlm' (a Qwen2.5-VL judge, [SPG]) or 'proxy' (CPU ones)"})
    reward_model: Optional[str] = field(default=None, metadata={
        "help": "VideoReward or Qwen2.5-VL folder or hub id (defaults: KwaiVGI/VideoReward, Qwen/Qwen2.5-VL-7B-Instruct); "
                "'tiny' = a random tiny model"})
    reward_prompt_template: Optional[str] = field(default=None, metadata={"help": "VideoAlign rubric text file"})
    reward_batch_size: int = field(default=2, metadata={"help": "videos per reward-model call"})
    reward_device_map: Optional[str] = field(default=None, metadata={
        "help": "'auto' spreads a large --reward vlm judge (72B) over the visible GPUs; default: the training GPU"})
    curriculum: str = field(default="self_paced", metadata={"help": f"one of {tuple(curriculum.CURRICULA)}"})
    curriculum_tau: Optional[str] = field(default=None, metadata={"help": "[SPG] thresholds (HunyuanVideo 0.70,0.68; Wan 0.75,0.75)"})
    curriculum_k: float = field(default=20.0, metadata={"help": "gate steepness (choice, SPEC §6)"})
    curriculum_beta: float = field(default=0.3, metadata={"help": "[SPG] Hoyer weight beta"})
    static_weights: str = field(default="0.5,0.5,1.0", metadata={"help": "static curriculum: [SAGE] Setting B"})
    # optimisation
    learning_rate: Optional[float] = field(default=None, metadata={
        "help": "default 3e-4 LoRA ([FlowGRPO]); full: the preset's ([SAGE] 1e-5, [SPG] Wan2.1-1.3B 5e-6)"})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw, or muon: torch.optim.Muon for the 2-D weight matrices and AdamW for the rest (the [SAGE] "
                "code's default); train.py Deviations 15"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay ([FlowGRPO] 1e-4; the [SAGE] code's Muon 0.01)"})
    lr_scheduler: str = field(default="constant", metadata={
        "help": "diffusers.optimization schedule over the optimizer updates: constant (the papers'), constant_with_warmup, "
                "linear, cosine, cosine_with_restarts, polynomial"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "optimizer updates of linear warm-up (the *_with_warmup, "
                                                              "linear, cosine and polynomial schedules)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "[SAGE] 1.0"})
    max_steps: int = field(default=300, metadata={"help": "iterations (rollout batches); each makes --updates_per_rollout optimizer steps"})
    seed: int = field(default=0, metadata={"help": "everything random derives from it"})
    # outputs
    output_dir: str = field(default="outputs/grpo", metadata={"help": "checkpoints, metrics, samples"})
    checkpointing_steps: int = field(default=50, metadata={"help": "save every N steps (0 = only at the end)"})
    checkpoints_total_limit: int = field(default=3, metadata={"help": "keep this many checkpoints"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "a checkpoint folder, or 'latest' (the newest complete one; a fresh start in an empty folder)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "delete the run already in --output_dir (its checkpoints, logs and samples) and start again"})
    validation_steps: int = field(default=25, metadata={"help": "ODE samples of the validation prompts every N steps"})
    report_to: str = field(default="none", metadata={
        "help": "trackers through accelerate: none, tensorboard, wandb or all (metrics.jsonl is written always)"})
    profile: bool = field(default=False, metadata={"help": "print a per-phase time / model-call table (README)"})
    dist_timeout: int = field(default=600, metadata={
        "help": "seconds a process waits for its peers at a collective call before the run stops with an error "
                "(train.py Deviations 11)"})


TRAIN_PROMPTS = ["a red ball bouncing on green grass", "a blue car driving through a city at night",
                 "a yellow kite flying over the beach", "a white swan gliding on a dark lake",
                 "a purple balloon rising into the sky", "an orange cat walking along a fence",
                 "a green parrot flapping its wings", "a black horse galloping across a field"]
VALIDATION_PROMPTS = ["a red fox running through snow", "a blue whale swimming under the ocean surface"]


class ConfigError(ValueError):
    """A bad option: the message names it and says what to do. From the command line: usage error, exit 2."""


def read_prompts(path: Optional[str], default: list[str], option: str) -> list[str]:
    if path is None:
        return default
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise ConfigError(f"{option} {path!r} does not exist (a text file, one prompt per line)") from None
    except (UnicodeDecodeError, IsADirectoryError) as err:
        raise ConfigError(f"{option} {path!r} is not a UTF-8 text file ({type(err).__name__}): one prompt per line") from None
    if not prompts:
        raise ConfigError(f"{option} {path!r} holds no prompts (one prompt per line)")
    return prompts


def parse_floats(text: str, n: int, option: str, low: float = 0.0, high: float = math.inf) -> list[float]:
    """'0.5,0.5,1.0' -> [0.5, 0.5, 1.0], or a ConfigError that names the option."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise ConfigError(f"{option} {text!r}: expected {n} comma-separated numbers")
    if not all(low <= v <= high for v in values):  # also false for nan
        raise ConfigError(f"{option} {text!r}: every number must be in [{low}, {high}]")
    return values


TRACKER_RUN = "tracker"  # trackers write under <output_dir>/tracker (tensorboard) or their own folder (wandb)
TRACKERS = ("none", "tensorboard", "wandb", "all")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LORA_TARGETS = ("attn", "attn_ffn")  # the families' LORA_TARGETS keys (hunyuan.py, wan.py)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's big-model placements
# One rule per numeric option: (options, test, what the value must be). NaN fails every comparison.
RULES = [
    (("num_steps", "group_size", "batch_size", "micro_batch_size", "lora_rank", "reward_batch_size", "max_steps",
      "checkpoints_total_limit", "fps", "num_frames", "height", "width", "updates_per_rollout"),
     lambda v: v >= 1, "an integer >= 1"),
    (("checkpointing_steps", "validation_steps", "anchor_every", "kl_ramp_steps", "lr_warmup_steps"),
     lambda v: v >= 0, "an integer >= 0 (0 switches it off where that makes sense, see --help)"),
    (("seed",), lambda v: 0 <= v < 2**32, "an integer in 0..2**32-1 (numpy's seed range; every seed derives from it)"),
    # torch keeps the timeout in milliseconds as a C++ integer: 1e14 s overflows it. A week is past any real wait.
    (("dist_timeout",), lambda v: 1 <= v <= 7 * 24 * 3600, "a number of seconds in 1..604800 (one week)"),
    # A learning rate above 1 is a typo (1e308 made an all-NaN adapter); the papers use 5e-6 (full) to 3e-4 (LoRA).
    (("learning_rate",), lambda v: 0 < v <= 1, "a number in (0, 1] (the papers: 5e-6 to 3e-4)"),
    (("eta", "clip_range", "adv_clip", "max_grad_norm", "curriculum_k", "lora_alpha", "shift"),
     lambda v: 0 < v < math.inf, "a finite number > 0"),
    (("beta_pos", "beta_vel", "kl_start", "kl_end", "weight_decay", "curriculum_beta", "guidance"),
     lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    (("timestep_fraction",), lambda v: 0 < v <= 1, "in (0, 1]"),
]


def resolve(cfg: Config) -> Config:
    """The backbone's presets filled in and every option checked, before any model, tokenizer or weight is
    touched, so a mistyped option costs seconds. Returns a new Config; the parsed one is left as it was."""
    if cfg.backbone not in backbones.NAMES:
        raise ConfigError(f"--backbone {cfg.backbone!r}: unknown backbone; choose one of {backbones.NAMES}")
    preset = backbones.preset(cfg.backbone)
    full_learning_rate = preset.pop("full_learning_rate")
    cfg = replace(cfg, **{k: v for k, v in preset.items() if getattr(cfg, k) is None})
    cfg = replace(cfg, batch_size=cfg.group_size if cfg.batch_size is None else cfg.batch_size, learning_rate=(
        cfg.learning_rate if cfg.learning_rate is not None else full_learning_rate if cfg.full else 3e-4))
    cfg = replace(cfg, micro_batch_size=cfg.batch_size if cfg.micro_batch_size is None else cfg.micro_batch_size)
    for options, ok, must in RULES:
        for option in options:
            value = getattr(cfg, option)
            if value is not None and not ok(value):
                raise ConfigError(f"--{option} {value}: must be {must}")
    if cfg.sde not in sde.KINDS[1:]:
        raise ConfigError(f"--sde {cfg.sde!r}: unknown SDE kind; choose one of {sde.KINDS[1:]}")
    if cfg.curriculum not in curriculum.CURRICULA:
        raise ConfigError(f"--curriculum {cfg.curriculum!r}: unknown curriculum; choose one of {tuple(curriculum.CURRICULA)}")
    if cfg.group_size < 2 or cfg.batch_size % cfg.group_size:
        raise ConfigError(f"--batch_size {cfg.batch_size} (videos per process) must be a multiple of --group_size "
                          f"{cfg.group_size} >= 2, so that every prompt's group stays on one process")
    cfg = replace(cfg, micro_batch_size=min(cfg.micro_batch_size, cfg.batch_size))  # larger means the whole batch
    if cfg.batch_size % cfg.micro_batch_size:
        raise ConfigError(f"--micro_batch_size {cfg.micro_batch_size} must divide --batch_size {cfg.batch_size}")
    if cfg.checkpointed_blocks is not None and not cfg.gradient_checkpointing:
        raise ConfigError(f"--checkpointed_blocks {cfg.checkpointed_blocks} needs --gradient_checkpointing True")
    if cfg.checkpointed_blocks is not None and cfg.checkpointed_blocks < 1:
        raise ConfigError(f"--checkpointed_blocks {cfg.checkpointed_blocks} must be >= 1 (the number of blocks "
                          f"checkpointed; for none, pass --gradient_checkpointing False)")
    if cfg.sde == "cps" and cfg.eta > 1:
        raise ConfigError(f"--sde cps --eta {cfg.eta}: cps needs eta in (0, 1] (its noise share is sin(eta pi / 2))")
    try:  # the clip size and, for real models, the weights folder (no weights are read)
        folder = backbones.check_request(cfg.backbone, cfg.pretrained, cfg.num_frames, cfg.height, cfg.width)
        shift = cfg.shift if cfg.shift is not None else backbones.default_shift(cfg.backbone, folder)
        blocks = backbones.num_blocks(folder)
    except (ValueError, RuntimeError, OSError, KeyError) as err:
        raise ConfigError(f"--backbone {cfg.backbone}: {err}") from None
    if cfg.checkpointed_blocks is not None and blocks is not None and cfg.checkpointed_blocks > blocks:
        raise ConfigError(f"--checkpointed_blocks {cfg.checkpointed_blocks}: this transformer has {blocks} blocks; "
                          f"choose 1..{blocks}")
    try:  # the schedule's own rules, on K numbers: no model involved
        stochastic = sde.step_variances(sde.sigma_schedule(cfg.num_steps, shift), cfg.sde, cfg.eta) > 0
    except ValueError as err:
        raise ConfigError(f"--sde {cfg.sde} --eta {cfg.eta} --num_steps {cfg.num_steps}: {err}") from None
    k_stochastic = int(stochastic.sum())  # cps's last step is deterministic
    if not 0 <= cfg.sde_window <= k_stochastic:
        raise ConfigError(f"--sde_window {cfg.sde_window}: must be in 0..{k_stochastic} (the stochastic steps of "
                          f"--sde {cfg.sde} --num_steps {cfg.num_steps}; 0 = all)")
    if cfg.sde_window_start not in ("random", "sliding") and not (
            cfg.sde_window_start.isdecimal() and int(cfg.sde_window_start) <= k_stochastic - cfg.sde_window):
        raise ConfigError(f"--sde_window_start {cfg.sde_window_start!r}: 'random', 'sliding' or an index in "
                          f"0..{k_stochastic - cfg.sde_window}")
    cfg = replace(cfg, sde_window_range=window_range(cfg, k_stochastic))
    if cfg.shared_prefix and not cfg.sde_window:
        raise ConfigError("--shared_prefix needs --sde_window W > 0 (without a window there is no ODE prefix to share)")
    if cfg.lora_targets not in LORA_TARGETS:
        raise ConfigError(f"--lora_targets {cfg.lora_targets!r}: choose one of {LORA_TARGETS}")
    if cfg.full and cfg.lora_targets != "attn":
        raise ConfigError(f"--lora_targets {cfg.lora_targets} chooses LoRA layers; --full trains every weight")
    if cfg.optimizer not in ("adamw", "muon"):
        raise ConfigError(f"--optimizer {cfg.optimizer!r}: choose adamw or muon")
    k_train = math.ceil(cfg.timestep_fraction * (cfg.sde_window or k_stochastic))
    if k_train < 1:
        raise ConfigError(f"--num_steps {cfg.num_steps}: {cfg.sde} has no stochastic step to train; use more steps")
    if k_train % cfg.updates_per_rollout:
        raise ConfigError(f"--updates_per_rollout {cfg.updates_per_rollout} must divide the {k_train} trained steps")
    if cfg.anchor_every % cfg.updates_per_rollout:
        raise ConfigError(f"--anchor_every {cfg.anchor_every} must be >= 0 (0 = fixed anchor) and a multiple of "
                          f"--updates_per_rollout {cfg.updates_per_rollout}, so the anchor moves between rollouts")
    parse_floats(cfg.curriculum_tau, 2, "--curriculum_tau", 0.0, 1.0)
    if sum(parse_floats(cfg.static_weights, 3, "--static_weights")) <= 0:
        raise ConfigError(f"--static_weights {cfg.static_weights!r}: at least one weight must be > 0")
    read_prompts(cfg.prompts, TRAIN_PROMPTS, "--prompts"), validation_prompt_list(cfg)
    if cfg.lr_scheduler not in LR_SCHEDULES:
        raise ConfigError(f"--lr_scheduler {cfg.lr_scheduler!r}: choose one of {LR_SCHEDULES}")
    if cfg.lr_warmup_steps and cfg.lr_scheduler == "constant":
        raise ConfigError(f"--lr_warmup_steps {cfg.lr_warmup_steps} does nothing with --lr_scheduler constant: "
                          f"use --lr_scheduler constant_with_warmup")
    if cfg.report_to not in TRACKERS:
        raise ConfigError(f"--report_to {cfg.report_to!r}: choose one of {TRACKERS}")
    for tracker in ("tensorboard", "wandb"):
        if cfg.report_to in (tracker, "all") and importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"--report_to {cfg.report_to} needs the {tracker} package: pip install {tracker}")
    if cfg.reward_prompt_template and not os.path.isfile(cfg.reward_prompt_template):
        raise ConfigError(f"--reward_prompt_template {cfg.reward_prompt_template!r} does not exist")
    if cfg.reward_device_map is not None and (cfg.reward != "vlm" or cfg.reward_device_map not in DEVICE_MAPS):
        raise ConfigError(f"--reward_device_map {cfg.reward_device_map!r}: one of {DEVICE_MAPS}, with --reward vlm only")
    if cfg.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(cfg.resume_from_checkpoint):
        raise ConfigError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint!r} is not a folder (or pass 'latest')")
    try:  # the reward's files, and for a judge its config and tokenizer (no weights are read)
        rewards.check_reward(cfg.reward, cfg.reward_model, cfg.reward_prompt_template)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(str(err)) from None
    return cfg


# ----------------------------------------------------------------------------------------------------


def main(cfg: Config) -> list[dict]:
    # ---- setup: every option checked first, then the output folder, then the models ----------------
    cfg = resolve(cfg)
    accelerator = Accelerator(  # [dist] reads `accelerate config` / launch flags (mixed precision, FSDP...)
        log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=cfg.output_dir,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer updates, whatever the process count
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout))])  # Deviations 11
    check_launch(cfg, accelerator)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    train_prompts, val_prompts = read_prompts(cfg.prompts, TRAIN_PROMPTS, "--prompts"), validation_prompt_list(cfg)
    identity = checkpoint.run_identity(cfg, world, accelerator.mixed_precision, train_prompts, val_prompts)
    resume = checkpoint.claim_output_dir(cfg.output_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir, identity)
    if accelerator.is_main_process:  # [dist] --overwrite_output_dir: the old run's own files go; then the record of
        checkpoint.record_run(cfg.output_dir, cfg.overwrite_output_dir)  # what this run writes, before it writes
    accelerator.wait_for_everyone()  # [dist] nobody writes before the old run is gone and the record is written
    set_seed(cfg.seed)  # model init of the tiny backbones and LoRA; rollouts use their own generators
    weight_dtype = weight_dtype_of(accelerator)
    family = backbones.module(cfg.backbone)  # hunyuan.py or wan.py: the same functions (backbones.py)
    backbone = family.load_backbone(cfg.backbone, cfg.pretrained, device=device, dtype=weight_dtype, seed=cfg.seed)
    latent = family.latent_shape(backbone, cfg.num_frames, cfg.height, cfg.width)  # (C, F', H', W')

    # Derived quantities, in one place: the schedule, which steps are stochastic, the equalizer, K_train.
    sigmas = sde.sigma_schedule(cfg.num_steps, cfg.shift if cfg.shift is not None else backbone.shift)  # (K+1,)
    stochastic = sde.step_variances(sigmas, cfg.sde, cfg.eta) > 0  # (K,) cps: the last step is deterministic
    k_train = math.ceil(cfg.timestep_fraction * (cfg.sde_window or int(stochastic.sum())))  # trained steps per sample

    # Every prompt is encoded once; then the (7B) text encoders leave the GPU and only the cache is read.
    text = family.PromptCache(backbone)
    text(train_prompts + val_prompts)
    negative = text.negative(1)
    text.offload_encoders()
    model, optimizers, schedulers, params = prepare_training(cfg, accelerator, family, backbone.transformer, k_train)
    anchor = trust_region.MovingAnchor(model, cfg.anchor_every)
    cur = build_curriculum(cfg)
    scorer = rewards.build_reward(cfg.reward, path=cfg.reward_model, prompt_template_file=cfg.reward_prompt_template,
                                  device=device, dtype=weight_dtype if device.type == "cuda" else torch.float32,
                                  batch_size=cfg.reward_batch_size, device_map=cfg.reward_device_map)
    timer = profiling.PhaseTimer(accelerator.unwrap_model(model), device, cfg.profile)
    accelerator.print(  # [dist] one line a user can check before the first (long) iteration
        f"setup: backbone={cfg.backbone} latent={latent} sde={cfg.sde} eta={cfg.eta} K={cfg.num_steps} "
        f"trained_steps={k_train} G={cfg.group_size} batch/process={cfg.batch_size} num_processes={world} "
        f"{'full' if cfg.full else 'LoRA'} trainable={sum(p.numel() for p in params) / 1e6:.2f}M reward={cfg.reward}")
    accelerator.init_trackers(TRACKER_RUN, config=logs.tracker_config(asdict(cfg)),  # [dist] no-op for none
                              init_kwargs={"wandb": {"dir": cfg.output_dir}})

    velocity_fn = lambda embeds: backbones.velocity_fn(family, model, embeds, negative, cfg.guidance)  # CFG inside
    validate = lambda tag, logged_until=0: validation(tag, cfg, accelerator, family, backbone, model, text, negative,
                                                      val_prompts, latent, sigmas, scorer, logged_until)  # scored

    # ---- resume: the newest complete checkpoint, or a fresh start -----------------------------------
    state = checkpoint.load(resume, accelerator, model, anchor, cur, identity, cfg.full,
                                                  cfg.output_dir) if resume else {}
    start_step = state.get("step", 0)
    # Deviations 6: the base policy is measured once, before any update, and kept in the checkpoints
    base_val = state["base_val"] if "base_val" in state else validate("base") if cfg.validation_steps else {}
    paths = {name: os.path.join(cfg.output_dir, f"{name}.jsonl") for name in ("metrics", "samples", "profile")}
    history = logs.start(accelerator, paths, start_step, os.path.join(cfg.output_dir, "config.json"),
                         {**asdict(cfg), "run_identity": identity})

    # ---- loop -------------------------------------------------------------------------------------
    N = cfg.batch_size  # videos on this process
    skipped_in_a_row = state.get("skipped_in_a_row", 0)
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
               disable=not accelerator.is_local_main_process, desc="GRPO")  # [dist]
    for step in bar:
        t_step = time.perf_counter()
        timer.reset()
        model.eval()  # no dropout anywhere, but be explicit: rollout and training forwards must agree
        with logs.StepWarnings(step + 1):
            # 1. sample: this process's prompts (whole groups), one noise stream per sample (Deviations 2)
            with timer("rollout"):
                prompts = local_prompts(train_prompts, cfg, step, rank, world)  # (N,) groups consecutive
                gens = backbones.rollout_generators(cfg.seed, step, rank * N, N, device)
                embeds = text(prompts)  # cached embeddings of this process's prompts, for rollout and training
                x_T = backbones.initial_noise(gens, latent, device)  # (N, C, F', H', W')
                if cfg.shared_prefix:  # a group shares its first member's x_T, so it shares the ODE prefix too
                    x_T = x_T[:: cfg.group_size].repeat_interleave(cfg.group_size, dim=0)
                window = sde_window(cfg, stochastic, step)  # (K,) bool: this iteration's stochastic steps
                traj = backbones.sample(family, model, embeds, negative, x_T, gens, sigmas, cfg.sde, cfg.eta,
                                        cfg.guidance, cfg.micro_batch_size, window, cfg.group_size * cfg.shared_prefix)

            # 2. reward: decode, score three components, mix them with the curriculum
            with timer("decode"):
                videos = family.decode(backbone, traj.latents[:, -1])  # (N, F, 3, H, W)
            with timer("reward"):
                scores, diagnostics = score(scorer, videos, prompts, cfg, device)  # (N, 3), {name: (N,)}
                # The curriculum's competence is global (the whole batch over all processes), while the mixing
                # below uses each group's own scores, which all live on this process.
                all_scores = accelerator.gather(scores)  # [dist] curriculum state must agree on every process
                cur.update(all_scores.nanmean(0))  # competence includes this batch, then the weights follow
                mixed, cstats = cur.reward(scores, cfg.group_size)  # (N,)

            # 3. advantage within each group (all on this process: Deviations 1)
            A = grpo.group_advantages(mixed, cfg.group_size, clip=cfg.adv_clip)  # (N,)
            all_mixed, all_A = accelerator.gather(mixed), accelerator.gather(A)  # [dist] global sample order

            # 4. update: the anchor's means first (at rollout time, one pass), then the optimizer steps
            S = (sde.equalizer_weights(sigmas, cfg.sde, cfg.eta, window) if cfg.equalizer else window.float()).to(device)  # (K,)
            steps = grpo.select_timesteps(N * world, window, cfg.timestep_fraction, torch.Generator().manual_seed(
                backbones.derive_seed(cfg.seed, step, "timesteps")))[rank * N : (rank + 1) * N].to(device)  # [dist] (N, K_train)
            micro = [slice(i, i + cfg.micro_batch_size) for i in range(0, N, cfg.micro_batch_size)]
            with timer("anchor"):
                mu_anchor = trust_region.anchor_means(anchor, lambda mb: velocity_fn(embeds[mb]), traj, steps, cfg.sde,
                                                      cfg.eta, micro, cfg.beta_pos)  # (N, K_train, ...) or None
            # lambda_KL follows the update count, so it is the same whatever --max_steps is and after a resume.
            lam = trust_region.kl_coefficient(anchor.num_updates, cfg.kl_start, cfg.kl_end, cfg.kl_ramp_steps)
            lr = schedulers[0].get_last_lr()[0]  # the rate of this step's first update
            with timer("train"):
                stats, grad_norms, skipped, skipped_in_a_row = update_policy(
                    cfg, accelerator, model, optimizers, schedulers, params, anchor, velocity_fn, embeds, traj, steps,
                    micro, A, S, mu_anchor, lam, bool((all_A != 0).any()), skipped_in_a_row, step, timer)

            # 5. log, validate, checkpoint
            with timer("log"):
                health = {"nonfinite_scores": int((~torch.isfinite(all_scores)).sum()), "skipped_updates": skipped,
                          "dropped_groups": int((~torch.isfinite(all_mixed)).view(-1, cfg.group_size).any(1).sum())}
                row = logs.training_row(accelerator, step + 1, lr, lam, anchor, all_scores, all_mixed, all_A, stats,
                                        grad_norms, cstats, diagnostics, timer.wall, health)
                if cfg.sde_window:  # where this iteration's window sat: its first denoising step t
                    row["sde/window_start"] = int(window.nonzero()[0])
                if cfg.validation_steps and ((step + 1) % cfg.validation_steps == 0 or step + 1 == cfg.max_steps):
                    val = validate(f"step{step + 1:06d}", history.logged_until)  # a replayed one: not re-sent
                    row.update({f"val/{k}": v for k, v in val.items()} | {f"val/base_{k}": v for k, v in base_val.items()})
                logs.write_step(accelerator, paths, history, row, {  # per-sample record, all processes
                    "step": step + 1, "prompt": gather_object(prompts), "scores": all_scores.tolist(),  # [dist]
                    "reward": all_mixed.tolist(), "advantage": all_A.tolist()}, cfg.max_steps)
                bar.set_postfix(reward=f"{row['reward/mixed']:.3f}", kl=f"{row['kl/pos']:.2e}")
            with timer("checkpoint"):
                if (cfg.checkpointing_steps and (step + 1) % cfg.checkpointing_steps == 0) or step + 1 == cfg.max_steps:
                    checkpoint.save(cfg.output_dir, step + 1, accelerator, model, anchor, cur,
                                    {"step": step + 1, "base_val": base_val, "skipped_in_a_row": skipped_in_a_row},
                                    identity, cfg.full, cfg.checkpoints_total_limit)
            if cfg.profile:
                profiling.print_profile(timer, time.perf_counter() - t_step, accelerator, model, step, cfg.output_dir)
    checkpoint.export_final(accelerator, model, cfg.output_dir, cfg.full)  # [dist] diffusers' format, at the root
    for tracker in accelerator.trackers:  # [dist] end_training() without destroying the process group (Deviations 16)
        tracker.finish()
    accelerator.print(f"done: {cfg.max_steps} steps in {cfg.output_dir}: the policy ("
                      f"{export.TRANSFORMER + '/' if cfg.full else export.LORA_FILE + ', ' + export.PEFT + '/'}), metrics.jsonl, metrics.png, "
                      f"samples/, {checkpoint.CHECKPOINTS}/. Videos: python sample.py --backbone {cfg.backbone} "
                      f"--{'transformer' if cfg.full else 'lora'} {cfg.output_dir} --prompt '...' --output_dir <folder>")
    return history


# ----------------------------------------------------------------------------------------------------
# The update phase, and what the setup builds


def update_policy(cfg, accelerator, model, optimizers, schedulers, params, anchor, velocity_fn, embeds, traj, steps,
                  micro, A, S, mu_anchor, lam, has_signal, skipped_in_a_row, step, timer):
    """Phase 4: `--updates_per_rollout` optimizer steps over the trained (sample, step) pairs of one rollout.

    An update is skipped (no optimizer step: Adam's momentum and weight decay would move the weights with no
    signal) when its gradient norm is not finite (Deviations 4) or when nothing in it carries signal: every
    advantage of the batch is 0 and no KL term is active (Deviations 12). The learning-rate schedule and the
    anchor count update slots, skipped ones too. Returns the per-micro-batch diagnostics, the gradient
    norms, the number of skipped updates and the running count of non-finite ones."""
    stats, grad_norms, skipped = [], [], 0
    model.train()
    for u, cols in enumerate(torch.arange(steps.shape[1]).chunk(cfg.updates_per_rollout)):  # Deviations 3
        for j, mb in [(j, mb) for j in cols.tolist() for mb in micro]:
            # accumulate: no gradient sync until the update's last micro-batch, where sync_gradients turns
            # true; the loss is divided by the number of micro-batches (DeepSpeed: by its engine).
            with accelerator.accumulate(model):  # [dist]
                # No extra autocast: `prepare` already wraps the forward for rollout and training alike, and any
                # difference between the two paths would break ratio = 1 (SPEC §8).
                loss, st = grpo.trained_step_loss(
                    velocity_fn(embeds[mb]), traj.rows(mb), steps[mb, j], A[mb], cfg.sde, cfg.eta, S,
                    None if mu_anchor is None else mu_anchor[mb, j], lam, cfg.beta_pos, cfg.beta_vel, cfg.clip_range)
                with timer.backward():
                    accelerator.backward(loss)  # [dist] the mean over the trained (i, t) pairs
            stats.append(st)
        assert accelerator.sync_gradients  # [dist] the accumulation boundary is this update's end
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)  # [dist]
        # DeepSpeed clips and steps inside its engine and returns a float or None here
        grad_norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, dtype=torch.float32)
        # The KL terms act when the anchor differs from the rollout policy (position) or when an earlier update of
        # this rollout moved the policy (step-wise); both are scaled by lambda_KL.
        kl_active = lam > 0 and ((cfg.beta_pos > 0 and mu_anchor is not None) or (cfg.beta_vel > 0 and u > 0))
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED  # [dist] it has stepped already
        if deepspeed or (torch.isfinite(grad_norm) and (has_signal or kl_active)):
            for optimizer in optimizers:
                optimizer.step()
            skipped_in_a_row = 0
        elif not torch.isfinite(grad_norm):  # Deviations 4
            warnings.warn(f"update {u + 1} of step {step + 1}: non-finite gradient norm; update skipped")
            skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
            if skipped_in_a_row >= 3:
                raise FloatingPointError("three updates in a row had non-finite gradients: lower --learning_rate, "
                                         "check the reward scores, use bf16 not fp16")
        else:  # Deviations 12
            warnings.warn(f"update {u + 1} of step {step + 1}: no sample carries signal (every advantage is 0 and "
                          f"no KL term acts); update skipped")
            skipped += 1
        for optimizer, scheduler in zip(optimizers, schedulers):
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        anchor.step()  # so refreshes fall between rollouts
        grad_norms.append(float(grad_norm))
    return stats, grad_norms, skipped, skipped_in_a_row


def prepare_training(cfg: Config, accelerator, family, model, k_train: int):
    """What is trained (LoRA or all weights), how (checkpointing, AdamW, the LR schedule) and `prepare`."""
    if cfg.full and next(model.parameters()).dtype != torch.float32:  # Deviations 14: fp32 master weights
        model.float()
    params = family.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) if not cfg.full else list(model.requires_grad_(True).parameters())
    family.freeze_unreachable(model)  # [dist] DDP and FSDP2 checkpoints need every trainable param to get a grad
    params = [p for p in params if p.requires_grad]
    if cfg.gradient_checkpointing:
        family.enable_gradient_checkpointing(model, cfg.checkpointed_blocks)
    optimizers = make_optimizers(params, name=cfg.optimizer, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                 muon_params=hidden_matrices(model, family.BLOCK_CLASS))
    schedulers = [get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                num_training_steps=cfg.max_steps * cfg.updates_per_rollout)  # in optimizer updates
                  for optimizer in optimizers]
    # One update = (trained steps / updates_per_rollout) x (batch / micro-batch) backward passes, accumulated.
    accelerator.gradient_accumulation_steps = k_train // cfg.updates_per_rollout * (cfg.batch_size // cfg.micro_batch_size)  # [dist]
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # [dist] no DataLoader tells DeepSpeed these
        accelerator.state.deepspeed_plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_clipping": cfg.max_grad_norm,
            "gradient_accumulation_steps": accelerator.gradient_accumulation_steps})
    model, *prepared = accelerator.prepare(model, *optimizers, *schedulers)  # [dist]
    optimizers, schedulers = prepared[: len(optimizers)], prepared[len(optimizers) :]
    if not cfg.full:  # [dist] accelerate saves optimizer, schedule and RNG; the adapter is saved by checkpoint.save
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
    return model, optimizers, schedulers, [p for p in model.parameters() if p.requires_grad]  # [dist] FSDP's tensors


def make_optimizers(params: list, *, name: str, lr: float, weight_decay: float, muon_params: Optional[list] = None) -> list:
    """AdamW, or Muon for `muon_params` (default: every 2-D parameter) and AdamW for the rest (Deviations 15)."""
    if name == "adamw":
        return [torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)]
    chosen = {id(p) for p in (muon_params if muon_params is not None else params) if p.dim() == 2}
    matrices, rest = [p for p in params if id(p) in chosen], [p for p in params if id(p) not in chosen]
    # match_rms_adamw scales each update to AdamW's RMS, so one --learning_rate means the same for both parts
    optimizers = [torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")]
    return optimizers + ([torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay)] if rest else [])


def hidden_matrices(model, block_class: str) -> list:
    """The trainable 2-D weights inside the transformer's repeated blocks (the family's BLOCK_CLASS): what Muon
    takes. Embeddings (text, time, condition type), the input patchifier and the output projection stay on AdamW,
    as Muon's authors prescribe for the first and last layers (Deviations 15)."""
    blocks = [m for m in model.modules() if type(m).__name__ == block_class]
    return [p for block in blocks for p in block.parameters() if p.requires_grad and p.dim() == 2]


def window_range(cfg: Config, k_stochastic: int) -> Optional[str]:
    """The resolved --sde_window_range 'A,B' (stochastic steps A..B-1) of a 'random' or 'sliding' window, checked;
    None where no range applies (no window, or a fixed start, which is its own range)."""
    movable = cfg.sde_window and cfg.sde_window_start in ("random", "sliding")
    if not movable:
        if cfg.sde_window_range is not None:
            raise ConfigError(f"--sde_window_range {cfg.sde_window_range!r} applies to --sde_window W > 0 with "
                              f"--sde_window_start random or sliding; a fixed start is its own range")
        return None
    if cfg.sde_window_range is None:  # the first half, where the step noise is large (issue: a late window
        # gives a group almost no reward spread: at K = 20 the step std falls from 0.66 to 0.05)
        return f"0,{max(cfg.sde_window, math.ceil(k_stochastic / 2))}"
    a, b = parse_floats(cfg.sde_window_range, 2, "--sde_window_range", 0, k_stochastic)
    if a != int(a) or b != int(b) or b - a < cfg.sde_window:
        raise ConfigError(f"--sde_window_range {cfg.sde_window_range!r}: two step indices A,B with 0 <= A, A + "
                          f"--sde_window {cfg.sde_window} <= B <= {k_stochastic} (the stochastic steps)")
    return f"{int(a)},{int(b)}"


def sde_window(cfg: Config, stochastic: torch.Tensor, step: int) -> torch.Tensor:
    """(K,) bool: the steps that are stochastic (and trained) in iteration `step` (sde.py Deviations 5). A
    'random' or 'sliding' window stays inside --sde_window_range (stochastic steps A..B-1)."""
    if not cfg.sde_window:
        return stochastic
    if cfg.sde_window_start in ("random", "sliding"):
        first, end = (int(x) for x in cfg.sde_window_range.split(","))
        last = end - cfg.sde_window  # the largest start inside the range
        if cfg.sde_window_start == "random":  # seeded by (seed, step): the same on every process and after a resume
            g = torch.Generator().manual_seed(backbones.derive_seed(cfg.seed, step, "window"))
            start = first + int(torch.randint(last - first + 1, (1,), generator=g))
        else:  # MixGRPO: from the noisiest steps of the range to its cleanest over the run
            start = first + min(last - first, step * (last - first + 1) // cfg.max_steps)
    else:
        start = int(cfg.sde_window_start)
    return sde.window_mask(stochastic, start, cfg.sde_window)


def score(scorer, videos, prompts, cfg: Config, device):
    """(n, 3) components in [0, 1] and the scorer's per-sample diagnostics {name: (n,)}, on `device`."""
    scores, diagnostics = rewards.score_batched(scorer, videos, prompts, cfg.fps, cfg.reward_batch_size)
    return scores.to(device), {k: v.to(device) for k, v in diagnostics.items()}


def validation(tag, cfg, accelerator, family, backbone, model, text, negative, prompts, latent, sigmas, scorer,
               logged_until: int = 0) -> dict:
    """ODE videos of the validation prompts (the same noise at every validation: prompt i's comes from
    (seed, VALIDATION, i), as in sample.py), split over the processes; saved, logged to the trackers, scored.
    Returns the mean scores over all of them: `total` (equal weights, comparable across curriculum stages)
    and each component."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    mine = list(range(rank, len(prompts), world))  # [dist] this process's share of the prompts
    # [dist] Every process samples the same number of videos, padding its share with prompt 0: under DDP and
    # FSDP a forward is a collective call (buffer broadcast, weight all-gather), so the counts must match.
    rows = mine + [0] * (math.ceil(len(prompts) / world) - len(mine))
    gens = [backbones.rollout_generators(cfg.seed, backbones.VALIDATION, i, 1, device)[0] for i in rows]
    with torch.no_grad():
        traj = backbones.sample(family, model, text([prompts[i] for i in rows]), negative,
                                backbones.initial_noise(gens, latent, device), gens, sigmas, "ode", 0.0, cfg.guidance,
                                cfg.micro_batch_size)
        videos = family.decode(backbone, traj.latents[:, -1])[: len(mine)]  # (n, F, 3, H, W), padding dropped
    s = score(scorer, videos, [prompts[i] for i in mine], cfg, device)[0].tolist() if mine else []
    logs.save_validation(accelerator, videos if mine else None,
                         [os.path.join(cfg.output_dir, "samples", f"{tag}_{i}") for i in mine], cfg.fps,
                         logged_until=logged_until)  # the trackers have the frames of a replayed validation
    s = torch.tensor(gather_object(s))  # [dist] (n_val, 3): everyone's scores, in rank order
    return {"total": s.mean().item(), **{c: s[:, j].mean().item() for j, c in enumerate(rewards.COMPONENTS)}}


def build_curriculum(cfg: Config):
    if cfg.curriculum == "static":
        return curriculum.build_curriculum("static", weights=parse_floats(cfg.static_weights, 3, "--static_weights"))
    return curriculum.build_curriculum(cfg.curriculum, tau=tuple(parse_floats(cfg.curriculum_tau, 2, "--curriculum_tau")),
                                       k=cfg.curriculum_k, beta=cfg.curriculum_beta)


def validation_prompt_list(cfg: Config) -> list[str]:
    """--validation_prompts' file (or the built-in list when neither option is given) + each --validation_prompt."""
    flags = cfg.validation_prompt or []
    if cfg.validation_prompts is None:
        return flags or VALIDATION_PROMPTS
    return read_prompts(cfg.validation_prompts, [], "--validation_prompts") + flags


def check_launch(cfg: Config, accelerator) -> None:
    """The checks that need the launch configuration (accelerate's, not ours); still before any model."""
    if accelerator.mixed_precision == "fp16":
        raise ConfigError("--mixed_precision fp16 gives NaN log-probs in the reference setups (SPEC §8); use bf16")
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) and cfg.optimizer == "muon":
        raise ConfigError("--optimizer muon is not supported under FSDP or DeepSpeed (Deviations 15): use adamw there, "
                          "or DDP (configs/multi_gpu_lora.yaml)")
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) and not cfg.full:  # [dist]
        raise ConfigError("LoRA under FSDP or DeepSpeed is not supported (the adapter would be saved with the whole "
                          "model); LoRA fits one GPU: use configs/multi_gpu_lora.yaml, or pass --full")
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)  # [dist]
    try:  # a run that cannot fit this device, refused now rather than as an out-of-memory error an hour in
        backbones.check_memory(
            cfg.backbone, cfg.pretrained, device=accelerator.device, num_frames=cfg.num_frames, height=cfg.height,
            width=cfg.width, num_steps=cfg.num_steps, batch_size=cfg.batch_size,
            micro_batch_size=cfg.micro_batch_size, lora_rank=cfg.lora_rank, lora_targets=cfg.lora_targets,
            full=cfg.full, guidance=cfg.guidance, dtype=weight_dtype_of(accelerator),
            gradient_checkpointing=cfg.gradient_checkpointing, checkpointed_blocks=cfg.checkpointed_blocks,
            shards=accelerator.num_processes if sharded else 1)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def weight_dtype_of(accelerator) -> torch.dtype:
    """The frozen weights' and the activations' dtype: bf16 under --mixed_precision bf16, else float32 (the
    trained parameters stay float32 either way)."""
    return {"bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def local_prompts(train_prompts: list[str], cfg: Config, step: int, rank: int, world: int) -> list[str]:
    """This process's prompts, each repeated G times (a group); the draw is global, so it does not depend on
    the process count, and seeded by (seed, step), so a resumed run draws the same."""
    g = torch.Generator().manual_seed(backbones.derive_seed(cfg.seed, step, "prompts"))
    order = torch.randint(len(train_prompts), (cfg.batch_size // cfg.group_size * world,), generator=g)
    local = order.view(world, -1)[rank].tolist()  # [dist] this process's share of the prompts
    return [train_prompts[i] for i in local for _ in range(cfg.group_size)]


def set_cpu_threads(prog: str) -> None:
    """Deviations 17: on a machine without CUDA and without OMP_NUM_THREADS, each process takes the cores that are
    neither another local process's share nor busy with other work (the 1-minute load average), at least one."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    idle = cores - round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
    threads = max(1, min(cores // local, idle))
    torch.set_num_threads(threads)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"{prog}: CPU run, {threads} thread(s) per process ({cores} cores, {local} local process(es), load "
              f"{os.getloadavg()[0]:.1f}); set OMP_NUM_THREADS to choose")


# What gloo and NCCL say when a peer process is gone: its socket closed (killed, crashed) or it never answered.
PEER_LOST = re.compile(r"connection (reset|closed) by peer|broken pipe|connection refused|socket closed", re.IGNORECASE)
TIMED_OUT = re.compile(r"time[d ]?\s?out", re.IGNORECASE)


def peer_failure(err: BaseException, timeout: Optional[int]) -> Optional[str]:
    """Deviations 11: the one line that says what happened to a peer process and what to do, or None when `err`
    is not about a peer (or this is not a multi-process run)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    # With two processes the peer is the other one; beyond that the backends' errors name an address, not a rank.
    peer = f"process {1 - rank}" if world == 2 else "another process"
    resume = "resume with --resume_from_checkpoint latest once all processes are healthy"
    if TIMED_OUT.search(str(err)):
        return (f"process {rank}: {peer} did not reach a collective call within --dist_timeout {timeout} s (hung, "
                f"stopped or dead); this process stops too. Fix the cause, then {resume}")
    if PEER_LOST.search(str(err)):
        return (f"process {rank}: lost the connection to {peer} (it was killed or crashed: its own output, or the "
                f"launcher's summary, says why); this process stops too. Then {resume}")
    return None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows a default once: not where the help text already says it, nor for None (the backbone's
    preset or a derived value, which the help text describes)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS or "default" in text.lower()
                or action.option_strings[0].startswith("--no_")):
            return text
        return super()._get_help_string(action)


class OptionParser(HfArgumentParser):
    """HfArgumentParser with one-line usage errors (argparse prints the whole usage, 40 lines here) and
    negative numbers in scientific notation read as values (`--learning_rate -1e-4` then fails the option's
    rule, naming it, instead of being taken for an option)."""

    def __init__(self, dataclass_types, prog: Optional[str] = None):
        super().__init__(dataclass_types, prog=prog, allow_abbrev=False, formatter_class=HelpFormatter)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
        for action in self._actions:  # HfArgumentParser gives --no_X the help text of --X
            if action.option_strings and action.option_strings[0].startswith("--no_"):
                action.help = f"turn --{action.option_strings[0][5:]} off"

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: Optional[list[str]] = None) -> Config:
    """Command-line options (every field of Config; `--help` lists them with the papers' values). No
    abbreviations (`--max_step` is not `--max_steps`); an unknown option is a usage error (exit 2)."""
    parser = OptionParser(Config, prog="train.py")
    config, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (see --help)")
    if config.validation_prompt:  # repeated --validation_prompt, each taking one or more prompts
        config.validation_prompt = [p for group in config.validation_prompt for p in group]
    return config


def cli(argv: Optional[list[str]] = None) -> None:
    """`python train.py ...`: a bad option or output folder is a usage error (exit 2, one line, no traceback)."""
    run_command("train.py", main, parse_args(argv))


def run_command(prog: str, main_fn, args) -> None:
    """The command-line end of train.py, sample.py and evaluate.py: a ConfigError or CheckpointError is a usage
    error (exit 2, one line); a multi-process run then exits without destroying its process group (Deviations
    16: the gloo destructor can deadlock on the GIL; everything is written, flushed and fsynced by now)."""
    set_cpu_threads(prog)
    logs.one_line_warnings()  # a warning outside an iteration too: one line, not two
    try:
        main_fn(args)
    except (ConfigError, checkpoint.CheckpointError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except checkpoint.SaveError as err:  # a full or failing disk: say which path, not a traceback (exit 1)
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1) if torch.distributed.is_initialized() else sys.exit(1)
    except RuntimeError as err:  # torch's DistBackendError is a RuntimeError
        message = peer_failure(err, getattr(args, "dist_timeout", None))
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)  # one line, not the backend's pages of traceback
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)  # the process group is broken: do not wait in its destructor (Deviations 16)
    if torch.distributed.is_initialized():
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    cli()
