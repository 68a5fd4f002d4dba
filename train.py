"""GRPO post-training of HunyuanVideo-1.5 text-to-video with the SAGE SDE, the equalizer, the dual trust
region and the self-paced reward curriculum, on any number of GPUs through Accelerate.

    accelerate launch train.py --backbone hunyuan15 --pretrained <dir> \
        --reward videoalign --reward_model <VideoReward dir> --reward_prompt_template <rubric.txt>
    accelerate launch --config_file configs/fsdp2_full.yaml train.py --backbone hunyuan15 --full ...
    python train.py --backbone tiny --max_steps 20            # CPU, seconds: the same code on tiny models
    python train.py --backbone small --max_steps 4 --profile  # CPU profile (README "Performance")

Each iteration runs five phases (SPEC §4), each a few calls into the concept modules:
    1. sample     B/P prompts x G videos per process, K SDE steps with log-probs        sde.rollout
    2. reward     decode, score three components, mix them with the curriculum        rewards, curriculum
    3. advantage  normalise within each prompt's group of G (groups never straddle processes)     grpo
    4. update     every stochastic step of every sample, equalized clipped loss + dual KL  grpo, trust_region
    5. log        metrics.jsonl, metrics.png, validation videos, checkpoints
Lines that involve Accelerate or other processes are tagged `# [dist]`; each has an obvious single-process
reading (gather = the tensor itself, accumulate/backward = loss.backward(), this process = all prompts).
The model plumbing (loading, text encoding, CFG, decoding) is in hunyuan.py; profiling.py times the phases.
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
5. LoRA checkpoints hold the adapter only (safetensors), not the 8.3 B frozen weights; the moving
   anchor is saved once, or per process under FSDP, where each process holds its own shard of it.
   Checkpoints are written by the main process and read by all: several nodes need a shared filesystem.
   A resume must use the options the checkpoint was saved with (METHOD_FIELDS); it then replays exactly.
6. Validation samples use the ODE (eta = 0) on fixed prompts and seeds; the base policy's scores on the
   same prompts and seeds are measured once before training and stored with the checkpoints.
7. The reward of a validation video uses the raw components with equal weights (`val/total`), so it is
   comparable across curriculum stages.
8. Parameters no gradient can reach (the last block's text-stream outputs) are frozen before `prepare`
   (hunyuan.freeze_unreachable): DDP would reject them and FSDP2 checkpoints would lack their optimizer state.
9. An update accumulates its micro-batches with `accelerator.accumulate`, so DDP syncs once per update and
   DeepSpeed steps once per update; DeepSpeed's micro-batch, accumulation steps and clipping are set from
   the options before `prepare` (there is no DataLoader to infer them from).
10. LoRA runs with DDP only; FSDP and DeepSpeed are for `--full` (they would checkpoint the whole model).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import HfArgumentParser

import curriculum
import grpo
import hunyuan
import profiling
import rewards
import sde
import trust_region


@dataclass
class Config:
    # model
    backbone: str = field(default="hunyuan15", metadata={"help": f"one of {hunyuan.BACKBONES}; 'tiny' and 'small' run on CPU"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "Diffusers folder or cached hub id (default: 480p t2v)"})
    full: bool = field(default=False, metadata={"help": "full fine-tuning instead of LoRA ([SAGE] trains all weights)"})
    lora_rank: int = field(default=32, metadata={"help": "[FlowGRPO] r = 32"})
    lora_alpha: int = field(default=64, metadata={"help": "[FlowGRPO] alpha = 64"})
    gradient_checkpointing: Optional[bool] = field(default=None, metadata={"help": "default: on for hunyuan15"})
    checkpointed_blocks: Optional[int] = field(default=None, metadata={
        "help": "with gradient checkpointing: recompute only the first N DiT blocks (default all 54; fewer is "
                "faster and needs more memory, configs/MEMORY.md)"})
    # data
    prompts: Optional[str] = field(default=None, metadata={"help": "text file, one prompt per line (default: built-in list)"})
    validation_prompts: Optional[str] = field(default=None, metadata={"help": "text file (default: built-in list)"})
    num_frames: Optional[int] = field(default=None, metadata={"help": "4k+1; [SAGE] 81 (tiny: 5)"})
    height: Optional[int] = field(default=None, metadata={"help": "[SAGE] 352 (tiny: 32)"})
    width: Optional[int] = field(default=None, metadata={"help": "[SAGE] 624 (tiny: 32)"})
    fps: Optional[int] = field(default=None, metadata={"help": "frame rate of saved and scored videos (24; tiny 8)"})
    # sampling (SPEC §2)
    sde: str = field(default="sage", metadata={"help": f"one of {sde.KINDS[1:]}"})
    eta: float = field(default=0.5, metadata={"help": "[SAGE] 0.5; [FlowGRPO] 0.7; [CPS] 0.8; [Dance] 0.25"})
    num_steps: Optional[int] = field(default=None, metadata={"help": "K; [SAGE] 20 (tiny: 4)"})
    shift: Optional[float] = field(default=None, metadata={"help": "SD3 shift; default from the scheduler config (5 at 480p)"})
    guidance: float = field(default=6.0, metadata={"help": "CFG scale of the policy velocity ([SAGE] 6)"})
    # objective (SPEC §3-5)
    group_size: int = field(default=4, metadata={"help": "G; [SAGE] 4"})
    batch_size: Optional[int] = field(default=None, metadata={"help": "videos per process per step, a multiple of G (default G)"})
    micro_batch_size: Optional[int] = field(default=None, metadata={"help": "videos per forward (default 1; tiny: batch)"})
    equalizer: bool = field(default=True, metadata={"help": "[SAGE] gradient norm equalizer"})
    timestep_fraction: float = field(default=1.0, metadata={"help": "fraction of steps trained; [SAGE] 1.0, [Dance] 0.6"})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip on the mean-reduced ratio ([FlowGRPO] 1e-4)"})
    adv_clip: float = field(default=5.0, metadata={"help": "advantage clip ([FlowGRPO] 5)"})
    anchor_every: int = field(default=10, metadata={"help": "moving-anchor period in optimizer updates; 0 = fixed reference"})
    beta_pos: float = field(default=1.0, metadata={"help": "position KL weight ([SAGE] 1.0)"})
    beta_vel: float = field(default=0.1, metadata={"help": "step-wise KL weight ([SAGE] 0.1)"})
    kl_start: float = field(default=1e-7, metadata={"help": "lambda_KL stage 1 ([SAGE])"})
    kl_end: float = field(default=1e-5, metadata={"help": "lambda_KL stage 2 ([SAGE])"})
    kl_ramp_steps: int = field(default=100, metadata={"help": "optimizer updates over which lambda_KL ramps"})
    updates_per_rollout: int = field(default=1, metadata={"help": "optimizer steps fed by one rollout batch (Deviations 3)"})
    # reward (SPEC §6)
    reward: Optional[str] = field(default=None, metadata={"help": "'videoalign' (hunyuan15 default) or 'proxy' (tiny default)"})
    reward_model: Optional[str] = field(default=None, metadata={"help": "VideoReward folder or hub id; 'tiny' = random tiny model"})
    reward_prompt_template: Optional[str] = field(default=None, metadata={"help": "VideoAlign rubric text file"})
    reward_batch_size: int = field(default=2, metadata={"help": "videos per reward-model call"})
    curriculum: str = field(default="self_paced", metadata={"help": f"one of {tuple(curriculum.CURRICULA)}"})
    curriculum_tau: str = field(default="0.70,0.68", metadata={"help": "[SPG] thresholds for HunyuanVideo"})
    curriculum_k: float = field(default=20.0, metadata={"help": "gate steepness (choice, SPEC §6)"})
    curriculum_beta: float = field(default=0.3, metadata={"help": "[SPG] Hoyer weight beta"})
    static_weights: str = field(default="0.5,0.5,1.0", metadata={"help": "static curriculum: [SAGE] Setting B"})
    # optimisation
    learning_rate: Optional[float] = field(default=None, metadata={"help": "default 3e-4 LoRA ([FlowGRPO]), 1e-5 full ([SAGE])"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay ([FlowGRPO])"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "[SAGE] 1.0"})
    max_steps: int = field(default=300, metadata={"help": "iterations (rollout batches); each makes --updates_per_rollout optimizer steps"})
    seed: int = field(default=0, metadata={"help": "everything random derives from it"})
    # outputs
    output_dir: str = field(default="outputs/grpo", metadata={"help": "checkpoints, metrics, samples"})
    checkpointing_steps: int = field(default=50, metadata={"help": "save every N steps (0 = only at the end)"})
    checkpoints_total_limit: int = field(default=3, metadata={"help": "keep this many checkpoints"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "a checkpoint folder or 'latest'"})
    validation_steps: int = field(default=25, metadata={"help": "ODE samples of the validation prompts every N steps"})
    profile: bool = field(default=False, metadata={"help": "print a per-phase time / model-call table (README)"})


PRESETS = {  # backbone defaults for the fields left at None
    "hunyuan15": dict(num_frames=81, height=352, width=624, fps=24, num_steps=20, micro_batch_size=1,
                      reward="videoalign", gradient_checkpointing=True),
    "small": dict(num_frames=9, height=64, width=64, fps=8, num_steps=8, micro_batch_size=None, reward="proxy",
                  gradient_checkpointing=False),  # latent 16 x 5 x 16 x 16: the CPU profile of the README
    "tiny": dict(num_frames=5, height=32, width=32, fps=8, num_steps=4, micro_batch_size=None, reward="proxy",
                 gradient_checkpointing=False),
}
TRAIN_PROMPTS = ["a red ball bouncing on green grass", "a blue car driving through a city at night",
                 "a yellow kite flying over the beach", "a white swan gliding on a dark lake",
                 "a purple balloon rising into the sky", "an orange cat walking along a fence",
                 "a green parrot flapping its wings", "a black horse galloping across a field"]
VALIDATION_PROMPTS = ["a red fox running through snow", "a blue whale swimming under the ocean surface"]


def read_prompts(path: Optional[str], default: list[str]) -> list[str]:
    if path is None:
        return default
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist (one prompt per line)")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompts (one prompt per line)")
    return prompts


def parse_floats(text: str, n: int, name: str) -> list[float]:
    """'0.5,0.5,1.0' -> [0.5, 0.5, 1.0], or a ValueError that names the option."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise ValueError(f"{name} {text!r}: expected {n} comma-separated numbers")
    return values


