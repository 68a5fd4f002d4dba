"""Context (sequence) parallelism: one video's tokens over several processes, through diffusers' own engine.

With `--ulysses_degree U` and `--ring_degree R`, the processes form groups of C = U x R consecutive ranks. The
C processes of a group share one set of videos: the same prompts, noise, timesteps and advantages. Inside the
transformer diffusers' context-parallel hooks split the video tokens into C shards after the patch embedding
(the model's `_cp_plan`), attention runs as Ulysses all-to-all or ring attention (diffusers' attention
dispatcher, which defines their backward), and the output projection gathers the shards, so every process of
a group ends each forward with the whole velocity. Everything outside the transformer (the SDE step, the
log-probs, the loss) is computed identically on every process of a group; a video belongs to one data-parallel
rank, as without context parallelism (D = num_processes / C of them).

    rank r:  data-parallel rank r // C, context rank r % C        (the device mesh ("dp", "ring", "ulysses"))

Gradients. The gather's backward hands each process its shard's part of the output gradient, so each process of
a group holds a partial sum of the parameter gradients. DDP averages over all D x C processes; the loss is
scaled by C first (`loss_scale`), so the average is the mean over data-parallel ranks of the group sums: the
gradient of one process holding the whole video (tests/test_parallel.py: the adapter after two iterations equals
the one-process run's to float32 round-off, on both families).

Deviations / choices
--------------------
1. Wan2.1's plan is diffusers' (`WanTransformer3DModel._cp_plan`: the video tokens and the rotary tables split,
   the text not: the cross-attention keys are the whole prompt on every process). HunyuanVideo-1.5 has no plan
   in diffusers 0.42.1 and attends jointly over video and text tokens: models/hunyuan.py writes its plan
   (CP_PLAN) and its Ulysses and ring attention over the joint sequence (hunyuan.py Deviation 10).
2. diffusers' `_resolve_parallel_config` takes the device index as rank % torch.accelerator.device_count(),
   which divides by zero on a machine without an accelerator; `enable` makes the count at least 1 while it
   calls `enable_parallelism` on CPU (gloo), nowhere else. The mesh is passed in, so diffusers builds none.
3. The reward is computed once per group: each process scores every C-th video of the group's batch and the
   group exchanges the scores (`share_scores`), so a judge runs on N / C videos per process. Decoding runs on
   every process of a group (the VAE is not split).
4. Full fine-tuning with FSDP2 (configs/fsdp2_full.yaml) shards every weight over all D x C processes, the
   context dimension included: accelerate's FSDP2 plugin builds no mesh of its own (fully_shard over the whole
   world), which is also the smallest per-GPU memory. Its reduce-scatter averages the gradients over all D x C
   processes while each process of a group holds a partial sum (its tokens' share), so the loss is scaled by C
   (`loss_scale`), as under DDP: the result is the mean over data-parallel ranks of the group sums, the one-process
   gradient (tests/test_parallel.py: 2e-6 and 4e-6 of the largest gradient; without the scale, half). Sharding
   over the data dimension only would keep C copies of every shard and need a hand-written all-reduce over the
   group. diffusers' own mesh (ring, ulysses) is built by `enable` next to FSDP's: the two need no common mesh
   object. DeepSpeed is refused with context parallelism (its ZeRO partitions and reductions are not tested
   under it).
5. Validation: the validation prompts are split over the data-parallel ranks; a group samples its prompts
   together and only its context rank 0 writes the videos.
6. Ring attention (`--ring_degree`) through diffusers' dispatcher (Wan2.1) merges the partial attentions of the
   ring by their log-sum-exp, which diffusers' native attention does not return ("Native attention does not
   support return_lse=True"). On a GPU it needs a backend that does (flash, _native_cudnn, _native_flash, sage),
   named by DIFFUSERS_ATTN_BACKEND; anything else is refused before loading. On CPU (gloo: the tests, a laptop)
   `enable` sets the transformer's backend to `_native_flash` and gives the aten op it calls,
   `_scaled_dot_product_flash_attention`, which has no CPU kernel, one: torch's own CPU flash kernel
   (`_scaled_dot_product_flash_attention_for_cpu`, which returns the log-sum-exp) and its backward
   (`register_cpu_flash_attention`, one torch.library registration, CPU only). diffusers' ring code then runs
   unchanged, its backward included. Two side effects: `set_attention_backend` also makes `_native_flash`
   diffusers' process-wide active backend (nothing else in a Wan2.1 run dispatches through it), and diffusers'
   optional input checks (DIFFUSERS_ATTN_CHECKS=1) refuse it in float32, which the CPU runs use: leave them off
   there. HunyuanVideo-1.5's ring is written in models/hunyuan.py and needs no log-sum-exp. Ulysses runs on every
   backend that supports context parallelism, native included.
7. sample.py and evaluate.py take the same two options: a group samples its share of the videos together, its
   context rank 0 writes them (sample.py), and evaluate.py scores each video once per group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """Where this process sits: `dp_rank` of `dp_size` data-parallel ranks, `cp_rank` of the `cp_size` processes
    of its context-parallel group (cp_size 1 without context parallelism: then dp is the process index)."""

    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int


# Backends whose forward returns the log-sum-exp that ring attention merges by (diffusers 0.42.1; Deviations 6)
RING_BACKENDS = ("flash", "flash_hub", "_flash_3_hub", "_native_cudnn", "_native_flash", "sage", "sage_hub")


def check_ring(ring_degree: int, device_type: str, cp_plan=None) -> str | None:
    """None, or why ring attention cannot run here (Deviations 6). With diffusers' plan and attention (`cp_plan`
    None: Wan2.1) on a GPU, the active backend must return the log-sum-exp, which diffusers' default (native)
    does not; on CPU `enable` provides one. A family's own plan (HunyuanVideo-1.5) brings its own ring."""
    if ring_degree == 1 or cp_plan is not None or device_type == "cpu":
        return None
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    backend = _AttentionBackendRegistry.get_active_backend()[0].value
    if device_type != "cuda" or backend not in RING_BACKENDS:
        return (f"--ring_degree {ring_degree}: ring attention needs a CUDA GPU (or the CPU) and an attention backend "
                f"that returns the log-sum-exp; diffusers' active backend is {backend!r} on {device_type}: use "
                f"--ulysses_degree, or set DIFFUSERS_ATTN_BACKEND to one of {', '.join(RING_BACKENDS)} "
                f"(training/parallel.py Deviations 6)")
    return None


