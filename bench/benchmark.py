"""Model cost of one GRPO iteration on a backbone's full-size transformer, with random weights (no download).

What it measures, each with the calls train.py makes, printed as it finishes and then all as JSON (`--out`):
1. attention: one batched CFG forward (2G rows) per processor:backend setup (`--attention`), median of
   interleaved rounds; the fastest is used for everything below, and "valid-token attention: X.XXx" gives
   diffusers' masked processor time over ours on the native backend when both ran.
2. rollout: `sde.rollout` of G videos of one prompt over K SAGE steps, cond + negative prompt in one batched
   forward per step (`backbones.velocity_fn`), no grad: seconds per video, TFLOP/s, MFU.
3. training step, per mode (`--modes`: `lora` = r 32 adapters, `full` = every weight) and per setup
   (`--train_variants`): `grpo.trained_step_loss` + backward for every trained timestep of every sample, then
   one AdamW step (`training.optimizers.make_optimizers`), with gradient checkpointing as train.py sets it. `--trace` adds a
   torch.profiler table (top 15 kernels by device time) of one forward + backward of the first setup.
4. optimizer (`--optimizer_rounds`, per mode): one AdamW step vs one Muon step (`training.optimizers.make_optimizers`, as
   `--optimizer adamw|muon`) on the trained parameters, interleaved rounds, median.
5. SDE window (`--windows 2,4`, `--shared_prefix`; last mode only): the iteration's model phases (rollout with
   `backbones.sample`, anchor means with `trust_region.anchor_means`, training with `grpo.trained_step_loss` on
   the window's steps + one AdamW step) with all K steps stochastic vs windows of W steps, interleaved rounds,
   median; rows per phase counted by `profiling.PhaseTimer` (the `--profile` table's rows); prints
   "window W / full: 0.xx".
6. `--compile` (last mode): one training step (the first `--train_variants` setup) without, then with
   diffusers' `compile_repeated_blocks(fullgraph=False)` (torch.compile of each DiT block).
Also: peak CUDA memory, FLOPs of one video's CFG forward (its prompt row and its negative-prompt row) counted by
torch's FlopCounterMode, and MFU = those FLOPs per second over the bf16 matmul peak measured in the same run.

Run (docs/performance.md holds the figures with their machine, date and command):
    bench/gpu.sh        # GPU (H100/H200): the sections below with versions and date, about 8 minutes
    python bench/benchmark.py --train_timesteps 1 --train_variants 1:ckpt,1:ckpt20,1:nockpt
                        # GPU: HunyuanVideo-1.5 8.3 B DiT, LoRA r=32, 33x320x576, G=4, K=16
    python bench/benchmark.py --model wan21-1.3b --frames 81 --height 480 --width 832 --modes full
                        # GPU: Wan2.1-T2V-1.3B at [SPG]'s size, full fine-tune
    python bench/benchmark.py --model small --frames 9 --height 64 --width 64 --train_timesteps 1
                        # CPU: the same code on the small backbone (about 30 s on 2 cores)
    python bench/benchmark.py --model small --frames 9 --height 64 --width 64 --num_steps 8 --train_timesteps 1 \\
        --train_variants 4:nockpt --windows 2,4 --shared_prefix --window_rounds 3
                        # CPU: K = 8 full vs windows of 2 and 4 (docs/performance.md; about 4 minutes)

`--model` is a backbone name (backbones.py; `full` = hunyuan15). Real names build the published
architecture (the hub config values) with random weights; tiny / small / tiny-wan are the CPU models.

Choices (stated in docs/performance.md next to the numbers):
1. Random weights and random text embeddings: the cost of a forward does not depend on their values.
   The prompt has `--text_tokens` valid tokens (HunyuanVideo-1.5 trims padding; Wan always carries its 512
   zero-padded rows, as the pipeline does).
2. Attention processors are the family's (`ATTENTION_PROCESSORS`: HunyuanVideo-1.5 `diffusers` (dense boolean
   mask) or `valid` (hunyuan.ValidTokenAttnProcessor, no mask, the one train.py uses); Wan only `diffusers`,
   which takes no mask), backends diffusers attention backends. On CPU only the native backend runs.
3. `--train_timesteps` of the K trained timesteps are timed and the training step is scaled to K
   (every trained timestep costs the same forward + backward), to fit a GPU time budget; the printed line
   says so. Setups: `ckpt` all blocks checkpointed, `ckptN` the first N, `nockpt` none (train.py:
   `--micro_batch_size`, `--checkpointed_blocks N`, `--gradient_checkpointing False`). Every setup first runs
   one untimed forward + backward (first calls in grad mode cost extra: ~1.2 s per forward for the first two
   on tiny-wan, then 0.02 s).
4. `--modes full,lora` runs full fine-tuning first (its optimizer state is freed before LoRA is added); each
   mode times its own rollout, since LoRA adapters add a little compute to every forward. The full mode keeps
   the bf16 weights (train.py keeps float32 master weights, so its optimizer steps move twice the bytes).
5. The noise schedule uses the preset's shift (5 where it is read from a scheduler config): the cost of a
   step does not depend on it.
6. The window comparison runs as train.py does with the backbone's preset: its micro-batch size (or
   `--micro_batch_size`) for rollout, anchor and training, its gradient checkpointing, `--timestep_fraction 1`,
   and an anchor one update behind (fixed after that), so the anchor pass runs as it does in every iteration but
   the one right after a refresh. Every window sits at the last start (steps K - W .. K - 1): without a shared
   prefix the cost does not depend on where it sits; with one this is where the prefix saves most (a window
   at start s saves s (1 - 1/G) of the rollout's K N forward rows). One untimed iteration of the narrowest
   window warms up first.
7. The optimizer comparison steps both optimizers on the same parameters with the same random gradients:
   the step time depends on the shapes, not the values.
8. compile cannot be undone on a module, so "off" is timed just before "on", not interleaved; the compiled
   setup's untimed first forward + backward includes the compilation and is reported apart.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import diffusers
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import grpo  # noqa: E402
import sde  # noqa: E402
import trust_region  # noqa: E402
from models import backbones  # noqa: E402
from training import profiling  # noqa: E402
from training.optimizers import make_optimizers  # noqa: E402

KIND, ETA = "sage", 0.5   # the rollout's SDE: its cost does not depend on the kind


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
    p.add_argument("--optimizer_rounds", type=int, default=5, help="timed AdamW and Muon steps per mode; 0 = skip")
    p.add_argument("--windows", default="", help="comma-separated SDE window widths W to compare with all K steps "
                                                 "(e.g. 2,4); empty = skip (Choices 6)")
    p.add_argument("--shared_prefix", action="store_true",
                   help="with --windows: also time each window with the group-shared ODE prefix (train.py "
                        "--shared_prefix)")
    p.add_argument("--ode_solver", default="euler", choices=sde.ODE_SOLVERS,
                   help="with --windows and --ode_steps: also time each window with this solver outside it")
    p.add_argument("--ode_steps", type=int, default=None,
                   help="with --windows: model calls of the solver for the steps outside each window (train.py's)")
    p.add_argument("--window_rounds", type=int, default=3, help="interleaved rounds of the window comparison")
    p.add_argument("--micro_batch_size", type=int, default=None,
                   help="micro-batch of the window comparison (default: the backbone preset's, or G)")
    p.add_argument("--compile", action="store_true",
                   help="time the first training setup without and with compile_repeated_blocks (Choices 8)")
    p.add_argument("--trace", action="store_true",
                   help="print a torch.profiler table of one training forward + backward (top 15 by device time)")
    p.add_argument("--ulysses_degree", type=int, default=1,
                   help="context parallelism (train.py's option): print the video tokens each process computes and "
                        "the bytes it receives per forward; timing it needs U x R GPUs (not built)")
    p.add_argument("--ring_degree", type=int, default=1, help="the same for ring attention (with U: U x R)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


def check_args(args) -> tuple[list[str], list[int]]:
    """Every option checked before any model is built; returns the modes (full first) and the window widths."""
    def fail(message):
        raise SystemExit(f"benchmark.py: {message}")

    if args.ulysses_degree < 1 or args.ring_degree < 1:
        fail("--ulysses_degree and --ring_degree must be >= 1")
    if args.attention_rounds < 1 or args.train_timesteps < 1 or args.window_rounds < 1 or args.optimizer_rounds < 0:
        fail("--attention_rounds, --train_timesteps and --window_rounds must be >= 1, --optimizer_rounds >= 0")
    if args.group_size < 1 or args.num_steps < 1:
        fail("--group_size and --num_steps must be >= 1")
    modes = args.modes.split(",")
    if any(m not in ("lora", "full") for m in modes):
        fail(f"--modes {args.modes!r}: comma-separated lora and/or full")
    for variant in args.train_variants.split(","):
        mb, _, ckpt = variant.partition(":")
        if not (mb.isdigit() and int(mb) >= 1 and args.group_size % int(mb) == 0
                and (ckpt in ("ckpt", "nockpt") or (ckpt.startswith("ckpt") and ckpt[4:].isdigit()))):
            fail(f"--train_variants {variant!r}: micro_batch:ckpt|ckptN|nockpt with micro_batch dividing "
                 f"--group_size {args.group_size} (e.g. 1:ckpt,1:ckpt20,1:nockpt)")
    try:
        widths = [int(w) for w in args.windows.split(",") if w.strip()]
    except ValueError:
        fail(f"--windows {args.windows!r}: comma-separated integers, e.g. 2,4")
    if any(not 1 <= w <= args.num_steps for w in widths):   # sage at eta 0.5: all K steps are stochastic
        fail(f"--windows {args.windows!r}: each width must be in 1..--num_steps ({args.num_steps})")
    if args.shared_prefix and not widths:
        fail("--shared_prefix needs --windows (it times the windows with a group-shared ODE prefix)")
    if args.ode_steps is not None and not (widths and all(1 <= args.ode_steps <= args.num_steps - w for w in widths)):
        fail(f"--ode_steps {args.ode_steps}: needs --windows, and 1 <= M <= K - W for every width (one run of "
             f"deterministic steps before each window)")
    mb = args.micro_batch_size
    if mb is not None and not (mb >= 1 and args.group_size % mb == 0):
        fail(f"--micro_batch_size {mb}: must divide --group_size {args.group_size}")
    return sorted(set(modes), key=("full", "lora").index), widths   # Choices 4: full first, then LoRA is added


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
    modes, widths = check_args(args)
    name = "hunyuan15" if args.model == "full" else args.model
    family, preset = backbones.module(name), backbones.preset(name)
    diffusers.utils.logging.set_verbosity_error()  # set_attention_backend warns "experimental" on every switch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "backbone": name,
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "args": vars(args)}
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
    if args.ulysses_degree * args.ring_degree > 1:  # training/parallel.py: arithmetic from the shapes, nothing is run
        U, R, D = args.ulysses_degree, args.ring_degree, model.proj_out.in_features
        C, rows = U * R, 2 * G   # processes per video; CFG doubles the rows of a forward
        blocks = sum(type(m).__name__ == family.BLOCK_CLASS for m in model.modules())
        # Ulysses: q, k, v in and the output back, each (S / C) x D per row, (U - 1) / U of it from other processes;
        # then ring: the keys and values of my heads (D / U) for all S tokens, (R - 1) / R of them from the ring
        per_row = 4 * tokens / C * D * (U - 1) / U + 2 * tokens * D / U * (R - 1) / R
        moved = per_row * dtype.itemsize * blocks * rows
        result["context_parallel"] = {"ulysses_degree": U, "ring_degree": R, "tokens_per_process": tokens / C,
                                      "received_bytes_per_forward": moved}
        print(f"context parallel U = {U}, R = {R}: {tokens / C:.0f} of {tokens} video tokens per process; each "
              f"receives {moved / 1e9:.2f} GB per {rows}-row forward ({dtype}, {blocks} blocks)", flush=True)

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
        last = mode == modes[-1]
        entry = result["modes"][mode] = {"trainable_params_m": sum(p.numel() for p in params) / 1e6}
        if args.optimizer_rounds:   # 4. AdamW vs Muon
            entry["optimizer_step_s"] = compare_optimizers(params, args.optimizer_rounds, device, mode)
        if widths and last:         # 5. the SDE window
            entry["windows"] = compare_windows(args, widths, family, model, params, preset, cond, negative, x_T,
                                               sigmas, device)
        # 2.-3. (and 6.) rollout, training setups, compile
        entry.update(measure(args, family, model, params, velocity_fn, x_T, gens, sigmas, per_video,
                             result["bf16_peak_tflops"], device, compile_last=args.compile and last))
        rollout, train_entry = entry["rollout"], entry["train"]
        if isinstance(train_entry, str):   # the headline variant ran out of memory
            line = f"rollout: {rollout['seconds_per_video']:.2f} s per video; training step: {train_entry}"
        else:
            line = (f"rollout: {rollout['seconds_per_video']:.2f} s per video ({K} steps, CFG batched); "
                    f"training step: {train_entry['seconds_per_step']:.1f} s ({K} timesteps x {G} samples, "
                    f"{train_entry['timed_timesteps']} timed and scaled); attention backend {best}"
                    + (f"; MFU rollout {100 * rollout['mfu']:.0f}%, train {100 * train_entry['mfu']:.0f}% of "
                       f"{result['bf16_peak_tflops']:.0f} TFLOP/s measured; peak memory "
                       f"{max(rollout['peak_memory_gib'], train_entry['peak_memory_gib']):.1f} GiB"
                       if device.type == "cuda" else ""))
        entry["line"] = line if modes == ["lora"] else f"[{mode}] {line}"
        if mode == "full":   # free the full-model gradients before LoRA is added
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


def compare_optimizers(params, rounds_n: int, device, mode: str) -> dict | str:
    """Median seconds of one AdamW step and one Muon (+ AdamW for the non-matrix rest) step on `params`, in
    interleaved rounds after one untimed step each (it allocates the optimizer state). Choices 7."""
    g = torch.Generator(device).manual_seed(0)
    for p in params:
        p.grad = 1e-3 * torch.randn(p.shape, generator=g, device=device, dtype=p.dtype)
    try:
        optimizers = {name: make_optimizers(params, name=name, lr=3e-4, weight_decay=1e-4) for name in ("adamw", "muon")}

        def step_s(name):
            sync(device)
            t = time.perf_counter()
            for optimizer in optimizers[name]:
                optimizer.step()
            sync(device)
            return time.perf_counter() - t

        for name in optimizers:
            step_s(name)
        times = {name: [] for name in optimizers}
        for _ in range(rounds_n):
            for name in optimizers:
                times[name].append(step_s(name))
    except torch.OutOfMemoryError:
        print(f"optimizer step [{mode}]: out of memory with both optimizers' state", flush=True)
        return "out of memory"
    finally:
        for p in params:
            p.grad = None
    out = {name: statistics.median(t) for name, t in times.items()}
    print(f"optimizer step [{mode}, {sum(p.numel() for p in params) / 1e6:.1f} M params]: adamw {out['adamw']:.4f} s, "
          f"muon {out['muon']:.4f} s (median of {rounds_n} interleaved); muon / adamw: "
          f"{out['muon'] / out['adamw']:.2f}", flush=True)
    return out


def compare_windows(args, widths, family, model, params, preset, cond, negative, x_T, sigmas, device) -> dict:
    """Median wall seconds per phase (rollout, anchor, train) of one iteration with all K steps stochastic vs
    SDE windows of the given widths (optionally with the group-shared prefix), and the rows each phase's
    forwards processed. Setups alternate within each round (Choices 6)."""
    G = x_T.shape[0]
    mb = args.micro_batch_size or preset["micro_batch_size"] or G
    stochastic = sde.step_variances(sigmas, KIND, ETA) > 0   # (K,)
    setups = {"full": (stochastic, False, None)}
    solver = f" {args.ode_solver} M={args.ode_steps}"
    for W in widths:   # train.py's window (a fixed --sde_window_start), at the last start (Choices 6)
        window = sde.window_mask(stochastic, int(stochastic.sum()) - W, W)   # (K,) bool
        setups[f"window {W}"] = (window, False, None)
        if args.ode_steps is not None:   # the K - W steps before the window by the solver in M calls
            setups[f"window {W}" + solver] = (window, False, args.ode_steps)
        if args.shared_prefix:
            setups[f"window {W} shared prefix"] = (window, True, None)
            if args.ode_steps is not None:
                setups[f"window {W} shared" + solver] = (window, True, args.ode_steps)
    if preset["gradient_checkpointing"]:   # as train.py with the preset
        family.enable_gradient_checkpointing(model)
    else:
        model.disable_gradient_checkpointing()
    optimizers = make_optimizers(params, name="adamw", lr=3e-4, weight_decay=1e-4)
    anchor = trust_region.MovingAnchor(model, anchor_every=0)
    anchor.step()   # one update behind: the anchor pass runs (Choices 6)
    timer = profiling.PhaseTimer(model, device, profile=True)
    A = torch.randn(G, generator=torch.Generator().manual_seed(0)).to(device)   # (G,)
    micro = [slice(i, i + mb) for i in range(0, G, mb)]
    velocity_for = lambda rows: backbones.velocity_fn(family, model, cond[rows], negative, preset["guidance"])

    def iteration(window, shared, ode_steps) -> dict:
        timer.reset()
        gens = [torch.Generator(device).manual_seed(i) for i in range(G)]
        x = x_T[::G].repeat_interleave(G, dim=0) if shared else x_T   # a group shares x_T, as in train.py
        model.eval()
        with timer("rollout"):
            traj = backbones.sample(family, model, cond, negative, x, gens, sigmas, KIND, ETA, preset["guidance"], mb,
                                    window, G if shared else 0, args.ode_solver, ode_steps)
        steps = grpo.select_timesteps(G, window, 1.0, torch.Generator().manual_seed(0)).to(device)   # (G, W)
        S = sde.equalizer_weights(sigmas, KIND, ETA, window).to(device)   # (K,)
        with timer("anchor"):
            mu_anchor = trust_region.anchor_means(anchor, velocity_for, traj, steps, KIND, ETA, micro, 1.0)
        model.train()
        with timer("train"):
            for j in range(steps.shape[1]):
                for rows in micro:
                    loss, _ = grpo.trained_step_loss(
                        velocity_for(rows), traj.rows(rows), steps[rows, j], A[rows], kind=KIND, eta=ETA, weight=S,
                        mu_anchor=mu_anchor[rows, j], lambda_kl=1e-7, beta_pos=1.0, beta_vel=0.1, clip_range=1e-4)
                    with timer.backward():
                        (loss / (steps.shape[1] * len(micro))).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        model.eval()
        return {"wall_s": dict(timer.wall), "rows": dict(timer.rows), "backwards": dict(timer.backwards)}

    iteration(*setups[f"window {min(widths)}" + (" shared prefix" if args.shared_prefix else "")])   # warm-up (Choices 6)
    rounds = {label: [] for label in setups}
    for _ in range(args.window_rounds):
        for label, setup in setups.items():
            rounds[label].append(iteration(*setup))
    timer.paused = True   # its hooks stay on the model; nothing later is counted
    phases = ("rollout", "anchor", "train")
    out = {}
    print(f"SDE window, K = {len(stochastic)}, G = {G}, micro-batch {mb}, gradient checkpointing "
          f"{preset['gradient_checkpointing']}: wall s per phase, median of {args.window_rounds} interleaved rounds",
          flush=True)
    print(f"  {'setup':<26}" + "".join(f"{p:>9}" for p in phases) + f"{'total':>9}   rows rollout/anchor/train")
    for label, runs in rounds.items():
        med = {p: statistics.median(r["wall_s"].get(p, 0.0) for r in runs) for p in phases}
        med["total"] = statistics.median(sum(r["wall_s"].get(p, 0.0) for p in phases) for r in runs)
        rows = {p: runs[-1]["rows"].get(p, 0) for p in phases}   # the same in every round
        out[label] = {"median_s": med, "rows": rows, "backwards": runs[-1]["backwards"].get("train", 0),
                      "rounds_s": [{p: r["wall_s"].get(p, 0.0) for p in phases} for r in runs]}
        print(f"  {label:<26}" + "".join(f"{med[p]:9.3f}" for p in phases) + f"{med['total']:9.3f}   "
              + "/".join(str(rows[p]) for p in phases), flush=True)
    full = out["full"]
    for label, entry in out.items():
        if label == "full":
            continue
        ratio = {p: entry["median_s"][p] / full["median_s"][p] for p in (*phases, "total")}
        entry["ratio_to_full"] = ratio
        print(f"{label} / full: {ratio['total']:.2f} (rollout {ratio['rollout']:.2f}, anchor {ratio['anchor']:.2f}, "
              f"train {ratio['train']:.2f}; training rows {entry['rows']['train']}/{full['rows']['train']})",
              flush=True)
    return out


def time_training(family, model, optimizers, params, velocity_fn, traj, steps, A, S, variant, timed, device,
                  trace=False) -> dict | str:
    """One training step of setup `variant` ("micro_batch:ckpt|ckptN|nockpt"): `timed` trained timesteps of
    every sample, forward + backward, scaled to K, plus one clipped optimizer step."""
    G, K = traj.latents.shape[0], len(traj.sigmas) - 1
    mb, ckpt = int(variant.split(":")[0]), variant.split(":")[1]
    if ckpt == "nockpt":
        model.disable_gradient_checkpointing()
    else:  # "ckpt" (all blocks) or "ckptN" (the first N)
        family.enable_gradient_checkpointing(model, int(ckpt[4:]) if ckpt[4:] else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def fwd_bwd(rows, j, scale):
        loss, _ = grpo.trained_step_loss(velocity_fn(rows), traj.rows(rows), steps[rows, j], A[rows], kind=KIND,
                                         eta=ETA, weight=S, mu_anchor=None, lambda_kl=1e-7, beta_pos=1.0,
                                         beta_vel=0.1, clip_range=1e-4)
        (loss / scale).backward()

    try:
        sync(device)
        t = time.perf_counter()
        fwd_bwd(slice(0, mb), 0, 1.0)   # untimed (Choices 3, 8)
        sync(device)
        warmup_s = time.perf_counter() - t
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        t = time.perf_counter()
        for j in range(timed):
            for i in range(0, G, mb):
                fwd_bwd(slice(i, i + mb), j, timed * G / mb)
        sync(device)
        fwd_bwd_s = time.perf_counter() - t
    except torch.OutOfMemoryError:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        return "out of memory"
    t = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    opt_s = time.perf_counter() - t
    train_s = fwd_bwd_s * K / timed + opt_s
    entry = {"seconds_per_step": train_s, "timed_timesteps": timed, "scaled_to": K, "optimizer_s": opt_s,
             "warmup_s": warmup_s, "tflops": None}
    if device.type == "cuda":
        entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if trace:   # where the time of one forward + backward goes
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            fwd_bwd(slice(0, mb), 0, 1.0)
            sync(device)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(f"trace: one forward + backward of train setup {variant}, top 15 by {sort}\n"
              + prof.key_averages().table(sort_by=sort, row_limit=15), flush=True)
    return entry


def measure(args, family, model, params, velocity_fn, x_T, gens, sigmas, per_video, peak, device,
            compile_last=False) -> dict:
    """Rollout of G videos, then the training variants (the first is the headline figure) for `params`, then
    with `compile_last` the first variant again without and with compile_repeated_blocks."""
    G, K = x_T.shape[0], len(sigmas) - 1
    optimizers = make_optimizers(params, name="adamw", lr=3e-4, weight_decay=1e-4)
    out = {}
    # 2. rollout: K steps of G videos, batched CFG
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        traj = sde.rollout(velocity_fn(slice(None)), x_T, sigmas, KIND, ETA, gens)
    sync(device)
    rollout_s = time.perf_counter() - t
    out["rollout"] = {"seconds": rollout_s, "seconds_per_video": rollout_s / G,
                      "tflops": K * G * per_video / rollout_s / 1e12}
    if device.type == "cuda":
        out["rollout"]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["rollout"]["mfu"] = out["rollout"]["tflops"] / peak

    # 3. training: the trained timesteps of every sample, forward + backward, then one optimizer step
    A = torch.randn(G, device=device)
    S = sde.equalizer_weights(sigmas, KIND, ETA).to(device)
    steps = grpo.select_timesteps(G, sde.step_variances(sigmas, KIND, ETA) > 0, 1.0,
                                  torch.Generator().manual_seed(0)).to(device)  # (G, K)
    timed = min(args.train_timesteps, steps.shape[1])
    train_flops = 3 * K * G * per_video  # forward + backward (2x), not crediting checkpoint recompute

    def run(variant, label, trace=False):
        entry = time_training(family, model, optimizers, params, velocity_fn, traj, steps, A, S, variant, timed,
                              device, trace)
        if isinstance(entry, dict):
            entry["tflops"] = train_flops / (entry["seconds_per_step"] - entry["optimizer_s"]) / 1e12
            if device.type == "cuda":
                entry["mfu"] = entry["tflops"] / peak
        print(f"train {label}: {json.dumps(entry)}", flush=True)
        return entry

    model.train()
    variants = args.train_variants.split(",")
    out["train_variants"] = {v: run(v, v, trace=args.trace and i == 0) for i, v in enumerate(variants)}
    out["train"] = out["train_variants"][variants[0]]
    if compile_last:   # 6. (Choices 8)
        off = run(variants[0], f"{variants[0]} compile off")
        model.compile_repeated_blocks(fullgraph=False)
        on = run(variants[0], f"{variants[0]} compile on")
        out["compile"] = {"off": off, "on": on}
        if isinstance(off, dict) and isinstance(on, dict):
            ratio = on["seconds_per_step"] / off["seconds_per_step"]
            out["compile"]["on_over_off"] = ratio
            print(f"compile_repeated_blocks: training step {on['seconds_per_step']:.2f} s on vs "
                  f"{off['seconds_per_step']:.2f} s off (on / off: {ratio:.2f}); first compiled forward + backward "
                  f"{on['warmup_s']:.1f} s", flush=True)
    model.eval()
    return out


if __name__ == "__main__":
    main()
