"""Tests for hunyuan.py on the tiny backbone (CPU, about 10 s). The oracles are independent of the code
under test: the denoiser call written out as HunyuanVideo15Pipeline makes it (729 image tokens, two
separate calls for CFG), the pipeline's own prompt-encoding functions, and per-sample VAE calls."""
import contextlib
import inspect
import re
import time
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

import sde
from models import backbones, hunyuan

PROMPTS = ["a red ball rolls on grass", 'a sign that says "OPEN", then “24h”, then "OPEN" again']


@pytest.fixture(scope="module")
def backbone():
    return hunyuan.load_backbone("tiny", seed=0)


@pytest.fixture(scope="module")
def cache(backbone):
    return hunyuan.PromptCache(backbone)


@contextlib.contextmanager
def diffusers_attention(transformer):
    """diffusers' own attention processor (dense mask) inside the block, ours (hunyuan Deviation 9) after."""
    hunyuan.use_valid_token_attention(transformer, enable=False)
    try:
        yield
    finally:
        hunyuan.use_valid_token_attention(transformer)


def pipeline_forward(transformer, x, sigma, text):
    """One denoiser call exactly as the pipeline's t2v loop makes it (float sigma, 729 image tokens,
    diffusers' attention processor)."""
    N = x.shape[0]
    latent_model_input = torch.cat([x, torch.zeros_like(x), torch.zeros(N, 1, *x.shape[2:])], dim=1)
    with diffusers_attention(transformer):
        return transformer(
            hidden_states=latent_model_input, timestep=torch.full((N,), 1000.0 * sigma),
            encoder_hidden_states=text.embeds, encoder_attention_mask=text.mask,
            encoder_hidden_states_2=text.embeds_2, encoder_attention_mask_2=text.mask_2,
            image_embeds=torch.zeros(N, 729, transformer.config.image_embed_dim), return_dict=False)[0]


def tiny_with_random_lora(seed: int):
    """A fresh tiny backbone with rank-4 LoRA whose A and B are both random, so every projection's gradient
    flows (gaussian init has B = 0). Returns (backbone, LoRA params)."""
    tiny = hunyuan.load_backbone("tiny", seed=0)
    params = hunyuan.add_lora(tiny.transformer, rank=4, alpha=8)
    torch.manual_seed(seed)
    for p in params:
        p.data.normal_(0, 0.1)
    return tiny, params


