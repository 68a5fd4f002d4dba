"""Tests for wan.py on the tiny-wan backbone (CPU). The oracle is diffusers' own `WanPipeline` on the same
weights: its prompt encoding, its sampling loop (two transformer calls per step for CFG, the
FlowMatchEulerDiscreteScheduler's Euler step) and its output_type="pt" decoding."""
import copy
import re

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

import grpo
import sde
from models import backbones, wan

PROMPTS = ["a red ball rolls on grass", "  a cat &amp; a   dog\n on a sofa "]   # the 2nd exercises prompt_clean


@pytest.fixture(scope="module")
def backbone():
    return wan.load_backbone("tiny-wan", seed=0)


@pytest.fixture(scope="module")
def cache(backbone):
    return wan.PromptCache(backbone)


class OurSchedule(FlowMatchEulerDiscreteScheduler):
    """The pipeline's scheduler on sde.sigma_schedule's noise levels: WanPipeline calls set_timesteps(K) with
    no sigmas, whose default grid ends at 1/1000 instead of 1/K; handing it our unshifted grid 1, 1 - 1/K,
    ..., 1/K makes it apply the same shift to the same points."""

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        unshifted = torch.linspace(1, 0, num_inference_steps + 1, dtype=torch.float64)[:-1].tolist()
        super().set_timesteps(num_inference_steps, device=device, sigmas=unshifted)


def pipeline(backbone, shift):
    return WanPipeline(tokenizer=backbone.tokenizer, text_encoder=backbone.text_encoder, vae=backbone.vae,
                       transformer=backbone.transformer, scheduler=OurSchedule(shift=shift))


def with_random_lora(seed: int):
    """A fresh tiny-wan with rank-4 LoRA whose A and B are both random (gaussian init has B = 0)."""
    tiny = wan.load_backbone("tiny-wan", seed=0)
    params = wan.add_lora(tiny.transformer, rank=4, alpha=8)
    torch.manual_seed(seed)
    for p in params:
        p.data.normal_(0, 0.1)
    return tiny, params


def test_tiny_is_deterministic_in_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = wan.load_backbone("tiny-wan", seed=7)
    assert torch.equal(torch.rand(3), expected)   # fork_rng: the caller's stream did not move
    b, c = wan.load_backbone("tiny-wan", seed=7), wan.load_backbone("tiny-wan", seed=8)
    for part in ("transformer", "vae", "text_encoder"):
        pa, pb, pc = (dict(getattr(m, part).named_parameters()) for m in (a, b, c))
        assert all(torch.equal(pa[k], pb[k]) for k in pa), part
        assert any(not torch.equal(pa[k], pc[k]) for k in pa), part


