"""videoalign.py against independent computations: Qwen2-VL patches written out as loops, hand-computed
frame indices and sizes, the reward recomputed from the tiny model's own hidden states, and the
released-checkpoint layout rebuilt by hand. The rubric is a stand-in (VideoAlign's text is not copied)."""
import json
import math
import time

import pytest
import torch

from reward_models import videoalign as va

STANDIN = va.STAND_IN_TEMPLATE
PROMPTS = ["a red car drives along a coast road", "cat", "two dogs play in the snow at dusk, slow pan"]


@pytest.fixture(scope="module")
def tiny():
    return va.build_tiny_videoalign(STANDIN, seed=0, batch_size=3)


def clips(n=3, frames=9, height=48, width=64, seed=0):
    return torch.rand(n, frames, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_patchify_matches_a_loop_over_qwen_patches():
    frames = torch.randn(4, 3, 56, 84, generator=torch.Generator().manual_seed(1))
    pixel_values, grid = va.patchify(frames)
    assert grid.dtype == torch.long and grid.tolist() == [[2, 4, 6]]
    rows = []  # time pair, 2x2 merge block (row-major), cell in the block; each row is (C, 2, 14, 14)
    for t in range(2):
        for bh in range(2):
            for bw in range(3):
                for mh in range(2):
                    for mw in range(2):
                        y, x = (2 * bh + mh) * 14, (2 * bw + mw) * 14
                        patch = torch.empty(3, 2, 14, 14)
                        for c in range(3):
                            for dt in range(2):
                                patch[c, dt] = frames[2 * t + dt, c, y:y + 14, x:x + 14]
                        rows.append(patch.flatten())
    assert torch.equal(pixel_values, torch.stack(rows))


def test_patchify_pads_an_odd_clip_by_repeating_its_last_frame():
    frames = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    pixel_values, grid = va.patchify(frames)
    assert grid.tolist() == [[2, 2, 2]]
    assert torch.equal(pixel_values, va.patchify(torch.cat([frames, frames[2:]]))[0])
    second = pixel_values[4:].view(4, 3, 2, 14, 14)  # the second pair is frame 2 twice
    assert torch.equal(second[:, :, 0], second[:, :, 1])


@pytest.mark.parametrize("size, expected", [((480, 848), (336, 588)), ((256, 256), (336, 336)),
                                            ((320, 576), (308, 588)), ((720, 1280), None),
                                            ((1080, 1920), None), ((100, 700), None)])
def test_resize_for_qwen_keeps_the_grid_the_budget_and_the_aspect(size, expected):
    H, W = size
    h, w = va.smart_size(H, W)
    if expected is not None:  # worked by hand from Qwen's rule (round, then floor / ceil by beta)
        assert (h, w) == expected
    assert h % 28 == 0 and w % 28 == 0 and va.MIN_PIXELS <= h * w <= va.MAX_PIXELS
    assert abs(h / w - H / W) <= (H / W) * (28 / h + 28 / w)  # off by at most one grid step per side
    out = va.resize_for_qwen(torch.rand(2, 3, H, W))
    assert out.shape == (2, 3, h, w) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, (out * 255).round() / 255)  # 8-bit levels, as a uint8 resize gives


@pytest.mark.parametrize("num_frames, fps, expected", [
    (33, 24.0, [0, 11, 21, 32]),            # 2.75 frames at 2 fps -> raised to 4
    (49, 16.0, [0, 10, 19, 29, 38, 48]),    # 6.125 -> 6
    (121, 24.0, [0, 13, 27, 40, 53, 67, 80, 93, 107, 120]),  # 10.08 -> 10
    (10, 4.0, [0, 3, 6, 9]),                # 5 -> round(2.5) * 2 = 4: half to even
    (3, 8.0, [0, 2]),                       # capped by floor_even(3) = 2, no repetition
    (10, 2.0, list(range(10))),             # already 2 fps: every frame
])
def test_frame_indices_follow_videoalign_uniform_sampling(num_frames, fps, expected):
    assert va.frame_indices(num_frames, fps).tolist() == expected
    video = torch.arange(num_frames).float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2)  # frame k holds k
    assert va.sample_frames(video, fps)[:, 0, 0, 0].tolist() == expected


