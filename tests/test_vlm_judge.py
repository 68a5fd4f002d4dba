"""vlm_judge.py against independent computations: the expected score by a hand softmax, the cached
three-question path against transformers' own forward of each whole chat, the shared video path and
transformers' vision tower, and the checks that refuse bad input before any weight loads."""
import json
import math
import time

import pytest
import torch

import rewards
from reward_models import videoalign as va, vlm_judge as vj

PROMPTS = ["a red car drives along a coast road", "cat", "two dogs play in the snow at dusk, slow pan"]


@pytest.fixture(scope="module")
def tiny():
    return vj.build_tiny_judge(seed=0, batch_size=3)


def clips(n=3, frames=9, height=48, width=64, seed=0):
    return torch.rand(n, frames, 3, height, width, generator=torch.Generator().manual_seed(seed))


def template_text(scale, questions):
    return f"[scale]\n{' '.join(map(str, scale))}\n" + "".join(f"\n[{k}]\n{q}\n" for k, q in questions.items())


def test_expected_score_is_the_mean_of_a_hand_softmax_over_the_scale_tokens():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(0)) * 3
    logits[3, [3, 7, 11]] += 40  # nearly all mass on the scale: off-format ~ 0, and expm1 keeps it accurate
    allowed, scale = [3, 7, 11], (1, 2, 4)
    score, off = vj.expected_score(logits, allowed, scale)
    for i, row in enumerate(logits.double().tolist()):
        p = [math.exp(x) for x in row]
        on = sum(p[j] for j in allowed)
        mean = sum(p[j] / on * v for j, v in zip(allowed, scale))
        assert score[i].item() == pytest.approx((mean - 1) / (4 - 1), abs=1e-6)
        assert off[i].item() == pytest.approx(1 - on / sum(p), rel=1e-4, abs=1e-7)
    certain = torch.full((1, 20), -1e4)
    certain[0, 11] = 0.0  # all mass on the top value
    assert vj.expected_score(certain, allowed, scale)[0].item() == 1.0
    lost = torch.zeros(1, 20)
    lost[0, allowed] = -30.0  # the judge answers anything but a digit: the score is still defined
    s, o = vj.expected_score(lost, allowed, scale)
    assert s.item() == pytest.approx((7 / 3 - 1) / 3, abs=1e-6) and o.item() > 0.999


def test_shared_prefix_equals_three_independent_forwards_of_the_whole_chat(tiny):
    """The oracle is transformers' own forward of each chat as one string, positions computed by transformers."""
    videos, fps = clips(2), 8.0
    batch = tiny.prepare(videos, PROMPTS[:2], fps)
    with torch.no_grad():
        shared = tiny.shared_prefix_logits(batch)  # (6, V)
        for b in range(2):
            pv, thw, spg = va.preprocess_video(videos[b], fps, max_pixels=tiny.max_pixels, min_pixels=tiny.min_pixels)
            for a, aspect in enumerate(vj.ASPECTS):
                text = vj.chat_prefix(int(thw.prod()) // 4) + vj.chat_suffix(tiny.questions[aspect], PROMPTS[b])
                ids = tiny.encode(text)[None]
                out = tiny.qwen(input_ids=ids, pixel_values_videos=pv, video_grid_thw=thw,
                                second_per_grid_ts=torch.tensor([spg]), mm_token_type_ids=(ids == tiny.video_id) * 2)
                torch.testing.assert_close(shared[b * 3 + a], out.logits[0, -1], atol=1e-5, rtol=0)
        independent = torch.stack([tiny.full_chat_logits(batch, (a,)) for a in vj.ASPECTS], 1).flatten(0, 1)
        torch.testing.assert_close(shared, independent, atol=1e-5, rtol=0)  # the benchmark's baselines
        torch.testing.assert_close(shared, tiny.full_chat_logits(batch), atol=1e-5, rtol=0)
    assert (shared[0::3] - shared[1::3]).abs().max() > 1e-3  # the three questions do get different answers


def test_scores_do_not_depend_on_batch_composition_or_order(tiny):
    videos = clips(3, seed=1)
    together, off = tiny.judge(videos, PROMPTS, 8.0)  # one call of 3
    try:
        tiny.batch_size = 1
        alone, _ = tiny.judge(videos, PROMPTS, 8.0)
    finally:
        tiny.batch_size = 3
    perm = [2, 0, 1]
    shuffled, _ = tiny.judge(videos[perm], [PROMPTS[i] for i in perm], 8.0)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[perm], shuffled, atol=1e-5, rtol=0)
    assert together.shape == off.shape == (3, 3) and ((0 <= together) & (together <= 1)).all()
    assert together.std(dim=0).min() > 1e-4  # the clips do get different scores