def resolve(cfg: Config, num_processes: int) -> Config:
    """Fill backbone presets and check every option before any model is loaded (fail in seconds)."""
    if cfg.backbone not in hunyuan.BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose one of {hunyuan.BACKBONES}")
    for key, value in PRESETS[cfg.backbone].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    hunyuan.check_video_size(*hunyuan.VIDEO_FACTORS[cfg.backbone], cfg.num_frames, cfg.height, cfg.width)
    if cfg.sde not in sde.KINDS[1:]:
        raise ValueError(f"unknown SDE kind {cfg.sde!r}; choose one of {sde.KINDS[1:]}")
    if cfg.curriculum not in curriculum.CURRICULA:
        raise ValueError(f"unknown curriculum {cfg.curriculum!r}; choose one of {tuple(curriculum.CURRICULA)}")
    cfg.batch_size = cfg.batch_size or cfg.group_size
    if cfg.group_size < 2 or cfg.batch_size % cfg.group_size:
        raise ValueError(f"--batch_size {cfg.batch_size} (videos per process) must be a multiple of --group_size "
                         f"{cfg.group_size} >= 2, so that every prompt's group stays on one process")
    cfg.micro_batch_size = min(cfg.micro_batch_size or cfg.batch_size, cfg.batch_size)
    if cfg.batch_size % cfg.micro_batch_size:
        raise ValueError(f"--micro_batch_size {cfg.micro_batch_size} must divide --batch_size {cfg.batch_size}")
    if cfg.reward not in ("proxy", "videoalign"):
        raise ValueError(f"unknown reward {cfg.reward!r}; choose 'proxy' or 'videoalign'")
    if cfg.reward == "videoalign" and cfg.reward_model != "tiny" and not cfg.reward_prompt_template:
        import videoalign

        raise ValueError(f"--reward videoalign needs --reward_prompt_template FILE: {videoalign.PROMPT_HINT}")
    if cfg.checkpointed_blocks is not None and not cfg.gradient_checkpointing:
        raise ValueError(f"--checkpointed_blocks {cfg.checkpointed_blocks} needs --gradient_checkpointing True")
    if cfg.checkpointed_blocks is not None and cfg.checkpointed_blocks < 1:
        raise ValueError(f"--checkpointed_blocks {cfg.checkpointed_blocks} must be >= 1 (the number of blocks "
                         f"checkpointed; for none, pass --gradient_checkpointing False)")
    if cfg.eta <= 0:
        raise ValueError(f"--eta {cfg.eta}: must be > 0 (eta = 0 is the deterministic ODE, which has no log-prob to train)")
    if not 0 < cfg.timestep_fraction <= 1:
        raise ValueError(f"--timestep_fraction {cfg.timestep_fraction} must be in (0, 1]")
    k_stochastic = cfg.num_steps - 1 if cfg.sde == "cps" else cfg.num_steps  # cps's last step is deterministic
    k_train = math.ceil(cfg.timestep_fraction * k_stochastic)
    if cfg.updates_per_rollout < 1 or k_train % cfg.updates_per_rollout:
        raise ValueError(f"--updates_per_rollout {cfg.updates_per_rollout} must divide the {k_train} trained steps")
    if cfg.anchor_every < 0 or cfg.anchor_every % cfg.updates_per_rollout:
        raise ValueError(f"--anchor_every {cfg.anchor_every} must be >= 0 (0 = fixed anchor) and a multiple of "
                         f"--updates_per_rollout {cfg.updates_per_rollout}, so the anchor moves between rollouts")
    parse_floats(cfg.curriculum_tau, 2, "--curriculum_tau"), parse_floats(cfg.static_weights, 3, "--static_weights")
    if cfg.max_steps < 1 or cfg.checkpoints_total_limit < 1:
        raise ValueError("--max_steps and --checkpoints_total_limit must be >= 1")
    if cfg.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(cfg.resume_from_checkpoint):
        raise FileNotFoundError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint!r} is not a folder")
    if cfg.learning_rate is None:
        cfg.learning_rate = 1e-5 if cfg.full else 3e-4
    return cfg


