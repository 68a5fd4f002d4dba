"""Tests for export.py: what a run writes is read back by diffusers' own loaders and by peft's (the oracles)
as exactly the trained policy, the adapter metadata is what makes it so, a bf16 policy holds the trained float32
adapter, the files are readable as the umask allows, and older checkpoints keep loading."""
import copy
import json
import os

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline, WanPipeline
from diffusers.guiders import ClassifierFreeGuidance
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sample
from models import backbones
from training import checkpoint, export, logs

FAMILIES = [("tiny", "hunyuan"), ("tiny-wan", "wan")]


def trained_lora(name: str, seed: int = 1, dtype=torch.float32, targets: str = "attn"):
    """A fresh backbone with rank-4, alpha-8 LoRA whose A and B are both random (as after training: gaussian
    init has B = 0). alpha != r, so an adapter loaded without its alpha gives a different policy. The LoRA is
    float32 on a `dtype` backbone, as train.py holds it; the same seed gives the same adapter in any dtype."""
    family = backbones.module(name)
    backbone = family.load_backbone(name, seed=0, dtype=dtype)
    choice = {} if targets == "attn" else {"targets": targets}  # TRANSITION: an add_lora without targets= is "attn"
    params = family.add_lora(backbone.transformer, rank=4, alpha=8, **choice)
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.data.normal_(0, 0.1, generator=g)
    return family, backbone


def attn_targets(family) -> str:
    """The family's default ("attn") LoRA target regex. TRANSITION: LORA_TARGETS becomes a dict {--lora_targets
    choice: regex}; before that it is the single "attn" regex."""
    return family.LORA_TARGETS["attn"] if isinstance(family.LORA_TARGETS, dict) else family.LORA_TARGETS


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
    assert metadata["transformer.target_modules"] == attn_targets(family)
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
        checkpoint.resolve_weights(str(bare / export.LORA_FILE))  # and we refuse to guess alpha


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
    weights = checkpoint.resolve_weights(str(tmp_path))
    assert (weights.kind, weights.path) == ("full", str(tmp_path / export.TRANSFORMER))
    fresh = family.load_backbone(name, seed=0)
    assert not torch.equal(velocity(family, fresh, fresh.transformer), expected)
    policy = export.load_policy(family, fresh, weights)
    assert fresh.transformer is policy
    assert torch.equal(velocity(family, fresh, policy), expected)


def old_checkpoint(ckpt, transformer, step: int, options: dict) -> None:
    """What checkpoint.save wrote before exports: lora.safetensors (peft keys, no metadata), r and alpha in
    trainer_state.json, and last a manifest of sizes (the manifest before content hashes)."""
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(transformer).items()},
              str(ckpt / export.OLD_LORA_FILE))
    logs.write_json(str(ckpt / "trainer_state.json"), {"step": step, "config": options})
    logs.write_json(str(ckpt / "manifest.json"), {"files": {name: os.path.getsize(ckpt / name)
                                                            for name in (export.OLD_LORA_FILE, "trainer_state.json")}})