@pytest.mark.parametrize("num_frames, fps, n", [(33, 24.0, 4), (49, 16.0, 6), (40, 4.0, 20)])
def test_preprocess_video_gives_the_seconds_each_temporal_patch_spans(num_frames, fps, n):
    """qwen-vl-utils: sample_fps = n / F * fps and second_per_grid_ts = 2 / sample_fps (Qwen2.5-VL's time axis)."""
    pixel_values, grid, seconds = va.preprocess_video(torch.rand(num_frames, 3, 28, 28), fps, min_pixels=28 * 28)
    assert grid.tolist() == [[n // 2, 2, 2]] and pixel_values.shape == (n // 2 * 4, 3 * 2 * 14 * 14)
    assert seconds == pytest.approx(2 / (n / num_frames * fps), rel=1e-12)


def test_frame_indices_cap_and_reject():
    assert len(va.frame_indices(2000, 1.0)) == 768  # 4000 wanted, capped at 768
    with pytest.raises(ValueError):
        va.frame_indices(1, 8.0)


def test_prompt_holds_one_video_pad_per_merged_patch_and_each_reward_token_once(tiny):
    batch = tiny.prepare(clips(2), [PROMPTS[1], PROMPTS[0]], 8.0)  # short caption first
    # 9 frames at 8 fps -> 4 frames; 48x64 -> 56x56; grid (2, 4, 4) -> 32 patches -> 8 merged tokens
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [2, 4, 4]]
    assert batch["pixel_values_videos"].shape == (64, 3 * 2 * 14 * 14)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tok = tiny.tokenizer.convert_tokens_to_ids
    for i in range(2):
        assert int((ids[i] == tok("<|video_pad|>")).sum()) == int(batch["video_grid_thw"][i].prod()) // 4
        assert [int((ids[i] == tok(t)).sum()) for t in va.REWARD_TOKENS] == [1, 1, 1]
    n = int(mask[0].sum())  # the shorter caption is right-padded
    assert n < ids.shape[1] and mask[1].all() and mask[0, :n].all() and not mask[0, n:].any()
    assert (ids[0, n:] == tiny.tokenizer.pad_token_id).all()
    text = tiny.tokenizer.decode(ids[1])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|video_pad|>")
    assert text.endswith("Match: <|TA_reward|>\nEND\n<|im_end|>\n<|im_start|>assistant\n") and PROMPTS[0] in text
    moved = va.build_chat_text("{video}\n" + STANDIN.replace("\nRate", "Rate"), "x", 2)  # explicit {video}
    assert "<|im_start|>user\n<|vision_start|><|video_pad|><|video_pad|><|vision_end|>\nRate" in moved


def test_tiny_scores_in_range_and_batched_equal_one_at_a_time(tiny):
    videos = clips()
    out = tiny(videos, PROMPTS, 8.0)
    assert sorted(out) == ["semantic", "temporal", "visual"]
    for score in out.values():
        assert score.shape == (3,) and score.dtype == torch.float32 and ((0 <= score) & (score <= 1)).all()
    batched = tiny.raw_scores(videos, PROMPTS, 8.0)
    try:
        tiny.batch_size = 1
        single = tiny.raw_scores(videos, PROMPTS, 8.0)
    finally:
        tiny.batch_size = 3
    assert batched.shape == (3, 3) and torch.allclose(batched, single, atol=1e-5, rtol=0)
    assert batched.std(dim=0).min() > 1e-3  # the clips do get different scores


def test_score_is_sigmoid_of_the_standardised_head_at_each_reward_token(tiny):
    video, prompt = clips(1, seed=3), PROMPTS[2]
    batch = tiny.prepare(video, [prompt], 8.0)
    ids = batch["input_ids"][0]
    tok = tiny.tokenizer.convert_tokens_to_ids
    with torch.no_grad():  # own route: embed, drop the merged vision features into the pads, run the LM
        embeds = tiny.qwen.language_model.embed_tokens(ids).clone()  # (L, D)
        vision = tiny.qwen.visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"]).pooler_output
        embeds[ids == tok("<|video_pad|>")] = vision
        # default positions of the language model: 0..L-1 on all three axes, as VideoAlign's forward gets
        hidden = tiny.qwen.language_model(inputs_embeds=embeds[None]).last_hidden_state[0]  # (L, D)
    raw = [float(hidden[(ids == tok(t)).nonzero().item()] @ tiny.rm_head.weight[0]) for t in va.REWARD_TOKENS]
    stats = [(3.6757, 2.2476), (1.1646, 1.3811), (2.8105, 2.5121)]
    expected = [1 / (1 + math.exp(-(r - m) / s)) for r, (m, s) in zip(raw, stats)]
    out = tiny(video, [prompt], 8.0)
    assert tiny.raw_scores(video, [prompt], 8.0)[0].tolist() == pytest.approx(raw, abs=1e-5)
    assert [out[k].item() for k in ("visual", "temporal", "semantic")] == pytest.approx(expected, abs=1e-6)


def test_the_score_reads_the_caption_and_the_video(tiny):
    video = clips(1, seed=4)
    a = tiny.raw_scores(video, ["a red car"], 8.0)[0]
    b = tiny.raw_scores(video, ["a blue boat drifting at night"], 8.0)[0]
    # causal attention: VQ and MQ sit before the caption in the stand-in rubric, TA after it
    assert torch.allclose(a[:2], b[:2], atol=1e-5) and abs(a[2] - b[2]) > 1e-3
    c = tiny.raw_scores(clips(1, seed=5), ["a red car"], 8.0)[0]
    assert (a - c).abs().min() > 1e-4


def test_template_errors_say_what_is_wrong_and_where_to_get_the_rubric(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt_template.py.*github.com/KwaiVGI/VideoAlign"):
        va.load_prompt_template(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="DETAILED_PROMPT_WITH_SPECIAL_TOKEN"):
        va.build_tiny_videoalign(tmp_path / "missing.txt")
    with pytest.raises(ValueError):
        va.check_template(STANDIN.replace("<|TA_reward|>", ""))
    with pytest.raises(ValueError):  # heads are read by position, so the order is fixed
        va.check_template(STANDIN.replace("<|VQ_reward|>", "@").replace("<|MQ_reward|>", "<|VQ_reward|>")
                          .replace("@", "<|MQ_reward|>"))
    (tmp_path / "rubric.txt").write_text(STANDIN)
    assert va.load_prompt_template(tmp_path / "rubric.txt") == STANDIN  # verbatim, newlines included


def test_from_pretrained_without_weights_fails_fast_with_the_download_command(tmp_path):
    (tmp_path / "rubric.txt").write_text(STANDIN)
    start = time.time()
    with pytest.raises(RuntimeError, match="hf download KwaiVGI/VideoReward --local-dir"):
        va.VideoAlignReward.from_pretrained(tmp_path / "nowhere", tmp_path / "rubric.txt")
    folder = tmp_path / "videoreward"  # reward files present, base model not available offline
    (folder / "checkpoint-7").mkdir(parents=True)
    (folder / "model_config.json").write_text("{}")
    (folder / "checkpoint-7" / "model.pth").write_bytes(b"")
    with pytest.raises(RuntimeError, match="hf download nobody/no-such-qwen"):
        va.VideoAlignReward.from_pretrained(folder, tmp_path / "rubric.txt", base_model="nobody/no-such-qwen")
    assert time.time() - start < 10


def released_layout(state, scale, rank=2, adapter_name=".default", seed=0):
    """Write a VideoAlignReward state dict as VideoReward stores it: transformers-4.45 names inside a peft
    wrapper, every language-model projection split into base weight + LoRA (W = W0 + scale * B @ A)."""
    g = torch.Generator().manual_seed(seed)
    out, base = {}, {}
    for key, value in state.items():
        old = key.removeprefix("qwen.").replace("language_model.", "model.", 1)
        module, leaf = old.rsplit(".", 1)
        if old.startswith("model.layers.") and module.endswith("_proj"):
            if leaf == "weight":
                A = torch.randn(rank, value.shape[1], generator=g)
                B = torch.randn(value.shape[0], rank, generator=g)
                base[key] = value - scale * B @ A
                out[f"base_model.model.{module}.base_layer.weight"] = base[key]
                out[f"base_model.model.{module}.lora_A{adapter_name}.weight"] = A
                out[f"base_model.model.{module}.lora_B{adapter_name}.weight"] = B
            else:
                out[f"base_model.model.{module}.base_layer.{leaf}"] = value
        else:
            out["base_model.model." + old] = value
    out["base_model.model.lm_head.weight"] = state["qwen.language_model.embed_tokens.weight"]
    return out, base


def test_released_checkpoint_remaps_onto_the_model(tiny):
    state = tiny.state_dict()
    released, _ = released_layout(state, scale=2.0)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in released
    assert "base_model.model.visual.merger.mlp.0.weight" in released and "base_model.model.rm_head.weight" in released
    remapped = va.remap_released_state_dict(released, lora_scale=2.0)
    assert sorted(remapped) == sorted(state)
    for key in state:
        assert torch.allclose(remapped[key], state[key], atol=1e-5), key
    other = va.build_tiny_videoalign(STANDIN, seed=1, batch_size=3)  # different random weights
    videos = clips(2, seed=6)
    assert not torch.allclose(other.raw_scores(videos, PROMPTS[:2], 8.0), tiny.raw_scores(videos, PROMPTS[:2], 8.0))
    other.load_state_dict(remapped)
    assert torch.allclose(other.raw_scores(videos, PROMPTS[:2], 8.0), tiny.raw_scores(videos, PROMPTS[:2], 8.0),
                          atol=1e-4)


def test_adapter_only_layout_merges_onto_the_base_weights(tiny):
    state = tiny.state_dict()
    released, base = released_layout(state, scale=0.5, adapter_name="")  # adapter_model.safetensors names
    adapter = {k: v for k, v in released.items() if ".lora_" in k}
    non_lora = {"base_model.model.rm_head.weight": state["rm_head.weight"]}
    remapped = va.remap_released_state_dict({**non_lora, **adapter}, lora_scale=0.5, base=base)
    assert sorted(remapped) == sorted(base) + ["rm_head.weight"]
    for key in remapped:
        assert torch.allclose(remapped[key], state[key], atol=1e-5), key


def test_from_pretrained_loads_a_videoreward_folder(tmp_path):
    """The whole loader on a miniature of the real files: a base model whose embedding is larger than its
    tokenizer (as Qwen2-VL's 151936 vs 151657), and model_config.json + checkpoint-<step>/model.pth."""
    from transformers import Qwen2VLForConditionalGeneration
    base, folder, rubric = tmp_path / "base", tmp_path / "videoreward", tmp_path / "rubric.txt"
    tokenizer = va.byte_level_tokenizer(["<|endoftext|>", "<|image_pad|>", *va.CHAT_SPECIALS])  # no reward tokens
    Qwen2VLForConditionalGeneration(va.tiny_qwen2vl_config(tokenizer, len(tokenizer) + 8)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    rubric.write_text(STANDIN)
    (folder / "checkpoint-3").mkdir(parents=True)  # an older step: the latest one is loaded
    (folder / "checkpoint-12").mkdir()
    stats = {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.25, "TA_std": 4.0}
    (folder / "model_config.json").write_text(json.dumps({
        "inference_config": stats, "data_config": {"fps": 2.0, "max_frame_pixels": va.MAX_PIXELS},
        "peft_lora_config": {"lora_r": 4, "lora_alpha": 8}}))
    trained = va.build_tiny_videoalign(STANDIN, seed=7)  # the "trained" weights, stored as VideoReward does
    trained.max_pixels, trained.min_pixels = va.MAX_PIXELS, va.MIN_PIXELS
    torch.save(released_layout(trained.state_dict(), scale=2.0)[0], folder / "checkpoint-12" / "model.pth")

    model = va.VideoAlignReward.from_pretrained(folder, rubric, dtype=torch.float32, base_model=str(base))
    assert model.reward_ids == trained.reward_ids and model.qwen.get_input_embeddings().num_embeddings == 266
    videos = clips(2, seed=8)
    raw = model.raw_scores(videos, PROMPTS[:2], 8.0)
    assert torch.allclose(raw, trained.raw_scores(videos, PROMPTS[:2], 8.0), atol=1e-4)
    out = model(videos, PROMPTS[:2], 8.0)
    for j, (name, mean, std) in enumerate([("visual", 1.0, 2.0), ("temporal", -1.0, 0.5), ("semantic", 0.25, 4.0)]):
        assert torch.allclose(out[name], torch.sigmoid((raw[:, j] - mean) / std), atol=1e-6)
