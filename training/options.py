"""The options of a GRPO run, checked before anything loads, and the command-line end shared by train.py,
sample.py and evaluate.py.

    Config                 every option of train.py, with its help text and the papers' values (`--help`)
    resolve(cfg)           the backbone's presets filled in, every option checked (ConfigError naming it)
    check_launch           the checks that need accelerate's launch configuration (mixed precision, FSDP,
                           the memory floor of the device)
    parse_args / run_command   the command line: one-line usage errors (exit 2), one-line peer and disk
                           failures (exit 1), the CPU thread count, a clean exit of a multi-process run

Deviations / choices
--------------------
1. A bad option fails in `resolve` before any model, tokenizer or weight is touched, naming the option and
   what to do; on the command line that is a usage error (exit 2, one line, not argparse's usage). Options
   take no abbreviations; negative numbers in scientific notation are values (`--learning_rate -1e-4` fails
   its rule, naming it). `check_launch` refuses a run whose memory floor (models/backbones.estimate_memory)
   exceeds all the memory of the device, with the estimate and what to lower.
2. Every collective call waits at most `--dist_timeout` seconds (default 600) for the other processes, so a
   hung or dead peer stops the run in bounded time instead of torch's 30 minutes. The longest a process may
   legitimately wait is one phase of imbalance between processes or the main process's checkpoint save and
   validation videos; raise it if those take longer on your cluster. A timed-out collective, or a peer whose
   connection closed (killed, crashed), ends the process with one line that names the peer where it can (with
   two processes, the other one) and says how to resume, exit status 1, not the backend's pages of traceback.
3. A multi-process run ends with `os._exit(0)` after its last collective call instead of destroying the
   process group (accelerate's `end_training`): with gloo, torch 2.13's ProcessGroupGloo destructor joins its
   worker threads while holding the GIL, and a worker that still owns the last all_gather's Python tensors
   needs the GIL to free them, a deadlock at exit seen in about 1 of 6 two-process CPU runs (native stacks
   taken with py-spy). Checkpoints, exports and logs are complete and flushed before; trackers are finished.
4. CPU threads (`set_cpu_threads`): without CUDA and without OMP_NUM_THREADS, a process takes
   min(cores / local processes, cores - the 1-minute load average) threads, at least one, and says so.
   torch's default, one thread per core, is 5x slower per forward of the tiny transformer when one other
   process is busy on a 2-core machine (54 vs 11 ms), while a second thread gains 1.2x (tiny) to 1.9x
   (`small`) on idle cores. OMP_NUM_THREADS, when set, decides.
5. `--sde_window_range` defaults to the first half of the stochastic steps (at least W), as FlowGRPO-Fast's
   configs set `sde_window_range`: the step noise falls along the schedule (the default sage step's std is
   0.56 at the first of K = 20 steps and 0.08 at the last), so a late window gives a group little reward spread.

Test: `python -m pytest tests/test_options.py -q`.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from accelerate.utils import DistributedType
from transformers import HfArgumentParser

import curriculum
import rewards
import sde
from models import backbones
from reward_models.remote import RewardServerError
from training import checkpoint, logs, parallel


@dataclass
class Config:
    # model
    backbone: str = field(default="hunyuan15", metadata={
        "help": f"one of {backbones.NAMES}; 'tiny', 'small' and 'tiny-wan' run on CPU (presets: models/backbones.py)"})
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
                "faster and needs more memory, docs/performance.md)"})
    ulysses_degree: int = field(default=1, metadata={
        "help": "context parallelism: U processes share one video, attention by Ulysses all-to-all (diffusers' "
                "ContextParallelConfig; training/parallel.py); U x R must divide the number of processes"})
    ring_degree: int = field(default=1, metadata={
        "help": "context parallelism: R processes share one video, attention by ring attention (with U: U x R)"})
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
    ode_solver: str = field(default="euler", metadata={
        "help": "with --sde_window: the solver of the deterministic steps outside the window (euler, or unipc: "
                "Wan2.1's own sampler; MixGRPO-Flash), also for validation"})
    ode_steps: Optional[int] = field(default=None, metadata={
        "help": "with --sde_window: model calls for all the deterministic steps outside the window (default: one "
                "per step); the window's steps keep the training schedule; validation takes W + M calls"})
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
                "'tiny' = a random tiny model; with a /v1 --reward_url, the served model's name"})
    reward_prompt_template: Optional[str] = field(default=None, metadata={"help": "VideoAlign rubric text file"})
    reward_batch_size: int = field(default=2, metadata={"help": "videos per reward-model call"})
    reward_url: Optional[str] = field(default=None, metadata={
        "help": "score through reward_server.py at this URL (http://host:port), or ask the vlm judge of an "
                "OpenAI-compatible server (http://host:port/v1: vLLM, SGLang; docs/judge_server.md)"})
    reward_timeout: float = field(default=300.0, metadata={
        "help": "seconds a reward request retries an unreachable server before the run stops (then resume)"})
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
                "code's default); training/optimizers.py"})
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
    profile: bool = field(default=False, metadata={"help": "print a per-phase time / model-call table (docs/performance.md)"})
    dist_timeout: int = field(default=600, metadata={
        "help": "seconds a process waits for its peers at a collective call before the run stops with an error "
                "(training/options.py Deviations 2)"})


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
      "ulysses_degree", "ring_degree",
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
    try:  # context parallelism: the family has a plan, U divides the heads, U x R the video tokens
        backbones.check_context_parallel(cfg.backbone, folder, num_frames=cfg.num_frames, height=cfg.height,
                                         width=cfg.width, ulysses_degree=cfg.ulysses_degree,
                                         ring_degree=cfg.ring_degree)
    except ValueError as err:
        raise ConfigError(str(err)) from None
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
    check_solver(cfg, stochastic)
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
    if not 0 < cfg.reward_timeout <= 7 * 24 * 3600:
        raise ConfigError(f"--reward_timeout {cfg.reward_timeout}: must be a number of seconds in (0, 604800]")
    if cfg.reward_url is not None:  # the server holds the scorer: it must be up and serve this reward (and rubric)
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", cfg.reward_url):
            raise ConfigError(f"--reward_url {cfg.reward_url!r}: an http://host:port address of reward_server.py, or "
                              f"http://host:port/v1 of an OpenAI-compatible judge server (vLLM, SGLang)")
        try:  # seconds, not --reward_timeout: a server that is not there at start-up is a usage error
            rewards.check_reward_url(cfg.reward, cfg.reward_url, cfg.reward_model, cfg.reward_prompt_template,
                                     timeout=min(cfg.reward_timeout, 5.0))
        except (ValueError, RuntimeError) as err:  # reward_models.remote.RewardServerError is a RuntimeError
            raise ConfigError(str(err)) from None
        return cfg
    try:  # the reward's files, and for a judge its config and tokenizer (no weights are read)
        rewards.check_reward(cfg.reward, cfg.reward_model, cfg.reward_prompt_template)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(str(err)) from None
    return cfg


def check_solver(cfg: Config, stochastic) -> None:
    """--ode_solver / --ode_steps (sde.py Deviations 6): a solver needs a window (without one every step is
    stochastic, sampled and trained: nothing is left to integrate), and M calls must fit every place the window can
    take (at least one call per run of deterministic steps, at most one per step)."""
    if cfg.ode_solver not in sde.ODE_SOLVERS:
        raise ConfigError(f"--ode_solver {cfg.ode_solver!r}: choose one of {sde.ODE_SOLVERS}")
    if cfg.ode_solver == "euler" and cfg.ode_steps is None:
        return  # one Euler call per step: the plain rollout
    if not cfg.sde_window:
        raise ConfigError(f"--ode_solver {cfg.ode_solver} / --ode_steps integrate the deterministic steps outside "
                          f"--sde_window; without a window every step is stochastic and trained: set --sde_window W")
    if cfg.ode_steps is None:
        return
    if cfg.ode_steps < 1:
        raise ConfigError(f"--ode_steps {cfg.ode_steps}: a number of model calls >= 1")
    if cfg.sde_window_start in ("random", "sliding"):
        first, end = (int(x) for x in cfg.sde_window_range.split(","))
        starts = range(first, end - cfg.sde_window + 1)
    else:
        starts = [int(cfg.sde_window_start)]
    for start in starts:  # every place the window may take (the rollout splits M the same way)
        runs = sde.ode_runs((~sde.window_mask(stochastic, start, cfg.sde_window)).tolist())
        try:
            sde.ode_calls([b - a for a, b in runs], cfg.ode_steps)
        except ValueError as err:
            raise ConfigError(f"--ode_steps {cfg.ode_steps} with the window at stochastic step {start}: {err}") from None


def validation_calls(run: dict) -> Optional[int]:
    """The model calls of a validation video's K-step ODE with --ode_steps M: W + M, what a rollout costs (None:
    one per step). `run`: a run's options (vars(cfg), or the ones a run recorded: sample.py)."""
    return None if run.get("ode_steps") is None else min(run["num_steps"], run["sde_window"] + run["ode_steps"])


