"""Reward models: every scorer maps decoded videos and their prompts to three component scores in [0, 1]
(visual fidelity, temporal coherence, semantic alignment), which the curriculum then mixes.

The interface (SPEC §6)
-----------------------
    scorer(videos, prompts, fps) -> {"visual": (N,), "temporal": (N,), "semantic": (N,), [diagnostic]: (N,) ...}
    videos: float (N, F, 3, H, W) in [0, 1];  prompts: list of N strings;  fps: frames per second
Every score is float32 in [0, 1] and higher is better. Keys beyond the three components are per-sample
diagnostics (e.g. the vlm judge's "judge_off_format_mass"), logged but never rewarded. A scorer runs under
no_grad on the local process's samples; `score_batched` bounds the batch so a reward model never sees the
whole rollout. `check_reward` runs every check that needs no weights before any model loads.

Scorers
-------
- `videoalign`: VideoAlign / VideoReward ([VideoAlign], arXiv 2501.13918), heads VQ -> visual,
  MQ -> temporal, TA -> semantic, each standardized with the checkpoint's statistics and passed through
  a sigmoid (SPEC §6 choice). Implemented in videoalign.py, imported lazily (it needs transformers).
- `vlm`: a frozen Qwen2.5-VL asked three questions about the video ([SPG]'s judge, our own prompts);
  each score is the expected answer on a 0..9 scale read from the next-token distribution, mapped to
  [0, 1]. Implemented in vlm_judge.py, imported lazily; through a vLLM / SGLang server in openai_judge.py
  (Deviations 6).
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
5. Every scorer sees 8-bit frames: `score_batched` rounds the decoded video to the 256 levels a video file
   holds before scoring. VideoAlign and the judge read 8-bit frames anyway (videoalign.py); for the proxies it
   makes an in-process score equal the one reward_server.py gives for the same video, which travels as uint8. The
   rounded frames go into a new tensor in C order, the layout the server's copy has, since float sums follow
   memory order (without it the proxy's scores differed in the last bit, tests/test_reward_server.py).
6. `--reward_url URL`: the scorer lives on a server, in one of two kinds that `remote_is_judge_chat` tells apart by
   the URL. A URL whose path ends in /v1 is an OpenAI-compatible server (vLLM, SGLang) holding the `vlm` judge's
   model: the judge's questions are asked over the chat-completions API and read from the first token's top
   log-probs (reward_models/openai_judge.py), `--reward_model` naming the served model. Any other URL is
   reward_server.py's, serving any scorer (reward_models/remote.py). `check_reward_url` checks either at start-up:
   the served model, or the same `--reward` and rubric.

Run: `python -m pytest tests/test_rewards.py tests/test_openai_judge.py -q`.
"""
from __future__ import annotations

import hashlib
import logging
import math
import re

import torch

from curriculum import COMPONENTS  # the three components, in the curriculum's stage order (one definition)

REWARDS = ("proxy", "videoalign", "vlm")
DEFAULT_MODELS = {"videoalign": "KwaiVGI/VideoReward", "vlm": "Qwen/Qwen2.5-VL-7B-Instruct"}
logger = logging.getLogger(__name__)

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


def score_batched(scorer, videos: torch.Tensor, prompts, fps: float, batch_size: int):
    """(N, 3) component scores in COMPONENTS order and {diagnostic: (N,)}, at most `batch_size` videos a call."""
    check_videos(videos, prompts)
    # Deviations 5: the 8-bit frames of a video file, in C order, the layout reward_server.py's copy has (a decoded
    # video is a view of (N, 3, F, H, W) memory, and a scorer's float sums follow the memory order). One new tensor,
    # the rest in place: this runs on the training GPU, over every decoded video of the process.
    quantized = torch.empty(videos.shape, dtype=videos.dtype, device=videos.device)  # (N, F, 3, H, W), C order
    videos = torch.clamp(videos, 0, 1, out=quantized).mul_(255).round_().div_(255)
    chunks, diagnostics = [], {}
    for start in range(0, videos.shape[0], batch_size):
        out = scorer(videos[start : start + batch_size], prompts[start : start + batch_size], fps)
        chunks.append(torch.stack([out[name].float() for name in COMPONENTS], dim=1))  # (n, 3)
        for key in sorted(set(out) - set(COMPONENTS)):
            diagnostics.setdefault(key, []).append(out[key].float())  # (n,)
    # Bounded chunks keep a reward model's memory independent of the rollout batch; the result is the
    # same as one call because every scorer is per-sample.
    scores = torch.cat(chunks)  # (N, 3)
    diagnostics = {key: torch.cat(parts) for key, parts in diagnostics.items()}  # (N,) each
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        # Reported here and left as NaN: grpo.group_advantages then drops the whole group (A = 0). A logger,
        # not warnings.warn: Python shows a warning text once per location, and this one recurs every step.
        bad = (~finite).any(dim=1).nonzero().flatten().tolist()
        logger.warning("non-finite reward scores for samples %s (of %d); their groups get zero advantage",
                       bad, scores.shape[0])
    # Out of range is a scorer bug, not a bad sample: the curriculum's thresholds are absolute scores in
    # [0, 1] (curriculum.py Deviations 6), so such a value would silently decide its stages.
    if bool(((scores[finite] < 0) | (scores[finite] > 1)).any()):
        raise ValueError(f"a scorer returned values outside [0, 1]: {scores.min().item()}..{scores.max().item()}")
    return scores, diagnostics