def launch_problem(world: int, ulysses_degree: int, ring_degree: int, device_type: str, cp_plan=None) -> str | None:
    """None, or why this launch cannot run the split: U x R must divide the processes, and ring attention needs
    what check_ring says (`cp_plan`: the family module's CP_PLAN). One check for train.py, sample.py and
    evaluate.py."""
    cp_size = ulysses_degree * ring_degree
    if world % cp_size:
        return (f"--ulysses_degree {ulysses_degree} x --ring_degree {ring_degree} = {cp_size} must divide the number "
                f"of processes ({world}): each group of {cp_size} processes shares one set of videos")
    return check_ring(ring_degree, device_type, cp_plan)


def layout(rank: int, world: int, ulysses_degree: int, ring_degree: int) -> Layout:
    cp_size = ulysses_degree * ring_degree
    return Layout(dp_rank=rank // cp_size, dp_size=world // cp_size, cp_rank=rank % cp_size, cp_size=cp_size)


def enable(model, ulysses_degree: int, ring_degree: int, world: int, device: torch.device, cp_plan=None):
    """Turns on diffusers' context parallelism on `model` (the bare transformer) over the mesh ("dp", "ring",
    "ulysses") of all processes, with `cp_plan` (the family module's CP_PLAN; None: the model class's own).
    Returns the mesh."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    cp_size = ulysses_degree * ring_degree
    mesh = init_device_mesh(device.type, (world // cp_size, ring_degree, ulysses_degree),
                            mesh_dim_names=("dp", "ring", "ulysses"))
    config = ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree, mesh=mesh)
    if ring_degree > 1 and cp_plan is None and device.type == "cpu":   # diffusers' ring on CPU (Deviations 6)
        register_cpu_flash_attention()
        model.set_attention_backend("_native_flash")
    count = torch.accelerator.device_count
    if device.type == "cpu":  # Deviations 2: diffusers computes rank % device_count(), 0 without an accelerator
        torch.accelerator.device_count = lambda: max(1, count())
    try:
        model.enable_parallelism(config=config, cp_plan=cp_plan)
    finally:
        torch.accelerator.device_count = count
    return mesh


_CPU_FLASH = []   # the torch.library registration of register_cpu_flash_attention, kept alive for the process


def register_cpu_flash_attention() -> None:
    """Gives aten's `_scaled_dot_product_flash_attention` and its backward a CPU kernel: torch's CPU flash
    attention, which computes the same attention and its log-sum-exp (B, heads, S) under another op name. The
    op's other outputs (sequence offsets, RNG state) matter only for variable-length batches and dropout, which
    diffusers' ring does not use; they are returned empty. Registered once per process (Deviations 6)."""
    if _CPU_FLASH:
        return

    def forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                             scale=scale)
        cum_seq_q, cum_seq_k, seed, offset, debug_mask = (query.new_empty(0) for _ in range(5))   # five, unaliased
        return out, lse, cum_seq_q, cum_seq_k, query.shape[2], key.shape[2], seed, offset, debug_mask

    def backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                 is_causal, philox_seed, philox_offset, *, scale=None):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, scale=scale)

    library = torch.library.Library("aten", "IMPL")
    library.impl("_scaled_dot_product_flash_attention", forward, "CPU")
    library.impl("_scaled_dot_product_flash_attention_backward", backward, "CPU")
    _CPU_FLASH.append(library)


