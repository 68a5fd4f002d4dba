"""GRPO post-training of text-to-video generators (HunyuanVideo-1.5, Wan2.1) with the SAGE SDE, the equalizer,
the dual trust region and the self-paced reward curriculum, on any number of GPUs through Accelerate.

    accelerate launch train.py --backbone hunyuan15 --pretrained <dir> \
        --reward videoalign --reward_model <VideoReward dir> --reward_prompt_template <rubric.txt>   # [SAGE]
    accelerate launch train.py --backbone wan21-1.3b --pretrained <dir> --full --group_size 16 \
        --reward vlm --curriculum self_paced                                                          # [SPG]
    accelerate launch --config_file configs/fsdp2_full.yaml train.py --backbone hunyuan15 --full ...
    python train.py --backbone tiny --max_steps 20            # CPU, seconds: the same code on tiny models
    python train.py --backbone small --max_steps 4 --profile  # CPU profile (docs/performance.md)

Each iteration runs five phases (SPEC §4), each a few calls into the concept modules:
    1. sample     B/G prompts x G videos per process, K SDE steps with log-probs     backbones.sample
    2. reward     decode, score three components, mix them with the curriculum        rewards, curriculum
    3. advantage  normalise within each prompt's group of G (groups never straddle processes)     grpo
    4. update     every trained step of every sample, equalized clipped loss + dual KL  grpo, trust_region
    5. log        metrics.jsonl, metrics.png, validation videos, checkpoints
Lines that involve Accelerate or other processes are tagged `# [dist]`; each has an obvious single-process
reading (gather = the tensor itself, accumulate/backward = loss.backward(), this process = all prompts).
The model plumbing (loading, text encoding, CFG, decoding) is in the backbone's family module (models/hunyuan.py,
models/wan.py), reached through models/backbones.py; training/ holds what a run needs around the loop: the
options (options.py), checkpoints and resume (checkpoint.py), the exported policy (export.py), the logs
(logs.py), the optimizers (optimizers.py), the phase timer (profiling.py).
Three counts, three names: an *iteration* is one rollout batch with its updates (the logs' `step`,
`--max_steps`); a *denoising step* is one of the sampler's K steps (`--num_steps`; `timesteps` are their
indices); an *update* is one optimizer step (`--updates_per_rollout` per iteration; `--anchor_every`,
`--kl_ramp_steps` and `--lr_warmup_steps` count updates).

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
11. An update in which no sample carries signal (every advantage of the batch is 0, e.g. all groups dropped
    or zero-spread, and no KL term acts) is skipped like a non-finite one and counted: AdamW's momentum and
    weight decay would otherwise move the weights by about the learning rate with no signal at all.
12. Full fine-tuning keeps the transformer's weights in float32 under bf16 mixed precision (autocast computes
    in bf16): an AdamW update below 1/256 of a bf16 weight would round away (lr 5e-6 / 1e-5). FSDP2 and
    DeepSpeed keep fp32 master weights themselves. LoRA weights are float32 always (backbones.add_lora).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

import curriculum
import grpo
import rewards
import sde
import trust_region
from models import backbones
from training import checkpoint, export, logs, options, parallel, profiling
from training.optimizers import hidden_matrices, make_optimizers


# ----------------------------------------------------------------------------------------------------


def main(cfg: options.Config) -> list[dict]:
    # ---- setup: every option checked first, then the output folder, then the models ----------------
    cfg = options.resolve(cfg)
    accelerator = Accelerator(  # [dist] reads `accelerate config` / launch flags (mixed precision, FSDP...)
        log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=cfg.output_dir,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer updates, whatever the process count
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout))])  # options Dev. 2
    options.check_launch(cfg, accelerator)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    lay = parallel.layout(rank, world, cfg.ulysses_degree, cfg.ring_degree)  # [dist] dp rank, context group
    train_prompts = options.read_prompts(cfg.prompts, options.TRAIN_PROMPTS, "--prompts")
    val_prompts = options.validation_prompt_list(cfg)
    identity = checkpoint.run_identity(cfg, world, accelerator.mixed_precision, train_prompts, val_prompts)
    resume = checkpoint.claim_output_dir(cfg.output_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir, identity)
    if accelerator.is_main_process:  # [dist] --overwrite_output_dir: the old run's own files go; then the record of
        checkpoint.record_run(cfg.output_dir, cfg.overwrite_output_dir)  # what this run writes, before it writes
    accelerator.wait_for_everyone()  # [dist] nobody writes before the old run is gone and the record is written
    set_seed(cfg.seed)  # model init of the tiny backbones and LoRA; rollouts use their own generators
    weight_dtype = options.weight_dtype_of(accelerator)
    # models/hunyuan.py or models/wan.py: a Python module with the same functions (models/backbones.py)
    family_module = backbones.module(cfg.backbone)
    backbone = family_module.load_backbone(cfg.backbone, cfg.pretrained, device=device, dtype=weight_dtype,
                                           seed=cfg.seed)
    latent = family_module.latent_shape(backbone, cfg.num_frames, cfg.height, cfg.width)  # (C, F', H', W')

    # Derived quantities, in one place: the schedule, which denoising steps are stochastic, K_train.
    sigmas = sde.sigma_schedule(cfg.num_steps, cfg.shift if cfg.shift is not None else backbone.shift)  # (K+1,)
    stochastic = sde.step_variances(sigmas, cfg.sde, cfg.eta) > 0  # (K,) cps: the last step is deterministic
    k_train = math.ceil(cfg.timestep_fraction * (cfg.sde_window or int(stochastic.sum())))  # trained steps per sample

    # Every prompt is encoded once; then the (7B) text encoders leave the GPU and only the cache is read.
    prompt_cache = family_module.PromptCache(backbone)
    prompt_cache(train_prompts + val_prompts)
    negative = prompt_cache.negative(1)
    prompt_cache.offload_encoders()
    model, optimizers, schedulers, params = prepare_training(cfg, accelerator, family_module, backbone.transformer,
                                                             k_train)
    cp_group = None
    if lay.cp_size > 1:  # [dist] a video's tokens over its group (after freeze_unreachable's one-token probe)
        cp_group = parallel.group(parallel.enable(accelerator.unwrap_model(model), cfg.ulysses_degree,
                                                  cfg.ring_degree, world, device, family_module.CP_PLAN))
        tokens_seen = parallel.count_tokens(accelerator.unwrap_model(model), family_module.BLOCK_CLASS)  # logged
    anchor = trust_region.MovingAnchor(model, cfg.anchor_every)
    reward_curriculum = curriculum.build_curriculum(cfg.curriculum, **options.curriculum_options(cfg))
    scorer = rewards.build_reward(cfg.reward, path=cfg.reward_model, prompt_template_file=cfg.reward_prompt_template,
                                  device=device, dtype=weight_dtype if device.type == "cuda" else torch.float32,
                                  batch_size=cfg.reward_batch_size, device_map=cfg.reward_device_map,
                                  url=cfg.reward_url, timeout=cfg.reward_timeout)
    timer = profiling.PhaseTimer(accelerator.unwrap_model(model), device, cfg.profile)
    accelerator.print(  # [dist] one line a user can check before the first (long) iteration
        f"setup: backbone={cfg.backbone} latent={latent} sde={cfg.sde} eta={cfg.eta} K={cfg.num_steps} "
        f"trained_steps={k_train} G={cfg.group_size} batch/process={cfg.batch_size} num_processes={world} "
        f"{'full' if cfg.full else 'LoRA'} trainable={sum(p.numel() for p in params) / 1e6:.2f}M reward={cfg.reward}"
        + (f" context_parallel=U{cfg.ulysses_degree}xR{cfg.ring_degree} data_parallel={lay.dp_size}" if cp_group else ""))
    accelerator.init_trackers(options.TRACKER_RUN, config=logs.tracker_config(asdict(cfg)),  # [dist] none: no-op
                              init_kwargs={"wandb": {"dir": cfg.output_dir}})

    velocity_fn = lambda embeds: backbones.velocity_fn(family_module, model, embeds, negative, cfg.guidance)  # CFG
    validate = lambda tag, logged_until=0: validation(  # the ODE videos of the validation prompts, scored
        tag, cfg, accelerator, lay, cp_group, family_module, backbone, model, prompt_cache, negative, val_prompts,
        latent, sigmas, scorer, logged_until)

    # ---- resume: the newest complete checkpoint, or a fresh start -----------------------------------
    state = checkpoint.load(resume, accelerator, model, anchor, reward_curriculum, identity, cfg.full,
                            cfg.output_dir) if resume else {}
    start_iteration = state.get("step", 0)
    # Deviations 6: the base policy is measured once, before any update, and kept in the checkpoints
    base_val = state["base_val"] if "base_val" in state else validate("base") if cfg.validation_steps else {}
    paths = {name: os.path.join(cfg.output_dir, f"{name}.jsonl") for name in ("metrics", "samples", "profile")}
    history = logs.start(accelerator, paths, start_iteration, os.path.join(cfg.output_dir, "config.json"),
                         {**asdict(cfg), "run_identity": identity})

    # ---- loop: one iteration = one rollout batch, its rewards and --updates_per_rollout optimizer updates ----
    N = cfg.batch_size  # videos on this process
    skipped_in_a_row = state.get("skipped_in_a_row", 0)
    bar = tqdm(range(start_iteration, cfg.max_steps), initial=start_iteration, total=cfg.max_steps,
               disable=not accelerator.is_local_main_process, desc="GRPO")  # [dist]
    for iteration in bar:  # 0-based; the logs' `step` is iteration + 1
        t_iteration = time.perf_counter()
        timer.reset()
        model.eval()  # no dropout anywhere, but be explicit: rollout and training forwards must agree
        with logs.StepWarnings(iteration + 1):
            # 1. sample: this process's prompts (whole groups), one noise stream per sample (Deviations 2)
            with timer("rollout"):
                prompts = local_prompts(train_prompts, cfg, iteration, lay.dp_rank, lay.dp_size)  # (N,) groups
                gens = backbones.rollout_generators(cfg.seed, iteration, lay.dp_rank * N, N, device)
                embeds = prompt_cache(prompts)  # cached embeddings of this process's prompts, for rollout and training
                x_T = backbones.initial_noise(gens, latent, device)  # (N, C, F', H', W')
                if cfg.shared_prefix:  # a group shares its first member's x_T, so it shares the ODE prefix too
                    x_T = x_T[:: cfg.group_size].repeat_interleave(cfg.group_size, dim=0)
                window = sde_window(cfg, stochastic, iteration)  # (K,) bool: this iteration's stochastic steps
                traj = backbones.sample(family_module, model, embeds, negative, x_T, gens, sigmas, cfg.sde, cfg.eta,
                                        cfg.guidance, cfg.micro_batch_size, window, cfg.group_size * cfg.shared_prefix,
                                        cfg.ode_solver, cfg.ode_steps)

            # 2. reward: decode, score three components, mix them with the curriculum
            with timer("decode"):
                videos = family_module.decode(backbone, traj.latents[:, -1])  # (N, F, 3, H, W)
            with timer("reward"):
                scores, diagnostics = parallel.share_scores(  # (N, 3), {name: (N,)}; once per context group
                    lambda v, p: score(scorer, v, p, cfg, device), videos, prompts, lay, cp_group)
                # The curriculum's competence is global (the whole batch over all processes), while the mixing
                # below uses each group's own scores, which all live on this process.
                all_scores = parallel.dedupe(accelerator.gather(scores), lay)  # [dist] the state must agree
                reward_curriculum.update(all_scores.nanmean(0))  # competence includes this batch, then the weights
                mixed, curriculum_stats = reward_curriculum.reward(scores, cfg.group_size)  # (N,)

            # 3. advantage within each group (all on this process: Deviations 1)
            A = grpo.group_advantages(mixed, cfg.group_size, clip=cfg.adv_clip)  # (N,)
            all_mixed = parallel.dedupe(accelerator.gather(mixed), lay)  # [dist] global sample order
            all_A = parallel.dedupe(accelerator.gather(A), lay)

            # 4. update: the anchor's means first (at rollout time, one pass), then the optimizer updates
            S = (sde.equalizer_weights(sigmas, cfg.sde, cfg.eta, window) if cfg.equalizer else window.float())  # (K,)
            timesteps = grpo.select_timesteps(N * lay.dp_size, window, cfg.timestep_fraction, torch.Generator(
            ).manual_seed(backbones.derive_seed(cfg.seed, iteration, "timesteps")))[lay.dp_rank * N :][:N]  # [dist]
            timesteps = timesteps.to(device)  # (N, K_train): the denoising steps each sample trains
            micro_batches = [slice(i, i + cfg.micro_batch_size) for i in range(0, N, cfg.micro_batch_size)]
            with timer("anchor"):
                mu_anchor = trust_region.anchor_means(anchor, lambda mb: velocity_fn(embeds[mb]), traj, timesteps,
                                                      cfg.sde, cfg.eta, micro_batches, cfg.beta_pos)  # or None
            # lambda_KL follows the update count, so it is the same whatever --max_steps is and after a resume.
            lambda_kl = trust_region.kl_coefficient(anchor.num_updates, cfg.kl_start, cfg.kl_end, cfg.kl_ramp_steps)
            lr = schedulers[0].get_last_lr()[0]  # the rate of this iteration's first update
            rollout = RolloutBatch(embeds=embeds, trajectory=traj, timesteps=timesteps, advantages=A,
                                   equalizer=S.to(device), mu_anchor=mu_anchor, has_signal=bool((all_A != 0).any()))
            with timer("train"):
                stats, grad_norms, skipped, skipped_in_a_row = update_policy(
                    cfg=cfg, accelerator=accelerator, model=model, optimizers=optimizers, schedulers=schedulers,
                    params=params, anchor=anchor, velocity_fn=velocity_fn, rollout=rollout,
                    micro_batches=micro_batches, lambda_kl=lambda_kl, skipped_in_a_row=skipped_in_a_row,
                    iteration=iteration, timer=timer, loss_scale=parallel.loss_scale(lay))

            # 5. log, validate, checkpoint
            done = iteration + 1  # iterations finished, the logs' `step`
            with timer("log"):
                health = {"nonfinite_scores": int((~torch.isfinite(all_scores)).sum()), "skipped_updates": skipped,
                          "dropped_groups": int((~torch.isfinite(all_mixed)).view(-1, cfg.group_size).any(1).sum())}
                row = logs.training_row(accelerator, done, lr, lambda_kl, anchor, all_scores, all_mixed,
                                        all_A, stats, grad_norms, curriculum_stats, diagnostics, timer.wall, health)
                if cp_group is not None:  # video tokens per row that this process's transformer computed
                    row["cp/tokens_per_process"] = tokens_seen["tokens"]
                if cfg.sde_window:  # where this iteration's window sat: its first denoising step t
                    row["sde/window_start"] = int(window.nonzero()[0])
                if cfg.validation_steps and (done % cfg.validation_steps == 0 or done == cfg.max_steps):
                    val = validate(f"step{done:06d}", history.logged_until)  # a replayed one: not re-sent
                    row.update({f"val/{k}": v for k, v in val.items()})
                    row.update({f"val/base_{k}": v for k, v in base_val.items()})
                logs.write_step(accelerator, paths, history, row, {  # per-sample record, all processes
                    "step": done, "prompt": parallel.dedupe_list(gather_object(prompts), lay),  # [dist]
                    "scores": all_scores.tolist(),
                    "reward": all_mixed.tolist(), "advantage": all_A.tolist()}, cfg.max_steps)
                bar.set_postfix(reward=f"{row['reward/mixed']:.3f}", kl=f"{row['kl/pos']:.2e}")
            with timer("checkpoint"):
                if (cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0) or done == cfg.max_steps:
                    checkpoint.save(cfg.output_dir, done, accelerator, model, anchor, reward_curriculum,
                                    {"step": done, "base_val": base_val, "skipped_in_a_row": skipped_in_a_row},
                                    identity, cfg.full, cfg.checkpoints_total_limit)
            if cfg.profile:
                profiling.print_profile(timer, time.perf_counter() - t_iteration, accelerator, model, iteration,
                                        cfg.output_dir)
    checkpoint.export_final(accelerator, model, cfg.output_dir, cfg.full)  # [dist] diffusers' format, at the root
    for tracker in accelerator.trackers:  # [dist] end_training() without destroying the process group (options Dev. 3)
        tracker.finish()
    policy = export.TRANSFORMER + "/" if cfg.full else f"{export.LORA_FILE}, {export.PEFT}/"
    accelerator.print(f"done: {cfg.max_steps} steps in {cfg.output_dir}: the policy ({policy}), metrics.jsonl, metrics"
                      f".png, {'samples/, ' * bool(cfg.validation_steps)}{checkpoint.CHECKPOINTS}/. Videos: python "
                      f"sample.py --backbone {cfg.backbone} --{'transformer' if cfg.full else 'lora'} {cfg.output_dir} "
                      f"--prompt '...' --output_dir <folder>")
    return history


# ----------------------------------------------------------------------------------------------------
# The update phase, and what the setup builds


@dataclass(frozen=True)
class RolloutBatch:
    """What the update phase reads of one rollout: this process's N samples."""

    embeds: object  # the prompt cache's embeddings of the N prompts (the family's PromptEmbeds)
    trajectory: sde.Trajectory  # every denoising step's x_t, x_{t+1}, mean and log-prob (N, K, ...)
    timesteps: torch.Tensor  # (N, K_train) the denoising steps each sample trains (grpo.select_timesteps)
    advantages: torch.Tensor  # (N,) A, normalised within each group
    equalizer: torch.Tensor  # (K,) S_t (the window's 0/1 mask with --no_equalizer)
    mu_anchor: Optional[torch.Tensor]  # (N, K_train, ...) the anchor's means of those steps, or None
    has_signal: bool  # some advantage of the whole batch (all processes) is non-zero


