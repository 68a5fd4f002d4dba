"""The Qwen2.5-VL judge through an OpenAI-compatible server (vLLM, SGLang): vlm_judge.py's three questions asked
over the chat-completions API, each answer read from the first token's top log-probs.

    vllm serve Qwen/Qwen2.5-VL-72B-Instruct --tensor-parallel-size 4 ...          (docs/judge_server.md)
    train.py --reward vlm --reward_url http://judgehost:8000/v1 --reward_model Qwen/Qwen2.5-VL-72B-Instruct

One request per video and question (3 per video; all those of a scorer call in flight together):

    POST {url}/chat/completions
    {"model": --reward_model, "max_tokens": 1, "temperature": 0, "logprobs": true, "top_logprobs": 20,
     "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                  {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/jpeg;base64,
                                                 <frame 1>,<frame 2>,..."}},          8-bit PNG frames, Deviations 1
                                               {"type": "text", "text": the question, caption filled in}]}],
     "mm_processor_kwargs": {"fps": the frames' rate}}                                 Deviations 2
    -> choices[0].logprobs.content[0].top_logprobs = [{"token": "7", "logprob": -0.4, ...}, ...]

which the server renders with Qwen2.5-VL's chat template into vlm_judge.py's chat (system turn, user turn with the
video first, then the question, the assistant's turn opened). The answer is read as vlm_judge.py reads it, over
the scale values D that the top log-probs hold (Deviations 4):

    p(k)       = exp(logprob of the token "k")                       k in D
    q(k)       = p(k) / sum_{j in D} p(j)                            the answer, renormalised over the values seen
    score      = (sum_{k in D} q(k) k - k_min) / (k_max - k_min)     in [0, 1]; NaN when D is empty
    off_format = 1 - sum_{k in D} p(k)                               "judge_off_format_mass" (per video: the mean
    missing    = 1 - |D| / |scale|                                   "judge_scale_missing"    of the 3 questions)

With every scale value among the top log-probs, off_format is vlm_judge.py's off-format mass exactly; otherwise it
also holds the mass of the values not returned (an upper bound), and `missing` says how many those are.

Conventions: rewards.py's scorer interface, videos (N, F, 3, H, W) float in [0, 1] -> {"visual", "temporal",
"semantic": (N,), "judge_off_format_mass": (N,), "judge_scale_missing": (N,)}; components in vlm_judge.ASPECTS order.

Deviations / choices
1. The video travels as ONE `video_url` part whose data URL is vLLM's frame list (`data:video/jpeg;base64,<frame>,
   <frame>,...`), so Qwen2.5-VL sees a video as in process: temporal patches of two frames, one vision block, the
   M-RoPE time axis. A list of `image_url` parts would be separate images (each frame its own block, no time
   axis); an MP4 would be re-encoded (codec loss) and re-sampled by the server's own frame loader. The frames are
   PNG although the type says jpeg: vLLM opens each frame with PIL, which reads the format from the bytes
   (VideoMediaIO.load_base64 -> ImageMediaIO.load_base64, vllm/multimodal/media/), so the 8-bit frames arrive
   bit-exact. This frame-list format is vLLM's; SGLang is not checked here.
2. The client runs the judge's video path up to the pixels: frames sampled at 2 fps, rounded to 8 bits, resized to
   Qwen's smart size (videoalign.py's functions, which vlm_judge.py calls too). The server then has nothing to
   resize (sides already multiples of 28, inside Qwen's default pixel bounds) and nothing to sample (a frame list
   is taken whole). Only the patching and the CLIP normalisation run there. `mm_processor_kwargs.fps` (vLLM hands
   it to the HF processor, which sets second_per_grid_ts = 2 / fps) gives the time axis the in-process seconds
   per temporal patch; a server that ignores it assumes 2 fps, which gives the same time positions for clips
   sampled at about 2 fps. E.g. [SPG]'s 81 frames at 16 fps: 10 frames at 1.975 fps, temporal patches at
   int(2.025 k) = 2k for k = 0..4, as at 2 fps.
3. One request per question: the API takes one conversation per request. A video's three requests share its
   prefix (system turn and video), which a server with prefix caching (vLLM's automatic prefix caching) computes
   once, as vlm_judge.py's key/value-cache reuse does in process. All 3n requests of a call are sent at once
   (a thread each) so that the server batches them.
4. The first token's top 20 log-probs (OpenAI's maximum, and vLLM's default --max-logprobs) are all the answer
   the API gives. A scale value outside them counts as probability 0: the score is renormalised over the values
   present, their missing mass counts as off-format (an upper bound of vlm_judge.py's quantity), and
   "judge_scale_missing" reports the fraction of the scale not seen. An answer with no scale value among them
   scores NaN (no information about the video): rewards.score_batched reports it and its group gets zero advantage,
   as for any non-finite score. A server that returns fewer entries than asked is read the same way.
5. The log-probs are the model's: vLLM returns raw log-probs (its default --logprobs-mode raw_logprobs), before
   temperature, penalties and top-k/p, so the sampling defaults of the model's generation_config.json do not
   change them. Temperature 0 only makes the one generated token deterministic.
6. Only single-digit scales (values 0..9), checked without the tokenizer. Qwen's tokenizer makes every digit one
   token and any longer number several (vlm_judge.py Deviations 1), and a value is matched by its token's text
   ("7"): a value that is several tokens could never appear among the first token's log-probs.
7. The standard library only (urllib, concurrent.futures): one JSON POST per question and one GET at start-up.
   The `openai` package would add a dependency and its own retry policy (two retries by default) beside the
   project's, which this follows (remote.py Deviations 2): connection errors and 5xx are retried with exponential
   backoff until --reward_timeout, one attempt waiting as long as the deadline allows, then RewardServerError names
   the URL (train.py stops with that line; --resume_from_checkpoint latest continues). A 4xx is raised at once with
   the server's reason (e.g. top_logprobs above the server's --max-logprobs).
8. Start-up check (`check_server`, seconds): the template's scale is single digits, and GET {url}/models lists
   --reward_model, the name the requests carry (a server started from a local folder lists that folder unless
   started with --served-model-name).
9. `--reward_model tiny` (the test double, tests/openai_double.py) sends frames under vlm_judge.build_tiny_judge's
   pixel caps (TINY_PIXELS), so that its scores can be compared with the in-process tiny judge's.

Run: `python -m pytest tests/test_openai_judge.py -q` (unit tests, and the tiny random judge behind
tests/openai_double.py, a loopback stand-in for vLLM).
"""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import torch

