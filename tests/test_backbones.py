"""Tests for backbones.py: the name table, the checks made before any weights are read, and that every
family module exposes the same interface with constants that agree with its built models."""
import inspect
import json
import re
import time

import huggingface_hub
import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

import backbones

FAMILY_NAMES = ("load_backbone", "latent_shape", "PromptCache", "velocity", "decode", "add_lora",
                "enable_gradient_checkpointing", "freeze_unreachable", "BLOCK_CLASS", "LORA_TARGETS", "FAMILY",
                "PIPELINE_CLASS", "VIDEO_FACTORS", "HUB_IDS", "SUBFOLDERS", "ATTENTION_PROCESSORS",
                "use_attention_processor", "random_policy")


def test_every_family_exposes_the_same_names_and_signatures():
    families = {backbones.module(name) for name in backbones.NAMES}
    assert {f.__name__ for f in families} == {"hunyuan", "wan"}
    for name in FAMILY_NAMES:
        kinds = {type(getattr(f, name)).__name__ for f in families}
        assert len(kinds) == 1, (name, kinds)
        if callable(getattr(next(iter(families)), name)) and not inspect.isclass(getattr(next(iter(families)), name)):
            assert len({tuple(inspect.signature(getattr(f, name)).parameters) for f in families}) == 1, name
    for name in backbones.NAMES:   # each name belongs to exactly the family that lists its clip factors
        assert name in backbones.module(name).VIDEO_FACTORS
    presets = [backbones.preset(n) for n in backbones.NAMES]
    assert all(p.keys() == presets[0].keys() for p in presets)


def test_unknown_backbone_lists_the_names():
    for call in (lambda: backbones.module("wan22"), lambda: backbones.preset("wan22"),
                 lambda: backbones.check_request("wan22", None, 81, 480, 832)):
        with pytest.raises(ValueError, match=re.escape(f"unknown backbone 'wan22'; choose one of {backbones.NAMES}")):
            call()


@pytest.mark.parametrize("name, frames, size, message", [
    ("wan21-1.3b", 80, (480, 832), re.escape("num_frames must be 4k+1 (e.g. 33, 81, 121); got 80")),
    ("wan21-14b", 53, (240, 420), "multiples of 16.*got 240x420"),
    ("tiny-wan", 5, (24, 32), "multiples of 16.*got 24x32"),
    ("hunyuan15", 32, (480, 848), re.escape("4k+1")),
    ("tiny", 8, (32, 32), re.escape("2k+1")),
])
def test_bad_clip_sizes_are_refused_before_looking_for_weights(name, frames, size, message):
    with pytest.raises(ValueError, match=message):
        backbones.check_request(name, "/no/such/folder", frames, *size)


def fake_folder(path, pipeline_class, subfolders):
    """A Diffusers folder with no weights: model_index.json and empty subfolders."""
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    for sub in subfolders:
        (path / sub).mkdir()
    return str(path)


def test_a_folder_of_the_other_family_fails_in_milliseconds_naming_both(tmp_path):
    import hunyuan
    import wan

    hunyuan_dir = fake_folder(tmp_path / "hy", "HunyuanVideo15Pipeline", hunyuan.SUBFOLDERS)
    wan_dir = fake_folder(tmp_path / "wan", "WanPipeline", wan.SUBFOLDERS)
    for name, folder, found in [("wan21-1.3b", hunyuan_dir, "HunyuanVideo15Pipeline"),
                                ("hunyuan15", wan_dir, "WanPipeline")]:
        start = time.perf_counter()
        with pytest.raises(RuntimeError) as err:
            backbones.check_request(name, folder, 33, 480, 832)
        assert time.perf_counter() - start < 1.0
        message = str(err.value)
        assert found in message and backbones.module(name).PIPELINE_CLASS in message and f"--backbone {name}" in message
        assert ("hunyuan15" if name != "hunyuan15" else "wan21-1.3b") in message   # the backbone it would fit
    # A matching (weightless) folder passes the check: nothing was loaded.
    assert backbones.check_request("wan21-1.3b", wan_dir, 81, 480, 832) == wan_dir
    assert backbones.check_request("tiny-wan", None, 5, 32, 32) is None


@pytest.mark.parametrize("where", ["missing_dir", "incomplete_dir", "hub_id"])
def test_missing_wan_weights_print_the_download_command(where, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))   # empty cache
    incomplete = fake_folder(tmp_path / "part", "WanPipeline", ["transformer", "vae"])
    pretrained = {"missing_dir": str(tmp_path / "nope"), "incomplete_dir": incomplete, "hub_id": None}[where]
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        backbones.check_request("wan21-1.3b", pretrained, 81, 480, 832)
    assert time.perf_counter() - start < 5.0
    message = str(err.value)
    assert "hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir checkpoints/wan21-1.3b" in message
    assert "--pretrained checkpoints/wan21-1.3b" in message and err.value.__cause__ is None
    if where == "incomplete_dir":
        assert "missing subfolders ['text_encoder', 'tokenizer', 'scheduler']" in message


def test_wan_clip_factors_and_configs_agree_with_the_real_classes():
    """VIDEO_FACTORS (used before any weights exist) equals the VAE x patch of the real architectures, built on
    the meta device; the 1.3B config has the published size."""
    import wan

    with torch.device("meta"):
        vae = AutoencoderKLWan()   # class defaults = the Wan2.1 VAE (z 16, x4 temporal, x8 spatial)
        for name, config in wan.REAL_TRANSFORMER.items():
            model = WanTransformer3DModel(**config)
            assert wan.VIDEO_FACTORS[name] == (vae.config.scale_factor_temporal,
                                               vae.config.scale_factor_spatial * model.config.patch_size[1])
            if name == "wan21-1.3b":
                assert 1.2e9 < sum(p.numel() for p in model.parameters()) < 1.5e9
    tiny = wan.load_backbone("tiny-wan")
    assert wan.VIDEO_FACTORS["tiny-wan"] == (tiny.vae.config.scale_factor_temporal,
                                             tiny.vae.config.scale_factor_spatial * tiny.transformer.config.patch_size[1])
    clip = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    with torch.no_grad():
        assert tuple(tiny.vae.encode(clip).latent_dist.mode().shape[1:]) == wan.latent_shape(tiny, 9, 32, 48)
