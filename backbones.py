"""A video generator family as a GRPO policy: the one table that maps a backbone name to its module and
preset, and what every family shares (LoRA, gradient checkpointing, the unreachable-parameter freeze, the
micro-batched rollout). No model is named outside this table and the family modules.

A family module (hunyuan.py, wan.py) exposes the same few names, with the same signatures:

    load_backbone(name, pretrained=None, device="cpu", dtype=torch.float32, seed=0) -> Backbone
        (.name, .transformer, .vae, .shift, ...); tiny models drawn from `seed` inside fork_rng
    latent_shape(backbone, num_frames, height, width) -> (C, F', H', W')
    PromptCache(backbone): cache(prompts) -> embeds (len, [rows], .repeat_interleave(n), type(embeds).cat),
        cache.negative(n), cache.offload_encoders()
    velocity(transformer, x, sigma, cond, uncond, guidance) -> v (N, C, F', H', W') float32, CFG in one forward
    decode(backbone, latents) -> frames (N, F, 3, H, W) float32 in [0, 1]
    add_lora(transformer, rank, alpha) -> params; enable_gradient_checkpointing(transformer, blocks=None);
    freeze_unreachable(transformer) -> names          (thin calls into this file)
    BLOCK_CLASS (FSDP wrap unit), LORA_TARGETS (regex), FAMILY (a human name), PIPELINE_CLASS (the
    model_index.json class of its Diffusers folders), VIDEO_FACTORS {name: (temporal, pixels per token side)},
    HUB_IDS {name: hub id} for the models with downloadable weights, SUBFOLDERS (what a folder must hold).

Adding a family = one module with those names + one line per backbone in BACKBONES.

Conventions: the same as sde.py (sigma 1 = noise, timestep = 1000 sigma, v = eps - x0); embeddings and
latents live on the transformer's device; `family` arguments are the module objects `module(name)` returns.

Deviations / choices
1. `check_request` knows the clip-size factors from the family module's VIDEO_FACTORS, not from the VAE
   config, so a wrong size is refused in milliseconds, with no weights present. A test per family checks
   the constants against the built VAE / transformer.
2. A weights folder of the other family is recognised by its model_index.json `_class_name`; a folder
   without that file (the parts saved one by one) is accepted and judged by its subfolders only.
3. The negative prompt's embeddings are repeated once per micro-batch (in `velocity_fn`), not per step.
4. With a shared prefix, the prefix's forwards run on N / G rows, micro-batched like the rest; the prefix
   is a plain ODE, so its rows carry no log-prob and nothing in them is trained.

Test: `python -m pytest tests/test_backbones.py tests/test_wan.py tests/test_hunyuan.py -q`.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

import sde

BACKBONES: dict[str, tuple[str, dict]] = {
    "hunyuan15": ("hunyuan", dict(
        num_frames=81,            # [SAGE] 81 frames
        height=352, width=624,    # [SAGE] 352 x 624
        fps=24,                   # [SAGE] HunyuanVideo-1.5's native 24 fps (its model card; the paper states none)
        num_steps=20,             # [SAGE] K = 20
        micro_batch_size=1,       # not in [SAGE]: one video (2 CFG rows) per forward bounds activation memory
        reward="videoalign",      # [SAGE] VideoAlign VQ / MQ / TA
        gradient_checkpointing=True,   # not in [SAGE]: needed to fit 80 GB (configs/MEMORY.md)
        guidance=6.0,             # [SAGE] CFG 6
        curriculum_tau="0.70,0.68",    # [SPG] thresholds for HunyuanVideo
        shift=None,               # [SAGE] shift 5, read from the 480p scheduler config
        full_learning_rate=1e-5,  # [SAGE] lr 1e-5 (full fine-tune)
    )),
    "wan21-1.3b": ("wan", dict(
        num_frames=81,            # [SPG] Wan2.1-1.3B: 81 frames
        height=480, width=832,    # [SPG] 480 x 832
        fps=16,                   # [SPG] 16 fps
        num_steps=20,             # [SAGE] K = 20 ([SPG] gives no K for Wan; DanceGRPO's Wan script uses 20)
        micro_batch_size=1,       # not in [SPG]: one video (2 CFG rows) per forward bounds activation memory
        reward="videoalign",      # [SPG] VideoAlign components
        gradient_checkpointing=True,   # not in [SPG]: 32,760 tokens per video at 81 x 480 x 832 (MEMORY.md)
        guidance=5.0,             # [SPG] uses Wan2.1's default CFG 5.0 (WanPipeline guidance_scale)
        curriculum_tau="0.75,0.75",    # [SPG] thresholds for Wan2.1-1.3B
        shift=3.0,                # Wan2.1 T2V 480p flow shift 3 (the hub scheduler's flow_shift; [SPG] states none)
        full_learning_rate=5e-6,  # [SPG] lr 5e-6 (full fine-tune)
    )),
    "wan21-14b": ("wan", dict(
        num_frames=53,            # [SPG] Wan2.1-14B: 53 frames
        height=240, width=416,    # [SPG] 240 x 416
        fps=16,                   # [SPG] 16 fps
        num_steps=20,             # [SAGE] K = 20 ([SPG] gives no K for Wan)
        micro_batch_size=1,       # not in [SPG]: one video (2 CFG rows) per forward bounds activation memory
        reward="videoalign",      # [SPG] VideoAlign components
        gradient_checkpointing=True,   # not in [SPG]: a 14B full fine-tune needs it (MEMORY.md)
        guidance=5.0,             # [SPG] Wan2.1 default CFG 5.0
        curriculum_tau="0.75,0.73",    # [SPG] thresholds for Wan2.1-14B
        shift=3.0,                # Wan2.1 T2V 480p-and-below flow shift 3 ([SPG] states none)
        full_learning_rate=5e-6,  # [SPG] lr 5e-6 (as for 1.3B; no separate 14B value is given)
    )),
    "tiny": ("hunyuan", dict(
        num_frames=5, height=32, width=32,   # CPU size (not a paper value): latent 4 x 3 x 8 x 8
        fps=8,                    # CPU size: only the saved GIFs use it
        num_steps=4,              # [SAGE] K = 20 cut to 4 for CPU
        micro_batch_size=None,    # CPU: the whole batch in one forward
        reward="proxy",           # CPU: no reward model, rewards.py proxy
        gradient_checkpointing=False,  # CPU: nothing to save
        guidance=6.0,             # [SAGE] CFG 6
        curriculum_tau="0.70,0.68",    # [SPG] HunyuanVideo thresholds
        shift=None,               # [SAGE] tiny scheduler shift 3 (hunyuan.py)
        full_learning_rate=1e-5,  # [SAGE] lr 1e-5
    )),
    "small": ("hunyuan", dict(
        num_frames=9, height=64, width=64,   # CPU-profile size (not a paper value): latent 16 x 5 x 16 x 16
        fps=8,                    # CPU size: only the saved GIFs use it
        num_steps=8,              # [SAGE] K = 20 cut to 8 for CPU
        micro_batch_size=None,    # CPU: the whole batch in one forward
        reward="proxy",           # CPU: rewards.py proxy
        gradient_checkpointing=False,  # CPU: nothing to save
        guidance=6.0,             # [SAGE] CFG 6
        curriculum_tau="0.70,0.68",    # [SPG] HunyuanVideo thresholds
        shift=None,               # [SAGE] tiny scheduler shift 3 (hunyuan.py)
        full_learning_rate=1e-5,  # [SAGE] lr 1e-5
    )),
    "tiny-wan": ("wan", dict(
        num_frames=5, height=32, width=32,   # CPU size (not a paper value): latent 16 x 2 x 4 x 4
        fps=16,                   # [SPG] 16 fps (Wan)
        num_steps=4,              # [SAGE] K = 20 cut to 4 for CPU
        micro_batch_size=None,    # CPU: the whole batch in one forward
        reward="proxy",           # CPU: rewards.py proxy
        gradient_checkpointing=False,  # CPU: nothing to save
        guidance=5.0,             # [SPG] Wan2.1 CFG 5.0
        curriculum_tau="0.75,0.75",    # [SPG] Wan2.1-1.3B thresholds
        shift=3.0,                # as wan21-1.3b (the tiny scheduler's shift is 3 too)
        full_learning_rate=5e-6,  # [SPG] lr 5e-6
    )),
}
NAMES = tuple(BACKBONES)


def _entry(name: str) -> tuple[str, dict]:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {NAMES}")
    return BACKBONES[name]


def module(name: str):
    """The family module of backbone `name` (imported on first use: each pulls in its own model classes)."""
    return importlib.import_module(_entry(name)[0])


def preset(name: str) -> dict:
    """A copy of the backbone's train.py Config defaults (the caller may change it freely)."""
    return dict(_entry(name)[1])