def test_prompt_embeddings_equal_the_pipeline_encode_prompt(backbone, cache):
    pipe = pipeline(backbone, 3.0)
    cond, uncond = pipe.encode_prompt(PROMPTS, None, True, max_sequence_length=512, device="cpu")
    ours, negative = cache(PROMPTS), cache.negative(2)
    assert ours.embeds.shape == cond.shape == (2, 512, 32)
    torch.testing.assert_close(ours.embeds, cond, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(negative.embeds, uncond, atol=1e-6, rtol=1e-6)
    # Zero rows past each prompt's tokens (cleaned text + end token), not the encoder's padding output.
    cleaned = "a cat & a dog on a sofa"
    for row, text in zip(ours.embeds, ["a red ball rolls on grass", cleaned]):
        n = len(backbone.tokenizer(text).input_ids)
        assert row[:n].abs().sum(1).min() > 0 and row[n:].abs().sum() == 0
    assert len(cache.cache[PROMPTS[1]]) == len(cleaned.encode()) + 1   # stored without padding (Deviation 6)


def test_prompts_encoded_after_offload_join_the_cache_on_its_device(backbone):
    """Issue 18 item 9. A CPU has no second real device, so "meta" stands for the accelerator: the cache is made
    while the encoder sits there (its embeddings belong there); offloading then leaves the encoder on the CPU (a
    meta module cannot be copied back, so the CPU copy is put in its place, which is what `.to("cpu")` amounts to),
    and a prompt seen only now is encoded there. It must join the cache on the cache's device, so that a batch
    mixing it with earlier prompts stacks; before the fix it stayed on the CPU and torch.stack failed."""
    tiny = wan.load_backbone("tiny-wan", seed=0)
    on_cpu = tiny.text_encoder
    tiny.text_encoder = copy.deepcopy(on_cpu).to("meta")   # the "accelerator" the run starts on
    cache = wan.PromptCache(tiny)
    assert cache.device.type == "meta"
    cache.cache["an earlier prompt"] = torch.zeros(5, 32, device="meta")   # as if encoded there before the offload
    tiny.text_encoder = on_cpu                              # offload_encoders(): the encoder now runs on the CPU
    cache.offload_encoders()
    batch = cache(["an earlier prompt", PROMPTS[0]])
    assert batch.embeds.device.type == "meta" and batch.embeds.shape == (2, 512, 32)
    assert {e.device.type for e in cache.cache.values()} == {"meta"}
    # The new prompt's rows, encoded on the CPU, are the ones the pipeline's encoder gives (only moved).
    assert cache.cache[PROMPTS[0]].shape == wan._encode_prompts(backbone, [PROMPTS[0]])[0].shape


def test_ode_rollout_with_cfg_equals_wan_pipeline_latents_and_frames(backbone, cache):
    K, shift, g = 4, backbone.shift, 5.0
    sigmas = sde.sigma_schedule(K, shift)
    pipe = pipeline(backbone, shift)
    pipe.scheduler.set_timesteps(K)
    torch.testing.assert_close(pipe.scheduler.sigmas, sigmas, atol=1e-6, rtol=0)   # same noise levels
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x_T = torch.stack([torch.randn(wan.latent_shape(backbone, 5, 32, 32), generator=gen) for gen in gens])
    embeds, negative = cache(PROMPTS), cache.negative(1)
    traj = backbones.sample(wan, backbone.transformer, embeds, negative, x_T, gens, sigmas, "ode", 0.0, g,
                            micro_batch=1)
    frames = wan.decode(backbone, traj.latents[:, -1])
    common = dict(prompt_embeds=embeds.embeds, negative_prompt_embeds=negative.repeat_interleave(2).embeds,
                  latents=x_T.clone(), num_frames=5, height=32, width=32, num_inference_steps=K, guidance_scale=g)
    latents = pipe(**common, output_type="latent").frames
    video = pipe(**common, output_type="pt").frames   # (N, F, 3, H, W) in [0, 1]
    assert (latents - x_T).abs().max() > 0.1 and video.std() > 0   # the comparison has teeth
    torch.testing.assert_close(traj.latents[:, -1], latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(frames, video, atol=1e-5, rtol=0)
    # CFG matters here: without the negative prompt the result differs.
    plain = backbones.sample(wan, backbone.transformer, embeds, None, x_T, gens, sigmas, "ode", 0.0, g, 2)
    assert (plain.latents[:, -1] - latents).abs().max() > 1e-3


def test_the_pipeline_sampler_equals_wan_pipeline_out_of_the_box(backbone, cache):
    """sample.py --ode_solver pipeline: WanPipeline with the scheduler the hub folders ship (UniPC, its own
    set_timesteps(K) grid), not the training grid, on which Euler gives visibly other videos."""
    K, g = 3, 5.0
    pipe = WanPipeline(tokenizer=backbone.tokenizer, text_encoder=backbone.text_encoder, vae=backbone.vae,
                       transformer=backbone.transformer, scheduler=UniPCMultistepScheduler.from_config(wan.HUB_SCHEDULER))
    x_T = torch.randn((1, *wan.latent_shape(backbone, 5, 32, 32)), generator=torch.Generator().manual_seed(0))
    embeds, negative = cache(PROMPTS[:1]), cache.negative(1)
    latents = pipe(prompt_embeds=embeds.embeds, negative_prompt_embeds=negative.embeds, latents=x_T.clone(),
                   num_frames=5, height=32, width=32, num_inference_steps=K, guidance_scale=g, output_type="latent").frames
    ours = backbones.pipeline_sample(wan, backbone, backbone.transformer, embeds, negative, x_T, g, K, micro_batch=1)
    torch.testing.assert_close(ours, latents, atol=1e-5, rtol=0)
    euler = backbones.sample(wan, backbone.transformer, embeds, negative, x_T, [torch.Generator()],
                             sde.sigma_schedule(K, backbone.shift), "ode", 0.0, g, 1).latents[:, -1]
    assert (euler - latents).abs().max() > 1e-2  # the training grid's Euler is another sampler


def test_batched_cfg_equals_two_pipeline_style_calls(backbone, cache):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 2, 4, 4)
    cond, uncond, sigma, g = cache(PROMPTS), cache.negative(2), torch.tensor([0.9, 0.3]), 4.5
    with torch.no_grad():
        v = wan.velocity(backbone.transformer, x, sigma, cond, uncond, g)
        v_cond, v_uncond = (backbone.transformer(hidden_states=x, timestep=1000 * sigma, encoder_hidden_states=e.embeds,
                                                 return_dict=False)[0] for e in (cond, uncond))
        v_one = wan.velocity(backbone.transformer, x, sigma, cond, uncond, 1.0)
    assert v.dtype == torch.float32 and (v_cond - v_uncond).abs().max() > 1e-3
    torch.testing.assert_close(v, v_uncond + g * (v_cond - v_uncond), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_one, v_cond, atol=1e-6, rtol=1e-6)   # g = 1: no CFG, as the pipeline


def test_bf16_keeps_the_fp32_modules_and_gives_float32_velocity(backbone, cache, tmp_path):
    """Under bf16 the tiny model has the dtypes from_pretrained(dtype=bf16) gives a checkpoint."""
    tiny = wan.load_backbone("tiny-wan", seed=0, dtype=torch.bfloat16)
    backbone.transformer.save_pretrained(tmp_path)
    loaded = type(tiny.transformer).from_pretrained(tmp_path, dtype=torch.bfloat16)
    ours, theirs = dict(tiny.transformer.named_parameters()), dict(loaded.named_parameters())
    assert {k: p.dtype for k, p in ours.items()} == {k: p.dtype for k, p in theirs.items()}
    assert {p.dtype for p in ours.values()} == {torch.float32, torch.bfloat16}
    assert ours["blocks.0.scale_shift_table"].dtype == torch.float32 and ours["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    x = torch.randn(2, 16, 2, 4, 4)
    with torch.no_grad():
        v16 = wan.velocity(tiny.transformer, x, 0.5, cache(PROMPTS), cache.negative(2), 5.0)
        v32 = wan.velocity(backbone.transformer, x, 0.5, cache(PROMPTS), cache.negative(2), 5.0)
    assert v16.dtype == torch.float32 and (v16 - v32).norm() / v32.norm() < 0.05   # bf16 rounding only


def test_lora_covers_every_attention_projection_in_the_blocks_and_nothing_else(cache):
    tiny = wan.load_backbone("tiny-wan", seed=0)
    projections = {n for n, m in tiny.transformer.named_modules() if isinstance(m, torch.nn.Linear)
                   and re.fullmatch(r"blocks\.\d+\.attn[12]\..*", n)}
    assert len(projections) == tiny.transformer.config.num_layers * 2 * 4   # q, k, v, out of attn1 and attn2
    params = wan.add_lora(tiny.transformer, rank=4, alpha=8)
    trainable = {n for n, p in tiny.transformer.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_")[0] for n in trainable}
    assert adapted == projections and len(trainable) == 2 * len(projections) == len(params)
    assert all(p.dtype == torch.float32 for p in params)


@pytest.mark.parametrize("targets", ["attn", "attn_ffn"])
def test_lora_targets_choose_the_attention_and_feed_forward_linears_of_the_blocks(targets):
    """attn (the default, the regex runs and exports made before --lora_targets carry): the 8 projections of
    attn1 and attn2 per block; attn_ffn: also exactly each block's FeedForward Linears (ffn.net.0.proj, ffn.net.2,
    found by module type), and nothing outside the blocks (the text and time embedders have Linears too)."""
    from diffusers.models.attention import FeedForward
    assert wan.LORA_TARGETS["attn"] == r"blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    tiny = wan.load_backbone("tiny-wan", seed=0)
    model = tiny.transformer
    attention = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                 and re.fullmatch(r"blocks\.\d+\.attn[12]\..*", n)}
    ffn = {f"blocks.{i}.ffn.{n}" for i, block in enumerate(model.blocks) for n, m in block.ffn.named_modules()
           if isinstance(block.ffn, FeedForward) and isinstance(m, torch.nn.Linear)}
    assert len(ffn) == 2 * model.config.num_layers
    params = wan.add_lora(model, rank=4, alpha=8, targets=targets)
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == (attention | ffn if targets == "attn_ffn" else attention)
    assert len(params) == 2 * len(adapted) and all(p.dtype == torch.float32 for p in params)
    assert model.peft_config["default"].target_modules == wan.LORA_TARGETS[targets]   # what exports record


def test_attn_ffn_lora_gets_a_gradient_everywhere_so_nothing_needs_freezing(cache):
    """With the feed-forward LoRA too, freeze_unreachable finds nothing (Wan drops no stream) and, with A and B
    random (a step after B left 0), every LoRA tensor gets a nonzero gradient through the batched CFG velocity."""
    tiny = wan.load_backbone("tiny-wan", seed=0)
    params = wan.add_lora(tiny.transformer, rank=4, alpha=8, targets="attn_ffn")
    assert wan.freeze_unreachable(tiny.transformer) == [] and all(p.requires_grad for p in params)
    torch.manual_seed(7)
    for p in params:
        p.data.normal_(0, 0.1)
    x, cond, uncond = torch.randn(2, 16, 2, 4, 4), cache(PROMPTS), cache.negative(2)
    grads = torch.autograd.grad(wan.velocity(tiny.transformer, x, 0.6, cond, uncond, 5.0).square().mean(), params)
    assert all(g.abs().sum() > 0 for g in grads)


def test_every_lora_and_every_full_parameter_gets_a_gradient_so_nothing_needs_freezing(cache):
    """Wan Deviation 7: with random LoRA A and B every LoRA parameter gets a nonzero gradient through the
    batched CFG velocity; for full fine-tuning freeze_unreachable finds nothing and every parameter is reached."""
    tiny, params = with_random_lora(seed=1)
    x, cond, uncond = torch.randn(2, 16, 2, 4, 4), cache(PROMPTS), cache.negative(2)
    grads = torch.autograd.grad(wan.velocity(tiny.transformer, x, 0.6, cond, uncond, 5.0).square().mean(), params)
    assert all(g.abs().sum() > 0 for g in grads)
    full = wan.load_backbone("tiny-wan", seed=0).transformer.requires_grad_(True)
    assert wan.freeze_unreachable(full) == []
    wan.velocity(full, x, 0.6, cond, uncond, 5.0).square().mean().backward()
    assert all(p.grad is not None for p in full.parameters())


@pytest.mark.parametrize("blocks, expected", [(None, [2, 2]), (1, [2, 1])])
def test_partial_gradient_checkpointing_recomputes_exactly_the_chosen_blocks(cache, blocks, expected):
    tiny, params = with_random_lora(seed=3)
    x, cond, uncond = torch.randn(2, 16, 2, 4, 4), cache(PROMPTS), cache.negative(2)
    loss = lambda: wan.velocity(tiny.transformer, x, 0.4, cond, uncond, 5.0).square().mean()
    reference = torch.autograd.grad(loss(), params)
    calls = [0, 0]
    for i, block in enumerate(tiny.transformer.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    wan.enable_gradient_checkpointing(tiny.transformer, blocks)
    grads = torch.autograd.grad(loss(), params)
    assert calls == expected
    for a, b in zip(grads, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", sde.KINDS[1:])
def test_on_policy_ratio_is_exactly_one_for_every_kind(cache, kind):
    """Rollout through backbones.sample in micro-batches of 2, then the training forward (sde.policy_step with
    one random trained step per sample, as grpo does) on the same micro-batches: logp equals logp_old bit for
    bit, so the first ratio is exactly 1."""
    tiny, _ = with_random_lora(seed=4)
    N, K, model, eta = 4, 4, tiny.transformer, 0.5
    sigmas = sde.sigma_schedule(K, tiny.shift)
    embeds, negative = cache([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2), cache.negative(1)
    gens = [torch.Generator().manual_seed(i) for i in range(N)]
    x_T = torch.stack([torch.randn(16, 2, 4, 4, generator=gen) for gen in gens])
    traj = backbones.sample(wan, model, embeds, negative, x_T, gens, sigmas, kind, eta, 5.0, micro_batch=2)
    steps = grpo.select_timesteps(N, sde.step_variances(sigmas, kind, eta) > 0, 1.0, torch.Generator().manual_seed(0))
    for j in range(steps.shape[1]):
        for mb in (slice(0, 2), slice(2, 4)):
            fn = backbones.velocity_fn(wan, model, embeds[mb], negative, 5.0)
            _, _, logp = sde.policy_step(fn, traj.rows(mb), steps[mb, j], kind, eta)
            logp_old = traj.logp[mb].gather(1, steps[mb, j:j + 1])[:, 0]
            assert torch.equal(torch.exp(logp - logp_old), torch.ones(2)), (kind, j)
