"""The proxy rewards rank hand-made clips the way their definitions say."""
import pytest
import torch

import rewards


def _clip(rgb, frames=6, size=8):
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(frames, 3, size, size).clone()


def test_flicker_scores_lower_on_temporal_than_a_steady_clip():
    steady = _clip([0.5, 0.5, 0.5])
    flicker = steady.clone()
    flicker[::2] = 0.0
    s = rewards.ProxyReward()(torch.stack([steady, flicker]), ["a ball", "a ball"])
    assert s["temporal"][0] == 1.0 and s["temporal"][1] < 0.1


def test_colour_word_decides_semantic():
    red, blue = _clip([0.9, 0.1, 0.1]), _clip([0.1, 0.1, 0.9])
    s = rewards.ProxyReward()(torch.stack([red, blue]), ["a red ball", "a red ball"])
    assert s["semantic"][0] > s["semantic"][1]
    s2 = rewards.ProxyReward()(torch.stack([red, blue]), ["a ball", "a ball"])
    assert torch.equal(s2["semantic"], torch.full((2,), 0.5))  # no colour word: no signal


def test_contrast_decides_visual():
    flat = _clip([0.5, 0.5, 0.5])
    checker = flat.clone()
    checker[..., ::2, ::2] = 1.0
    checker[..., 1::2, 1::2] = 0.0
    s = rewards.ProxyReward()(torch.stack([flat, checker]), ["x", "x"])
    assert s["visual"][0] == 0 and s["visual"][1] > 0.5


def test_score_batched_equals_one_call_and_checks_input():
    v = torch.rand(5, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["red", "blue", "green", "a cat", "white"]
    scorer = rewards.ProxyReward()
    eight_bit = (v * 255).round() / 255  # what score_batched hands every scorer (Deviations 5)
    one = scorer(eight_bit, prompts)
    batched, diagnostics = rewards.score_batched(scorer, v, prompts, 8.0, batch_size=2)
    assert diagnostics == {}  # the proxy reports no diagnostics
    assert torch.equal(batched, torch.stack([one[n] for n in rewards.COMPONENTS], 1))
    assert not torch.equal(batched, torch.stack([scorer(v, prompts)[n] for n in rewards.COMPONENTS], 1))
    assert ((batched >= 0) & (batched <= 1)).all()
    with pytest.raises(ValueError, match=r"\(N, F, 3, H, W\)"):
        scorer(v[:, :, :2], prompts)
    with pytest.raises(ValueError, match="prompts"):
        scorer(v, prompts[:2])


def test_nonfinite_scores_are_reported_every_time_with_their_indices(caplog):
    def broken(videos, prompts, fps):
        out = rewards.ProxyReward()(videos, prompts, fps)
        out["visual"][0] = float("nan")
        return out
    for _ in range(2):  # a repeated message is logged again (warnings.warn would show it once)
        scores, _ = rewards.score_batched(broken, torch.rand(3, 2, 3, 4, 4), ["a", "b", "c"], 8.0, 2)
    assert torch.isnan(scores[0, 0]) and torch.isnan(scores[2, 0]) and torch.isfinite(scores[1]).all()
    logged = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(logged) == 2 and all("samples [0, 2]" in m for m in logged)


def test_diagnostics_are_concatenated_per_sample_across_chunks():
    def scorer(videos, prompts, fps):  # a diagnostic that names the sample it came from
        out = rewards.ProxyReward()(videos, prompts, fps)
        return {**out, "mean_level": videos.mean(dim=(1, 2, 3, 4))}
    v = torch.rand(5, 2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    scores, diagnostics = rewards.score_batched(scorer, v, list("abcde"), 8.0, batch_size=2)
    assert scores.shape == (5, 3) and sorted(diagnostics) == ["mean_level"]
    torch.testing.assert_close(diagnostics["mean_level"], ((v * 255).round() / 255).mean(dim=(1, 2, 3, 4)))


def test_check_reward_refuses_bad_options_before_any_model_loads(tmp_path):
    assert rewards.REWARDS == ("proxy", "videoalign", "vlm")
    with pytest.raises(ValueError, match="unknown --reward 'clip'"):
        rewards.check_reward("clip")
    with pytest.raises(ValueError, match="unknown --reward"):
        rewards.build_reward("clip")
    with pytest.raises(ValueError, match="--reward proxy uses no model"):
        rewards.check_reward("proxy", "tiny")
    with pytest.raises(ValueError, match="needs --reward_prompt_template.*prompt_template.py"):
        rewards.check_reward("videoalign", "KwaiVGI/VideoReward")
    rewards.check_reward("videoalign", "tiny")  # the tiny twin has a stand-in rubric
    with pytest.raises(ValueError, match="DETAILED_PROMPT_WITH_SPECIAL_TOKEN"):  # a usage error, like the rest
        rewards.check_reward("videoalign", "tiny", tmp_path / "missing.txt")
    # VideoReward's files are looked for here, before any model loads (names only: no weight is read)
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("{text_prompt} <|VQ_reward|> <|MQ_reward|> <|TA_reward|>")
    with pytest.raises(RuntimeError, match=f"no VideoReward weights in {tmp_path / 'VideoReward'}.*hf download"):
        rewards.check_reward("videoalign", str(tmp_path / "VideoReward"), rubric)
    (tmp_path / "VideoReward" / "checkpoint-7").mkdir(parents=True)
    (tmp_path / "VideoReward" / "model_config.json").write_text("{}")
    (tmp_path / "VideoReward" / "checkpoint-7" / "model.pth").write_bytes(b"")
    rewards.check_reward("videoalign", str(tmp_path / "VideoReward"), rubric)
    with pytest.raises(ValueError, match="--reward_device_map is for --reward vlm"):
        rewards.build_reward("proxy", device_map="auto")