# ----------------------------------------------------------------------------------------------------
# Checks that need no weights


def check_video_size(temporal: int, pixels: int, num_frames: int, height: int, width: int) -> None:
    """Raise a ValueError with valid examples unless F = temporal k + 1 and H, W are multiples of `pixels`
    (VAE spatial factor x transformer patch size: one token per `pixels` x `pixels` square)."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"num_frames must be {temporal}k+1 (e.g. {8 * temporal + 1}, {20 * temporal + 1}, "
                         f"{30 * temporal + 1}); got {num_frames}")
    if height % pixels or width % pixels or height < pixels or width < pixels:
        raise ValueError(f"height and width must be positive multiples of {pixels} (e.g. {30 * pixels}x"
                         f"{52 * pixels}); got {height}x{width}")


def check_request(name: str, pretrained: str | None, num_frames: int, height: int, width: int) -> str | None:
    """Everything about a request that can be checked without reading weights (milliseconds, no model):
    the backbone name, the clip size for its family, and for a real model the weights folder (present,
    complete, of this family). Returns the folder (None for the models built in code)."""
    family = module(name)
    check_video_size(*family.VIDEO_FACTORS[name], num_frames, height, width)
    if name not in family.HUB_IDS:   # tiny / small: built from configs, nothing to find
        return None
    return find_weights(name, pretrained)


def default_shift(name: str, folder: str | None) -> float:
    """The SD3 shift a run uses when --shift is not given, read without a model: the preset's, else the
    scheduler config of the weights folder, else (the tiny models) their schedulers' 3.0."""
    shift = _entry(name)[1]["shift"]
    if shift is not None:
        return shift
    if folder is None:
        return 3.0  # hunyuan.py's tiny and small backbones
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    return float(config.get("shift", config.get("flow_shift", 1.0)))