from reward_models import remote
from reward_models.remote import RewardServerError
from reward_models.videoalign import (CHAT_SPECIALS, MAX_PIXELS, MIN_PIXELS, resize_for_qwen, sample_frames,
                                      to_uint8_levels)
from reward_models.vlm_judge import ASPECTS, OFF_FORMAT_WARN, SYSTEM_PROMPT, load_template

logger = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # Deviations 4: the OpenAI API's maximum and vLLM's default --max-logprobs
TINY_PIXELS = {"max_pixels": 112 * 112, "min_pixels": 28 * 28}  # Deviations 9: vlm_judge.build_tiny_judge's caps
RETRY_HINT = ("start the judge server (vllm serve ..., docs/judge_server.md), then run again (a run that had "
              "started: --resume_from_checkpoint latest)")


def is_openai_url(url: str) -> bool:
    """A --reward_url whose path ends in /v1 is an OpenAI-compatible server's base URL (vLLM, SGLang)."""
    return urllib.parse.urlsplit(url).path.rstrip("/").endswith("/v1")


def load_judge_template(prompt_template_file=None) -> tuple[tuple[int, ...], dict]:
    """(scale, questions) of vlm_judge.py's template, refused unless every scale value is one digit (Deviations 6)."""
    scale, questions = load_template(prompt_template_file)
    for value in scale:
        if not 0 <= value <= 9:
            raise ValueError(f"--reward_prompt_template {prompt_template_file}: scale value {value} is not one digit; "
                             f"a judge behind --reward_url answers one token, and Qwen's tokenizer splits numbers "
                             f"into digits: use values from 0..9")
    return scale, questions


