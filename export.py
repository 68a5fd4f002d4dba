"""A run's weights in diffusers' formats, out and back in: the trained policy written so that diffusers' own
loaders read it, and any run, checkpoint or adapter file resolved and applied to a freshly loaded backbone.

What a run leaves (`save_weights`: LoRA in every checkpoint and at the end, at the output dir's root; full
fine-tuning at the end only, since its checkpoints already hold the weights in accelerate's training state)
    LoRA   pytorch_lora_weights.safetensors   keys `transformer.<module>.lora_A.weight` / `lora_B.weight`,
           safetensors metadata `lora_adapter_metadata` = the LoraConfig as JSON, keys prefixed `transformer.`
           (`transformer.r`, `transformer.lora_alpha`, `transformer.target_modules`, ...)
    full   transformer/config.json + diffusion_pytorch_model*.safetensors (save_pretrained, 10 GB shards + index)
The adapter is applied as W x + (alpha / r) B A x; without alpha in the file a loader assumes alpha = r.

Loading it (diffusers 0.42.1; the tests run each call against the trained velocity)
    Wan2.1             WanPipeline.from_pretrained(...).load_lora_weights(RUN, weight_name=LORA_FILE)
    HunyuanVideo-1.5   pipe.transformer.load_lora_adapter(RUN, weight_name=LORA_FILE)   (the pipeline has no
                       load_lora_weights; the default prefix "transformer" is the one this file carries)
    full fine-tuning   <TransformerClass>.from_pretrained(RUN, subfolder="transformer")

Deviations / choices
1. The adapter is written in the pipeline layout (`transformer.` prefix on keys and metadata), byte for byte
   what `WanPipeline.save_lora_weights` writes (tested), not `transformer.save_lora_adapter`'s unprefixed one:
   `WanPipeline.load_lora_weights` finds no key in an unprefixed file and loads nothing, with only a log line
   (measured), the very failure the export exists to remove. The writer is ours (a dozen lines) because
   HunyuanVideo-1.5 has no pipeline LoRA mixin to call.
2. Full fine-tuning: the full state dict is gathered on every process (`accelerator.get_state_dict`, a
   collective under FSDP2 / ZeRO-3) and the main process writes it through `save_pretrained` of a model built
   on the meta device and given those tensors (`assign=True`): one code path for one process, DDP and FSDP2,
   no second copy of the weights in memory. Weights keep the dtype they were trained in (float32 master
   weights, train.py Deviations 14); pass `dtype=torch.bfloat16` to `from_pretrained` to halve them.
3. Older checkpoints hold `lora.safetensors` (peft keys, no metadata). They still load: r and alpha come from
   the checkpoint's trainer_state.json, the targets from the family module, handed to diffusers'
   `load_lora_adapter(state_dict, metadata=...)`. An adapter file with neither metadata nor a run beside it is
   refused: its alpha is unknown and guessing alpha = r would silently change the policy.
4. A run folder resolves to its root export when there is one, else to its newest complete checkpoint
   (checkpoint.latest), so a LoRA run that is still training can be sampled; a full fine-tuning run can be
   sampled once it has finished (its export is written at the end).
5. Loaded LoRA weights are cast to float32, as backbones.add_lora trains them, so a bf16 transformer computes
   the same policy it was trained as.

Test: `python -m pytest tests/test_export.py -q`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

import backbones

LORA_FILE = "pytorch_lora_weights.safetensors"   # diffusers' LORA_WEIGHT_NAME_SAFE
OLD_LORA_FILE = "lora.safetensors"               # checkpoints written before this module existed
TRANSFORMER = "transformer"                      # full fine-tuning: the save_pretrained folder
PREFIX = "transformer"                           # the pipelines' name of the denoiser (diffusers' transformer_name)
METADATA_KEY = "lora_adapter_metadata"           # diffusers' LORA_ADAPTER_METADATA_KEY
ADAPTER = "policy"                               # the adapter name `load_policy` gives a loaded LoRA


@dataclass
class Weights:
    """What `resolve_weights` found. `run` holds the run's recorded options (backbone, seed, lora_rank, ...;
    {} for a bare file); `metadata` is the LoraConfig to hand diffusers for a file without one (Deviations 3)."""
    kind: str                   # "lora" or "full"
    path: str                   # the adapter file, or the transformer folder
    source: str                 # the run / checkpoint / file it came from, for messages
    run: dict = field(default_factory=dict)
    prefix: str | None = PREFIX  # key prefix of the adapter file (None: peft's own keys)
    metadata: dict | None = None


# ----------------------------------------------------------------------------------------------------
# Out


def save_weights(accelerator, model, folder: str, full: bool) -> None:
    """Writes the policy into `folder` in diffusers' format (module docstring). Call it on every process (the
    full state dict is gathered by a collective); only the main process writes."""
    core = accelerator.unwrap_model(model)  # [dist]
    if not full:
        if accelerator.is_main_process:  # [dist] DDP: every process holds the same adapter
            write_lora(core, folder)
        return
    state = accelerator.get_state_dict(model)  # [dist] collective under FSDP2 / ZeRO-3 (Deviations 2)
    if accelerator.is_main_process:  # [dist]
        with torch.device("meta"):  # the architecture only; its tensors are the gathered ones
            shell = _model_class(core).from_config(core.config)
        shell.load_state_dict(state, assign=True, strict=True)
        shell.save_pretrained(os.path.join(folder, TRANSFORMER), safe_serialization=True)


def write_lora(core, folder: str, adapter: str = "default") -> str:
    """The adapter `adapter` of `core` as LORA_FILE in `folder`, in the pipeline layout (Deviations 1)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(core, adapter_name=adapter)  # peft keys, adapter name removed
    tensors = {f"{PREFIX}.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in core.peft_config[adapter].to_dict().items()}
    metadata = {"format": "pt",  # as diffusers writes it: JSON, sorted keys, indent 2
                METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LORA_FILE)
    save_file(tensors, path, metadata=metadata)
    return path


def _model_class(core):
    """The model's own class: FSDP2's fully_shard swaps in a subclass (FSDP<Name>) that must not be rebuilt."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(core).__mro__ if not issubclass(c, FSDPModule))


# ----------------------------------------------------------------------------------------------------
# In


def resolve_weights(path: str) -> Weights:
    """A run folder, a checkpoint folder or an adapter .safetensors file -> what to load (Deviations 3, 4).
    Reads only small files (JSON, a safetensors header); raises ValueError naming what it looked for."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"{path!r} is a file but not a .safetensors adapter")
        return _lora_file(path, _recorded_options(os.path.dirname(path)), source=path)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} does not exist (a run folder, a checkpoint folder or a .safetensors file)")
    run = _recorded_options(path)
    if os.path.isfile(os.path.join(path, LORA_FILE)):
        return _lora_file(os.path.join(path, LORA_FILE), run, source=path)
    if os.path.isfile(os.path.join(path, TRANSFORMER, "config.json")):
        return Weights("full", os.path.join(path, TRANSFORMER), path, run, prefix=None)
    if os.path.isfile(os.path.join(path, OLD_LORA_FILE)):
        return _lora_file(os.path.join(path, OLD_LORA_FILE), run, source=path)
    import checkpoint  # here, not at the top: checkpoint.py imports this module

    newest = checkpoint.latest(os.path.join(path, checkpoint.CHECKPOINTS))
    if newest is not None:
        return resolve_weights(newest)
    raise ValueError(f"{path!r} holds no weights: looked for {LORA_FILE}, {TRANSFORMER}/, {OLD_LORA_FILE} and a "
                     f"complete {checkpoint.CHECKPOINTS}/checkpoint-<step>/ (a full fine-tuning checkpoint holds "
                     f"accelerate's training state only; {TRANSFORMER}/ is written at the end of the run: resume and "
                     f"finish it, or pass the run folder once it has finished)")