def assert_grads_close(grads, reference, atol, rtol) -> int:
    """Same None pattern and close values; returns how many reference gradients are nonzero."""
    nonzero = 0
    for a, b in zip(grads, reference, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
            nonzero += int(b.abs().sum() > 0)
    return nonzero


def test_tiny_is_deterministic_in_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = hunyuan.load_backbone("tiny", seed=7)
    assert torch.equal(torch.rand(3), expected_draw)   # fork_rng: the caller's stream did not move
    b, c = hunyuan.load_backbone("tiny", seed=7), hunyuan.load_backbone("tiny", seed=8)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        pa, pb, pc = (dict(getattr(m, part).named_parameters()) for m in (a, b, c))
        assert all(torch.equal(pa[k], pb[k]) for k in pa), part
        assert any(not torch.equal(pa[k], pc[k]) for k in pa), part


def test_text_constants_match_the_pipeline():
    mllm = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters
    byt5 = inspect.signature(HunyuanVideo15Pipeline._get_byt5_prompt_embeds).parameters
    assert hunyuan.HUNYUAN_CROP_START == mllm["crop_start"].default
    assert hunyuan.HUNYUAN_MAX_LENGTH == mllm["tokenizer_max_length"].default
    assert hunyuan.HUNYUAN_MAX_LENGTH_2 == byt5["tokenizer_max_length"].default
    assert hunyuan.QWEN_LAYER == -(mllm["num_hidden_layers_to_skip"].default + 1)


def test_crop_removes_exactly_the_system_prompt(backbone):
    ids = backbone.tokenizer.apply_chat_template(hunyuan._chat(["a cat"], backbone.system_message),
                                                 add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = ids["input_ids"][0]
    assert backbone.tokenizer.decode(ids[backbone.crop_start:]).startswith("a cat<|im_end|>")
    assert backbone.tokenizer.decode(ids[:backbone.crop_start]).endswith("<|im_start|>user\n")


def test_glyph_text_matches_the_pipeline():
    for prompt in PROMPTS + ["", 'one "word"', 'unclosed "quote', '"a" "a"', "“x” and “y”"]:
        assert hunyuan._glyph_text(prompt) == extract_glyph_texts(prompt), prompt


def test_prompt_embeddings_match_the_pipeline_functions(backbone, cache):
    ours = cache(PROMPTS + [""])
    embeds, mask = HunyuanVideo15Pipeline._get_mllm_prompt_embeds(
        text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, prompt=PROMPTS + [""], device="cpu",
        tokenizer_max_length=backbone.max_length, system_message=backbone.system_message,
        crop_start=backbone.crop_start)
    embeds_2, mask_2 = HunyuanVideo15Pipeline._get_byt5_prompt_embeds(
        tokenizer=backbone.tokenizer_2, text_encoder=backbone.text_encoder_2, prompt=PROMPTS + [""], device="cpu",
        tokenizer_max_length=backbone.max_length_2)
    full = hunyuan._encode_prompts(backbone, PROMPTS + [""])   # before the cache trims the padding
    torch.testing.assert_close(full.embeds, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.embeds_2, embeds_2, atol=1e-5, rtol=1e-5)
    assert torch.equal(full.mask, mask) and torch.equal(full.mask_2, mask_2)
    # The cache keeps the columns up to the longest valid prompt and drops only padding (Deviation 7).
    L, L2 = ours.embeds.shape[1], ours.embeds_2.shape[1]
    assert L == int(mask.sum(1).max()) and L2 == int(mask_2.sum(1).max())
    for i, p in enumerate(PROMPTS + [""]):   # each cached prompt alone: its valid columns, at least one
        assert cache.cache[p].embeds.shape[1] == max(int(mask[i].sum()), 1)
        assert cache.cache[p].embeds_2.shape[1] == max(int(mask_2[i].sum()), 1)
    assert cache.cache[""].embeds.shape[1] < mask.shape[1] and cache.cache[""].embeds_2.shape[1] == 1
    assert torch.equal(ours.mask, mask[:, :L]) and torch.equal(ours.mask_2, mask_2[:, :L2])
    assert mask[:, L:].sum() == 0 and mask_2[:, L2:].sum() == 0
    valid = ours.mask.bool()
    torch.testing.assert_close(ours.embeds[valid], embeds[:, :L][valid], atol=1e-5, rtol=1e-5)
    assert ours.mask_2[0].sum() == 0 and ours.mask_2[1].sum() > 0   # ByT5 only sees quoted text
    # The negative prompt is the pipeline's default: the empty string, repeated.
    negative = cache.negative(3)
    assert len(negative) == 3
    n = negative.embeds.shape[1]
    torch.testing.assert_close(negative.embeds, embeds[2:3, :n].expand(3, -1, -1), atol=1e-5, rtol=1e-5)


def test_prompt_cache_encodes_each_distinct_prompt_once(backbone):
    rows_encoded = []
    hook = backbone.text_encoder.register_forward_hook(
        lambda module, args, kwargs, out: rows_encoded.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        cache = hunyuan.PromptCache(backbone)
        first = cache(["a", "b", "a"])
        second = cache(["b", "c"])
        cache.negative(4)
    finally:
        hook.remove()
    assert sum(rows_encoded) == 4   # a, b, c and the empty negative prompt, each once
    assert torch.equal(first.embeds[0], first.embeds[2]) and torch.equal(first.embeds[1], second.embeds[0])
    # repeat_interleave: prompt i fills rows i*G .. (i+1)*G - 1.
    G = 3
    grouped = second.repeat_interleave(G)
    for i in range(2):
        for j in range(G):
            assert torch.equal(grouped.embeds[i * G + j], second.embeds[i])
            assert torch.equal(grouped.mask_2[i * G + j], second.mask_2[i])
    picked = grouped.index(torch.tensor([5, 0]))
    assert torch.equal(picked.embeds, torch.stack([second.embeds[1], second.embeds[0]]))


def test_velocity_is_cfg_of_two_plain_pipeline_calls(backbone, cache):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8)
    cond, uncond, sigma, g = cache(PROMPTS), cache.negative(2), 0.73, 4.5
    # The pipeline's calls get the full padded text (32 Qwen, 16 ByT5 columns); ours is trimmed, and the
    # shorter negative prompt is padded only to the longest prompt of the batched forward.
    full, full_uncond = hunyuan._encode_prompts(backbone, PROMPTS), hunyuan._encode_prompts(backbone, ["", ""])
    assert uncond.embeds.shape[1] < full.embeds.shape[1] and uncond.embeds_2.shape[1] < full.embeds_2.shape[1]
    with torch.no_grad():
        v_cond = pipeline_forward(backbone.transformer, x, sigma, full)
        v_uncond = pipeline_forward(backbone.transformer, x, sigma, full_uncond)
        v = hunyuan.velocity(backbone.transformer, x, sigma, cond, uncond, g)
        v_plain = hunyuan.velocity(backbone.transformer, x, sigma, cond, uncond, 1.0)
        v_no_uncond = hunyuan.velocity(backbone.transformer, x, sigma, cond, None, g)
    assert v.dtype == torch.float32 and v.shape == x.shape
    assert (v_cond - v_uncond).abs().max() > 1e-3   # the prompt matters, so the check below has teeth
    torch.testing.assert_close(v, v_uncond + g * (v_cond - v_uncond), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_plain, v_cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_no_uncond, v_cond, atol=1e-5, rtol=1e-5)


def test_valid_token_attention_equals_diffusers_masked_attention_in_values_and_lora_grads(cache, monkeypatch):
    """Rows of three valid lengths (a glyph prompt, a plain one, the empty negative), the two prompts
    interleaved (A B A B, so both groups are non-contiguous and a wrong row index shows), through the
    batched CFG velocity with LoRA: the velocity and every LoRA gradient equal those of diffusers'
    processor, and no attention call gets a mask (so the flash kernels can run)."""
    tiny, params = tiny_with_random_lora(seed=2)
    x = torch.randn(4, 4, 3, 8, 8)
    cond, uncond = cache([PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1]]), cache.negative(4)
    assert len({int(cond.mask[i].sum() + cond.mask_2[i].sum()) for i in range(4)}) == 2   # two valid lengths

    def run():
        v = hunyuan.velocity(tiny.transformer, x, 0.6, cond, uncond, 5.0)
        grads = torch.autograd.grad(v.square().mean(), params, allow_unused=True)
        return v.detach(), grads

    with diffusers_attention(tiny.transformer):
        v_ref, g_ref = run()
    masks = []
    real = hunyuan.dispatch_attention_fn
    monkeypatch.setattr(hunyuan, "dispatch_attention_fn", lambda *a, **k: masks.append(k["attn_mask"]) or real(*a, **k))
    v, g = run()
    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
    assert assert_grads_close(g, g_ref, atol=1e-5, rtol=1e-4) > len(params) // 2
    # 3 groups (uncond rows 0-3, prompt 0 in rows 4 and 6, prompt 1 in rows 5 and 7) x blocks, forward only
    assert len(masks) == 3 * tiny.transformer.config.num_layers and all(m is None for m in masks)


def test_valid_token_attention_under_autocast_agrees_with_diffusers_to_bf16_rounding(backbone, cache):
    """float32 weights under bf16 autocast (SDPA returns bf16 into a float32 buffer) with non-contiguous
    groups: runs, and differs from diffusers' processor only by bf16 rounding (amplified by CFG 5)."""
    torch.manual_seed(5)
    x, cond, uncond = torch.randn(3, 4, 3, 8, 8), cache([PROMPTS[0], PROMPTS[1], PROMPTS[0]]), cache.negative(3)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        v = hunyuan.velocity(backbone.transformer, x, 0.5, cond, uncond, 5.0)
        with diffusers_attention(backbone.transformer):
            v_ref = hunyuan.velocity(backbone.transformer, x, 0.5, cond, uncond, 5.0)
    assert v.dtype == torch.float32
    assert (v - v_ref).abs().max() < 0.05 * v_ref.abs().max()


def test_both_samplers_equal_hunyuan_pipeline_end_to_end(backbone, cache):
    """backbones.sample (the training grid's Euler, sample.py's default) and backbones.pipeline_sample (sample.py
    --ode_solver pipeline) against diffusers' own HunyuanVideo15Pipeline, its text encoding and scheduler included:
    its grid is the training grid, so the two samplers agree with it and with each other."""
    b, K, g = backbone, 4, 6.0
    pipe = HunyuanVideo15Pipeline(
        text_encoder=b.text_encoder, tokenizer=b.tokenizer, transformer=b.transformer, vae=b.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=b.shift), text_encoder_2=b.text_encoder_2,
        tokenizer_2=b.tokenizer_2, guider=ClassifierFreeGuidance(guidance_scale=g))
    pipe.set_progress_bar_config(disable=True)
    # The pipeline's __init__ hard-codes the 8.3B model's template (its system prompt, crop 108, 1000 / 256 tokens)
    # whatever tokenizer it gets; the tiny backbone has its own (Deviation 6).
    pipe.system_message, pipe.prompt_template_encode_start_idx = b.system_message, b.crop_start
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = b.max_length, b.max_length_2
    prompts = ["a red ball", 'say "hi"']   # short enough for the tiny 32 tokens; the second one runs ByT5
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x_T = torch.stack([torch.randn(hunyuan.latent_shape(b, 5, 32, 32), generator=gen) for gen in gens])
    ours = backbones.sample(hunyuan, b.transformer, cache(prompts), cache.negative(1), x_T, gens,
                            sde.sigma_schedule(K, b.shift), "ode", 0.0, g, 2).latents[:, -1]
    as_pipeline = backbones.pipeline_sample(hunyuan, b, b.transformer, cache(prompts), cache.negative(1), x_T, g, K, 2)
    hunyuan.use_valid_token_attention(b.transformer, False)  # the pipeline with diffusers' own processor
    try:
        theirs = pipe(prompt=prompts, num_frames=5, height=32, width=32, num_inference_steps=K, latents=x_T.clone(),
                      output_type="latent").frames
    finally:
        hunyuan.use_valid_token_attention(b.transformer, True)
    assert (ours - x_T).abs().max() > 1.0  # the ODE moved the latents
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(as_pipeline, theirs, rtol=0, atol=1e-5)