def count_tokens(model, block_class: str) -> dict:
    """A forward pre-hook on the first attention of the first transformer block (the family's BLOCK_CLASS), which
    sees this process's shard: the returned dict's "tokens" is the number of video tokens per row that this
    process's transformer computed in its last forward (logged as cp/tokens_per_process)."""
    seen = {"tokens": 0}
    block = next(m for m in model.modules() if type(m).__name__ == block_class)
    attention = next(m for m in block.modules() if hasattr(m, "processor"))

    def hook(module, args, kwargs):
        seen["tokens"] = (args[0] if args else kwargs["hidden_states"]).shape[1]

    attention.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def group(mesh):
    """The process group of this process's context-parallel group (its C processes)."""
    return mesh["ring", "ulysses"]._flatten().get_group()


def loss_scale(lay: Layout) -> int:
    """What the loss is multiplied by before the backward: DDP averages the C partial gradients of a group over
    all processes, so C x the mean is the sum (module docstring)."""
    return lay.cp_size


def dedupe(gathered: torch.Tensor, lay: Layout) -> torch.Tensor:
    """accelerator.gather's result (all processes' rows, in rank order) without the C copies of each group:
    context rank 0's rows of every data-parallel rank, in data-parallel order."""
    if lay.cp_size == 1:
        return gathered
    return gathered.view(lay.dp_size, lay.cp_size, -1, *gathered.shape[1:])[:, 0].reshape(-1, *gathered.shape[1:])


def dedupe_list(gathered: list, lay: Layout) -> list:
    """The same for gather_object's list, where every process contributed the same number of items."""
    if lay.cp_size == 1:
        return gathered
    assert len(gathered) % (lay.dp_size * lay.cp_size) == 0, "every process must contribute as many items"
    n = len(gathered) // (lay.dp_size * lay.cp_size)
    return [x for d in range(lay.dp_size) for x in gathered[d * lay.cp_size * n : d * lay.cp_size * n + n]]


def share_scores(score_fn, videos, prompts, lay: Layout, process_group):
    """(N, 3) scores and {name: (N,)} diagnostics of a group's N videos, each video scored by one process of the
    group (every C-th, from its context rank on) and the results exchanged (Deviations 3). `score_fn(videos,
    prompts)` returns (n, 3) scores and {name: (n,)} on the CPU or the device."""
    if lay.cp_size == 1:
        return score_fn(videos, prompts)
    mine = list(range(lay.cp_rank, len(prompts), lay.cp_size))
    scores, diagnostics = score_fn(videos[mine], [prompts[i] for i in mine]) if mine else (None, {})
    part = (mine, None if scores is None else scores.cpu(), {k: v.cpu() for k, v in diagnostics.items()})
    parts = [None] * lay.cp_size
    dist.all_gather_object(parts, part, group=process_group)  # [dist] small: three numbers per video
    device = videos.device
    first = next(p for p in parts if p[1] is not None)
    all_scores = torch.empty(len(prompts), first[1].shape[1], dtype=first[1].dtype)
    all_diagnostics = {k: torch.empty(len(prompts), dtype=v.dtype) for k, v in first[2].items()}
    for rows, s, d in parts:
        if s is not None:
            all_scores[rows] = s
            for k, v in d.items():
                all_diagnostics[k][rows] = v
    return all_scores.to(device), {k: v.to(device) for k, v in all_diagnostics.items()}