def check_reward(name: str, model=None, prompt_template_file=None) -> None:
    """Every check of --reward / --reward_model / --reward_prompt_template that needs no weights (milliseconds
    to a second or so: files, config.json, VideoReward's checkpoint files, and for `vlm` the tokenizer files);
    call it before any model loads. Raises ValueError or RuntimeError with one line saying what to do."""
    try:
        _check_reward(name, model, prompt_template_file)
    except FileNotFoundError as err:   # a missing rubric file: a usage error like the others
        raise ValueError(str(err)) from None


def _check_reward(name: str, model, prompt_template_file) -> None:
    if name not in REWARDS:
        raise ValueError(f"unknown --reward {name!r}; choose one of {REWARDS}")
    if name == "proxy" and (model is not None or prompt_template_file is not None):
        raise ValueError("--reward proxy uses no model: drop --reward_model and --reward_prompt_template")
    if name == "videoalign":
        from reward_models import videoalign  # lazy: only its text helpers run here

        if prompt_template_file is None and model != "tiny":
            raise ValueError(f"--reward videoalign needs --reward_prompt_template FILE: {videoalign.PROMPT_HINT}")
        if prompt_template_file is not None:
            videoalign.load_prompt_template(prompt_template_file)  # exists, and holds the rubric's slots
        if model != "tiny":
            videoalign.find_weights(model or DEFAULT_MODELS["videoalign"])  # the files, not the weights
    if name == "vlm":
        from reward_models import vlm_judge

        vlm_judge.check_judge(model or DEFAULT_MODELS["vlm"], prompt_template_file)


def remote_is_judge_chat(name: str, url: str) -> bool:
    """Whether --reward_url is an OpenAI-compatible server (its path ends in /v1) rather than reward_server.py
    (Deviations 6); such a server holds a chat model, so only the `vlm` judge can be asked there."""
    from reward_models import openai_judge

    if not openai_judge.is_openai_url(url):
        return False
    if name != "vlm":
        raise ValueError(f"--reward_url {url} is an OpenAI-compatible server (a path ending in /v1), which can only "
                         f"hold the --reward vlm judge, not {name!r}: serve {name} with reward_server.py instead")
    return True


def check_reward_url(name: str, url: str, model=None, prompt_template_file=None, timeout: float = 5.0) -> None:
    """The start-up check of --reward_url (seconds, before any model loads): an OpenAI-compatible server must list
    the judge's model (`model`, default DEFAULT_MODELS["vlm"]), reward_server.py must serve `name` with the same
    rubric. Raises ValueError or reward_models.remote.RewardServerError (a RuntimeError), naming the URL."""
    from reward_models import openai_judge, remote

    if remote_is_judge_chat(name, url):
        openai_judge.check_server(url, model or DEFAULT_MODELS["vlm"], prompt_template_file, timeout=timeout)
        return
    rubric = None
    if prompt_template_file:
        with open(prompt_template_file, "rb") as f:
            rubric = hashlib.sha256(f.read()).hexdigest()
    remote.check_server(url, name, rubric, timeout=timeout)


def build_reward(name: str, path=None, prompt_template_file=None, device="cpu", dtype=torch.float32,
                 batch_size: int = 2, device_map=None, url: str | None = None, timeout: float = 300.0):
    """The scorer called `name` (REWARDS). `path` is the model folder or hub id (DEFAULT_MODELS when None);
    path="tiny" builds the random tiny twin of `videoalign` or `vlm` on the same prompt / patchify / read-out
    code, so `train.py --backbone tiny --reward <name> --reward_model tiny` runs that path on CPU.
    device_map="auto" (vlm only) spreads a large judge over the visible GPUs instead of `device`. With `url`, the
    scorer is the server's at that URL (Deviations 6; nothing is loaded here)."""
    if url is not None:
        from reward_models import openai_judge, remote

        if remote_is_judge_chat(name, url):
            return openai_judge.OpenAIJudge(url, path or DEFAULT_MODELS["vlm"], prompt_template_file, timeout=timeout)
        return remote.RemoteScorer(url, timeout)
    check_reward(name, path, prompt_template_file)
    if device_map is not None and name != "vlm":
        raise ValueError(f"--reward_device_map is for --reward vlm, not {name!r}")
    if name == "proxy":
        return ProxyReward()
    path = path or DEFAULT_MODELS[name]
    if name == "videoalign":
        from reward_models import videoalign  # lazy: pulls in the Qwen2-VL stack

        if path == "tiny":
            return videoalign.build_tiny_videoalign(prompt_template_file or videoalign.STAND_IN_TEMPLATE,
                                                    batch_size=batch_size).to(device)
        return videoalign.VideoAlignReward.from_pretrained(path, prompt_template_file, device=device, dtype=dtype,
                                                           batch_size=batch_size)
    from reward_models import vlm_judge  # lazy: pulls in the Qwen2.5-VL stack

    if path == "tiny":
        return vlm_judge.build_tiny_judge(prompt_template_file, batch_size=batch_size).to(device=device, dtype=dtype)
    return vlm_judge.VLMJudge.from_pretrained(path, prompt_template_file, device=device, dtype=dtype,
                                              batch_size=batch_size, device_map=device_map)