def test_velocity_with_per_sample_sigma_equals_per_sample_calls(backbone, cache):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 8)
    cond, uncond, sigmas = cache(PROMPTS), cache.negative(2), [0.95, 0.2]
    with torch.no_grad():
        v = hunyuan.velocity(backbone.transformer, x, torch.tensor(sigmas), cond, uncond, 6.0)
        singles = [hunyuan.velocity(backbone.transformer, x[i:i + 1], s, cond[i:i + 1], uncond[i:i + 1], 6.0)
                   for i, s in enumerate(sigmas)]
    assert (singles[0] - singles[1]).abs().max() > 1e-3
    torch.testing.assert_close(v, torch.cat(singles), atol=1e-5, rtol=1e-5)


def test_bf16_transformer_gives_float32_velocity_and_float32_lora(backbone, cache):
    tiny_bf16 = hunyuan.load_backbone("tiny", seed=0, dtype=torch.bfloat16)
    torch.manual_seed(2)
    x = torch.randn(2, 4, 3, 8, 8)
    cond, uncond = cache(PROMPTS), cache.negative(2)
    with torch.no_grad():
        v16 = hunyuan.velocity(tiny_bf16.transformer, x, 0.5, cond, uncond, 3.0)
        v32 = hunyuan.velocity(backbone.transformer, x, 0.5, cond, uncond, 3.0)
    assert v16.dtype == torch.float32
    assert (v16 - v32).norm() / v32.norm() < 0.05   # bf16 rounding only (8 mantissa bits)
    # LoRA on the bf16 transformer trains in float32 and still starts at the pretrained policy.
    params = hunyuan.add_lora(tiny_bf16.transformer, rank=4, alpha=8)
    assert params and all(p.dtype == torch.float32 for p in params)
    v = hunyuan.velocity(tiny_bf16.transformer, x, 0.5, cond, uncond, 3.0)
    torch.testing.assert_close(v, v16)
    v.square().mean().backward()
    assert any(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in params)


