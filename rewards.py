"""Reward models: every scorer maps decoded videos and their prompts to three component scores in [0, 1]
(visual fidelity, temporal coherence, semantic alignment), which the curriculum then mixes.

The interface (SPEC §6)
-----------------------
    scorer(videos, prompts, fps) -> {"visual": (N,), "temporal": (N,), "semantic": (N,)}
    videos: float (N, F, 3, H, W) in [0, 1];  prompts: list of N strings;  fps: frames per second
Every score is float32 in [0, 1] and higher is better. A scorer runs under no_grad on the local
process's samples; `score_batched` bounds the batch so a reward model never sees the whole rollout.

Scorers
-------
- `videoalign`: VideoAlign / VideoReward ([VideoAlign], arXiv 2501.13918), heads VQ -> visual,
  MQ -> temporal, TA -> semantic, each standardized with the checkpoint's statistics and passed through
  a sigmoid (SPEC §6 choice). Implemented in videoalign.py, imported lazily (it needs transformers).
- `proxy`: three cheap, deterministic, weight-free scores that are real learning signals on CPU:
    visual   = clamp(2 std(luma), 0, 1)                     frame contrast (a flat grey clip scores 0)
    temporal = exp(-mean |frame_{f+1} - frame_f| / 0.1)      1 for a still clip, falls with flicker
    semantic = 1 - || mean RGB - colour(prompt) || / sqrt(3) agreement with a colour word in the prompt

Deviations / choices
--------------------
1. The proxies stand in for VQ / MQ / TA where no weights can be downloaded (tests, `--backbone tiny`).
   They are hackable by design (a saturated clip of the prompt's colour maxes `semantic`), which is
   what the trust region is for; they are not quality metrics.
2. A prompt without a colour word scores semantic = 0.5 for every sample: no signal, zero spread, and
   hence zero advantage from that component, rather than an invented target.
3. A clip of one frame scores temporal = 1 (no motion to judge).
4. Luma uses the Rec. 601 weights (0.299, 0.587, 0.114).

Run: `python -m pytest tests/test_rewards.py -q`.
"""
from __future__ import annotations

import math
import re
import warnings

import torch

COMPONENTS = ("visual", "temporal", "semantic")

COLOURS = {  # RGB targets in [0, 1] for the semantic proxy
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
    "orange": (1.0, 0.5, 0.0), "purple": (0.5, 0.0, 0.5), "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0), "grey": (0.5, 0.5, 0.5), "gray": (0.5, 0.5, 0.5),
}


def check_videos(videos: torch.Tensor, prompts) -> None:
    """Fail early, with the expected layout, on a malformed batch."""
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be (N, F, 3, H, W), got {tuple(videos.shape)}")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {videos.shape[0]} videos")


def prompt_colour(prompt: str):
    """The first colour word of the prompt, as an RGB tuple, or None."""
    # The first one: prompts name the subject first ("a red ball bouncing on green grass" is about the ball).
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in COLOURS:
            return COLOURS[word]
    return None


class ProxyReward:
    """Weight-free visual / temporal / semantic scores (see the module docstring for the formulas)."""

    def __init__(self, motion_scale: float = 0.1):
        self.motion_scale = motion_scale

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts, fps: float = 8.0) -> dict:
        check_videos(videos, prompts)
        v = videos.float().clamp(0, 1)  # (N, F, 3, H, W)
        luma = (v * torch.tensor([0.299, 0.587, 0.114], device=v.device).view(1, 1, 3, 1, 1)).sum(2)  # (N, F, H, W)
        # visual: a flat grey clip is the failure a fresh or collapsing generator shows first, so frame
        # contrast is the cheapest stand-in for VQ; a luma std of 0.5 (black-and-white halves) scores 1.
        visual = (2 * luma.flatten(2).std(dim=2).mean(dim=1)).clamp(0, 1)  # (N,) contrast per frame
        if v.shape[1] > 1:
            # temporal: flicker is the cheapest stand-in for MQ; exp(-MAD / scale) maps any mean absolute
            # frame difference into (0, 1], with scale 0.1 a visible but not total change per frame.
            motion = (v[:, 1:] - v[:, :-1]).abs().flatten(1).mean(dim=1)  # (N,)
            temporal = torch.exp(-motion / self.motion_scale)
        else:
            temporal = torch.ones(v.shape[0], device=v.device)  # Deviations 3
        # semantic: distance of the clip's mean colour to the prompt's colour word, over the largest
        # possible RGB distance sqrt(3). It is hackable on purpose (a saturated clip of that colour maxes it).
        mean_rgb = v.mean(dim=(1, 3, 4))  # (N, 3)
        semantic = torch.full((v.shape[0],), 0.5, device=v.device)  # Deviations 2
        for i, prompt in enumerate(prompts):
            target = prompt_colour(prompt)
            if target is not None:
                dist = (mean_rgb[i] - torch.tensor(target, device=v.device)).norm()
                semantic[i] = 1 - dist / math.sqrt(3)
        return {"visual": visual, "temporal": temporal, "semantic": semantic}


def score_batched(scorer, videos: torch.Tensor, prompts, fps: float, batch_size: int) -> torch.Tensor:
    """(N, 3) component scores in COMPONENTS order, scoring at most `batch_size` videos at a time."""
    check_videos(videos, prompts)
    chunks = []
    for start in range(0, videos.shape[0], batch_size):
        out = scorer(videos[start : start + batch_size], prompts[start : start + batch_size], fps)
        chunks.append(torch.stack([out[name].float() for name in COMPONENTS], dim=1))  # (n, 3)
    # Bounded chunks keep a reward model's memory independent of the rollout batch; the result is the
    # same as one call because every scorer is per-sample.
    scores = torch.cat(chunks)  # (N, 3)
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        # Reported here and left as NaN: grpo.group_advantages then drops the whole group (A = 0).
        bad = (~finite).any(dim=1).nonzero().flatten().tolist()
        warnings.warn(f"non-finite reward scores for samples {bad}; their groups get zero advantage")
    # Out of range is a scorer bug, not a bad sample: the curriculum's thresholds are absolute scores in
    # [0, 1] (curriculum.py Deviations 6), so such a value would silently decide its stages.
    if bool(((scores[finite] < 0) | (scores[finite] > 1)).any()):
        raise ValueError(f"a scorer returned values outside [0, 1]: {scores.min().item()}..{scores.max().item()}")
    return scores


def build_reward(name: str, **kwargs):
    """`proxy` or `videoalign` (kwargs go to videoalign.VideoAlignReward.from_pretrained).

    `videoalign` with path="tiny" builds the random tiny Qwen2-VL twin (videoalign.build_tiny_videoalign) on
    the same prompt / patchify / reward-token code, with the stand-in rubric unless a template file is named;
    it exists so `train.py --backbone tiny --reward videoalign --reward_model tiny` runs that path on CPU."""
    if name == "proxy":
        return ProxyReward(**kwargs)
    if name == "videoalign":
        import videoalign  # lazy: pulls in the Qwen2-VL stack

        if kwargs.get("path") == "tiny":
            return videoalign.build_tiny_videoalign(kwargs.get("prompt_template_file") or videoalign.STAND_IN_TEMPLATE,
                                                    batch_size=kwargs.get("batch_size", 2)).to(kwargs.get("device", "cpu"))
        return videoalign.VideoAlignReward.from_pretrained(**kwargs)
    raise ValueError(f"unknown reward {name!r}; choose 'proxy' or 'videoalign'")
