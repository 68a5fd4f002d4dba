"""A run's weights in diffusers' formats, out and back in: the trained policy written so that diffusers' own
loaders (and peft's) read it, and any run, checkpoint or adapter file resolved and applied to a freshly loaded
backbone.

What a run leaves (`save_weights`: LoRA in every checkpoint and at the end, at the output dir's root; full
fine-tuning at the end only, since its checkpoints already hold the weights in accelerate's training state)
    LoRA   pytorch_lora_weights.safetensors   keys `transformer.<module>.lora_A.weight` / `lora_B.weight`,
           safetensors metadata `lora_adapter_metadata` = the LoraConfig as JSON, keys prefixed `transformer.`
           (`transformer.r`, `transformer.lora_alpha`, `transformer.target_modules`, ...)
           peft/adapter_config.json + peft/adapter_model.safetensors   the same adapter in peft's layout
           (keys `base_model.model.<module>.lora_A.weight`), what `PeftModel.save_pretrained` writes (Deviations 6)
    full   transformer/config.json + diffusion_pytorch_model*.safetensors (save_pretrained, 10 GB shards + index)
The adapter is applied as W x + (alpha / r) B A x; without alpha in the file a loader assumes alpha = r.
Every file is readable as the user's umask allows, like the run's other files (Deviations 7).

Loading it (diffusers 0.42.1, peft 0.21.2; the tests run each call against the trained velocity)
    Wan2.1             WanPipeline.from_pretrained(...).load_lora_weights(RUN, weight_name=LORA_FILE)
    HunyuanVideo-1.5   pipe.transformer.load_lora_adapter(RUN, weight_name=LORA_FILE)   (the pipeline has no
                       load_lora_weights; the default prefix "transformer" is the one this file carries; without
                       weight_name diffusers looks for pytorch_lora_weights.bin and fails)
    either, with peft  PeftModel.from_pretrained(pipe.transformer, RUN/peft)   (adds the adapter to
                       pipe.transformer in place; float32 on a bf16 transformer, peft's autocast_adapter_dtype)
    full fine-tuning   <TransformerClass>.from_pretrained(RUN, subfolder="transformer")
diffusers' loaders keep the adapter in the transformer's dtype (bf16 on a bf16 pipeline); sample.py and
evaluate.py load it in float32, as it was trained (Deviations 5).

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
   weights, train.py Deviations 12); pass `dtype=torch.bfloat16` to `from_pretrained` to halve them.
3. Older checkpoints hold `lora.safetensors` (peft keys, no metadata). They still load: r and alpha come from
   the checkpoint's trainer_state.json, the targets from the family module's LORA_TARGETS entry for the run's
   recorded --lora_targets ("attn", the only targets before the option existed, when none is recorded), handed
   to diffusers' `load_lora_adapter(state_dict, metadata=...)`. An adapter file with neither metadata nor a run
   beside it is refused: its alpha is unknown and guessing alpha = r would silently change the policy.
4. A run folder resolves to its root export when there is one, else to its newest complete checkpoint
   (checkpoint.latest), so a LoRA run that is still training can be sampled; a full fine-tuning run can be
   sampled once it has finished (its export is written at the end).
5. Loaded LoRA weights are the file's float32 values, as backbones.add_lora trains them, also on a bf16
   transformer: peft creates the adapter in the base layer's dtype, so diffusers' loader leaves bf16(saved)
   there; `load_policy` casts the adapter to float32 and copies the file's values in again (bit for bit,
   tested). Under bf16 autocast, which train.py (through `prepare`), sample.py and evaluate.py run in, the LoRA
   matmuls take bf16 copies of their weights either way, so there the velocity is the same with or without
   this step (measured: bit-identical on tiny and tiny-wan); it differs without autocast (1.7e-2 / 2.2e-2
   relative L2 on tiny / tiny-wan, where peft computes a float32 adapter in float32), and the weights
   themselves are what was trained, for any later use.
6. The peft layout is a second copy of the adapter (peft/, in every LoRA checkpoint too: it doubles the
   adapter's disk use, 0.23 GB per copy at HunyuanVideo-1.5's 56.6 M LoRA parameters), so that
   `PeftModel.from_pretrained` loads a run without this code; it is what `PeftModel.save_pretrained` writes
   (tested) without its generated README.md. Nothing here reads it back: the pipeline file is the source.
7. safetensors writes its files with mode 0600 whatever the umask (0.8.0); every file `save_weights` writes is
   set to 0666 less the umask afterwards, the mode `open()` gives the run's other files, so collaborators on a
   shared filesystem can read an export when the umask lets them.
8. `load_policy` refuses an adapter file whose keys do not all name LoRA layers of the transformer (another
   key layout, e.g. kohya's lora_down / lora_up): diffusers' loader only logs such keys and leaves the
   gaussian-init adapter (B = 0), i.e. the base policy, under the adapter's name (measured).

Test: `python -m pytest tests/test_export.py -q`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from models import backbones

LORA_FILE = "pytorch_lora_weights.safetensors"   # diffusers' LORA_WEIGHT_NAME_SAFE
OLD_LORA_FILE = "lora.safetensors"               # checkpoints written before this module existed
TRANSFORMER = "transformer"                      # full fine-tuning: the save_pretrained folder
PREFIX = "transformer"                           # the pipelines' name of the denoiser (diffusers' transformer_name)
METADATA_KEY = "lora_adapter_metadata"           # diffusers' LORA_ADAPTER_METADATA_KEY
ADAPTER = "policy"                               # the adapter name `load_policy` gives a loaded LoRA
PEFT = "peft"                                    # sub-folder: the adapter in peft's layout (Deviations 6)
PEFT_CONFIG = "adapter_config.json"              # peft's CONFIG_NAME
PEFT_WEIGHTS = "adapter_model.safetensors"       # peft's SAFETENSORS_WEIGHTS_NAME
PEFT_PREFIX = "base_model.model"                 # PeftModel's name of the model it wraps (PeftModel.base_model.model)


@dataclass
class Weights:
    """What `checkpoint.resolve_weights` found. `run` holds the run's recorded options (backbone, seed, lora_rank, ...;
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
            write_peft(core, os.path.join(folder, PEFT))
        return
    state = accelerator.get_state_dict(model)  # [dist] collective under FSDP2 / ZeRO-3 (Deviations 2)
    if accelerator.is_main_process:  # [dist]
        with torch.device("meta"):  # the architecture only; its tensors are the gathered ones
            shell = _model_class(core).from_config(core.config)
        shell.load_state_dict(state, assign=True, strict=True)
        shell.save_pretrained(os.path.join(folder, TRANSFORMER), safe_serialization=True)
        _readable(os.path.join(dirpath, name) for dirpath, _, names in os.walk(os.path.join(folder, TRANSFORMER))
                  for name in names)  # Deviations 7: the shards are 0600, config.json and the index are not