def window_range(cfg: Config, k_stochastic: int) -> Optional[str]:
    """The resolved --sde_window_range 'A,B' (stochastic steps A..B-1) of a 'random' or 'sliding' window, checked;
    None where no range applies (no window, or a fixed start, which is its own range)."""
    movable = cfg.sde_window and cfg.sde_window_start in ("random", "sliding")
    if not movable:
        if cfg.sde_window_range is not None:
            raise ConfigError(f"--sde_window_range {cfg.sde_window_range!r} applies to --sde_window W > 0 with "
                              f"--sde_window_start random or sliding; a fixed start is its own range")
        return None
    if cfg.sde_window_range is None:  # Deviations 5: the first half, where the step noise is large
        return f"0,{max(cfg.sde_window, math.ceil(k_stochastic / 2))}"
    a, b = parse_floats(cfg.sde_window_range, 2, "--sde_window_range", 0, k_stochastic)
    if a != int(a) or b != int(b) or b - a < cfg.sde_window:
        raise ConfigError(f"--sde_window_range {cfg.sde_window_range!r}: two step indices A,B with 0 <= A, A + "
                          f"--sde_window {cfg.sde_window} <= B <= {k_stochastic} (the stochastic steps)")
    return f"{int(a)},{int(b)}"


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
        raise ConfigError("--optimizer muon is not supported under FSDP or DeepSpeed (training/optimizers.py): use adamw there, "
                          "or DDP (configs/multi_gpu_lora.yaml)")
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) and not cfg.full:  # [dist]
        raise ConfigError("LoRA under FSDP or DeepSpeed is not supported (the adapter would be saved with the whole "
                          "model); LoRA fits one GPU: use configs/multi_gpu_lora.yaml, or pass --full")
    cp_size = cfg.ulysses_degree * cfg.ring_degree  # training/parallel.py
    problem = parallel.launch_problem(accelerator.num_processes, cfg.ulysses_degree, cfg.ring_degree,
                                      accelerator.device.type, backbones.module(cfg.backbone).CP_PLAN)
    if problem:
        raise ConfigError(problem)
    fsdp_plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if cp_size > 1 and accelerator.distributed_type == DistributedType.FSDP and getattr(fsdp_plugin, "fsdp_version",
                                                                                          1) != 2:
        raise ConfigError("--ulysses_degree / --ring_degree with FSDP needs FSDP2 (fsdp_version: 2, as "
                          "configs/fsdp2_full.yaml; training/parallel.py Deviations 4): FSDP1 is not tested with a split")
    if cp_size > 1 and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("--ulysses_degree / --ring_degree with DeepSpeed is not supported (training/parallel.py "
                          "Deviations 4): launch full fine-tuning with FSDP2 (configs/fsdp2_full.yaml), LoRA with DDP "
                          "(configs/multi_gpu_lora.yaml)")
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)  # [dist]
    try:  # a run that cannot fit this device, refused now rather than as an out-of-memory error an hour in
        backbones.check_memory(
            cfg.backbone, cfg.pretrained, device=accelerator.device, num_frames=cfg.num_frames, height=cfg.height,
            width=cfg.width, num_steps=cfg.num_steps, batch_size=cfg.batch_size,
            micro_batch_size=cfg.micro_batch_size, lora_rank=cfg.lora_rank, lora_targets=cfg.lora_targets,
            full=cfg.full, guidance=cfg.guidance, dtype=weight_dtype_of(accelerator),
            gradient_checkpointing=cfg.gradient_checkpointing, checkpointed_blocks=cfg.checkpointed_blocks,
            shards=accelerator.num_processes if sharded else 1, context_parallel=cp_size, ring_degree=cfg.ring_degree)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def weight_dtype_of(accelerator) -> torch.dtype:
    """The frozen weights' and the activations' dtype: bf16 under --mixed_precision bf16, else float32 (the
    trained parameters stay float32 either way)."""
    return {"bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def set_cpu_threads(prog: str) -> None:
    """Deviations 4: on a machine without CUDA and without OMP_NUM_THREADS, each process takes the cores that are
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
    """Deviations 2: the one line that says what happened to a peer process and what to do, or None when `err`
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
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")   # error() adds "(see --help)"
    if config.validation_prompt:  # repeated --validation_prompt, each taking one or more prompts
        config.validation_prompt = [p for group in config.validation_prompt for p in group]
    return config


def run_command(prog: str, main_fn, args) -> None:
    """The command-line end of train.py, sample.py and evaluate.py: a ConfigError or CheckpointError is a usage
    error (exit 2, one line); a multi-process run then exits without destroying its process group (Deviations
    3: the gloo destructor can deadlock on the GIL; everything is written, flushed and fsynced by now)."""
    set_cpu_threads(prog)
    logs.one_line_warnings()  # a warning outside an iteration too: one line, not two
    try:
        main_fn(args)
    except (ConfigError, checkpoint.CheckpointError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except RewardServerError as err:  # the reward server went away mid-run: name it, say how to resume (exit 1)
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1) if torch.distributed.is_initialized() else sys.exit(1)
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
        os._exit(1)  # the process group is broken: do not wait in its destructor (Deviations 3)
    if torch.distributed.is_initialized():
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)



def curriculum_options(cfg: Config) -> dict:
    """The keyword arguments of curriculum.build_curriculum(cfg.curriculum, ...) from the option strings."""
    if cfg.curriculum == "static":
        return {"weights": parse_floats(cfg.static_weights, 3, "--static_weights")}
    return {"tau": tuple(parse_floats(cfg.curriculum_tau, 2, "--curriculum_tau")), "k": cfg.curriculum_k,
            "beta": cfg.curriculum_beta}
