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
    add_lora(transformer, rank, alpha, targets="attn") -> params; enable_gradient_checkpointing(transformer,
    blocks=None); freeze_unreachable(transformer) -> names          (thin calls into this file)
    BLOCK_CLASS (FSDP wrap unit), LORA_TARGETS {--lora_targets choice: regex}, FAMILY (a human name),
    PIPELINE_CLASS (the model_index.json class of its Diffusers folders), VIDEO_FACTORS {name: (temporal, pixels
    per token side)}, HUB_IDS {name: hub id} for the models with downloadable weights, SUBFOLDERS (what a folder
    must hold); for the memory estimate TRANSFORMER_CLASS, BUILT_IN_CONFIGS {name: transformer config} of the
    backbones built in code, TEXT_LINEARS (regex: block Linears that see only text tokens), MIN_TEXT_TOKENS,
    RING_KEEPS_GATHERED (whether its ring attention keeps the gathered keys and values for the backward).

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
5. `find_weights` parses every *config.json of the folder's subfolders (and model_index.json) before anything
   loads: a damaged one is a one-line ValueError naming the file and the command that restores it, not a
   traceback after minutes of loading the weights before it. tokenizer.json / vocab files (megabytes) are not
   read here.
6. `check_memory` refuses a run whose memory FLOOR exceeds all of the device's memory (not what is free now):
   weights, trained state, rollout and one micro-batch's activations, estimated from the transformer config on
   the meta device (ACTIVATION_FLOOR below; measured floors 0.2-0.8 of what autograd keeps). A floor misses
   runs that will not fit (e.g. HunyuanVideo-1.5 at 33 x 320 x 576 without checkpointing: floor 65 GiB,
   measured 91 GiB), but never refuses one that would: a refusal must be certain.

Test: `python -m pytest tests/test_backbones.py tests/test_wan.py tests/test_hunyuan.py -q`.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from dataclasses import dataclass
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
        gradient_checkpointing=True,   # not in [SAGE]: needed to fit 80 GB (docs/performance.md)
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
        gradient_checkpointing=True,   # not in [SPG]: 32,760 tokens per video at 81 x 480 x 832 (docs/performance.md)
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
        gradient_checkpointing=True,   # not in [SPG]: a 14B full fine-tune needs it (docs/performance.md)
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
    return importlib.import_module(f"models.{_entry(name)[0]}")


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
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    config = read_config(path, _REPAIR)
    try:
        return float(config.get("shift", config.get("flow_shift", 1.0)))
    except (TypeError, ValueError):
        raise ValueError(f"{path}: 'shift' must be a number; {_REPAIR}") from None


def num_blocks(folder: str | None) -> int | None:
    """The transformer's number of DiT blocks from its config.json (None for the models built in code)."""
    if folder is None:
        return None
    path = os.path.join(folder, "transformer", "config.json")
    config = read_config(path, _REPAIR)
    if not isinstance(config.get("num_layers"), int) or config["num_layers"] < 1:
        raise ValueError(f"{path}: 'num_layers' must be a positive integer, got {config.get('num_layers')!r}; "
                         f"{_REPAIR}")
    return config["num_layers"]


# What to do about a damaged config file of a weights folder (find_weights names the exact command).
_REPAIR = "repair the file or download the folder again (hf download: docs/training.md, Weights)"