def test_decode_batch_equals_per_sample_vae_and_is_in_unit_range(backbone):
    torch.manual_seed(3)
    z = torch.randn(2, 4, 3, 4, 6)
    frames = hunyuan.decode(backbone, z)
    assert frames.shape == (2, 5, 3, 16, 24) and frames.dtype == torch.float32
    assert frames.min() >= 0 and frames.max() <= 1 and frames.std() > 0
    vae = backbone.vae
    with torch.no_grad():
        for i in range(2):
            video = vae.decode(z[i:i + 1] / vae.config.scaling_factor, return_dict=False)[0]   # (1, 3, F, H, W)
            expected = (video * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 0, 2, 3)
            torch.testing.assert_close(frames[i], expected)


def test_decode_builds_no_graph_even_for_latents_that_require_grad(backbone):
    z = torch.randn(1, *hunyuan.latent_shape(backbone, 5, 32, 32), requires_grad=True)
    assert not hunyuan.decode(backbone, z).requires_grad  # the frozen VAE under no_grad, as wan.decode


def test_latent_shape_matches_vae_encode(backbone):
    clip = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    with torch.no_grad():
        latent = backbone.vae.encode(clip).latent_dist.mode()
    assert tuple(latent.shape[1:]) == hunyuan.latent_shape(backbone, 9, 16, 24) == (4, 5, 4, 6)