def num_blocks(folder: str | None) -> int | None:
    """The transformer's number of DiT blocks from its config.json (None for the models built in code)."""
    if folder is None:
        return None
    with open(os.path.join(folder, "transformer", "config.json")) as f:
        return int(json.load(f)["num_layers"])


def find_weights(name: str, pretrained: str | None) -> str:
    """A local folder holding `name`'s Diffusers layout, or a RuntimeError that names the problem and the
    download command (weights are never downloaded implicitly). A hub id is looked up in the local
    Hugging Face cache only (local_files_only: answers in milliseconds, never touches the network)."""
    family = module(name)
    repo_default = family.HUB_IDS[name]
    pretrained = pretrained or repo_default
    if os.path.isdir(pretrained):
        root, problem = pretrained, None
    else:
        import huggingface_hub
        try:
            root, problem = huggingface_hub.snapshot_download(pretrained, local_files_only=True), None
        except Exception as err:   # not cached, offline, or not a valid repo id / path
            root, problem = None, f"not a folder and not in the Hugging Face cache ({type(err).__name__})"
    if root is not None:
        found = _pipeline_class(root)
        if found is not None and found != family.PIPELINE_CLASS:   # Deviations 2
            others = [n for n, (m, _) in BACKBONES.items()
                      if getattr(importlib.import_module(m), "PIPELINE_CLASS", None) == found]
            raise RuntimeError(
                f"--pretrained {pretrained!r} holds a {found} folder (backbone {' / '.join(others) or '?'}), but "
                f"--backbone {name} is {family.FAMILY} and needs a {family.PIPELINE_CLASS} folder "
                f"(e.g. {repo_default}): pass the matching --backbone or --pretrained")
        missing = [sub for sub in family.SUBFOLDERS if not os.path.isdir(os.path.join(root, sub))]
        problem = f"missing subfolders {missing}" if missing else None
    if problem is None:
        return root
    repo = pretrained if re.fullmatch(r"[\w.-]+/[\w.-]+", pretrained) else repo_default
    local = "checkpoints/" + name
    raise RuntimeError(
        f"{family.FAMILY} weights for --backbone {name} not found at {pretrained!r}: {problem}.\n"
        f"Download them once (this code never downloads implicitly):\n"
        f"    hf download {repo} --local-dir {local}\n"
        f"(older huggingface_hub: huggingface-cli download {repo} --local-dir {local})\n"
        f"then pass --pretrained {local}")