def test_old_checkpoint_with_lora_safetensors_only_still_loads(tmp_path):
    family, trained = trained_lora("tiny")
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "checkpoint-3"
    old_checkpoint(ckpt, trained.transformer, 3, {"backbone": "tiny", "lora_rank": 4, "lora_alpha": 8, "seed": 0})
    assert checkpoint.resolve_weights(str(ckpt)).path == str(ckpt / export.OLD_LORA_FILE)  # named
    weights = checkpoint.resolve_weights(str(run))  # a run folder without a root export: its newest checkpoint
    assert (weights.kind, weights.source, weights.prefix) == ("lora", str(ckpt), None)
    assert weights.metadata == {"r": 4, "lora_alpha": 8, "target_modules": attn_targets(family)}
    fresh = family.load_backbone("tiny", seed=0)
    policy = export.load_policy(family, fresh, weights)
    assert torch.equal(velocity(family, fresh, policy), velocity(family, trained, trained.transformer))

    # a root export takes precedence over the checkpoints; a folder without weights is refused by name
    export.write_lora(trained.transformer, str(run))
    assert checkpoint.resolve_weights(str(run)).path == os.path.join(str(run), export.LORA_FILE)
    with pytest.raises(ValueError, match="holds no weights"):
        checkpoint.resolve_weights(str(tmp_path / "run" / "checkpoints"))
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.resolve_weights(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------------
# The README's "from a run to a video", per backbone and layout


def pipeline(family_name: str, backbone):
    """The backbone's parts as the diffusers pipeline a user gets from `from_pretrained` (tiny weights)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    if family_name == "wan":
        return WanPipeline(tokenizer=backbone.tokenizer, text_encoder=backbone.text_encoder, vae=backbone.vae,
                           transformer=backbone.transformer, scheduler=scheduler)
    return HunyuanVideo15Pipeline(text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                                  transformer=backbone.transformer, vae=backbone.vae, scheduler=scheduler,
                                  text_encoder_2=backbone.text_encoder_2, tokenizer_2=backbone.tokenizer_2,
                                  guider=ClassifierFreeGuidance(guidance_scale=5.0))


def video(pipe) -> torch.Tensor:
    """The README's last line, on the tiny clip size: two ODE steps from a fixed generator."""
    return torch.as_tensor(pipe("a red fox running through snow", num_frames=5, height=32, width=32,
                                num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                                output_type="np").frames[0])  # (F, H, W, 3)


@pytest.mark.parametrize("name, family_name", FAMILIES)
@pytest.mark.parametrize("layout", ["diffusers", "peft"])
def test_readme_calls_load_a_run_into_its_pipeline_as_the_trained_policy(tmp_path, name, family_name, layout):
    """Each README snippet's loading line, run on the pipeline object: the loaded transformer gives the trained
    velocity exactly, and the pipeline's video is the one it makes with the trained transformer itself."""
    family, trained = trained_lora(name)
    run = str(tmp_path)
    export.save_weights(Accelerator(), trained.transformer, run, full=False)
    expected = velocity(family, trained, trained.transformer)

    fresh = family.load_backbone(name, seed=0)
    pipe = pipeline(family_name, fresh)
    if layout == "peft":  # the same line for both backbones; peft adds the adapter to pipe.transformer in place
        PeftModel.from_pretrained(pipe.transformer, os.path.join(run, "peft"))
    elif family_name == "wan":
        pipe.load_lora_weights(run, weight_name="pytorch_lora_weights.safetensors")
    else:  # diffusers 0.42.1: HunyuanVideo15Pipeline has no LoRA mixin, and the loader needs the file's name
        assert not hasattr(pipe, "load_lora_weights")
        with pytest.raises(OSError, match="pytorch_lora_weights.bin"):
            pipe.transformer.load_lora_adapter(run)
        pipe.transformer.load_lora_adapter(run, weight_name="pytorch_lora_weights.safetensors")
    assert pipe.transformer is fresh.transformer
    assert torch.equal(velocity(family, fresh, pipe.transformer), expected)
    assert torch.equal(video(pipe), video(pipeline(family_name, trained)))


def test_peft_folder_is_what_peft_model_save_pretrained_writes(tmp_path):
    family, trained = trained_lora("tiny-wan")
    ours = export.write_peft(trained.transformer, str(tmp_path / "ours"))
    # peft's own writer, on a PeftModel holding the same adapter
    wrapped = get_peft_model(family.load_backbone("tiny-wan", seed=0).transformer,
                             copy.deepcopy(trained.transformer.peft_config["default"]))
    state = {f"{export.PEFT_PREFIX}.{k}": v for k, v in get_peft_model_state_dict(trained.transformer).items()}
    assert not set_peft_model_state_dict(wrapped, state).unexpected_keys
    wrapped.save_pretrained(str(tmp_path / "peft"))
    a, b = load_file(os.path.join(ours, export.PEFT_WEIGHTS)), load_file(tmp_path / "peft" / export.PEFT_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert header(os.path.join(ours, export.PEFT_WEIGHTS)) == header(tmp_path / "peft" / export.PEFT_WEIGHTS)
    with open(os.path.join(ours, export.PEFT_CONFIG)) as f, open(tmp_path / "peft" / export.PEFT_CONFIG) as g:
        assert json.load(f) == json.load(g)
    assert sorted(os.listdir(ours)) == [export.PEFT_CONFIG, export.PEFT_WEIGHTS]  # peft adds a README.md card


# ----------------------------------------------------------------------------------------------------
# bf16


@pytest.fixture
def bf16_accelerator():
    """sample.py's Accelerator under `--mixed_precision bf16`. accelerate keeps one state per process, fixed by
    the first Accelerator(): reset it here and after, so the other tests get their float32 one."""
    AcceleratorState._reset_state(True)
    yield Accelerator(mixed_precision="bf16")
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("name", ["tiny", "tiny-wan"])
def test_bf16_policy_holds_the_trained_float32_adapter(tmp_path, name, bf16_accelerator):
    """sample.py / evaluate.py under --mixed_precision bf16 load the policy with sample.load (export.load_policy).
    The oracle is the model train.py trains under bf16: the bf16 backbone with the float32 LoRA, its forward
    wrapped in autocast by `prepare`. Loaded LoRA weights equal the file bit for bit (before the fix:
    bf16(saved)), so the policy equals that model in any forward: under autocast (where the LoRA matmuls run
    in bf16 anyway, so the rounding did not show: 0 error before and after) and without it (before: 1.7e-2 /
    2.2e-2 relative L2 on tiny / tiny-wan, after: 0). Against the float32 policy the difference is bf16 forward
    precision: 2.4e-2 / 2.3e-2 measured, bound 5e-2."""
    family, trained = trained_lora(name)
    export.save_weights(bf16_accelerator, trained.transformer, str(tmp_path), full=False)
    v32 = velocity(family, trained, trained.transformer)

    weights = checkpoint.resolve_weights(str(tmp_path))
    _, backbone, policy = sample.load(name, None, weights, seed=0, accelerator=bf16_accelerator)
    assert policy.proj_out.weight.dtype == torch.bfloat16  # the backbone is bf16
    loaded = dict(policy.named_parameters())
    saved = load_file(tmp_path / export.LORA_FILE)
    for key, value in saved.items():  # transformer.<module>.lora_A.weight -> <module>.lora_A.policy.weight
        module, matrix, leaf = key.removeprefix("transformer.").rsplit(".", 2)
        p = loaded[f"{module}.{matrix}.{export.ADAPTER}.{leaf}"]
        assert p.dtype == value.dtype == torch.float32 and torch.equal(p, value), key

    _, as_trained = trained_lora(name, dtype=torch.bfloat16)  # train.py's model: bf16 base, float32 LoRA
    assert torch.equal(velocity(family, backbone, policy), velocity(family, as_trained, as_trained.transformer))
    with bf16_accelerator.autocast():  # sample.generate's context
        v = velocity(family, backbone, policy)
    prepared = bf16_accelerator.prepare(as_trained.transformer)  # the forward train.py runs (autocast inside)
    assert torch.equal(v, velocity(family, as_trained, prepared))
    assert (v - v32).norm() / v32.norm() < 5e-2


def test_on_a_bf16_pipeline_diffusers_keeps_the_adapter_in_bf16_and_peft_in_float32(tmp_path):
    """The README's note on diffusers' behaviour (tiny-wan): WanPipeline.load_lora_weights on a bf16 pipeline
    holds bf16(saved); its velocity (the pipeline runs without autocast) differs from the float32 policy's by
    2.2e-2 relative L2, as much as the run's own bf16 forward does (2.3e-2, the test above). PeftModel's
    loader upcasts the adapter (autocast_adapter_dtype) and holds the saved values."""
    family, trained = trained_lora("tiny-wan")
    export.save_weights(Accelerator(), trained.transformer, str(tmp_path), full=False)
    saved = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / export.LORA_FILE).items()}
    v32 = velocity(family, trained, trained.transformer)

    def lora(transformer, adapter):  # <module>.lora_A.weight -> its parameter in `transformer`
        params = dict(transformer.named_parameters())
        return {k: params[k.replace(".weight", f".{adapter}.weight")] for k in saved}

    bf16 = family.load_backbone("tiny-wan", seed=0, dtype=torch.bfloat16)
    pipeline("wan", bf16).load_lora_weights(str(tmp_path), weight_name=export.LORA_FILE)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, saved[k].bfloat16())
               for k, p in lora(bf16.transformer, "default_0").items())
    v = velocity(family, bf16, bf16.transformer)
    assert 1e-2 < (v - v32).norm() / v32.norm() < 5e-2

    bf16 = family.load_backbone("tiny-wan", seed=0, dtype=torch.bfloat16)
    PeftModel.from_pretrained(bf16.transformer, str(tmp_path / export.PEFT))
    loaded = lora(bf16.transformer, "default")
    assert all(p.dtype == torch.float32 and torch.equal(p, saved[k]) for k, p in loaded.items())