def read_config(path: str, fix: str) -> dict:
    """The JSON object in the file `path`, or a one-line ValueError that names the file, what is wrong with it
    and `fix` (what to do). Config files are small: reading one costs well under a millisecond."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; {fix}") from None
    except (OSError, ValueError) as err:   # unreadable, not UTF-8, not JSON (JSONDecodeError is a ValueError)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a readable JSON file ({reason}); {fix}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object {{...}}; {fix}")
    return config


def find_weights(name: str, pretrained: str | None) -> str:
    """A local folder holding `name`'s Diffusers layout, or a RuntimeError that names the problem and the
    download command (weights are never downloaded implicitly), or a ValueError naming a damaged config file
    (Deviations 5). A hub id is looked up in the local Hugging Face cache only (local_files_only: answers in
    milliseconds, never touches the network)."""
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
                      if getattr(importlib.import_module(f"models.{m}"), "PIPELINE_CLASS", None) == found]
            raise RuntimeError(
                f"--pretrained {pretrained!r} holds a {found} folder (backbone {' / '.join(others) or '?'}), but "
                f"--backbone {name} is {family.FAMILY} and needs a {family.PIPELINE_CLASS} folder "
                f"(e.g. {repo_default}): pass the matching --backbone or --pretrained")
        missing = [sub for sub in family.SUBFOLDERS if not os.path.isdir(os.path.join(root, sub))]
        problem = f"missing subfolders {missing}" if missing else None
    if problem is None:
        # Every config file the loaders will read must parse now, not after minutes of loading the weights
        # that come before it (Deviations 5). Only the small *config.json files: tokenizer.json is megabytes.
        repo = _repo_to_download(pretrained, repo_default)
        again = f"--local-dir {root}" if os.path.isdir(pretrained) else "--force-download"   # a folder / the cache
        for sub in family.SUBFOLDERS:
            for file in sorted(os.listdir(os.path.join(root, sub))):
                if file.endswith("config.json"):
                    read_config(os.path.join(root, sub, file),
                                f"repair the file or download the folder again: hf download {repo} {again}")
        return root
    repo = _repo_to_download(pretrained, repo_default)
    local = "checkpoints/" + name
    raise RuntimeError(
        f"{family.FAMILY} weights for --backbone {name} not found at {pretrained!r}: {problem}.\n"
        f"Download them once (this code never downloads implicitly):\n"
        f"    hf download {repo} --local-dir {local}\n"
        f"(older huggingface_hub: huggingface-cli download {repo} --local-dir {local})\n"
        f"then pass --pretrained {local}")


def _repo_to_download(pretrained: str, default: str) -> str:
    """The hub id a message tells the user to download for --pretrained: the value itself when it reads as one
    (owner/name), else the backbone's default. A relative path of the same shape is a folder, not a hub id, when its
    first part is an existing folder or the checkpoints/ folder the messages suggest (checkpoints/wan21-1.3b)."""
    first = pretrained.split("/")[0]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", pretrained) and first != "checkpoints" and not os.path.isdir(first):
        return pretrained
    return default


def _pipeline_class(root: str) -> str | None:
    """model_index.json's `_class_name` (the pipeline the folder was saved from), or None without one."""
    path = os.path.join(root, "model_index.json")
    if not os.path.isfile(path):
        return None
    fix = ("repair it, or delete it (a folder without model_index.json is judged by its subfolders alone), or "
           "download the folder again")
    found = read_config(path, fix).get("_class_name")
    if found is not None and not isinstance(found, str):
        raise ValueError(f"{path}: '_class_name' must be a pipeline class name, got {found!r}; {fix}")
    return found


# ----------------------------------------------------------------------------------------------------
# Memory: a floor estimated from the transformer config before any weights are read (Deviations 6)

# Bytes that autograd certainly keeps per video token, row and block, in units of hidden size x dtype size,
# not counting LoRA: the LayerNorm inputs, q / k / v and the attention output, the GELU input, the gated
# residual operands. Frozen Linears keep none of their inputs. Measured with saved-tensor hooks on one
# real-width block on CPU (576 tokens, LoRA r = 32 subtracted): 12 (float32) to 16 (bf16) for HunyuanVideo-1.5,
# 16 to 22 for Wan2.1 (bf16 keeps some float32 tensors: norms, rotary). 10 stays below all of them, so the
# estimate is a floor and a refusal is never a false one (tests/test_backbones.py checks it on the tiny models).
ACTIVATION_FLOOR = 10