def _pipeline_class(root: str) -> str | None:
    """model_index.json's `_class_name` (the pipeline the folder was saved from), or None without one."""
    path = os.path.join(root, "model_index.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("_class_name")


# ----------------------------------------------------------------------------------------------------
# Shared model plumbing (one copy for every family)


def keep_in_fp32(model: nn.Module, dtype: torch.dtype) -> None:
    """Casts `model` to `dtype` except the parameters diffusers' from_pretrained keeps in float32: those
    whose dotted name has a component in the class's `_keep_in_fp32_modules`. For models built from a
    config (tiny ones), so they carry the same dtypes as a loaded checkpoint."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keep & set(name.split(".")) else dtype)


def add_lora(transformer, targets: str, rank: int, alpha: int) -> list[nn.Parameter]:
    """Freezes the transformer and adds gaussian-init LoRA (B = 0, so the policy starts unchanged) to the
    Linear layers whose full name matches the regex `targets`. Returns the trainable parameters, in float32:
    a bf16 weight has 8 mantissa bits, so an AdamW update below 1/256 of the weight would be lost; peft
    casts the input to the LoRA dtype and the sum back to the layer's dtype."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=targets))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def enable_gradient_checkpointing(transformer, block_list: nn.ModuleList, blocks: int | None = None) -> None:
    """Gradient checkpointing of the first `blocks` of `block_list` (None or all: diffusers'
    `enable_gradient_checkpointing()` itself). A checkpointed block keeps only its inputs for the backward
    and runs its forward again there; the others keep their activations. So each block left out saves one
    block forward per backward (about 1/3 of its training compute) and costs its activation memory
    (configs/MEMORY.md). Which blocks are chosen changes nothing else: they all cost the same.

    The choice is an attribute on each block, not a set of block objects, because a wrapper that replaces
    the blocks (FSDP1 auto-wrap) still forwards attribute reads to the block inside."""
    core = getattr(transformer, "module", transformer)
    total = len(block_list)
    blocks = total if blocks is None else blocks
    if not 1 <= blocks <= total:
        raise ValueError(f"--checkpointed_blocks {blocks}: this transformer has {total} blocks; choose 1..{total}")
    if blocks == total:
        core.enable_gradient_checkpointing()
        return
    for i, block in enumerate(block_list):
        block.recompute_in_backward = i < blocks

    def checkpoint_chosen(block, *args):   # diffusers calls this for every block when grad is enabled
        if getattr(block, "recompute_in_backward", True):
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    core.enable_gradient_checkpointing(checkpoint_chosen)


def freeze_unreachable(transformer, probe: Callable[[nn.Module], torch.Tensor]) -> list[str]:
    """Freezes the trainable parameters no gradient can reach, and returns their names.

    `probe(core)` runs one small differentiable forward that exercises every input path (the family
    module builds it). A parameter left without a gradient by its backward feeds nothing the output depends
    on: DDP rejects such parameters ("parameters that were not used in producing loss") and FSDP2's
    checkpoint loader rejects the holes they leave in the optimizer state."""
    core = getattr(transformer, "module", transformer)
    with torch.enable_grad():
        probe(core).square().mean().backward()
    dead = [(n, p) for n, p in core.named_parameters() if p.requires_grad and p.grad is None]
    for p in core.parameters():
        p.grad = None
    for _, p in dead:
        p.requires_grad_(False)
    return [n for n, _ in dead]


VALIDATION = -1  # the "step" of validation and sample.py noise: prompt i with seed s gives the same video in both


def derive_seed(*parts) -> int:
    """A stable 62-bit seed from a tuple of ints/strings (Python's hash() of a str changes per process)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def rollout_generators(seed: int, step: int, first_index: int, n: int, device) -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, step, global sample index): a sample's x_T and every later
    noise draw come from its own generator, so it is the same whatever the process count, the micro-batch
    size or an interruption and resume."""
    return [torch.Generator(device).manual_seed(derive_seed(seed, step, first_index + i)) for i in range(n)]


def initial_noise(generators: list[torch.Generator], latent: tuple, device) -> torch.Tensor:
    """x_T (N, C, F', H', W'): row i drawn from generators[i] (which then carries on to the SDE noise)."""
    return torch.stack([torch.randn(latent, generator=g, device=g.device) for g in generators]).to(device)


def velocity_fn(family, model, embeds, negative, guidance: float) -> Callable:
    """The policy velocity (x, sigma) -> v for one micro-batch of prompt embeddings, CFG inside.
    `negative` is the one-row negative-prompt embedding (cache.negative(1)), or None for no CFG; it is
    repeated to the micro-batch here, once, not at every step (Deviations 3)."""
    uncond = None if negative is None else negative.repeat_interleave(len(embeds))
    return lambda x, sigma: family.velocity(model, x, sigma, embeds, uncond, guidance)


def sample(family, model, embeds, negative, x_T, generators, sigmas, kind: str, eta: float, guidance: float,
           micro_batch: int, window: torch.Tensor | None = None, shared_prefix: int = 0) -> sde.Trajectory:
    """The micro-batched rollout (training rollouts and validation alike): `sde.rollout` of each run of
    `micro_batch` rows, joined. Row i's noise comes from generators[i] only, so the result does not depend
    on the micro-batch size. `window` (K,) bool makes only its steps stochastic (sde.py Deviations 5).

    shared_prefix = G > 0 (with a window that starts at step s > 0): the G rows of each group share x_T, so
    they share the deterministic ODE prefix up to the window too; it is computed once per group, on rows
    0, G, 2G, ..., and repeated (Deviations 4). The caller gives the group's rows the same x_T. The other rows'
    generators skip the draws the prefix would have made (sde_step draws noise on every step), so the result
    equals computing each row's prefix on its own (tested)."""
    start = int(torch.nonzero(window.cpu())[0]) if window is not None and shared_prefix else 0
    if start > 0:
        G = shared_prefix
        prefix = sample(family, model, embeds[::G], negative, x_T[::G], generators[::G], sigmas[: start + 1], "ode",
                        0.0, guidance, micro_batch)
        prefix = prefix.rows(torch.arange(len(embeds) // G, device=x_T.device).repeat_interleave(G))  # (N, s+1, ...)
        for _ in range(start):  # the other members' noise streams advance as if they had run the prefix themselves
            [torch.randn(x_T.shape[1:], generator=g, device=g.device) for i, g in enumerate(generators) if i % G]
        rest = sample(family, model, embeds, negative, prefix.latents[:, -1], generators, sigmas[start:], kind, eta,
                      guidance, micro_batch, window[start:])
        return prefix.then(rest)
    return sde.Trajectory.cat([
        sde.rollout(velocity_fn(family, model, embeds[i:i + micro_batch], negative, guidance),
                    x_T[i:i + micro_batch], sigmas, kind, eta, generators[i:i + micro_batch], window)
        for i in range(0, len(embeds), micro_batch)])