# ----------------------------------------------------------------------------------------------------
# File modes, --lora_targets


@pytest.mark.parametrize("full, umask", [(False, 0o022), (False, 0o027), (True, 0o022)])
def test_exported_files_are_as_readable_as_the_umask_allows(tmp_path, full, umask):
    """Like every file the run writes with open(): 0666 less the umask (safetensors alone writes 0600)."""
    family = backbones.module("tiny")
    if full:
        model = family.load_backbone("tiny", seed=0).transformer
    else:
        _, trained = trained_lora("tiny")
        model = trained.transformer
    before = os.umask(umask)
    try:
        export.save_weights(Accelerator(), model, str(tmp_path), full=full)
    finally:
        os.umask(before)
    files = [os.path.relpath(os.path.join(d, n), tmp_path) for d, _, names in os.walk(tmp_path) for n in names]
    assert {f: oct(os.stat(tmp_path / f).st_mode & 0o777) for f in files} == {f: oct(0o666 & ~umask) for f in files}
    assert set(files) == ({"transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"} if full else
                          {"pytorch_lora_weights.safetensors", "peft/adapter_config.json",
                           "peft/adapter_model.safetensors"})  # every file save_weights writes was checked


@pytest.mark.parametrize("name, family_name", FAMILIES)
def test_attn_ffn_adapter_exports_and_loads_from_old_checkpoints(tmp_path, name, family_name):
    """--lora_targets attn_ffn: the export's metadata carries the attn_ffn targets (from the model's own
    LoraConfig), and an old-style checkpoint (no metadata) takes them from its recorded --lora_targets."""
    family = backbones.module(name)
    if not isinstance(family.LORA_TARGETS, dict):
        pytest.skip("this family module has no --lora_targets choices yet (LORA_TARGETS is one regex)")
    family, trained = trained_lora(name, targets="attn_ffn")
    assert any(".ff" in n and ".lora_" in n for n, _ in trained.transformer.named_parameters())
    expected = velocity(family, trained, trained.transformer)
    export.write_lora(trained.transformer, str(tmp_path / "run"))
    metadata = json.loads(header(tmp_path / "run" / export.LORA_FILE)[export.METADATA_KEY])
    assert metadata["transformer.target_modules"] == family.LORA_TARGETS["attn_ffn"]
    fresh = family.load_backbone(name, seed=0)
    fresh.transformer.load_lora_adapter(str(tmp_path / "run"), weight_name=export.LORA_FILE)
    assert torch.equal(velocity(family, fresh, fresh.transformer), expected)

    ckpt = tmp_path / "old" / "checkpoint-1"
    options = {"backbone": name, "lora_rank": 4, "lora_alpha": 8, "seed": 0, "lora_targets": "attn_ffn"}
    old_checkpoint(ckpt, trained.transformer, 1, options)
    weights = checkpoint.resolve_weights(str(ckpt))
    assert weights.metadata["target_modules"] == family.LORA_TARGETS["attn_ffn"]
    fresh = family.load_backbone(name, seed=0)
    assert torch.equal(velocity(family, fresh, export.load_policy(family, fresh, weights)), expected)
    logs.write_json(str(ckpt / "trainer_state.json"), {"step": 1, "config": {**options, "lora_targets": "all"}})
    with pytest.raises(ValueError, match="--lora_targets 'all'"):
        checkpoint.resolve_weights(str(ckpt))