def test_latent_shape_rejects_bad_sizes_with_valid_values(backbone):
    real = SimpleNamespace(temporal_factor=4, spatial_factor=16, latent_channels=32,
                           transformer=SimpleNamespace(config=SimpleNamespace(patch_size=1)))
    assert hunyuan.latent_shape(real, 121, 480, 848) == (32, 31, 30, 53)
    with pytest.raises(ValueError, match=re.escape("num_frames must be 4k+1 (e.g. 33, 81, 121); got 32")):
        hunyuan.latent_shape(real, 32, 480, 848)
    with pytest.raises(ValueError, match="multiples of 16.*got 480x850"):
        hunyuan.latent_shape(real, 33, 480, 850)
    with pytest.raises(ValueError, match=re.escape("2k+1")):
        hunyuan.latent_shape(backbone, 8, 16, 16)
    with pytest.raises(ValueError, match="multiples of 4.*got 18x16"):
        hunyuan.latent_shape(backbone, 9, 18, 16)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="hunyuan15.*tiny"):
        hunyuan.load_backbone("nope")


@pytest.mark.parametrize("where", ["missing_dir", "empty_dir", "hub_id"])
def test_missing_weights_fail_fast_with_download_hint(where, tmp_path, monkeypatch):
    # An empty cache, so the hub id cannot be found even on a machine that has the weights.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    pretrained = {"missing_dir": str(tmp_path / "nope"), "empty_dir": str(tmp_path),
                  "hub_id": hunyuan.DEFAULT_PRETRAINED}[where]
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        hunyuan.load_backbone("hunyuan15", pretrained=pretrained)
    assert time.perf_counter() - start < 5.0
    message = str(err.value)
    assert f"hf download {hunyuan.DEFAULT_PRETRAINED} --local-dir" in message and "--pretrained" in message
    assert err.value.__cause__ is None   # no chained 50-line traceback


def test_hunyuan15_loads_every_part_from_a_diffusers_layout_folder(backbone, tmp_path):
    # The tiny parts saved in the hub's folder layout stand in for the real 35 GB checkpoint.
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        getattr(backbone, sub).save_pretrained(tmp_path / sub)
    FlowMatchEulerDiscreteScheduler(shift=5.0).save_pretrained(tmp_path / "scheduler")
    loaded = hunyuan.load_backbone("hunyuan15", pretrained=str(tmp_path))
    assert (loaded.shift, loaded.spatial_factor, loaded.temporal_factor, loaded.latent_channels) == (5.0, 4, 2, 4)
    assert loaded.crop_start == 108 and loaded.max_length == 1000 and "Describe the video" in loaded.system_message
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = dict(getattr(loaded, sub).state_dict()), dict(getattr(backbone, sub).state_dict())
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), sub
    assert not any(p.requires_grad for p in loaded.text_encoder.parameters())
    ids = [backbone.tokenizer("a “b”").input_ids, loaded.tokenizer("a “b”").input_ids]
    assert ids[0] == ids[1]


