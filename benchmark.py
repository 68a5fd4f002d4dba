"""Model cost of one GRPO iteration on a backbone's full-size transformer, without any download.

    python benchmark.py                      # GPU: HunyuanVideo-1.5 8.3 B DiT, random bf16 weights, LoRA r=32
    python benchmark.py --model wan21-1.3b --frames 81 --height 480 --width 832 --num_steps 20 --modes full,lora
                                             # GPU: Wan2.1-T2V-1.3B at [SPG]'s size, full fine-tune and LoRA
    python benchmark.py --model small --frames 9 --height 64 --width 64 --train_timesteps 1
                                             # CPU: the same code on the small backbone (23 s on 2 cores)
    python benchmark.py --model tiny-wan --frames 5 --height 32 --width 32 --train_timesteps 1   # CPU

`--model` is a backbone name (backbones.py; `full` = hunyuan15). Real names build the published
architecture (the hub config values) with random weights; tiny / small / tiny-wan are the CPU models.

What it measures (README "Performance"), with the exact calls train.py makes:
- rollout: `sde.rollout` of G videos of one prompt over K SAGE steps, cond + negative prompt in one batched
  forward per step (`backbones.velocity_fn`), no grad. Reported per video.
- training step, per mode (`--modes`: `lora` = r 32 adapters, `full` = every weight, AdamW either way):
  `grpo.trained_step_loss` + backward for every trained timestep of every sample, then one AdamW step,
  with gradient checkpointing as train.py uses it (`enable_gradient_checkpointing`, all blocks or the first N).
- peak CUDA memory, FLOPs of one video's CFG forward (its prompt row and its negative-prompt row) counted by
  torch's FlopCounterMode, and the model FLOP utilisation (MFU) against the bf16 matmul peak measured on the
  same device in the same run.

Choices (stated in the README next to the numbers):
1. Random weights and random text embeddings: the cost of a forward does not depend on their values.
   The prompt has `--text_tokens` valid tokens (HunyuanVideo-1.5 trims padding; Wan always carries its 512
   zero-padded rows, as the pipeline does).
2. Attention setups "processor:backend" are compared on one batched CFG forward each. Processors are the
   family's (`ATTENTION_PROCESSORS`: HunyuanVideo-1.5 `diffusers` (dense boolean mask) or `valid`
   (hunyuan.ValidTokenAttnProcessor, no mask, the one train.py uses); Wan only `diffusers`, which takes
   no mask), backends diffusers attention backends. The fastest runs the full measurement, and the line
   "valid-token attention: X.XXx" gives diffusers' time over ours on the default backend when both exist.
3. `--train_timesteps` of the K trained timesteps are timed and the training step is scaled to K
   (every trained timestep costs the same forward + backward), to fit a 15-minute device budget. The
   printed line says so. `--train_variants` times other micro-batch sizes and checkpointing setups:
   `ckpt` all blocks, `ckptN` the first N, `nockpt` none (train.py: `--micro_batch_size`,
   `--checkpointed_blocks N`, `--gradient_checkpointing False`).
4. `--modes full,lora` runs full fine-tuning first (its AdamW state is freed before LoRA is added); each
   mode times its own rollout, since LoRA adapters add a little compute to every forward.
5. The noise schedule uses the preset's shift (5 where it is read from a scheduler config): the cost of a
   step does not depend on it.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import diffusers
import torch

import backbones
import grpo
import profiling
import sde


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("full",) + backbones.NAMES, default="full",
                   help="a backbone name; full = hunyuan15 (real names: random weights, no download)")
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
    p.add_argument("--attention", default=None,
                   help="processor:backend setups to compare (default: the family's train.py processor on native, "
                        "_native_flash and _native_cudnn, plus diffusers:native; CPU: native only)")
    p.add_argument("--modes", default="lora", help="comma-separated training modes to time: lora, full")
    p.add_argument("--attention_rounds", type=int, default=3, help="timed forwards per attention setup")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_setups(family) -> str:
    """The processor train.py uses (the family's last) on three backends, plus diffusers' own on native."""
    used = family.ATTENTION_PROCESSORS[-1]
    setups = [f"{used}:{b}" for b in ("native", "_native_flash", "_native_cudnn")]
    return ",".join(dict.fromkeys(["diffusers:native"] + setups))


def compare_attention(family, model, setups, forward_s, rounds_n, device) -> tuple[str, dict]:
    """Median time of one batched CFG forward per processor:backend setup; rounds interleave the setups, so a
    drift in the machine's speed (CPU frequency, other load) hits all of them alike. Leaves the best set."""
    def use(setup):
        processor, backend = setup.split(":")
        family.use_attention_processor(model, processor)
        model.set_attention_backend(backend)

    rounds = {}
    for setup in setups if device.type == "cuda" else [s for s in setups if s.endswith(":native")]:
        if setup.split(":")[0] not in family.ATTENTION_PROCESSORS:
            continue
        try:
            use(setup)
            forward_s()  # warm-up
            rounds[setup] = []
        except Exception as err:  # a backend this build lacks: report it and go on
            print(f"attention {setup:<26} unavailable: {type(err).__name__}: {str(err)[:120]}", flush=True)
    for _ in range(rounds_n):
        for setup in rounds:
            use(setup)
            rounds[setup].append(forward_s())
    timings = {setup: statistics.median(r) for setup, r in rounds.items()}
    best = min(timings, key=timings.get)
    use(best)
    return best, timings


def main():
    args = parse_args()
    if args.attention_rounds < 1 or args.train_timesteps < 1:
        raise SystemExit("--attention_rounds and --train_timesteps must be >= 1")
    modes = args.modes.split(",")
    if not modes or any(m not in ("lora", "full") for m in modes):
        raise SystemExit(f"--modes {args.modes!r}: comma-separated lora and/or full")
    modes = sorted(set(modes), key=("full", "lora").index)   # Choices 4: full first, then LoRA is added
    name = "hunyuan15" if args.model == "full" else args.model
    family, preset = backbones.module(name), backbones.preset(name)
    diffusers.utils.logging.set_verbosity_error()  # set_attention_backend warns "experimental" on every switch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "backbone": name,
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "args": vars(args)}
    t0 = time.perf_counter()
    model, latent, cond1, negative = family.random_policy(name, device, dtype, args.frames, args.height, args.width,
                                                          args.text_tokens)
    result["build_s"] = time.perf_counter() - t0
    result["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9

    G, K, guidance = args.group_size, args.num_steps, preset["guidance"]
    cond = cond1.repeat_interleave(G)
    velocity_fn = lambda rows: backbones.velocity_fn(family, model, cond[rows], negative, guidance)
    sigmas = sde.sigma_schedule(K, preset["shift"] or 5.0)   # Choices 5
    gens = [torch.Generator(device).manual_seed(i) for i in range(G)]
    x_T = torch.stack([torch.randn(latent, generator=g, device=device) for g in gens])
    patch = model.config.patch_size
    tokens = math.prod(latent[1:]) // (patch**2 if isinstance(patch, int) else math.prod(patch))
    result["video_tokens"] = tokens
    print(f"{result['device']}: {name} {result['params_b']:.2f} B params, latent {latent} = {tokens} video tokens "
          f"+ {args.text_tokens} text, built in {result['build_s']:.1f} s", flush=True)

    # FLOPs of one video's CFG forward (its prompt row and its negative-prompt row), and the bf16 peak
    one = torch.full((1,), 0.5, device=device)
    per_video = profiling.count_flops(lambda: velocity_fn(slice(0, 1))(x_T[:1], one))
    result["forward_tflop_per_video_cfg"] = per_video / 1e12
    result["bf16_peak_tflops"] = profiling.measured_bf16_peak(device) if device.type == "cuda" else None

    # 1. attention setups on one batched CFG forward (2G rows)
    def forward_s():
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            velocity_fn(slice(None))(x_T, sigmas[1].expand(G).to(device))
        sync(device)
        return time.perf_counter() - t

    best, timings = compare_attention(family, model, (args.attention or default_setups(family)).split(","),
                                      forward_s, args.attention_rounds, device)
    for setup, seconds in timings.items():
        print(f"attention {setup:<26} {seconds:.3f} s per {2 * G}-row forward (median of {args.attention_rounds})",
              flush=True)
    result["attention"] = {"per_forward_s": timings, "chosen": best}
    if "diffusers:native" in timings and "valid:native" in timings:
        ratio = timings["diffusers:native"] / timings["valid:native"]
        result["attention"]["valid_speedup_native"] = ratio
        print(f"valid-token attention: {ratio:.2f}x (diffusers' masked processor time / ours, native backend, "
              f"same run)", flush=True)

    result["modes"] = {}
    for mode in modes:
        if mode == "full":
            params = list(model.requires_grad_(True).parameters())
            family.freeze_unreachable(model)   # as train.py: DDP / FSDP2 need every trainable param reached
            params = [p for p in params if p.requires_grad]
        else:
            params = family.add_lora(model, rank=32, alpha=64)
            result["lora_params_m"] = sum(p.numel() for p in params) / 1e6
        result["modes"][mode] = entry = measure(args, family, model, params, velocity_fn, x_T, gens, sigmas,
                                                per_video, result["bf16_peak_tflops"], device)
        entry["trainable_params_m"] = sum(p.numel() for p in params) / 1e6
        rollout, train = entry["rollout"], entry["train"]
        if isinstance(train, str):   # the headline variant ran out of memory
            line = f"rollout: {rollout['seconds_per_video']:.2f} s per video; training step: {train}"
        else:
            line = (f"rollout: {rollout['seconds_per_video']:.2f} s per video ({K} steps, CFG batched); "
                    f"training step: {train['seconds_per_step']:.1f} s ({K} timesteps x {G} samples, "
                    f"{train['timed_timesteps']} timed and scaled); attention backend {best}"
                    + (f"; MFU rollout {100 * rollout['mfu']:.0f}%, train {100 * train['mfu']:.0f}% of "
                       f"{result['bf16_peak_tflops']:.0f} TFLOP/s measured; peak memory "
                       f"{max(rollout['peak_memory_gib'], train['peak_memory_gib']):.1f} GiB"
                       if device.type == "cuda" else ""))
        entry["line"] = line if modes == ["lora"] else f"[{mode}] {line}"
        if mode == "full":   # free the full-model gradients and AdamW state before LoRA is added
            model.requires_grad_(False)
            for p in model.parameters():
                p.grad = None
    result["rollout"], result["train"] = result["modes"][modes[-1]]["rollout"], result["modes"][modes[-1]]["train"]
    print(json.dumps(result, indent=1), flush=True)
    for mode in modes:
        print(result["modes"][mode]["line"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def measure(args, family, model, params, velocity_fn, x_T, gens, sigmas, per_video, peak, device) -> dict:
    """Rollout of G videos, then the training variants (the first is the headline figure) for `params`."""
    G, K = x_T.shape[0], len(sigmas) - 1
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4)
    out = {}
    # 2. rollout: K steps of G videos, batched CFG
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        traj = sde.rollout(velocity_fn(slice(None)), x_T, sigmas, "sage", 0.5, gens)
    sync(device)
    rollout_s = time.perf_counter() - t
    out["rollout"] = {"seconds": rollout_s, "seconds_per_video": rollout_s / G,
                      "tflops": K * G * per_video / rollout_s / 1e12}
    if device.type == "cuda":
        out["rollout"]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["rollout"]["mfu"] = out["rollout"]["tflops"] / peak

    # 3. training: the trained timesteps of every sample, forward + backward, then one optimizer step;
    #    once per variant "micro_batch:checkpointing"
    A = torch.randn(G, device=device)
    S = sde.equalizer_weights(sigmas, "sage", 0.5).to(device)
    steps = grpo.select_timesteps(G, sde.step_variances(sigmas, "sage", 0.5) > 0, 1.0,
                                  torch.Generator().manual_seed(0)).to(device)  # (G, K)
    timed = min(args.train_timesteps, steps.shape[1])
    model.train()
    out["train_variants"] = {}
    for variant in args.train_variants.split(","):
        mb, ckpt = int(variant.split(":")[0]), variant.split(":")[1]
        if ckpt == "nockpt":
            model.disable_gradient_checkpointing()
        else:  # "ckpt" (all blocks) or "ckptN" (the first N)
            family.enable_gradient_checkpointing(model, int(ckpt[4:]) if ckpt[4:] else None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            # one untimed forward + backward of one micro-batch: first calls in grad mode cost extra
            # (measured on CPU: ~1.2 s per forward for the first two on tiny-wan, then 0.02 s)
            loss, _ = grpo.trained_step_loss(velocity_fn(slice(0, mb)), traj.rows(slice(0, mb)), steps[:mb, 0],
                                             A[:mb], "sage", 0.5, S, None, 1e-7, 1.0, 0.1, 1e-4)
            loss.backward()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            t = time.perf_counter()
            for j in range(timed):
                for i in range(0, G, mb):
                    rows = slice(i, i + mb)
                    loss, _ = grpo.trained_step_loss(velocity_fn(rows), traj.rows(rows), steps[rows, j], A[rows],
                                                     "sage", 0.5, S, None, 1e-7, 1.0, 0.1, 1e-4)
                    (loss / (timed * G / mb)).backward()
            sync(device)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            print(f"train {variant}: out of memory", flush=True)
            out["train_variants"][variant] = "out of memory"
            continue
        fwd_bwd_s = time.perf_counter() - t
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
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
            entry["mfu"] = entry["tflops"] / peak
        print(f"train {variant}: {json.dumps(entry)}", flush=True)
        out["train_variants"][variant] = entry
    out["train"] = out["train_variants"][args.train_variants.split(",")[0]]
    model.eval()
    del optimizer
    return out


if __name__ == "__main__":
    main()