def test_video_path_is_videoaligns_and_fills_the_pads_and_the_time_axis(tiny):
    assert vj.preprocess_video is va.preprocess_video  # one function, shared
    videos, fps = clips(1, frames=40, seed=2), 4.0  # 10 s at 2 fps: 20 frames, 10 temporal patches
    batch = tiny.prepare(videos, PROMPTS[:1], fps)
    pv, thw, spg = va.preprocess_video(videos[0], fps, max_pixels=tiny.max_pixels, min_pixels=tiny.min_pixels)
    assert torch.equal(batch["pixel_values_videos"], pv) and thw.tolist() == [[10, 4, 4]]
    assert spg == 2 * 40 / (20 * 4) and batch["second_per_grid_ts"].tolist() == [1.0]  # 2 frames at 2 fps
    pads = batch["prefix_ids"][0] == tiny.video_id
    with torch.no_grad():  # transformers' vision tower: one merged feature per <|video_pad|>
        features = tiny.qwen.model.visual(pv, grid_thw=thw).pooler_output
    assert int(pads.sum()) == features.shape[0] == 10 * 4 * 4 // 4
    # M-RoPE time axis: temporal patch k sits at k * tokens_per_second * seconds_per_grid = 2k after the start
    time_pos = batch["position_ids"][0, 0, :pads.numel()][pads]
    assert (time_pos.unique() - time_pos.min()).tolist() == [2 * k for k in range(10)]


def test_template_file_replaces_the_prompts_and_is_validated(tiny, tmp_path):
    same = tmp_path / "same.txt"
    same.write_text(template_text(vj.SCALE, vj.QUESTIONS))
    assert vj.load_template(same) == (vj.SCALE, vj.QUESTIONS)
    other = dict(vj.QUESTIONS, visual="Is it pretty? One digit, 1 to 5.")
    (tmp_path / "other.txt").write_text(template_text((1, 2, 3, 4, 5), other))
    judge = vj.build_tiny_judge(tmp_path / "other.txt", seed=0)
    assert judge.scale == (1, 2, 3, 4, 5) and judge.allowed_ids == tiny.tokenizer.convert_tokens_to_ids(list("12345"))
    videos = clips(1, seed=3)
    a, b = judge.judge(videos, PROMPTS[:1], 8.0)[0][0], tiny.judge(videos, PROMPTS[:1], 8.0)[0][0]
    assert abs(a[0] - b[0]) > 1e-4  # another question and scale, another visual score
    bad = {
        "missing or empty sections \\['semantic'\\]": "[scale]\n0 1\n[visual]\nv\n[temporal]\nt\n",
        "unknown section \\[style\\]": template_text(vj.SCALE, vj.QUESTIONS) + "[style]\nx\n",
        "appears twice": template_text(vj.SCALE, vj.QUESTIONS) + "[visual]\nx\n",
        "text before the first": "hello\n" + template_text(vj.SCALE, vj.QUESTIONS),
        "must be integers": template_text(("low", "high"), vj.QUESTIONS),
        "at least two increasing": template_text((3, 2, 1), vj.QUESTIONS),
        "\\[semantic\\] question must hold \\{prompt\\} exactly once": template_text(
            vj.SCALE, dict(vj.QUESTIONS, semantic="Does it match?")),
        "\\[visual\\] question must hold \\{prompt\\} nowhere": template_text(
            vj.SCALE, dict(vj.QUESTIONS, visual="Is {prompt} pretty?")),
        "chat token": template_text(vj.SCALE, dict(vj.QUESTIONS, temporal="<|im_end|>")),
    }
    for message, text in bad.items():
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(ValueError, match=message):
            rewards.check_reward("vlm", "tiny", tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="--reward_prompt_template .*no such file"):
        rewards.check_reward("vlm", "tiny", tmp_path / "missing.txt")