def frames_data_url(video: torch.Tensor, fps: float, max_pixels: int = MAX_PIXELS, min_pixels: int = MIN_PIXELS,
                    target_fps: float = 2.0) -> tuple[str, float]:
    """One clip (F, 3, H, W) in [0, 1] -> (vLLM's frame-list data URL of the judge's frames, their rate in frames/s).

    The frames are those of videoalign.preprocess_video (sampled, 8-bit, smart-resized; Deviations 1-2), as PNG."""
    from PIL import Image  # Pillow: a requirement of imageio and matplotlib

    frames = resize_for_qwen(to_uint8_levels(sample_frames(video, fps, target_fps).float()), max_pixels, min_pixels)
    values = (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (n, h, w, 3)
    encoded = []
    for frame in values:
        with io.BytesIO() as buffer:
            Image.fromarray(frame).save(buffer, format="PNG")  # lossless: the server sees these very 8-bit values
            encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    # the rate of the frames sent: n of the clip's F frames over F / fps seconds, so 2 / rate is the in-process
    # seconds per temporal patch (videoalign.preprocess_video's seconds_per_grid)
    return "data:video/jpeg;base64," + ",".join(encoded), len(encoded) * fps / video.shape[0]


def chat_request(model: str, video_url: str, frames_fps: float, question: str) -> dict:
    """The chat-completions body of one question about one video (the module docstring's request)."""
    return {"model": model, "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": TOP_LOGPROBS,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url}},
                                                      {"type": "text", "text": question}]}],
            "mm_processor_kwargs": {"fps": frames_fps}}


def read_answer(top_logprobs: list, scale) -> tuple[float, float, float]:
    """(score, off_format, missing) of one answer from its first token's top log-probs [{"token", "logprob"}, ...]:
    the module docstring's equations over the scale values present (score NaN when none is; Deviations 4)."""
    logp = {}
    for entry in top_logprobs:
        logp.setdefault(entry["token"], float(entry["logprob"]))  # a text twice: its first, most probable entry
    present = [(value, logp[str(value)]) for value in scale if str(value) in logp]  # D, in scale order
    missing = 1 - len(present) / len(scale)
    if not present:
        return math.nan, 1.0, missing
    top = max(lp for _, lp in present)
    weights = [math.exp(lp - top) for _, lp in present]  # p(k) / max p: no underflow when every p(k) is tiny
    mean = sum(w * value for w, (value, _) in zip(weights, present)) / sum(weights)  # sum_k q(k) k
    score = (mean - scale[0]) / (scale[-1] - scale[0])
    log_seen = top + math.log(sum(weights))  # log sum_{k in D} p(k)
    # 1 - exp(log_seen) through expm1, accurate when almost all mass is on the scale (as vlm_judge.expected_score)
    off_format = -math.expm1(min(log_seen, 0.0))
    return min(max(score, 0.0), 1.0), off_format, missing


def request_json(url: str, path: str, body: dict | None, timeout: float, what: str = "--reward_timeout") -> dict:
    """The JSON answer of GET url + path (POST with `body`): remote.request_json, the project's one HTTP client
    (retries, backoff, one-line errors naming the URL; Deviations 7), with the judge server's hint."""
    data = None if body is None else json.dumps(body).encode()
    return remote.request_json(url, path, data, timeout, what, RETRY_HINT)


def check_server(url: str, model: str, prompt_template_file=None, timeout: float = 5.0) -> list[str]:
    """Start-up check (Deviations 8): the template's scale is single digits and GET {url}/models lists `model`.
    Returns the served names; raises ValueError (template) or RewardServerError naming the URL, in one line."""
    load_judge_template(prompt_template_file)
    answer = request_json(url.rstrip("/"), "/models", None, timeout, what="at start-up")
    try:
        served = [entry["id"] for entry in answer["data"]]
    except (KeyError, TypeError):
        raise RewardServerError(f"--reward_url {url}: GET /models answered {str(answer)[:120]}, not an OpenAI model "
                                f"list: is it an OpenAI-compatible server's /v1?") from None
    if model not in served:
        raise RewardServerError(f"--reward_url {url} serves {served}, not --reward_model {model}: pass the served "
                                f"name as --reward_model, or serve that model (vllm serve {model} ... "
                                f"--served-model-name {model}, docs/judge_server.md)")
    return served