def write_lora(core, folder: str, adapter: str = "default") -> str:
    """The adapter `adapter` of `core` as LORA_FILE in `folder`, in the pipeline layout (Deviations 1)."""
    from safetensors.torch import save_file

    tensors, config = _adapter(core, adapter)
    metadata = {"format": "pt",  # as diffusers writes it: JSON, sorted keys, indent 2
                METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LORA_FILE)
    save_file({f"{PREFIX}.{k}": v for k, v in tensors.items()}, path, metadata=metadata)
    _readable([path])  # Deviations 7
    return path


def write_peft(core, folder: str, adapter: str = "default") -> str:
    """The adapter `adapter` of `core` in peft's layout in `folder` (Deviations 6): PEFT_CONFIG and PEFT_WEIGHTS
    as `PeftModel.save_pretrained` writes them, so `PeftModel.from_pretrained(transformer, folder)` loads it."""
    from safetensors.torch import save_file

    tensors, config = _adapter(core, adapter)
    # PeftModel.save_pretrained marks a saved adapter for inference (from_pretrained sets it from is_trainable
    # anyway), and records the class of a model that is not a transformers task model (AutoPeftModel reads it).
    model_class = _model_class(core)  # not FSDP2's FSDP<Name> subclass
    config = {**config, "inference_mode": True,
              "auto_mapping": {"base_model_class": model_class.__name__, "parent_library": model_class.__module__}}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, PEFT_CONFIG), "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))  # peft's format: indent 2, sorted keys
    path = os.path.join(folder, PEFT_WEIGHTS)
    save_file({f"{PEFT_PREFIX}.{k}": v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    _readable([path])  # Deviations 7
    return folder


def _adapter(core, adapter: str) -> tuple[dict, dict]:
    """The adapter's tensors with peft's own keys (`<module>.lora_A.weight`, adapter name removed), on the CPU,
    and its LoraConfig as a JSON-ready dict (a set, e.g. target_modules given as a list, sorted)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(core, adapter_name=adapter)
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in core.peft_config[adapter].to_dict().items()}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, config


def _readable(paths) -> None:
    """Gives each file the mode `open()` would have given it, 0666 less the umask (Deviations 7). Python cannot
    read the umask without setting it: Linux shows it in /proc/self/status; elsewhere it is set to 022 and
    back, two system calls during which a file another thread creates would get 0644."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


def _model_class(core):
    """The model's own class: FSDP2's fully_shard swaps in a subclass (FSDP<Name>) that must not be rebuilt."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(core).__mro__ if not issubclass(c, FSDPModule))


# ----------------------------------------------------------------------------------------------------
# In


def read_adapter(folder: str) -> dict:
    """The adapter saved in a checkpoint folder, with peft's own keys (what set_peft_model_state_dict takes):
    LORA_FILE without its pipeline prefix, or OLD_LORA_FILE of a checkpoint from before exports."""
    from safetensors.torch import load_file

    if os.path.isfile(os.path.join(folder, LORA_FILE)):
        return {k.removeprefix(PREFIX + "."): v for k, v in load_file(os.path.join(folder, LORA_FILE)).items()}
    return load_file(os.path.join(folder, OLD_LORA_FILE))


def lora_file(path: str, run: dict, source: str) -> Weights:
    """An adapter file as Weights: its key prefix, and the LoraConfig from its metadata or from the run's
    recorded options `run` (Deviations 3). Reads the safetensors header only."""
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
    # The targets of the run's --lora_targets choice ("attn" for a run recorded before the option existed).
    targets, choice = backbones.module(run["backbone"]).LORA_TARGETS, run.get("lora_targets", "attn")
    if choice not in targets:
        raise ValueError(f"{path!r}: its run records --lora_targets {choice!r}, which {run['backbone']} does not "
                         f"have ({', '.join(targets)})")
    metadata = {"r": run["lora_rank"], "lora_alpha": run["lora_alpha"], "target_modules": targets[choice]}
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
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(weights.path)  # the trained values, float32
    if weights.metadata is None:  # diffusers reads r, alpha and the targets from the file's header
        base.load_lora_adapter(os.path.dirname(weights.path), weight_name=os.path.basename(weights.path),
                               prefix=weights.prefix, adapter_name=ADAPTER)
    else:  # Deviations 3: the file has no header; the metadata comes from the run
        base.load_lora_adapter(dict(saved), prefix=weights.prefix, adapter_name=ADAPTER, metadata=weights.metadata)
    # Deviations 5: the loader made the adapter in the base layers' dtype (bf16(saved) on a bf16 transformer);
    # cast it to float32, as it was trained, and copy the file's float32 values in again.
    for name, p in base.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()
    state = {k.removeprefix(f"{weights.prefix}.") if weights.prefix else k: v for k, v in saved.items()}
    result = set_peft_model_state_dict(base, state, adapter_name=ADAPTER)
    if result.unexpected_keys:  # Deviations 8: a key that names no LoRA layer; the loader only logged it
        raise ValueError(f"{weights.path!r}: {len(result.unexpected_keys)} adapter keys do not name this "
                         f"transformer's LoRA layers (e.g. {result.unexpected_keys[0]!r})")
    return base.requires_grad_(False)