def update_policy(*, cfg, accelerator, model, optimizers, schedulers, params, anchor, velocity_fn,
                  rollout: RolloutBatch, micro_batches: list[slice], lambda_kl: float, skipped_in_a_row: int,
                  iteration: int, timer, loss_scale: int = 1):
    """Phase 4: `--updates_per_rollout` optimizer updates over the trained (sample, denoising step) pairs of one
    rollout.

    An update is skipped (no optimizer step: Adam's momentum and weight decay would move the weights with no
    signal) when its gradient norm is not finite (Deviations 4) or when nothing in it carries signal: every
    advantage of the batch is 0 and no KL term is active (Deviations 11). The learning-rate schedule and the
    anchor count update slots, skipped ones too. `loss_scale` is training/parallel.py's (C under context
    parallelism, else 1). Returns the per-micro-batch diagnostics, the gradient
    norms, the number of skipped updates and the running count of non-finite ones."""
    stats, grad_norms, skipped = [], [], 0
    traj, mu_anchor = rollout.trajectory, rollout.mu_anchor
    model.train()
    # Deviations 3: the K_train columns are split between the updates
    for update, columns in enumerate(torch.arange(rollout.timesteps.shape[1]).chunk(cfg.updates_per_rollout)):
        for j, mb in [(j, mb) for j in columns.tolist() for mb in micro_batches]:
            # accumulate: no gradient sync until the update's last micro-batch, where sync_gradients turns
            # true; the loss is divided by the number of micro-batches (DeepSpeed: by its engine).
            with accelerator.accumulate(model):  # [dist]
                # No extra autocast: `prepare` already wraps the forward for rollout and training alike, and any
                # difference between the two paths would break ratio = 1 (SPEC §8).
                loss, st = grpo.trained_step_loss(
                    velocity_fn(rollout.embeds[mb]), traj.rows(mb), rollout.timesteps[mb, j], rollout.advantages[mb],
                    kind=cfg.sde, eta=cfg.eta, weight=rollout.equalizer,
                    mu_anchor=None if mu_anchor is None else mu_anchor[mb, j], lambda_kl=lambda_kl,
                    beta_pos=cfg.beta_pos, beta_vel=cfg.beta_vel, clip_range=cfg.clip_range)
                with timer.backward():
                    accelerator.backward(loss * loss_scale)  # [dist] the mean over the trained (i, t) pairs
            stats.append(st)
        assert accelerator.sync_gradients  # [dist] the accumulation boundary is this update's end
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)  # [dist]
        # DeepSpeed clips and steps inside its engine and returns a float or None here
        grad_norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, dtype=torch.float32)
        # The KL terms act when the anchor differs from the rollout policy (position) or when an earlier update of
        # this rollout moved the policy (step-wise); both are scaled by lambda_KL.
        kl_active = lambda_kl > 0 and ((cfg.beta_pos > 0 and mu_anchor is not None)
                                       or (cfg.beta_vel > 0 and update > 0))
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED  # [dist] it has stepped already
        where = f"update {update + 1} of step {iteration + 1}"
        if deepspeed or (torch.isfinite(grad_norm) and (rollout.has_signal or kl_active)):
            for optimizer in optimizers:
                optimizer.step()
            skipped_in_a_row = 0
        elif not torch.isfinite(grad_norm):  # Deviations 4
            warnings.warn(f"{where}: non-finite gradient norm; update skipped")
            skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
            if skipped_in_a_row >= 3:
                raise FloatingPointError("three updates in a row had non-finite gradients: lower --learning_rate, "
                                         "check the reward scores, use bf16 not fp16")
        else:  # Deviations 11
            warnings.warn(f"{where}: no sample carries signal (every advantage is 0 and no KL term acts); "
                          f"update skipped")
            skipped += 1
        for optimizer, scheduler in zip(optimizers, schedulers):
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        anchor.step()  # so refreshes fall between rollouts
        grad_norms.append(float(grad_norm))
    return stats, grad_norms, skipped, skipped_in_a_row


