"""Model cost of one GRPO iteration on the real HunyuanVideo-1.5 transformer, without any download.

    python benchmark.py                      # GPU: full-size 8.3 B DiT, random bf16 weights, LoRA r=32
    python benchmark.py --model small --frames 9 --height 64 --width 64 --train_timesteps 1
                                             # CPU: the same code on the small backbone (23 s on 2 cores)

What it measures (README "Performance"), with the exact calls train.py makes:
- rollout: `sde.rollout` of G videos over K SAGE steps, cond + uncond in one batched forward per step
  (`hunyuan.velocity`), no grad. Reported per video.
- training step: `grpo.trained_step_loss` + backward for every trained timestep of every sample, then one
  AdamW step on the LoRA parameters, with gradient checkpointing as train.py uses it for hunyuan15
  (`hunyuan.enable_gradient_checkpointing`, all blocks or the first N).
- peak CUDA memory, FLOPs of one video's CFG forward (its prompt row and its empty-prompt row) counted by
  torch's FlopCounterMode, and the model FLOP
  utilisation (MFU) against the bf16 matmul peak measured on the same device in the same run.

Choices (stated in the README next to the numbers):
1. Random weights and random text embeddings: the cost of a forward does not depend on their values.
   The text streams have `--text_tokens` valid tokens (train.py trims padding, hunyuan.py Deviation 7).
2. Attention setups "processor:backend" are compared on one batched CFG forward each: processor
   `diffusers` (its dense boolean mask) or `valid` (hunyuan.ValidTokenAttnProcessor, no mask, the one
   train.py uses), backend a diffusers attention backend. The fastest runs the full measurement, and the
   line "valid-token attention: X.XXx" gives diffusers' time over ours on the default backend.
3. `--train_timesteps` of the K trained timesteps are timed and the training step is scaled to K
   (every trained timestep costs the same forward + backward), to fit a 15-minute device budget. The
   printed line says so. `--train_variants` times other micro-batch sizes and checkpointing setups:
   `ckpt` all blocks, `ckptN` the first N, `nockpt` none (train.py: `--micro_batch_size`,
   `--checkpointed_blocks N`, `--gradient_checkpointing False`).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import diffusers
import torch

import grpo
import hunyuan
import profiling
import sde


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("full", "small"), default="full")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--group_size", type=int, default=4, help="G videos of one prompt, batched")
    p.add_argument("--num_steps", type=int, default=16, help="K")
    p.add_argument("--train_variants", default="1:ckpt",
                   help="comma-separated micro_batch:ckpt|ckptN|nockpt training setups to time (the first is "
                        "reported); ckptN checkpoints the first N blocks")
    p.add_argument("--train_timesteps", type=int, default=4, help="trained timesteps timed (scaled to K)")
    p.add_argument("--text_tokens", type=int, default=64, help="valid Qwen tokens of the prompt")
    p.add_argument("--attention", default="diffusers:native,valid:native,valid:_native_flash,valid:_native_cudnn",
                   help="processor:backend setups to compare, processor 'diffusers' or 'valid' (CPU: native only)")
    p.add_argument("--attention_rounds", type=int, default=3, help="timed forwards per attention setup")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device, dtype):
    """The transformer (full: the 480p t2v architecture, diffusers' defaults with task_type='t2v')."""
    from diffusers import HunyuanVideo15Transformer3DModel

    if args.model == "full":
        with torch.device(device):  # allocate on the GPU directly: 8.3 B parameters
            model = HunyuanVideo15Transformer3DModel(task_type="t2v").to(dtype)
        temporal, spatial, channels = 4, 16, 32
    else:
        model = HunyuanVideo15Transformer3DModel(**hunyuan.SMALL_TRANSFORMER).to(device, dtype)
        temporal, spatial, channels = 2, 4, 16
    hunyuan.use_valid_token_attention(model)   # as hunyuan.load_backbone does for train.py
    hunyuan.check_video_size(temporal, spatial * model.config.patch_size, args.frames, args.height, args.width)
    latent = (channels, (args.frames - 1) // temporal + 1, args.height // spatial, args.width // spatial)
    return model.eval(), latent


def text_embeds(model, n: int, tokens: int, device) -> hunyuan.PromptEmbeds:
    """Random embeddings shaped like the trimmed cache output: `tokens` valid Qwen tokens, no glyph text."""
    cfg = model.config
    g = torch.Generator(device).manual_seed(tokens)
    return hunyuan.PromptEmbeds(
        embeds=torch.randn(n, tokens, cfg.text_embed_dim, device=device, generator=g),
        mask=torch.ones(n, tokens, dtype=torch.long, device=device),
        embeds_2=torch.zeros(n, 1, cfg.text_embed_2_dim, device=device),
        mask_2=torch.zeros(n, 1, dtype=torch.long, device=device))


def main():
    args = parse_args()
    if args.attention_rounds < 1 or args.train_timesteps < 1:
        raise SystemExit("--attention_rounds and --train_timesteps must be >= 1")
    diffusers.utils.logging.set_verbosity_error()  # set_attention_backend warns "experimental" on every switch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "args": vars(args)}
    t0 = time.perf_counter()
    model, latent = build(args, device, dtype)
    result["build_s"] = time.perf_counter() - t0
    result["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    lora_params = hunyuan.add_lora(model, rank=32, alpha=64)
    result["lora_params_m"] = sum(p.numel() for p in lora_params) / 1e6
    optimizer = torch.optim.AdamW(lora_params, lr=3e-4, weight_decay=1e-4)

    G, K = args.group_size, args.num_steps
    cond = text_embeds(model, 1, args.text_tokens, device).repeat_interleave(G)
    uncond = text_embeds(model, 1, 14, device).repeat_interleave(G)  # the empty prompt: ~14 template tokens
    velocity_fn = lambda c, u: (lambda x, sigma: hunyuan.velocity(model, x, sigma, c, u, 6.0))
    sigmas = sde.sigma_schedule(K, 5.0)
    gens = [torch.Generator(device).manual_seed(i) for i in range(G)]
    x_T = torch.stack([torch.randn(latent, generator=g, device=device) for g in gens])
    tokens = math.prod(latent[1:]) // model.config.patch_size**2
    result["video_tokens"] = tokens
    print(f"{result['device']}: {result['params_b']:.2f} B params, LoRA {result['lora_params_m']:.1f} M, "
          f"latent {latent} = {tokens} video tokens + {args.text_tokens} text, built in {result['build_s']:.1f} s",
          flush=True)

    # FLOPs of one video's forward, and the device's measured bf16 peak
    one = torch.full((1,), 0.5, device=device)
    # one video's CFG forward: its prompt row and its empty-prompt row (their token counts differ)
    per_video = profiling.count_flops(lambda: hunyuan.velocity(model, x_T[:1], one, cond[:1], uncond[:1], 6.0))
    result["forward_tflop_per_video_cfg"] = per_video / 1e12
    result["bf16_peak_tflops"] = profiling.measured_bf16_peak(device) if device.type == "cuda" else None

    # 1. attention setups on one batched CFG forward (2G rows); rounds interleave the setups, so a drift in
    #    the machine's speed (CPU frequency, other load) hits all of them alike; the median round counts
    def use(setup):
        processor, backend = setup.split(":")
        hunyuan.use_valid_token_attention(model, enable=processor == "valid")
        model.set_attention_backend(backend)

    def forward_s():
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            velocity_fn(cond, uncond)(x_T, sigmas[1].expand(G).to(device))
        sync(device)
        return time.perf_counter() - t

    setups = args.attention.split(",")
    rounds = {}
    for setup in setups if device.type == "cuda" else [s for s in setups if s.endswith(":native")]:
        try:
            use(setup)
            forward_s()  # warm-up
            rounds[setup] = []
        except Exception as err:  # a backend this build lacks: report it and go on
            print(f"attention {setup:<26} unavailable: {type(err).__name__}: {str(err)[:120]}", flush=True)
    for _ in range(args.attention_rounds):
        for setup in rounds:
            use(setup)
            rounds[setup].append(forward_s())
    timings = {setup: statistics.median(r) for setup, r in rounds.items()}
    for setup, seconds in timings.items():
        print(f"attention {setup:<26} {seconds:.3f} s per {2 * G}-row forward (median of {args.attention_rounds})",
              flush=True)
    best = min(timings, key=timings.get)
    hunyuan.use_valid_token_attention(model, enable=best.startswith("valid:"))
    model.set_attention_backend(best.split(":")[1])
    result["attention"] = {"per_forward_s": timings, "chosen": best}
    if "diffusers:native" in timings and "valid:native" in timings:
        ratio = timings["diffusers:native"] / timings["valid:native"]
        result["attention"]["valid_speedup_native"] = ratio
        print(f"valid-token attention: {ratio:.2f}x (diffusers' masked processor time / ours, native backend, "
              f"same run)", flush=True)

    # 2. rollout: K steps of G videos, batched CFG
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        traj = sde.rollout(velocity_fn(cond, uncond), x_T, sigmas, "sage", 0.5, gens)
    sync(device)
    rollout_s = time.perf_counter() - t
    rollout_flops = K * G * per_video
    result["rollout"] = {"seconds": rollout_s, "seconds_per_video": rollout_s / G,
                         "tflops": rollout_flops / rollout_s / 1e12}
    if device.type == "cuda":
        result["rollout"]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)

    # 3. training: the trained timesteps of every sample, forward + backward, then one optimizer step;
    #    once per variant "micro_batch:checkpointing" (the first is the headline figure)
    A = torch.randn(G, device=device)
    S = sde.equalizer_weights(sigmas, "sage", 0.5).to(device)
    steps = grpo.select_timesteps(G, sde.step_variances(sigmas, "sage", 0.5) > 0, 1.0,
                                  torch.Generator().manual_seed(0)).to(device)  # (G, K)
    timed = min(args.train_timesteps, steps.shape[1])
    model.train()
    result["train_variants"] = {}
    for variant in args.train_variants.split(","):
        mb, ckpt = int(variant.split(":")[0]), variant.split(":")[1]
        if ckpt == "nockpt":
            model.disable_gradient_checkpointing()
        else:  # "ckpt" (all blocks) or "ckptN" (the first N)
            hunyuan.enable_gradient_checkpointing(model, int(ckpt[4:]) if ckpt[4:] else None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            sync(device)
            t = time.perf_counter()
            for j in range(timed):
                for i in range(0, G, mb):
                    rows = slice(i, i + mb)
                    loss, _ = grpo.trained_step_loss(velocity_fn(cond[rows], uncond[rows]), traj.rows(rows),
                                                     steps[rows, j], A[rows], "sage", 0.5, S, None, 1e-7, 1.0, 0.1, 1e-4)
                    (loss / (timed * G / mb)).backward()
            sync(device)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            print(f"train {variant}: out of memory", flush=True)
            result["train_variants"][variant] = "out of memory"
            continue
        fwd_bwd_s = time.perf_counter() - t
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        opt_s = time.perf_counter() - t
        train_s = fwd_bwd_s * K / timed + opt_s
        train_flops = 3 * K * G * per_video  # forward + backward (2x), not crediting checkpoint recompute
        entry = {"seconds_per_step": train_s, "timed_timesteps": timed, "scaled_to": K, "optimizer_s": opt_s,
                 "tflops": train_flops / (train_s - opt_s) / 1e12}
        if device.type == "cuda":
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            entry["mfu"] = entry["tflops"] / result["bf16_peak_tflops"]
        print(f"train {variant}: {json.dumps(entry)}", flush=True)
        result["train_variants"][variant] = entry
    result["train"] = result["train_variants"][args.train_variants.split(",")[0]]
    train_s = result["train"]["seconds_per_step"]
    if device.type == "cuda":
        result["rollout"]["mfu"] = result["rollout"]["tflops"] / result["bf16_peak_tflops"]

    print(json.dumps(result, indent=1), flush=True)
    print(f"rollout: {result['rollout']['seconds_per_video']:.2f} s per video ({K} steps, CFG batched); "
          f"training step: {train_s:.1f} s ({K} timesteps x {G} samples, {timed} timed and scaled); "
          f"attention backend {best}"
          + (f"; MFU rollout {100 * result['rollout']['mfu']:.0f}%, train {100 * result['train']['mfu']:.0f}% of "
             f"{result['bf16_peak_tflops']:.0f} TFLOP/s measured; peak memory "
             f"{max(result['rollout']['peak_memory_gib'], result['train']['peak_memory_gib']):.1f} GiB"
             if device.type == "cuda" else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