@dataclass(frozen=True)
class MemoryEstimate:
    """A floor, in bytes, of one process's memory during a training step, in four parts (each a lower bound):

    weights      the frozen transformer in its dtype (LoRA runs; 0 with --full, where `trained` holds it)
    trained      each trained tensor 16 B per element: its float32 value, gradient, anchor copy and at least one
                 optimizer state (AdamW keeps two, Muon one); split over `shards` processes under FSDP / ZeRO
    rollout      the stored trajectory, latents and means (N, 2K+1, C, F', H', W') float32, and the decoded
                 videos (N, F, 3, H, W) float32, which stay alive through the update
    activations  what autograd keeps for one training micro-batch, forward to backward; `lora_activations` of it
                 are LoRA's (A's r outputs, and under bf16 peft's float32 copy of each adapted Linear's input)

    Left out: the VAE, the reward model, text encoders, allocator slack, the attention scores (no attention a run
    makes is masked, so torch's CPU and CUDA kernels never hold the (S, S) scores: 16,384 tokens x 2 heads kept
    12.7 MB on CPU, not 2 GiB) and Linear inputs under --full."""

    weights: int
    trained: int
    rollout: int
    activations: int
    lora_activations: int
    lines: dict[str, str]   # part -> what it holds and the options that drive it, for check_memory's message

    @property
    def total(self) -> int:
        return self.weights + self.trained + self.rollout + self.activations


def transformer_skeleton(name: str, folder: str | None) -> nn.Module:
    """The transformer of `name` built on the meta device from its config: every shape, no memory, no weights.
    The config is the family's built-in one for tiny / small / tiny-wan, else the folder's transformer/config.json
    (a config the class rejects is a one-line ValueError naming the file)."""
    family = module(name)
    if folder is None:
        config, path = family.BUILT_IN_CONFIGS[name], None
    else:
        path = os.path.join(folder, "transformer", "config.json")
        config = read_config(path, _REPAIR)
    try:
        with torch.device("meta"):
            return family.TRANSFORMER_CLASS.from_config(config)
    except Exception as err:   # a value of the wrong type or size: whatever the class raises
        raise ValueError(f"{path}: {family.TRANSFORMER_CLASS.__name__} cannot be built from it "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); {_REPAIR}") from None