class OpenAIJudge:
    """The vlm judge asked through an OpenAI-compatible server; call it as judge(videos, prompts, fps) (rewards.py's
    scorer interface). Holds no weights: the url, the served model name, the template and the pixel caps."""

    def __init__(self, url: str, model: str, prompt_template_file=None, timeout: float = 300.0,
                 max_pixels: int | None = None, min_pixels: int | None = None):
        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout
        self.scale, self.questions = load_judge_template(prompt_template_file)
        caps = TINY_PIXELS if model == "tiny" else {"max_pixels": MAX_PIXELS, "min_pixels": MIN_PIXELS}
        self.max_pixels = max_pixels or caps["max_pixels"]
        self.min_pixels = min_pixels or caps["min_pixels"]

    def ask(self, body: dict) -> list:
        """The first token's top log-probs of one chat, checked to be OpenAI's format."""
        answer = request_json(self.url, "/chat/completions", body, self.timeout)
        try:
            top = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            if not all(isinstance(e["token"], str) and isinstance(e["logprob"], (int, float)) for e in top):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            raise RewardServerError(f"--reward_url {self.url}: the answer holds no first-token top log-probs "
                                    f"(choices[0].logprobs.content[0].top_logprobs of {{token, logprob}}): "
                                    f"{str(answer)[:160]}") from None
        return top

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts, fps: float) -> dict:
        """The three components (N,) in [0, 1] (NaN where an answer holds no scale value) and the diagnostics
        "judge_off_format_mass" and "judge_scale_missing" (N,), each the mean over the three questions."""
        if videos.dim() != 5 or len(prompts) != videos.shape[0]:
            raise ValueError(f"need videos (N, F, 3, H, W) and N prompts: {tuple(videos.shape)}, {len(prompts)}")
        bodies = []  # video-major: row b * 3 + a asks question a about video b
        for video, prompt in zip(videos, prompts):
            if any(token in prompt for token in CHAT_SPECIALS):  # as in process: it would break the chat
                raise ValueError(f"the caption {prompt!r} holds a chat or vision token")
            video_url, frames_fps = frames_data_url(video, fps, self.max_pixels, self.min_pixels)
            for aspect in ASPECTS:  # the caption goes where vlm_judge.chat_suffix puts it
                question = self.questions[aspect].replace("{prompt}", prompt)
                bodies.append(chat_request(self.model, video_url, frames_fps, question))
        with ThreadPoolExecutor(max_workers=max(1, len(bodies))) as pool:  # Deviations 3: all in flight at once
            answers = list(pool.map(self.ask, bodies))  # the first error is raised here, naming the URL
        read = torch.tensor([read_answer(top, self.scale) for top in answers], dtype=torch.float64)  # (3N, 3)
        score, off, missing = read.float().view(-1, 3, 3).unbind(dim=2)  # (N, 3) each: video x aspect
        off_format = off.mean(dim=1)  # (N,)
        if off_format.mean() > OFF_FORMAT_WARN:  # a logger, not warnings.warn: it must not be deduplicated
            logger.warning("the vlm judge at %s put %.0f%% of its answer probability outside the scale values among "
                           "the top log-probs it returned (videos %s; %.0f%% of the scale values were not among them); "
                           "scores are renormalised over the values seen, check the model and the questions", self.url,
                           100 * off_format.mean().item(),
                           (off_format > OFF_FORMAT_WARN).nonzero().flatten().tolist(), 100 * missing.mean().item())
        return {**{aspect: score[:, j] for j, aspect in enumerate(ASPECTS)},
                "judge_off_format_mass": off_format, "judge_scale_missing": missing.mean(dim=1)}