def test_lora_only_on_dit_attention_and_gets_gradients_through_velocity(cache):
    tiny = hunyuan.load_backbone("tiny", seed=0)
    torch.manual_seed(4)
    x = torch.randn(2, 4, 3, 8, 8)
    cond, uncond = cache(PROMPTS), cache.negative(2)
    with torch.no_grad():
        v_before = hunyuan.velocity(tiny.transformer, x, 0.6, cond, uncond, 5.0)
    params = hunyuan.add_lora(tiny.transformer, rank=4, alpha=8)
    trainable = {n: p for n, p in tiny.transformer.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for p in trainable.values()}
    projections = "to_q|to_k|to_v|to_out.0|add_q_proj|add_k_proj|add_v_proj|to_add_out"
    pattern = rf"transformer_blocks\.\d+\.attn\.({projections})\.lora_[AB]\.default\.weight"
    assert all(re.fullmatch(pattern, n) for n in trainable)
    num_layers = tiny.transformer.config.num_layers
    assert len(trainable) == num_layers * 8 * 2                   # 8 projections x (A, B) per block
    assert not any("context_embedder" in n for n in trainable)   # the token refiner has no LoRA
    assert all(p.dtype == torch.float32 for p in params)

    v = hunyuan.velocity(tiny.transformer, x, 0.6, cond, uncond, 5.0)
    torch.testing.assert_close(v, v_before)   # gaussian init has B = 0: the policy starts unchanged
    v.square().mean().backward()
    # The last block's text tokens are discarded, so its text queries and text output projection get no
    # gradient; every other lora_B does (lora_A gets none on this first step because B = 0).
    last = f"transformer_blocks.{num_layers - 1}.attn."
    dead = (last + "add_q_proj.", last + "to_add_out.")
    for name, p in trainable.items():
        if ".lora_B." in name:
            reached = p.grad is not None and p.grad.abs().sum() > 0
            assert reached != name.startswith(dead), name


# The regex `attn` had before --lora_targets existed: runs and exports made then must keep their meaning.
ATTN_BEFORE_ISSUE_18 = (r".*transformer_blocks\.\d+\.attn\."
                        r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)")


def feed_forward_linears(model, where: str) -> set[str]:
    """The nn.Linear names inside every FeedForward module under `where` (found by module type, not by name)."""
    from diffusers.models.attention import FeedForward
    root = model.get_submodule(where)
    return {f"{where}.{ff_name}.{name}" for ff_name, ff in root.named_modules() if isinstance(ff, FeedForward)
            for name, m in ff.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("targets", ["attn", "attn_ffn"])
def test_lora_targets_choose_the_attention_and_feed_forward_linears_of_the_dit_blocks(targets):
    """attn (the default, today's regex unchanged): the 8 attention projections per block; attn_ffn: also exactly
    the DiT blocks' feed-forward Linears, of both streams (ff, ff_context: net.0.proj and net.2), and none of the
    token refiner's, which has a FeedForward of its own."""
    assert hunyuan.LORA_TARGETS["attn"] == ATTN_BEFORE_ISSUE_18
    tiny = hunyuan.load_backbone("tiny", seed=0)
    model = tiny.transformer
    attention = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                 and re.fullmatch(r"transformer_blocks\.\d+\.attn\..*", n)}
    ffn = feed_forward_linears(model, "transformer_blocks")
    assert len(attention) == 8 * model.config.num_layers and len(ffn) == 4 * model.config.num_layers
    assert feed_forward_linears(model, "context_embedder")   # the refiner's ff exists, and must stay untouched
    params = hunyuan.add_lora(model, rank=4, alpha=8, targets=targets)
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == (attention | ffn if targets == "attn_ffn" else attention)
    assert len(params) == 2 * len(adapted) and all(p.dtype == torch.float32 for p in params)
    assert model.peft_config["default"].target_modules == hunyuan.LORA_TARGETS[targets]   # what exports record
    with pytest.raises(ValueError, match=re.escape("--lora_targets 'ffn': choose one of ('attn', 'attn_ffn')")):
        hunyuan.add_lora(hunyuan.load_backbone("tiny", seed=0).transformer, targets="ffn")


