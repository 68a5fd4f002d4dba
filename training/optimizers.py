"""The optimizers of a run: AdamW, or Muon for the hidden matrices with AdamW for the rest ([SAGE] trains
with Muon). train.py builds them once (`make_optimizers`), each with its own learning-rate schedule.

Deviations / choices
--------------------
1. `--optimizer muon` follows [SAGE]'s choice of optimizer, with torch.optim.Muon (Newton-Schulz
   orthogonalised momentum) where [SAGE]'s code builds its own Muon (`hyvideo.optim.muon`). Muon takes the
   hidden matrices: every LoRA matrix, and in full fine-tuning the 2-D weights inside the transformer blocks
   (`hidden_matrices`); AdamW takes the rest: biases, norms, the patch, text and time embedders, the
   `nn.Embedding`s and the output layer `proj_out`, as Muon's authors prescribe ([SAGE]'s code splits by
   ndim >= 2 and so puts the embedders on Muon too). Each has its own LR schedule, saved and restored by
   accelerate. Muon's update is scaled to AdamW's RMS (`adjust_lr_fn="match_rms_adamw"`), so
   `--learning_rate` keeps its meaning. It runs with DDP and on one process; it is refused under FSDP
   (Muon would orthogonalise each process's shard, not the matrix) and DeepSpeed (one engine optimizer).

Test: `python -m pytest tests/test_train.py -q -k muon`.
"""
from __future__ import annotations

from typing import Optional

import torch


def make_optimizers(params: list, *, name: str, lr: float, weight_decay: float, muon_params: Optional[list] = None) -> list:
    """AdamW, or Muon for `muon_params` (default: every 2-D parameter) and AdamW for the rest (Deviations 1)."""
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
    as Muon's authors prescribe for the first and last layers (Deviations 1)."""
    blocks = [m for m in model.modules() if type(m).__name__ == block_class]
    return [p for block in blocks for p in block.parameters() if p.requires_grad and p.dim() == 2]
