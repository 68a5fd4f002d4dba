"""Where an iteration's time goes: wall time per phase, time inside transformer calls, their number, and
model FLOP utilisation. `train.py --profile` prints one table per iteration and appends it to profile.jsonl.

Definitions (docs/performance.md)
- phase: rollout, decode, reward, anchor, train, log, checkpoint (train.py's `with timer(...)` blocks).
- model s: time inside transformer forwards (forward hooks) and inside `accelerator.backward`.
- calls / bwd: transformer forwards / backward passes; rows: samples x CFG branches they processed.
- overhead: 1 - (all model time) / (iteration wall time), the last printed line.
- TFLOP/s and MFU (CUDA only): rows x FLOPs of one forward row (torch's FlopCounterMode, counted once on the
  first call's inputs), x3 in training (backward = 2 forwards; gradient checkpointing's recomputation is not
  credited), divided by model time and by the bf16 matmul throughput measured on the same device.

Deviations / choices
1. Without --profile the timer adds no hooks and no device syncs; wall times per phase are still logged
   (time/<phase> in metrics.jsonl), so on GPU they include queued work of earlier phases.
2. With --profile every phase boundary and model call synchronises the device, so GPU time lands in the
   phase that launched it; this costs a little throughput and is for measuring only.
3. The FLOP count runs one extra forward on one row, on every process (under FSDP a forward is collective).

Run: `python train.py --backbone small --max_steps 4 --validation_steps 0 --profile`; tested by the call
counts in `tests/test_train.py`.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch

from training import logs


class PhaseTimer:
    """Wall time per phase; with `profile`, also the time inside transformer calls, their number and the
    number of rows they processed (a row = one sample at one step for one CFG branch), with a device sync at
    every boundary so GPU time lands in the right phase. Without `profile` it adds no hooks and no syncs.

    Backward passes are timed around `accelerator.backward` (`timer.backward()`); their model time includes
    the small SDE-loss graph and, with gradient checkpointing, the recomputed block forwards."""

    def __init__(self, model: torch.nn.Module, device: torch.device, profile: bool):
        self.device, self.profile = device, profile
        self.reset()
        self.phase, self._t, self.example, self.paused = None, 0.0, None, False
        self.flops_per_row = self.peak_tflops = None  # measured at the first print_profile of this run
        if profile:
            model.register_forward_pre_hook(self._pre, with_kwargs=True)
            model.register_forward_hook(self._post)

    def reset(self):
        self.wall, self.model_time, self.calls, self.rows, self.backwards = {}, {}, {}, {}, {}

    def _sync(self):
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, module, args, kwargs):
        if self.paused:
            return
        if self.example is None:  # one row of the first call, for the FLOP count in print_profile
            self.example = {k: v[:1] if torch.is_tensor(v) and v.dim() else v for k, v in kwargs.items()}
        self.rows[self.phase] = self.rows.get(self.phase, 0) + kwargs["hidden_states"].shape[0]
        self._sync()
        self._t = time.perf_counter()

    def _post(self, module, args, output):
        if self.paused:
            return
        self._sync()
        self.model_time[self.phase] = self.model_time.get(self.phase, 0.0) + time.perf_counter() - self._t
        self.calls[self.phase] = self.calls.get(self.phase, 0) + 1

    @contextmanager
    def backward(self):
        """Around `accelerator.backward`: its time is model time, and it is counted."""
        if not self.profile:
            yield
            return
        self._sync()
        t = time.perf_counter()
        yield
        self._sync()
        self.model_time[self.phase] = self.model_time.get(self.phase, 0.0) + time.perf_counter() - t
        self.backwards[self.phase] = self.backwards.get(self.phase, 0) + 1

    @contextmanager
    def __call__(self, phase: str):
        self._sync()
        self.phase, t = phase, time.perf_counter()
        yield
        self._sync()
        self.wall[phase] = self.wall.get(phase, 0.0) + time.perf_counter() - t


def count_flops(fn) -> float:
    """FLOPs of fn() under no_grad, counted by torch's FlopCounterMode (matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return float(counter.get_total_flops())


def measured_bf16_peak(device) -> float:
    """TFLOP/s of an 8192^3 bf16 matmul on this device, the denominator of model FLOP utilisation."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):  # warm-up: clocks and cuBLAS heuristics
        a @ a
    torch.cuda.synchronize(device)
    t, n = time.perf_counter(), 10
    for _ in range(n):
        a @ a
    torch.cuda.synchronize(device)
    return 2 * 8192**3 * n / (time.perf_counter() - t) / 1e12


def print_profile(timer, total, accelerator, model, step, output_dir) -> None:
    """The --profile table for one iteration, also appended to profile.jsonl; last line `overhead: X% ...`."""
    if timer.flops_per_row is None and timer.example is not None:  # once per run, on every process (FSDP)
        timer.paused = True  # the FLOP count's own forward is not part of the iteration
        core = accelerator.unwrap_model(model)
        timer.flops_per_row = count_flops(lambda: core(**timer.example))
        timer.paused = False
    per_row = timer.flops_per_row or 0.0
    if not accelerator.is_main_process:
        return
    inside = sum(timer.model_time.values())
    cuda = accelerator.device.type == "cuda"
    if cuda and timer.peak_tflops is None:
        timer.peak_tflops = measured_bf16_peak(accelerator.device)
    record = {"step": step + 1, "total_s": total, "phases": {}}
    head = f"{'phase':<11}{'wall s':>9}{'model s':>9}{'ratio':>7}{'calls':>7}{'bwd':>5}{'rows':>7}"
    print(f"\nprofile step {step + 1}: {head}" + (f"{'TFLOP/s':>9}{'MFU':>7}" if cuda else ""))
    for phase, wall in timer.wall.items():
        m, rows = timer.model_time.get(phase, 0.0), timer.rows.get(phase, 0)
        calls, backwards = timer.calls.get(phase, 0), timer.backwards.get(phase, 0)
        flops = rows * per_row * (3 if phase == "train" else 1)  # forward + backward (2x) in training
        line = f"{'':>20}{phase:<11}{wall:9.3f}{m:9.3f}{m / wall if wall else 0:7.2f}{calls:7d}{backwards:5d}{rows:7d}"
        entry = {"wall_s": wall, "model_s": m, "calls": calls, "backwards": backwards, "rows": rows, "flops": flops}
        if cuda and m > 0:
            entry["tflops"] = flops / m / 1e12
            entry["mfu"] = entry["tflops"] / timer.peak_tflops
            line += f"{entry['tflops']:9.1f}{100 * entry['mfu']:6.1f}%"
        record["phases"][phase] = entry
        print(line)
    if cuda:
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak CUDA memory {record['peak_memory_gib']:.2f} GiB; bf16 matmul peak "
              f"{timer.peak_tflops:.0f} TFLOP/s (measured); forward {per_row / 1e12:.2f} TFLOP/row")
    else:
        import resource

        record["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"peak RSS {record['peak_memory_gib']:.2f} GiB")
    record["overhead"] = 1 - inside / total
    logs.append_jsonl(os.path.join(output_dir, "profile.jsonl"), record)
    print(f"overhead: {100 * record['overhead']:.1f}% of the iteration outside model calls")