# ----------------------------------------------------------------------------------------------------
# Small helpers that only wire things (the maths lives in the concept modules)


def derive_seed(*parts) -> int:
    """A stable 62-bit seed from a tuple of ints/strings (Python's hash() of a str changes per process)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def rollout_generators(seed: int, step: int, first_index: int, n: int, device) -> list[torch.Generator]:
    """One generator per sample from (seed, step, global sample index): Deviations 2."""
    return [torch.Generator(device).manual_seed(derive_seed(seed, step, first_index + i)) for i in range(n)]


def save_videos(videos: torch.Tensor, paths: list[str], fps: int) -> None:
    """GIFs always; MP4 too when imageio-ffmpeg is installed."""
    import imageio.v3 as iio  # lazy: only the main process writes videos

    for video, path in zip(videos, paths):
        frames = (video.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().cpu().numpy()  # (F, H, W, 3)
        iio.imwrite(path + ".gif", frames, extension=".gif", duration=1000 / fps, loop=0)
        try:
            iio.imwrite(path + ".mp4", frames, extension=".mp4", fps=fps)
        except Exception:  # no video writer installed: the GIF is enough
            pass


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
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key.split("/")[-1], marker="." if title.startswith("val") else None)
        ax.set_title(title), ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    # fixed margins: tight_layout measures every tick label, a large part of a plot's cost
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.14, top=0.91, wspace=0.3)
    fig.savefig(path, dpi=80), plt.close(fig)


# ----------------------------------------------------------------------------------------------------


def main(cfg: Config) -> list[dict]:
    # ---- setup ------------------------------------------------------------------------------------
    accelerator = Accelerator()  # [dist] reads `accelerate config` / launch flags (mixed precision, FSDP...)
    cfg = resolve(cfg, accelerator.num_processes)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED  # [dist]
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) and not cfg.full:  # [dist]
        raise ValueError("LoRA under FSDP or DeepSpeed is not supported (the adapter would be saved with the whole "
                         "model); LoRA fits one GPU: use configs/multi_gpu_lora.yaml, or pass --full")
    set_seed(cfg.seed)  # model init of the tiny backbone and LoRA; rollouts use their own generators
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    if weight_dtype == torch.float16:
        raise ValueError("fp16 gives NaN log-probs in the reference setups (SPEC §8); use --mixed_precision bf16")
    train_prompts = read_prompts(cfg.prompts, TRAIN_PROMPTS)
    val_prompts = read_prompts(cfg.validation_prompts, VALIDATION_PROMPTS)
    backbone = hunyuan.load_backbone(cfg.backbone, cfg.pretrained, device=device, dtype=weight_dtype, seed=cfg.seed)
    latent = hunyuan.latent_shape(backbone, cfg.num_frames, cfg.height, cfg.width)  # (C, F', H', W')
    shift = cfg.shift if cfg.shift is not None else backbone.shift
    sigmas = sde.sigma_schedule(cfg.num_steps, shift)  # (K+1,)
    stochastic = sde.step_variances(sigmas, cfg.sde, cfg.eta) > 0  # (K,) validates the schedule too
    S = (sde.equalizer_weights(sigmas, cfg.sde, cfg.eta) if cfg.equalizer else stochastic.float()).to(device)  # (K,)

    # The 7B text encoder is needed only here: after this, its ~14 GB (bf16) go back to the CPU and every
    # rollout and training step reads cached embeddings.
    text = hunyuan.PromptCache(backbone)  # every prompt encoded once; then the encoders leave the GPU
    text(train_prompts + val_prompts)
    negative = text.negative(1)
    text.offload_encoders()

    model = backbone.transformer
    params = hunyuan.add_lora(model, cfg.lora_rank, cfg.lora_alpha) if not cfg.full else list(model.requires_grad_(True).parameters())
    hunyuan.freeze_unreachable(model)  # [dist] DDP and FSDP2 checkpoints need every trainable param to get a grad
    params = [p for p in params if p.requires_grad]
    if cfg.gradient_checkpointing:
        hunyuan.enable_gradient_checkpointing(model, cfg.checkpointed_blocks)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # One update = (trained steps / updates_per_rollout) x (batch / micro-batch) backward passes, accumulated.
    k_train = math.ceil(cfg.timestep_fraction * int(stochastic.sum()))  # as resolve() checked it
    accelerator.gradient_accumulation_steps = k_train // cfg.updates_per_rollout * (cfg.batch_size // cfg.micro_batch_size)  # [dist]
    if deepspeed:  # [dist] no DataLoader tells DeepSpeed these (configs/deepspeed_zero2.yaml leaves them out)
        accelerator.state.deepspeed_plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_clipping": cfg.max_grad_norm,
            "gradient_accumulation_steps": accelerator.gradient_accumulation_steps})
    model, optimizer = accelerator.prepare(model, optimizer)  # [dist]
    params = [p for p in model.parameters() if p.requires_grad]  # [dist] FSDP replaces the tensors
    anchor = trust_region.MovingAnchor(model, cfg.anchor_every)
    tau = tuple(parse_floats(cfg.curriculum_tau, 2, "--curriculum_tau"))
    cur = curriculum.build_curriculum(cfg.curriculum, **(
        {"weights": parse_floats(cfg.static_weights, 3, "--static_weights")} if cfg.curriculum == "static"
        else {"tau": tau, "k": cfg.curriculum_k, "beta": cfg.curriculum_beta}))
    scorer = (rewards.build_reward("proxy") if cfg.reward == "proxy" else rewards.build_reward(
        "videoalign", path=cfg.reward_model or "KwaiVGI/VideoReward", prompt_template_file=cfg.reward_prompt_template,
        device=device, dtype=weight_dtype if device.type == "cuda" else torch.float32, batch_size=cfg.reward_batch_size))
    timer = profiling.PhaseTimer(accelerator.unwrap_model(model), device, cfg.profile)
    accelerator.print(  # [dist] one line a user can check before the first (long) iteration
        f"setup: backbone={cfg.backbone} latent={latent} sde={cfg.sde} eta={cfg.eta} K={cfg.num_steps} "
        f"trained_steps={k_train} G={cfg.group_size} "
        f"batch/process={cfg.batch_size} num_processes={world} precision={accelerator.mixed_precision} "
        f"{'full' if cfg.full else 'LoRA'} trainable={sum(p.numel() for p in params) / 1e6:.2f}M "
        f"reward={cfg.reward} curriculum={cfg.curriculum}")
    if not cfg.full:  # [dist] Deviations 5: accelerate saves optimizer and RNG, the adapter is saved by us
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())

    def velocity_fn(embeds):  # the policy velocity for one micro-batch of prompts (CFG inside)
        uncond = negative.repeat_interleave(len(embeds))  # once per micro-batch, not once per step
        return lambda x, sigma: hunyuan.velocity(model, x, sigma, embeds, uncond, cfg.guidance)

    def sample_videos(embeds, x_T, gens, kind, eta) -> sde.Trajectory:  # micro-batched rollout
        mb = cfg.micro_batch_size
        return sde.Trajectory.cat([
            sde.rollout(velocity_fn(embeds[i : i + mb]), x_T[i : i + mb], sigmas, kind, eta, gens[i : i + mb])
            for i in range(0, len(embeds), mb)])

    def score(videos, prompts) -> torch.Tensor:  # (n, 3) components in [0, 1]
        return rewards.score_batched(scorer, videos, prompts, cfg.fps, cfg.reward_batch_size).to(device)

    def validate(tag: str) -> dict:  # ODE samples of the validation prompts, same noise every time
        n = len(val_prompts)
        x_T = torch.randn((n, *latent), generator=torch.Generator().manual_seed(cfg.seed + 12345)).to(device)
        with torch.no_grad():
            traj = sample_videos(text(val_prompts), x_T, rollout_generators(cfg.seed, -1, 0, n, device), "ode", 0.0)
            videos = hunyuan.decode(backbone, traj.latents[:, -1])
        s = score(videos, val_prompts)
        if accelerator.is_main_process:  # [dist]
            os.makedirs(os.path.join(cfg.output_dir, "samples"), exist_ok=True)
            save_videos(videos, [os.path.join(cfg.output_dir, "samples", f"{tag}_{i}") for i in range(n)], cfg.fps)
        return {"total": s.mean().item(), **{c: s[:, j].mean().item() for j, c in enumerate(rewards.COMPONENTS)}}

    # ---- resume -----------------------------------------------------------------------------------
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    start_step, state = 0, {}
    resume = cfg.resume_from_checkpoint
    if resume == "latest":
        found = list_checkpoints(ckpt_root)
        resume = found[-1] if found else None
    if resume:
        state = load_checkpoint(resume, accelerator, model, cfg, anchor, cur)
        start_step = state["step"]
    if "base_val" in state:  # Deviations 6: the base policy is measured once, before any update
        base_val = state["base_val"]
    else:
        base_val = validate("base") if cfg.validation_steps and not resume else {}
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")  # one row of scalars per step (README)
    samples_path = os.path.join(cfg.output_dir, "samples.jsonl")  # per-sample prompts, scores, rewards, advantages
    history = []
    if accelerator.is_main_process:  # [dist]
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
        profile_path = os.path.join(cfg.output_dir, "profile.jsonl")
        for path in (metrics_path, samples_path, profile_path):  # keep rows up to the resumed step, drop the rest
            rows = []
            if os.path.exists(path):
                with open(path) as f:
                    rows = [r for r in map(json.loads, f) if r["step"] <= start_step]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            history = rows if path == metrics_path else history

    # ---- loop -------------------------------------------------------------------------------------
    N = cfg.batch_size  # videos on this process
    skipped_in_a_row = state.get("skipped_in_a_row", 0)
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
               disable=not accelerator.is_local_main_process, desc="GRPO")  # [dist]
    for step in bar:
        t_step = time.perf_counter()
        timer.reset()
        model.eval()  # no dropout anywhere, but be explicit: rollout and training forwards must agree

        # 1. sample: this process's prompts (whole groups), one noise stream per sample
        with timer("rollout"):
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, step, "prompts"))
            order = torch.randint(len(train_prompts), (N // cfg.group_size * world,), generator=g)
            local = order.view(world, -1)[rank].tolist()  # [dist] this process's share of the prompts
            prompts = [train_prompts[i] for i in local for _ in range(cfg.group_size)]  # (N,) groups consecutive
            gens = rollout_generators(cfg.seed, step, rank * N, N, device)
            # x_T and every later noise draw of sample i come from its own generator, so the sample is the same
            # whatever the process count or micro-batch size, and a resumed run redraws it exactly.
            x_T = torch.stack([torch.randn(latent, generator=gen, device=gen.device) for gen in gens]).to(device)
            embeds = text(prompts)  # cached embeddings of this process's prompts, for rollout and training
            traj = sample_videos(embeds, x_T, gens, cfg.sde, cfg.eta)

        # 2. reward: decode, score three components, mix them with the curriculum
        with timer("decode"):
            videos = hunyuan.decode(backbone, traj.latents[:, -1])  # (N, F, 3, H, W)
        with timer("reward"):
            scores = score(videos, prompts)  # (N, 3)
            # The curriculum's competence is global (the whole batch over all processes), while the mixing
            # below uses each group's own scores, which all live on this process.
            all_scores = accelerator.gather(scores)  # [dist] curriculum state must agree on every process
            cur.update(all_scores.nanmean(0))  # competence includes this batch, then the weights follow
            mixed, cstats = cur.reward(scores, cfg.group_size)  # (N,)

        # 3. advantage within each group (all on this process: Deviations 1)
        A = grpo.group_advantages(mixed, cfg.group_size, clip=cfg.adv_clip)  # (N,)

        # 4. update: every trained step of every sample; anchor means first, at rollout time
        steps = grpo.select_timesteps(N * world, stochastic, cfg.timestep_fraction, torch.Generator().manual_seed(
            derive_seed(cfg.seed, step, "timesteps")))[rank * N : (rank + 1) * N].to(device)  # [dist] (N, K_train)
        micro = [slice(i, i + cfg.micro_batch_size) for i in range(0, N, cfg.micro_batch_size)]
        with timer("anchor"):
            # The anchor's means for every trained (sample, step) are computed now, under no_grad with the
            # anchor's weights swapped in, so the training loop below never runs a second model.
            mu_anchor = {}
            if cfg.beta_pos > 0 and not anchor.is_current:  # right after a refresh the anchor IS mu_old
                with torch.no_grad(), anchor.swapped_in():
                    for j in range(steps.shape[1]):
                        mu_anchor[j] = torch.cat([sde.policy_step(velocity_fn(embeds[mb]), traj.rows(mb), steps[mb, j],
                                                                  cfg.sde, cfg.eta)[0] for mb in micro])
        # lambda_KL follows the update count, so it is the same whatever --max_steps is and after a resume.
        lam = trust_region.kl_coefficient(anchor.num_updates, cfg.kl_start, cfg.kl_end, cfg.kl_ramp_steps)
        stats, grad_norms = [], []
        with timer("train"):
            model.train()
            for cols in torch.arange(steps.shape[1]).chunk(cfg.updates_per_rollout):  # Deviations 3
                for j, mb in [(j, mb) for j in cols.tolist() for mb in micro]:
                    # accumulate: no gradient sync until the update's last micro-batch, where sync_gradients
                    # turns true; the loss is divided by the number of micro-batches (DeepSpeed: by its engine).
                    with accelerator.accumulate(model):  # [dist]
                        # No extra autocast: `prepare` already wraps the forward for rollout and training alike,
                        # and any difference between the two paths would break ratio = 1 (SPEC §8).
                        loss, st = grpo.trained_step_loss(
                            velocity_fn(embeds[mb]), traj.rows(mb), steps[mb, j], A[mb], cfg.sde, cfg.eta, S,
                            mu_anchor[j][mb] if j in mu_anchor else None, lam, cfg.beta_pos, cfg.beta_vel,
                            cfg.clip_range)
                        with timer.backward():
                            accelerator.backward(loss)  # [dist] the mean over the trained (i, t) pairs
                    stats.append(st)
                assert accelerator.sync_gradients  # [dist] the accumulation boundary is this update's end
                grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)  # [dist]
                # DeepSpeed clips and steps inside its engine and returns a float or None here
                grad_norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, dtype=torch.float32)
                if torch.isfinite(grad_norm) or deepspeed:
                    optimizer.step()
                    skipped_in_a_row = 0
                else:  # Deviations 4
                    warnings.warn(f"step {step}: non-finite gradient norm; update skipped")
                    skipped_in_a_row += 1
                    if skipped_in_a_row >= 3:
                        raise FloatingPointError("three updates in a row had non-finite gradients: lower "
                                                 "--learning_rate, check the reward scores, use bf16 not fp16")
                anchor.step()  # counts update slots, skipped ones too, so refreshes fall between rollouts
                optimizer.zero_grad(set_to_none=True)
                grad_norms.append(float(grad_norm))

        # 5. log, validate, checkpoint
        with timer("log"):
            row = {"step": step + 1, "lr": cfg.learning_rate, "lambda_kl": lam, "anchor/refreshes": anchor.num_refreshes}
            comp = all_scores.nanmean(0)
            row.update({f"reward/{c}": comp[j].item() for j, c in enumerate(rewards.COMPONENTS)})
            all_mixed, all_A = accelerator.gather(mixed), accelerator.gather(A)  # [dist] global sample order
            row["reward/mixed"] = all_mixed.nanmean().item()
            row["adv/abs_mean"] = all_A.abs().mean().item()
            mean_st = {k: accelerator.reduce(torch.stack([s[k] for s in stats]).mean(), "mean").item()  # [dist]
                       for k in stats[0]}
            first_dev = accelerator.gather(stats[0]["ratio_dev_max"].reshape(1)).max().item()  # [dist] every process
            row.update({"train/ratio_mean": mean_st["ratio_mean"], "train/first_ratio_dev": first_dev,
                        "train/clipfrac_high": mean_st["clipfrac_high"], "train/clipfrac_low": mean_st["clipfrac_low"],
                        "train/approx_kl": mean_st["approx_kl"], "train/policy_loss": mean_st["policy_loss"],
                        "kl/pos": mean_st["kl_pos"], "kl/vel": mean_st["kl_vel"],
                        "train/grad_norm": max(grad_norms, key=lambda g: g if math.isfinite(g) else math.inf)})
            cvals = accelerator.reduce(torch.tensor(list(cstats.values()), device=device), "mean")  # [dist] all groups
            row.update({f"curriculum/{k.replace('/', '_')}": v for k, v in zip(cstats, cvals.tolist())})
            row.update({f"time/{phase}": seconds for phase, seconds in timer.wall.items()})
            if cfg.validation_steps and ((step + 1) % cfg.validation_steps == 0 or step + 1 == cfg.max_steps):
                val = validate(f"step{step + 1:06d}")
                row.update({f"val/{k}": v for k, v in val.items()} | {f"val/base_{k}": v for k, v in base_val.items()})
            all_prompts = gather_object(prompts)  # [dist]
            if accelerator.is_main_process:  # [dist]
                with open(samples_path, "a") as f:  # per-sample record, for analysis and the two-process test
                    f.write(json.dumps({"step": step + 1, "prompt": all_prompts, "scores": all_scores.tolist(),
                                        "reward": all_mixed.tolist(), "advantage": all_A.tolist()}) + "\n")
                history.append(row)
                with open(metrics_path, "a") as f:  # a non-finite value is written as null (warned where it arose)
                    f.write(json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None
                                        for k, v in row.items()}) + "\n")
                if "val/total" in row or (step + 1) % 10 == 0 or step + 1 == cfg.max_steps:
                    plot_metrics(history, os.path.join(cfg.output_dir, "metrics.png"))
            bar.set_postfix(reward=f"{row['reward/mixed']:.3f}", kl=f"{row['kl/pos']:.2e}")
        with timer("checkpoint"):
            if (cfg.checkpointing_steps and (step + 1) % cfg.checkpointing_steps == 0) or step + 1 == cfg.max_steps:
                save_checkpoint(os.path.join(ckpt_root, f"checkpoint-{step + 1}"), accelerator, model, cfg, anchor, cur,
                                {"step": step + 1, "base_val": base_val, "skipped_in_a_row": skipped_in_a_row})
        if cfg.profile:
            profiling.print_profile(timer, time.perf_counter() - t_step, accelerator, model, step, cfg.output_dir)
    accelerator.end_training()  # [dist]
    return history


# ----------------------------------------------------------------------------------------------------
# Checkpoints: accelerate's state (optimizer, RNG, full weights) + LoRA adapter + anchor + curriculum


# Options that define the run: a resume must not change them (the rest, e.g. max_steps, output paths,
# validation and checkpoint frequency, micro-batch size, may change).
METHOD_FIELDS = ("backbone", "full", "lora_rank", "lora_alpha", "num_frames", "height", "width", "sde", "eta",
                 "num_steps", "shift", "guidance", "group_size", "batch_size", "equalizer", "timestep_fraction",
                 "clip_range", "adv_clip", "anchor_every", "beta_pos", "beta_vel", "kl_start", "kl_end",
                 "kl_ramp_steps", "updates_per_rollout", "reward", "curriculum", "curriculum_tau", "curriculum_k",
                 "curriculum_beta", "static_weights", "learning_rate", "weight_decay", "max_grad_norm", "seed")


def method_fields(cfg: Config, num_processes: int) -> dict:
    return {**{k: getattr(cfg, k) for k in METHOD_FIELDS}, "num_processes": num_processes}


def sharded_anchor(accelerator) -> bool:
    """Under FSDP every process holds a different shard of the anchor; otherwise all hold the same copy."""
    return accelerator.distributed_type == DistributedType.FSDP


def anchor_file(accelerator) -> str:
    return f"anchor_rank{accelerator.process_index}.pt" if sharded_anchor(accelerator) else "anchor.pt"


def list_checkpoints(root: str) -> list[str]:
    """The `checkpoint-<step>` folders under root, oldest step first."""
    found = sorted((int(d.split("-")[1]), d) for d in os.listdir(root) if d.startswith("checkpoint-"))
    return [os.path.join(root, d) for _, d in found]


def save_checkpoint(path, accelerator, model, cfg, anchor, cur, state) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    accelerator.save_state(path)  # [dist] optimizer, RNG states and (full fine-tuning) sharded weights
    if accelerator.is_main_process and not cfg.full:  # Deviations 5: the adapter is the whole model delta
        lora = get_peft_model_state_dict(accelerator.unwrap_model(model))
        save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, os.path.join(path, "lora.safetensors"))
    if accelerator.is_main_process or sharded_anchor(accelerator):  # [dist] FSDP: each process its own shard
        torch.save(anchor.state_dict(), os.path.join(path, anchor_file(accelerator)))
    if accelerator.is_main_process:  # [dist]
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump({**state, "curriculum": cur.state_dict(),
                       "config": method_fields(cfg, accelerator.num_processes)}, f)
        old = list_checkpoints(os.path.dirname(path))  # keep the newest `checkpoints_total_limit`
        for d in old[: max(len(old) - cfg.checkpoints_total_limit, 0)]:
            shutil.rmtree(d)
    accelerator.wait_for_everyone()  # [dist]


def load_checkpoint(path, accelerator, model, cfg, anchor, cur) -> dict:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    changed = {k: (state["config"].get(k), v) for k, v in method_fields(cfg, accelerator.num_processes).items()
               if state["config"].get(k) != v}
    if changed:  # a resumed run must be the same run; anything else is a new run from these weights
        raise ValueError(f"--resume_from_checkpoint {path}: options differ from the checkpoint's (saved, now): "
                         f"{changed}; resume with the options it was saved with")
    accelerator.load_state(path)  # [dist]
    if not cfg.full:
        set_peft_model_state_dict(accelerator.unwrap_model(model), load_file(os.path.join(path, "lora.safetensors")))
    anchor.load_state_dict(torch.load(os.path.join(path, anchor_file(accelerator)), weights_only=True))
    cur.load_state_dict(state["curriculum"])
    return state


def parse_args(argv: Optional[list[str]] = None) -> Config:
    """Command-line options (every field of Config, `--help` lists them with the papers' values)."""
    (config,) = HfArgumentParser(Config).parse_args_into_dataclasses(args=argv)
    return config


if __name__ == "__main__":
    main(parse_args())
