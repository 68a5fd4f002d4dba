"""Tests for export.py: what a run writes is read back by diffusers' own loaders (the oracle) as exactly the
trained policy, the adapter metadata is what makes it so, and older checkpoints keep loading."""
import json
import os

import pytest
import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import backbones
import export
import logs

FAMILIES = [("tiny", "hunyuan"), ("tiny-wan", "wan")]


def trained_lora(name: str, seed: int = 1):
    """A fresh backbone with rank-4, alpha-8 LoRA whose A and B are both random (as after training: gaussian
    init has B = 0). alpha != r, so an adapter loaded without its alpha gives a different policy."""
    family = backbones.module(name)
    backbone = family.load_backbone(name, seed=0)
    params = family.add_lora(backbone.transformer, rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.data.normal_(0, 0.1, generator=g)
    return family, backbone


def velocity(family, backbone, transformer):
    """The CFG velocity of one prompt at one noise level, on a fixed latent."""
    cache = family.PromptCache(backbone)
    x = torch.randn(1, *family.latent_shape(backbone, 5, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return family.velocity(transformer, x, 0.7, cache(["a red fox running through snow"]), cache.negative(1), 5.0)


def header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


@pytest.mark.parametrize("name, family_name", FAMILIES)
def test_exported_adapter_loads_through_diffusers_as_the_trained_velocity(tmp_path, name, family_name):
    family, trained = trained_lora(name)
    export.save_weights(Accelerator(), trained.transformer, str(tmp_path), full=False)
    file = tmp_path / export.LORA_FILE
    metadata = json.loads(header(file)[export.METADATA_KEY])
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"]) == (4, 8)
    assert metadata["transformer.target_modules"] == family.LORA_TARGETS
    expected = velocity(family, trained, trained.transformer)

    fresh = family.load_backbone(name, seed=0)
    if family_name == "wan":  # the README's call for Wan: the pipeline's own LoRA loader
        pipe = WanPipeline(tokenizer=fresh.tokenizer, text_encoder=fresh.text_encoder, vae=fresh.vae,
                           transformer=fresh.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
        pipe.load_lora_weights(str(tmp_path), weight_name=export.LORA_FILE)
    else:  # HunyuanVideo15Pipeline has no load_lora_weights: the transformer's loader
        fresh.transformer.load_lora_adapter(str(tmp_path), weight_name=export.LORA_FILE)
    assert torch.equal(velocity(family, fresh, fresh.transformer), expected)

    # The same file without its metadata: diffusers then assumes alpha = r, i.e. half this adapter's update
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(load_file(file), str(bare / export.LORA_FILE))
    stripped = family.load_backbone(name, seed=0)
    stripped.transformer.load_lora_adapter(str(bare), weight_name=export.LORA_FILE)
    assert (velocity(family, stripped, stripped.transformer) - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no lora_adapter_metadata and no run options"):
        export.resolve_weights(str(bare / export.LORA_FILE))  # and we refuse to guess alpha


def test_adapter_file_is_what_wan_pipeline_save_lora_weights_writes(tmp_path):
    family, trained = trained_lora("tiny-wan")
    ours = export.write_lora(trained.transformer, str(tmp_path / "ours"))
    WanPipeline.save_lora_weights(str(tmp_path / "diffusers"), get_peft_model_state_dict(trained.transformer),
                                  transformer_lora_adapter_metadata=trained.transformer.peft_config["default"].to_dict())
    theirs = tmp_path / "diffusers" / export.LORA_FILE
    a, b = load_file(ours), load_file(theirs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert header(ours) == header(theirs)


@pytest.mark.parametrize("name, family_name", FAMILIES)
def test_full_export_reloads_with_from_pretrained_to_identical_outputs(tmp_path, name, family_name):
    family = backbones.module(name)
    trained = family.load_backbone(name, seed=0)
    with torch.no_grad():  # "fine-tuned": every weight moved away from the seed-0 model
        g = torch.Generator().manual_seed(2)
        for p in trained.transformer.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    export.save_weights(Accelerator(), trained.transformer, str(tmp_path), full=True)
    assert (tmp_path / export.TRANSFORMER / "diffusion_pytorch_model.safetensors").is_file()
    expected = velocity(family, trained, trained.transformer)

    reloaded = type(trained.transformer).from_pretrained(str(tmp_path / export.TRANSFORMER))
    saved = trained.transformer.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in reloaded.state_dict().items())
    weights = export.resolve_weights(str(tmp_path))
    assert (weights.kind, weights.path) == ("full", str(tmp_path / export.TRANSFORMER))
    fresh = family.load_backbone(name, seed=0)
    assert not torch.equal(velocity(family, fresh, fresh.transformer), expected)
    policy = export.load_policy(family, fresh, weights)
    assert fresh.transformer is policy
    assert torch.equal(velocity(family, fresh, policy), expected)


def test_old_checkpoint_with_lora_safetensors_only_still_loads(tmp_path):
    family, trained = trained_lora("tiny")
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    # what checkpoint.save wrote before exports: peft keys, no metadata; r and alpha in trainer_state.json
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(trained.transformer).items()},
              str(ckpt / export.OLD_LORA_FILE))
    logs.write_json(str(ckpt / "trainer_state.json"),
                    {"step": 3, "config": {"backbone": "tiny", "lora_rank": 4, "lora_alpha": 8, "seed": 0}})
    weights = export.resolve_weights(str(run))  # a run folder without a root export: its newest checkpoint
    assert (weights.kind, weights.source, weights.prefix) == ("lora", str(ckpt), None)
    assert weights.metadata == {"r": 4, "lora_alpha": 8, "target_modules": family.LORA_TARGETS}
    fresh = family.load_backbone("tiny", seed=0)
    policy = export.load_policy(family, fresh, weights)
    assert torch.equal(velocity(family, fresh, policy), velocity(family, trained, trained.transformer))

    # a root export takes precedence over the checkpoints; a folder without weights is refused by name
    export.write_lora(trained.transformer, str(run))
    assert export.resolve_weights(str(run)).path == os.path.join(str(run), export.LORA_FILE)
    with pytest.raises(ValueError, match="holds no weights"):
        export.resolve_weights(str(tmp_path / "run" / "checkpoints"))
    with pytest.raises(ValueError, match="does not exist"):
        export.resolve_weights(str(tmp_path / "nowhere"))


def test_export_imports_first_in_a_fresh_interpreter():
    """sample.py and evaluate.py import export before checkpoint; the two modules import each other, which
    must work in that order too (a module-level use of the other's names would not)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", "import export, checkpoint; print(checkpoint.FINAL_EXPORT)"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "pytorch_lora_weights.safetensors" in done.stdout, done.stderr[-2000:]