def check_context_parallel(name: str, folder: str | None, *, num_frames: int, height: int, width: int,
                           ulysses_degree: int, ring_degree: int) -> None:
    """Raises a one-line ValueError when the transformer of `name` cannot run with this context-parallel split
    (training/parallel.py): a family without a plan, heads that `ulysses_degree` does not divide, or video tokens
    per row that the U x R shards cannot split evenly. Reads the config only."""
    if ulysses_degree * ring_degree == 1:
        return
    family = module(name)
    model = transformer_skeleton(name, folder)
    if (family.CP_PLAN or getattr(type(model), "_cp_plan", None)) is None:
        raise ValueError(f"--backbone {name}: {family.FAMILY}'s transformer has no context-parallel plan "
                         f"(training/parallel.py): leave --ulysses_degree and --ring_degree at 1")
    heads = model.config.num_attention_heads
    if heads % ulysses_degree:
        raise ValueError(f"--ulysses_degree {ulysses_degree} must divide the {heads} attention heads of --backbone "
                         f"{name} (each process of a Ulysses group takes heads / U of them)")
    temporal, pixels = family.VIDEO_FACTORS[name]
    tokens = ((num_frames - 1) // temporal + 1) * (height // pixels) * (width // pixels)
    if tokens % (ulysses_degree * ring_degree):
        raise ValueError(f"--ulysses_degree {ulysses_degree} x --ring_degree {ring_degree} must divide the {tokens} "
                         f"video tokens of --num_frames {num_frames} --height {height} --width {width}: change the "
                         f"clip size or the degrees")


def estimate_memory(name: str, folder: str | None, *, num_frames: int, height: int, width: int, num_steps: int,
                    batch_size: int, micro_batch_size: int, lora_rank: int, lora_targets: str, full: bool,
                    guidance: float, dtype: torch.dtype, gradient_checkpointing: bool,
                    checkpointed_blocks: int | None, shards: int = 1, context_parallel: int = 1,
                    ring_degree: int = 1) -> MemoryEstimate:
    """The MemoryEstimate of a training run with these (resolved) options, from the transformer's shapes alone
    (milliseconds for the tiny models, under 0.5 s for 14 B). `dtype` is the transformer's compute dtype (bf16
    under --mixed_precision bf16); `shards` the processes FSDP / DeepSpeed split the trained state over (1 for
    DDP or one process); `context_parallel` the processes one video's tokens are split over (U x R: each holds
    1 / U x R of the block activations, and the whole rollout), `ring_degree` R of them by ring attention."""
    family = module(name)
    model = transformer_skeleton(name, folder)
    temporal, pixels = family.VIDEO_FACTORS[name]
    # Both families patch time by 1, so a row carries one token per latent frame and pixels x pixels square.
    V = ((num_frames - 1) // temporal + 1) * (height // pixels) * (width // pixels)   # video tokens per row
    D, per_token = model.proj_out.in_features, model.proj_out.out_features   # hidden size; latent values per token
    blocks = sum(type(m).__name__ == family.BLOCK_CLASS for m in model.modules())
    item = dtype.itemsize   # bytes per activation value: bf16 2, float32 4

    # The trained tensors and, for LoRA, the Linear layers it adapts (with the tokens each one sees).
    P = sum(p.numel() for p in model.parameters())
    regex = lora_regex(family.LORA_TARGETS, lora_targets)
    adapted = [] if full else [(n, m) for n, m in model.named_modules()
                               if isinstance(m, nn.Linear) and re.fullmatch(regex, n)]
    L = sum(lora_rank * (m.in_features + m.out_features) for _, m in adapted)   # A (r x in) + B (out x r)
    weights = 0 if full else P * item // shards
    trained = (P if full else L) * 16 // shards

    N, K = batch_size, num_steps
    rollout = N * (2 * K + 1) * V * per_token * 4 + N * num_frames * 3 * height * width * 4

    # One micro-batch through the blocks: R rows (a video and, with CFG, its negative prompt).
    R = micro_batch_size * (2 if guidance > 1 else 1)
    copy = 4 if dtype != torch.float32 else 0   # peft casts a bf16 input to the float32 LoRA weights: a kept copy
    V_local = V // context_parallel   # the video tokens of one row that this process holds inside the blocks
    lora_per_row = sum((family.MIN_TEXT_TOKENS if re.fullmatch(family.TEXT_LINEARS, n) else V_local)
                       * (lora_rank * 4 + m.in_features * copy) for n, m in adapted) // blocks   # A's output (r)
    block = R * (V_local * ACTIVATION_FLOOR * D * item + lora_per_row)   # one block that keeps its activations
    checkpointed = (blocks if checkpointed_blocks is None else checkpointed_blocks) if gradient_checkpointing else 0
    # A checkpointed block keeps its input only, and the backward recomputes one block at a time.
    kept = blocks - checkpointed + (1 if checkpointed else 0)   # blocks whose activations are alive at the peak
    activations = kept * block + checkpointed * R * V_local * D * item
    # Ring attention gathers the keys and values of the whole row (their D / U channels under Ulysses): one block's
    # gathered copy at a time, or, where the family's ring keeps them for the backward, one per block that keeps its
    # activations (RING_KEEPS_GATHERED: hunyuan.py Deviation 10); beyond this process's own share, counted above.
    if ring_degree > 1:
        gathered = 2 * R * V * (D // (context_parallel // ring_degree)) * item * (ring_degree - 1) // ring_degree
        activations += gathered * (kept if family.RING_KEEPS_GATHERED else 1)

    size = f"--num_frames {num_frames} --height {height} --width {width}"
    lora = "--full" if full else f"--lora_rank {lora_rank} --lora_targets {lora_targets}"
    lines = {
        "activations": f"activations of one micro-batch {_gib(activations)} (--micro_batch_size {micro_batch_size} "
                       f"videos x {R // micro_batch_size} rows (CFG) x {V:,} tokens of {size}, "
                       f"{blocks - checkpointed} of {blocks} blocks not checkpointed"
                       + ("" if full else f"; LoRA's share {_gib(kept * R * lora_per_row)} at {lora}") + ")",
        "rollout": f"rollout {_gib(rollout)} (--batch_size {N} videos x {2 * K + 1} latents of --num_steps {K}, and "
                   f"the decoded videos of {size})",
        "trained": f"trained state {_gib(trained)} ({(P if full else L) / 1e6:,.1f} M parameters x 16 B, {lora})",
        "weights": f"weights {_gib(weights)} ({P / 1e6:,.1f} M parameters in {str(dtype).removeprefix('torch.')})",
    }
    return MemoryEstimate(weights=weights, trained=trained, rollout=rollout, activations=activations,
                          lora_activations=kept * R * lora_per_row, lines=lines)


# What lowers each part of a MemoryEstimate, for the message of check_memory. --micro_batch_size defaults to 1
# video on the real backbones and to the whole --batch_size on the CPU ones; --batch_size defaults to --group_size.
_REMEDY = {"activations": "lower --micro_batch_size (on the CPU backbones it defaults to --batch_size, which "
                          "defaults to --group_size), the clip size, or pass --gradient_checkpointing True",
           "lora_activations": "lower --lora_rank",
           "rollout": "lower --batch_size (default: --group_size), --num_steps or the clip size",
           "trained": "lower --lora_rank, or shard --full over more GPUs (configs/fsdp2_full.yaml)",
           "weights": "use --mixed_precision bf16 or a device with more memory"}


def check_memory(name: str, folder: str | None, *, device, **options) -> MemoryEstimate:
    """Refuses, before any weights load, a run whose memory floor (estimate_memory, same keyword options)
    exceeds all the memory of `device`: a ValueError of one line with the estimate, its largest parts and the
    options behind them, and what to lower. Returns the estimate. Devices other than CPU and CUDA pass."""
    estimate = estimate_memory(name, folder, **options)
    available = available_memory(device)
    if available is None or estimate.total <= available[0]:
        return estimate
    # The parts from the largest, leaving out those under 1 % of the total; the remedy is the largest one's
    # (LoRA's own, when the adapters' activations are most of the activations).
    parts = [p for p in sorted(estimate.lines, key=lambda p: -getattr(estimate, p))
             if getattr(estimate, p) >= estimate.total / 100]
    remedy = "lora_activations" if parts[0] == "activations" and \
        estimate.lora_activations > estimate.activations / 2 else parts[0]
    raise ValueError(
        f"--backbone {name} needs at least {_gib(estimate.total)} per process, more than the {_gib(available[0])} "
        f"of {available[1]}: {'; '.join(estimate.lines[p] for p in parts)}. To fit, {_REMEDY[remedy]} "
        f"(a floor estimated from the transformer config; docs/performance.md)")


def available_memory(device) -> tuple[int, str] | None:
    """(bytes, description) of all the memory of `device`, not what is free now: other tenants may come and go,
    and a refusal must be certain. CPU: the RAM (os.sysconf), or a smaller cgroup limit of this container;
    CUDA: the device's total (its properties; no model is created). None for other devices."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"{props.name} ({device})"
    if device.type != "cpu":
        return None
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):   # cgroup v2, v1
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdecimal() and int(limit) < ram:
            return int(limit), f"this container's memory limit ({path})"
    return ram, "this machine's RAM"


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:,.1f} MiB"


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


def lora_regex(table: dict[str, str], choice: str) -> str:
    """The family's LORA_TARGETS regex for the --lora_targets `choice`, or a one-line ValueError."""
    if choice not in table:
        raise ValueError(f"--lora_targets {choice!r}: choose one of {tuple(table)}")
    return table[choice]


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
    (docs/performance.md). Which blocks are chosen changes nothing else: they all cost the same.

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


def scheduler_from_config(config: dict):
    """A diffusers scheduler from a weights folder's scheduler config (its `_class_name`), fresh, so that a
    multistep scheduler's history starts empty."""
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"scheduler config names {config.get('_class_name')!r}, which is not a diffusers scheduler")
    return cls.from_config(config)


@torch.no_grad()
def pipeline_sample(family, backbone, model, embeds, negative, x_T, guidance: float, num_steps: int,
                    micro_batch: int) -> torch.Tensor:
    """The final latents (N, ...) as the family's diffusers pipeline samples them (sample.py --ode_solver
    pipeline): its scheduler and grid (family.pipeline_scheduler), the model at the timesteps the scheduler hands
    out, the scheduler's own step. The policy velocity (CFG inside) is the training one."""
    finals = []
    for i in range(0, len(embeds), micro_batch):
        scheduler = family.pipeline_scheduler(backbone, num_steps)  # fresh per batch: a multistep solver has a history
        v = velocity_fn(family, model, embeds[i:i + micro_batch], negative, guidance)
        x = x_T[i:i + micro_batch].float()
        for t in scheduler.timesteps:
            sigma = (t.double() / 1000).float().expand(len(x))  # the velocity sees timestep 1000 sigma = t
            x = scheduler.step(v(x, sigma), t, x, return_dict=False)[0]
        finals.append(x)
    return torch.cat(finals)


def velocity_fn(family, model, embeds, negative, guidance: float) -> Callable:
    """The policy velocity (x, sigma) -> v for one micro-batch of prompt embeddings, CFG inside.
    `negative` is the one-row negative-prompt embedding (cache.negative(1)), or None for no CFG; it is
    repeated to the micro-batch here, once, not at every step (Deviations 3)."""
    uncond = None if negative is None else negative.repeat_interleave(len(embeds))
    return lambda x, sigma: family.velocity(model, x, sigma, embeds, uncond, guidance)


def sample(family, model, embeds, negative, x_T, generators, sigmas, kind: str, eta: float, guidance: float,
           micro_batch: int, window: torch.Tensor | None = None, shared_prefix: int = 0, ode_solver: str = "euler",
           ode_steps: int | None = None) -> sde.Trajectory:
    """The micro-batched rollout (training rollouts and validation alike): `sde.rollout` of each run of
    `micro_batch` rows, joined. Row i's noise comes from generators[i] only, so the result does not depend
    on the micro-batch size. `window` (K,) bool makes only its steps stochastic (sde.py Deviations 5).

    shared_prefix = G > 0 (with a window that starts at step s > 0): the G rows of each group share x_T, so
    they share the deterministic ODE prefix up to the window too; it is computed once per group, on rows
    0, G, 2G, ..., and repeated (Deviations 4). The caller gives the group's rows the same x_T. The other rows'
    generators skip the draws the prefix would have made (sde_step draws noise on every step), so the result
    equals computing each row's prefix on its own (tested).

    ode_solver / ode_steps: the steps outside the window (all of them for kind "ode") are integrated by that solver
    in ode_steps model calls in all (sde.py Deviations 6); a shared prefix gets its share of the calls
    (sde.ode_calls), the rest the others."""
    start = int(torch.nonzero(window.cpu())[0]) if window is not None and shared_prefix else 0
    if start > 0:
        G = shared_prefix
        prefix_calls = rest_calls = None
        if ode_steps is not None:  # the calls of the whole rollout, shared as sde.rollout would share them
            runs = sde.ode_runs((~window.cpu()).tolist())
            prefix_calls = sde.ode_calls([b - a for a, b in runs], ode_steps)[0]  # runs[0] is the prefix [0, start)
            rest_calls = ode_steps - prefix_calls if len(runs) > 1 else None
        prefix = sample(family, model, embeds[::G], negative, x_T[::G], generators[::G], sigmas[: start + 1], "ode",
                        0.0, guidance, micro_batch, ode_solver=ode_solver, ode_steps=prefix_calls)
        prefix = prefix.rows(torch.arange(len(embeds) // G, device=x_T.device).repeat_interleave(G))  # (N, s+1, ...)
        for _ in range(start):  # the other members' noise streams advance as if they had run the prefix themselves
            [torch.randn(x_T.shape[1:], generator=g, device=g.device) for i, g in enumerate(generators) if i % G]
        rest = sample(family, model, embeds, negative, prefix.latents[:, -1], generators, sigmas[start:], kind, eta,
                      guidance, micro_batch, window[start:], ode_solver=ode_solver, ode_steps=rest_calls)
        return prefix.then(rest)
    return sde.Trajectory.cat([
        sde.rollout(velocity_fn(family, model, embeds[i:i + micro_batch], negative, guidance),
                    x_T[i:i + micro_batch], sigmas, kind, eta, generators[i:i + micro_batch], window,
                    ode_solver=ode_solver, ode_steps=ode_steps)
        for i in range(0, len(embeds), micro_batch)])