def test_attn_ffn_freezes_the_last_blocks_text_feed_forward_and_every_other_lora_parameter_learns(cache):
    """freeze_unreachable with attn_ffn: besides the last block's to_add_out (as with attn), its text-stream
    feed-forward ff_context feeds only text tokens that the transformer drops, so its LoRA gets no gradient and is
    frozen. Then, with every A and B random (a step after B left 0), one backward through the batched CFG
    velocity gives every remaining LoRA tensor a nonzero gradient, except the last block's text queries
    (add_q_proj): they feed only the dropped text tokens' attention outputs, so their gradient is exactly 0 (not
    None: DDP and FSDP2 accept it); hunyuan Deviation 8 says why they stay trainable."""
    tiny = hunyuan.load_backbone("tiny", seed=0)
    model = tiny.transformer
    params = hunyuan.add_lora(model, rank=4, alpha=8, targets="attn_ffn")
    frozen = hunyuan.freeze_unreachable(model)
    last = f"transformer_blocks.{model.config.num_layers - 1}."
    assert set(frozen) == {f"{last}{layer}.lora_{ab}.default.weight" for ab in "AB"
                           for layer in ("attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2")}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(params) - 6
    torch.manual_seed(6)
    for p in trainable.values():
        p.data.normal_(0, 0.1)
    x = torch.randn(2, 4, 3, 8, 8)
    loss = hunyuan.velocity(model, x, 0.6, cache(PROMPTS), cache.negative(2), 5.0).square().mean()
    grads = dict(zip(trainable, torch.autograd.grad(loss, list(trainable.values()))))
    zero = {n for n, g in grads.items() if g.abs().sum() == 0}
    assert zero == {f"{last}attn.add_q_proj.lora_{ab}.default.weight" for ab in "AB"}


def test_freeze_unreachable_freezes_exactly_the_last_blocks_text_outputs(cache):
    """Full fine-tuning: the parameters that can never get a gradient are the last block's text output
    projection and text MLP (the text tokens are dropped after it); after freezing them, one backward through
    the batched CFG velocity reaches every trainable parameter (what DDP and FSDP2 checkpoints need)."""
    tiny = hunyuan.load_backbone("tiny", seed=0)
    model = tiny.transformer.requires_grad_(True)
    frozen = hunyuan.freeze_unreachable(model)
    last = f"transformer_blocks.{model.config.num_layers - 1}."
    expected = {n for n, _ in model.named_parameters()
                if n.startswith((last + "attn.to_add_out.", last + "ff_context."))}
    assert set(frozen) == expected and len(expected) == 6
    x = torch.randn(2, 4, 3, 8, 8)
    hunyuan.velocity(model, x, 0.6, cache(PROMPTS), cache.negative(2), 5.0).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("blocks, expected", [(None, [2, 2]), (1, [2, 1])])
def test_partial_gradient_checkpointing_recomputes_exactly_the_chosen_blocks(cache, blocks, expected):
    """Forward + backward runs a checkpointed block twice and any other block once, and the LoRA gradients
    equal those without checkpointing; under no_grad (the rollout) every block runs once."""
    tiny, params = tiny_with_random_lora(seed=3)
    x, cond, uncond = torch.randn(2, 4, 3, 8, 8), cache(PROMPTS), cache.negative(2)
    loss = lambda: hunyuan.velocity(tiny.transformer, x, 0.4, cond, uncond, 5.0).square().mean()
    reference = torch.autograd.grad(loss(), params, allow_unused=True)

    calls = [0] * len(tiny.transformer.transformer_blocks)
    for i, block in enumerate(tiny.transformer.transformer_blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    hunyuan.enable_gradient_checkpointing(tiny.transformer, blocks)
    grads = torch.autograd.grad(loss(), params, allow_unused=True)
    assert calls == expected
    assert_grads_close(grads, reference, atol=1e-6, rtol=1e-5)
    calls[:] = [0] * len(calls)
    with torch.no_grad():
        loss()
    assert calls == [1, 1]


def test_checkpointed_blocks_out_of_range_names_the_valid_range():
    tiny = hunyuan.load_backbone("tiny", seed=0)
    with pytest.raises(ValueError, match=r"has 2 blocks; choose 1\.\.2"):
        hunyuan.enable_gradient_checkpointing(tiny.transformer, 3)