def read_adapter(folder: str) -> dict:
    """The adapter saved in a checkpoint folder, with peft's own keys (what set_peft_model_state_dict takes):
    LORA_FILE without its pipeline prefix, or OLD_LORA_FILE of a checkpoint from before exports."""
    from safetensors.torch import load_file

    if os.path.isfile(os.path.join(folder, LORA_FILE)):
        return {k.removeprefix(PREFIX + "."): v for k, v in load_file(os.path.join(folder, LORA_FILE)).items()}
    return load_file(os.path.join(folder, OLD_LORA_FILE))


def _recorded_options(folder: str) -> dict:
    """The run options recorded beside the weights: trainer_state.json's (a checkpoint) or config.json's (a run)."""
    import checkpoint  # here, not at the top: checkpoint.py imports this module

    for name, key in ((checkpoint.STATE, "config"), ("config.json", None)):
        file = os.path.join(folder, name)
        if os.path.isfile(file):
            with open(file) as f:
                saved = json.load(f)
            return dict(saved[key] if key else saved)
    return {}


def _lora_file(path: str, run: dict, source: str) -> Weights:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        header, keys = f.metadata() or {}, list(f.keys())
    if not keys or not all(".lora_" in k for k in keys):
        raise ValueError(f"{path!r} is not a LoRA adapter (expected keys like '...to_q.lora_A.weight')")
    prefix = PREFIX if all(k.startswith(PREFIX + ".") for k in keys) else None
    if METADATA_KEY in header:
        return Weights("lora", path, source, run, prefix)
    if not {"backbone", "lora_rank", "lora_alpha"} <= run.keys():  # Deviations 3
        raise ValueError(f"{path!r} has no {METADATA_KEY} and no run options beside it (trainer_state.json or "
                         f"config.json), so its alpha is unknown; pass the checkpoint or run folder instead")
    metadata = {"r": run["lora_rank"], "lora_alpha": run["lora_alpha"],
                "target_modules": backbones.module(run["backbone"]).LORA_TARGETS}
    if prefix is not None:
        metadata = {f"{prefix}.{k}": v for k, v in metadata.items()}
    return Weights("lora", path, source, run, prefix, metadata)


def load_policy(family, backbone, weights: Weights):
    """Applies `weights` to a freshly loaded `backbone` through diffusers' own API and returns the policy
    transformer: LoRA is added to backbone.transformer as adapter ADAPTER (remove it with
    `delete_adapters(ADAPTER)`); a full transformer replaces backbone.transformer, with the family's attention
    processors carried over (hunyuan.py's valid-token processor gives the same velocity faster)."""
    base = backbone.transformer
    if weights.kind == "full":
        device = next(base.parameters()).device
        policy = type(base).from_pretrained(weights.path)  # the dtype it was saved in (Deviations 2)
        policy.set_attn_processor(base.attn_processors)
        backbone.transformer = policy.to(device).eval().requires_grad_(False)
        return backbone.transformer
    if weights.metadata is None:  # diffusers reads r, alpha and the targets from the file's header
        base.load_lora_adapter(os.path.dirname(weights.path), weight_name=os.path.basename(weights.path),
                               prefix=weights.prefix, adapter_name=ADAPTER)
    else:  # Deviations 3: the file has no header; the metadata comes from the run
        from safetensors.torch import load_file

        base.load_lora_adapter(load_file(weights.path), prefix=weights.prefix, adapter_name=ADAPTER,
                               metadata=weights.metadata)
    for name, p in base.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()  # Deviations 5
    return base.requires_grad_(False)