def prepare_training(cfg: options.Config, accelerator, family_module, model, k_train: int):
    """What is trained (LoRA or all weights), how (checkpointing, AdamW, the LR schedule) and `prepare`."""
    if cfg.full and next(model.parameters()).dtype != torch.float32:  # Deviations 12: fp32 master weights
        model.float()
    if cfg.full:
        params = list(model.requires_grad_(True).parameters())
    else:
        params = family_module.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    family_module.freeze_unreachable(model)  # [dist] DDP and FSDP2 checkpoints need every trainable param to get a grad
    params = [p for p in params if p.requires_grad]
    if cfg.gradient_checkpointing:
        family_module.enable_gradient_checkpointing(model, cfg.checkpointed_blocks)
    optimizers = make_optimizers(params, name=cfg.optimizer, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                 muon_params=hidden_matrices(model, family_module.BLOCK_CLASS))
    schedulers = [get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                num_training_steps=cfg.max_steps * cfg.updates_per_rollout)  # in optimizer updates
                  for optimizer in optimizers]
    # One update = (trained steps / updates_per_rollout) x (batch / micro-batch) backward passes, accumulated.
    accumulation = k_train // cfg.updates_per_rollout * (cfg.batch_size // cfg.micro_batch_size)
    accelerator.gradient_accumulation_steps = accumulation  # [dist]
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