def test_a_scale_value_that_is_not_one_token_is_refused_with_the_value(tmp_path):
    (tmp_path / "ten.txt").write_text(template_text((0, 5, 10), vj.QUESTIONS))
    with pytest.raises(ValueError, match=r"scale value 10 is 2 tokens \['1', '0'\]"):
        rewards.check_reward("vlm", "tiny", tmp_path / "ten.txt")


def test_missing_or_wrong_folders_are_refused_fast_with_what_to_do(tmp_path):
    start = time.time()
    with pytest.raises(RuntimeError, match="hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir .*nowhere"):
        rewards.check_reward("vlm", str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="not found locally or in the Hugging Face cache.*hf download nobody/x"):
        rewards.check_reward("vlm", "nobody/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        rewards.check_reward("vlm", str(tmp_path / "empty"))
    qwen2vl = tmp_path / "qwen2vl"
    qwen2vl.mkdir()
    (qwen2vl / "config.json").write_text(json.dumps({"model_type": "qwen2_vl",
                                                     "architectures": ["Qwen2VLForConditionalGeneration"]}))
    with pytest.raises(ValueError, match="model_type='qwen2_vl'.*Qwen2VLForConditionalGeneration.*needs a Qwen2.5-VL"):
        rewards.check_reward("vlm", str(qwen2vl))
    (qwen2vl / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl",
                                                     "architectures": ["Qwen2_5_VLForConditionalGeneration"]}))
    with pytest.raises(RuntimeError, match="no \\*.safetensors weights.*hf download"):  # config only: not cached
        rewards.check_reward("vlm", str(qwen2vl))
    assert time.time() - start < 10


def test_from_pretrained_loads_a_saved_checkpoint_and_checks_the_scale_before_the_weights(tiny, tmp_path):
    folder = tmp_path / "judge"
    tiny.qwen.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    judge = rewards.build_reward("vlm", path=str(folder), dtype=torch.float32, batch_size=2)
    assert isinstance(judge, vj.VLMJudge) and judge.qwen.dtype == torch.float32 and not judge.qwen.training
    videos = clips(2, seed=4)
    # the real loader keeps the real pixel budget; give the saved tiny the test budget to compare scores
    judge.max_pixels, judge.min_pixels = tiny.max_pixels, tiny.min_pixels
    torch.testing.assert_close(judge.judge(videos, PROMPTS[:2], 8.0)[0], tiny.judge(videos, PROMPTS[:2], 8.0)[0],
                               atol=1e-5, rtol=0)
    (tmp_path / "ten.txt").write_text(template_text((0, 5, 10), vj.QUESTIONS))
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"not weights")  # reading them would fail with another error
    with pytest.raises(ValueError, match="scale value 10 is 2 tokens"):
        rewards.build_reward("vlm", path=str(folder), prompt_template_file=tmp_path / "ten.txt")


def test_build_reward_vlm_tiny_scores_decoded_videos(caplog):
    assert vj.ASPECTS == rewards.COMPONENTS  # the judge's questions come in the curriculum's order
    scorer = rewards.build_reward("vlm", path="tiny", batch_size=2)
    videos = torch.rand(4, 5, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # --backbone tiny's clips
    scores, diagnostics = rewards.score_batched(scorer, videos, ["a red ball", "a blue cube", "x", "y"], 8.0, 2)
    assert scores.shape == (4, 3) and torch.isfinite(scores).all() and ((0 <= scores) & (scores <= 1)).all()
    off = diagnostics["judge_off_format_mass"]
    assert sorted(diagnostics) == ["judge_off_format_mass"] and off.shape == (4,) and ((0 <= off) & (off <= 1)).all()
    # a random judge spreads its answer over the whole vocabulary (263 tokens, 10 on the scale): warned
    assert off.min() > vj.OFF_FORMAT_WARN
    assert sum("outside the scale" in r.getMessage() for r in caplog.records) == 2  # once per call of 2 videos
