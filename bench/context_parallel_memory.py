"""Per-process memory floors with context parallelism (training/parallel.py), from the transformer configs alone
(models/backbones.estimate_memory, the floor train.py checks before loading; no weights, CPU, seconds).

    python bench/context_parallel_memory.py

For HunyuanVideo-1.5 at 121 x 720 x 1280 and Wan2.1-14B at 81 x 720 x 1280, LoRA r = 32 under DDP, bf16, G = 4
videos per group, micro-batch 1 with CFG, and C = 1, 2, 4, 8 processes per video, split by Ulysses (U = C) or by
ring attention (R = C): the floor with every block checkpointed and with none; then full fine-tuning under FSDP2
on 8 and 64 GPUs (the trained state, 16 B per parameter, sharded over all of them: training/parallel.py
Deviations 4), every block checkpointed. A floor, not a
prediction: the VAE, the reward model, FSDP's gathered block weights and allocator slack come on top
(docs/performance.md). Also the bytes each process receives per forward, with C = U processes per video split
by Ulysses (4 all-to-alls: q, k, v and the output, 4 x S x D x 2 bytes x (U - 1) / U^2 per block) and with C = R
split by ring attention (the ring's keys and values gathered: 2 x S x D x 2 bytes x (R - 1) / R per block; both
diffusers' ring for Wan2.1 and models/hunyuan.py's). The backward moves as much again (diffusers' ring twice as
much: it gathers the keys and values again instead of keeping them). Ring attention holds the
gathered keys and values on top: one block's at a time, and for HunyuanVideo-1.5 one per block that keeps its
activations (hunyuan.py Deviation 10; estimate_memory's `ring_degree`)."""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from models import backbones, hunyuan, wan  # noqa: E402

GiB = 2**30
SETTINGS = [("hunyuan15", hunyuan, dict(task_type="t2v"), 121), ("wan21-14b", wan, wan.REAL_TRANSFORMER["wan21-14b"], 81)]

with tempfile.TemporaryDirectory() as root:
    print(f"{'':<40}{'floor, every block checkpointed':>32}{'floor, none checkpointed':>27}"
          f"{'received per forward':>25}")
    print(f"{'backbone':<11} {'clip':<16} {'tokens':>8} {'C':>2} {'Ulysses':>15} {'ring':>15} {'Ulysses':>12} "
          f"{'ring':>13} {'Ulysses':>11} {'ring':>12}")
    for name, family, config, frames in SETTINGS:
        folder = os.path.join(root, name)
        with torch.device("meta"):   # the config only: every shape, no memory
            model = family.TRANSFORMER_CLASS.from_config(config)
        model.save_config(os.path.join(folder, "transformer"))
        temporal, pixels = family.VIDEO_FACTORS[name]
        S = ((frames - 1) // temporal + 1) * (720 // pixels) * (1280 // pixels)
        D = model.proj_out.in_features
        blocks = sum(type(m).__name__ == family.BLOCK_CLASS for m in model.modules())
        for C in (1, 2, 4, 8):
            floors = [backbones.estimate_memory(
                name, folder, num_frames=frames, height=720, width=1280, num_steps=20, batch_size=4,
                micro_batch_size=1, lora_rank=32, lora_targets="attn", full=False, guidance=6.0,
                dtype=torch.bfloat16, gradient_checkpointing=checkpointing, checkpointed_blocks=None,
                context_parallel=C, ring_degree=ring).total / GiB
                for checkpointing in (True, False) for ring in (1, C)]
            ulysses = 4 * S * D * 2 * (C - 1) / C**2 * blocks * 2 / 1e9   # x 2: CFG doubles the rows of a forward
            ring = 2 * S * D * 2 * (C - 1) / C * blocks * 2 / 1e9   # the same C processes as a ring
            print(f"{name:<11} {f'{frames} x 720 x 1280':<16} {S:>8,} {C:>2} {floors[0]:>11.1f} GiB "
                  f"{floors[1]:>11.1f} GiB {floors[2]:>8.1f} GiB {floors[3]:>9.1f} GiB {ulysses:>8.1f} GB "
                  f"{ring:>9.1f} GB")

    print(f"\nfull fine-tuning, FSDP2 over all GPUs, every block checkpointed:\n{'backbone':<11} {'clip':<16} "
          f"{'U':>2} {'8 GPUs: floor':>15} {'64 GPUs: floor':>16}")
    for name, family, config, frames in SETTINGS:
        folder = os.path.join(root, name)
        for U in (1, 2, 4, 8):
            floors = [backbones.estimate_memory(
                name, folder, num_frames=frames, height=720, width=1280, num_steps=20, batch_size=4, micro_batch_size=1,
                lora_rank=32, lora_targets="attn", full=True, guidance=6.0, dtype=torch.bfloat16,
                gradient_checkpointing=True, checkpointed_blocks=None, shards=gpus, context_parallel=U).total / GiB
                for gpus in (8, 64)]
            print(f"{name:<11} {f'{frames} x 720 x 1280':<16} {U:>2} {floors[0]:>11.1f} GiB {floors[1]:>12.1f} GiB")