def sde_window(cfg: options.Config, stochastic: torch.Tensor, iteration: int) -> torch.Tensor:
    """(K,) bool: the denoising steps that are stochastic (and trained) in `iteration` (sde.py Deviations 5). A
    'random' or 'sliding' window stays inside --sde_window_range (stochastic steps A..B-1)."""
    if not cfg.sde_window:
        return stochastic
    if cfg.sde_window_start in ("random", "sliding"):
        first, end = (int(x) for x in cfg.sde_window_range.split(","))
        last = end - cfg.sde_window  # the largest start inside the range
        if cfg.sde_window_start == "random":  # seeded by (seed, iteration): the same on all processes and at resume
            g = torch.Generator().manual_seed(backbones.derive_seed(cfg.seed, iteration, "window"))
            start = first + int(torch.randint(last - first + 1, (1,), generator=g))
        else:  # MixGRPO: from the noisiest steps of the range to its cleanest over the run
            start = first + min(last - first, iteration * (last - first + 1) // cfg.max_steps)
    else:
        start = int(cfg.sde_window_start)
    return sde.window_mask(stochastic, start, cfg.sde_window)


def score(scorer, videos, prompts, cfg: options.Config, device):
    """(n, 3) components in [0, 1] and the scorer's per-sample diagnostics {name: (n,)}, on `device`."""
    scores, diagnostics = rewards.score_batched(scorer, videos, prompts, cfg.fps, cfg.reward_batch_size)
    return scores.to(device), {k: v.to(device) for k, v in diagnostics.items()}


def validation(tag, cfg, accelerator, lay, cp_group, family_module, backbone, model, prompt_cache, negative, prompts,
               latent, sigmas, scorer, logged_until: int = 0) -> dict:
    """ODE videos of the validation prompts (the same noise at every validation: prompt i's comes from
    (seed, VALIDATION, i), as in sample.py), split over the processes; saved, logged to the trackers, scored.
    Returns the mean scores over all of them: `total` (equal weights, comparable across curriculum stages)
    and each component."""
    device = accelerator.device
    mine = list(range(lay.dp_rank, len(prompts), lay.dp_size))  # [dist] this data-parallel rank's prompts
    # [dist] Every process samples the same number of videos, padding its share with prompt 0: under DDP and
    # FSDP a forward is a collective call (buffer broadcast, weight all-gather), so the counts must match.
    rows = mine + [0] * (math.ceil(len(prompts) / lay.dp_size) - len(mine))
    gens = [backbones.rollout_generators(cfg.seed, backbones.VALIDATION, i, 1, device)[0] for i in rows]
    with torch.no_grad():
        traj = backbones.sample(family_module, model, prompt_cache([prompts[i] for i in rows]), negative,
                                backbones.initial_noise(gens, latent, device), gens, sigmas, "ode", 0.0, cfg.guidance,
                                cfg.micro_batch_size, ode_solver=cfg.ode_solver, ode_steps=options.validation_calls(vars(cfg)))
        videos = family_module.decode(backbone, traj.latents[:, -1])[: len(mine)]  # (n, F, 3, H, W), padding dropped
    s = parallel.share_scores(lambda v, p: score(scorer, v, p, cfg, device), videos, [prompts[i] for i in mine], lay,
                              cp_group)[0].tolist() if mine else []
    s = list(zip(mine, s))  # (prompt index, scores): a group's processes hold the same, kept once below
    logs.save_validation(accelerator, videos if mine and lay.cp_rank == 0 else None,  # a group writes once
                         [os.path.join(cfg.output_dir, "samples", f"{tag}_{i}") for i in mine], cfg.fps,
                         logged_until=logged_until)  # the trackers have the frames of a replayed validation
    s = torch.tensor([v for _, v in sorted(dict(gather_object(s)).items())])  # [dist] (n_val, 3), by prompt
    return {"total": s.mean().item(), **{c: s[:, j].mean().item() for j, c in enumerate(rewards.COMPONENTS)}}


def local_prompts(train_prompts: list[str], cfg: options.Config, iteration: int, rank: int, world: int) -> list[str]:
    """This process's prompts, each repeated G times (a group); the draw is global, so it does not depend on
    the process count, and seeded by (seed, iteration), so a resumed run draws the same."""
    g = torch.Generator().manual_seed(backbones.derive_seed(cfg.seed, iteration, "prompts"))
    order = torch.randint(len(train_prompts), (cfg.batch_size // cfg.group_size * world,), generator=g)
    local = order.view(world, -1)[rank].tolist()  # [dist] this process's share of the prompts
    return [train_prompts[i] for i in local for _ in range(cfg.group_size)]


def cli(argv: Optional[list[str]] = None) -> None:
    """`python train.py ...`: a bad option or output folder is a usage error (exit 2, one line, no traceback)."""
    options.run_command("train.py", main, options.parse_args(argv))


if __name__ == "__main__":
    cli()
