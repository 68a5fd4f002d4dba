"""Scoring over HTTP: the wire format of reward_server.py and the client train.py uses with `--reward_url`.

    GET  /health   {"reward": name, "model": its weights, "rubric_sha256": hash or null, "components": [...],
                    "reward_batch_size": n, "waiting": requests queued, "scoring": videos in the scorer now,
                    "scored_calls": scorer calls so far, "scored_videos": the videos they held}
    POST /score    one JSON header line {"prompts": [N strings], "fps": number, "shape": [N, F, 3, H, W]}, "\n",
                   then the N F 3 H W uint8 values of the videos, C order (application/octet-stream)
               ->  {"scores": [[visual, temporal, semantic] x N], "diagnostics": {name: [N values]}}

A video travels as 8-bit values in C order, a quarter of float32 and what a video file holds; every scorer sees
8-bit frames in C order either way (rewards.score_batched quantizes into a C-ordered copy before scoring, in
process too), so a score through the server equals the in-process one, bitwise for the proxy. A non-finite score
travels as null and comes back as NaN, to be reported and handled by rewards.score_batched as any other.

Deviations / choices
--------------------
1. The standard library serves and fetches (http.server's ThreadingHTTPServer, urllib), batching included: a
   request is one JSON body and one JSON answer, a thread per connection is plenty for the few dozen training
   processes of a run, and the batching lives behind a queue (reward_server.py's Batcher) that no web framework
   provides: FastAPI or aiohttp would add an event loop in front of the same one blocking scorer thread. Nothing
   beyond the project's requirements is installed on the reward machine. The body is binary (a JSON header line,
   then the raw bytes): with the videos in base64 inside JSON, decoding one request of two [SPG] clips took 1.59 s
   under Python's lock (json.loads 0.57 s, base64 0.88 s), 204 s of an iteration's 128 requests; the raw bytes
   take 0.14 s, one copy (11x, `python bench/reward_traffic.py --measure`, side by side), and are 3/4 of base64's
   size.
2. The client retries connection errors and 5xx answers (503: the queue is full) with exponential backoff until
   `timeout` seconds have passed, then raises RewardServerError naming the URL (train.py ends with that one line;
   `--resume_from_checkpoint latest` continues once the server is back). A 4xx is a bug in the request, not a
   passing fault: raised at once. One attempt waits for its answer as long as the deadline allows, not a fixed
   minute: a request queued behind other processes' videos is slow, not lost, and sending it again would queue
   it twice (the server would still score the first copy, whose client has gone).
3. Requests of all training processes wait in one queue, bounded by `--max_queue` (beyond it 503); one scoring
   thread fills each scorer call with up to `--reward_batch_size` videos from as many waiting requests as fit,
   the oldest request first, splitting a large one over calls; only videos of the same fps and frame shape share
   a call. It does not wait for a call to fill: a call takes what waits when the previous one ends (continuous
   batching, as vLLM does), so a lone request is scored at once and under load the calls fill by themselves.
   Every scorer is per video, so a request's scores do not depend on what it was batched with (the proxy's
   bitwise, tests/test_reward_server.py; VideoAlign and the judge pad with a mask, equal to rounding).
   `/health` shows the queue (`waiting`, `scoring`) and counts the scorer calls and their videos (`scored_calls`,
   `scored_videos`). The judge through an OpenAI-compatible server (vLLM, SGLang) is reward_models/openai_judge.py's.
4. A scorer error fails only the requests at fault: a call that fails is retried one request at a time, then each
   request that still fails gets 400 (a ValueError: the scorer's check of its input) or 500 (anything else,
   with the traceback in the server's log), and the server goes on with the next call.
"""
from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler

import torch

from curriculum import COMPONENTS


class JSONHandler(BaseHTTPRequestHandler):
    """http.server's request handler with one JSON answer per request: reward_server.py's, and the tests'
    stand-in for an OpenAI-compatible server."""

    def answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class RewardServerError(RuntimeError):
    """The reward server could not be reached, or did not serve what the run asked for; the message names it."""


def encode(videos: torch.Tensor, prompts: list[str], fps: float) -> bytes:
    """The POST /score body of `videos` (N, F, 3, H, W) in [0, 1]: the JSON header line, then the uint8 values."""
    values = (videos.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()
    header = json.dumps({"prompts": list(prompts), "fps": fps, "shape": list(values.shape)})  # no raw newline
    return header.encode() + b"\n" + values.numpy().tobytes()


def decode(body: bytes) -> tuple[torch.Tensor, list[str], float]:
    """(videos (N, F, 3, H, W) uint8, prompts, fps) of a POST /score body; a ValueError with a one-line reason for
    anything else. The values stay 8-bit until scored (a quarter of float32 while a request waits): / 255."""
    cut = body.find(b"\n")
    if cut < 0:
        raise ValueError("the body must be a JSON header line, a newline, then the uint8 values (remote.encode)")
    try:
        header = json.loads(body[:cut])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"the header line is not JSON ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("the header must be a JSON object with prompts, fps and shape")
    missing = [key for key in ("prompts", "fps", "shape") if key not in header]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    prompts, fps, shape = header["prompts"], header["fps"], header["shape"]
    if not (isinstance(shape, list) and len(shape) == 5 and all(isinstance(n, int) and n > 0 for n in shape)
            and shape[2] == 3):
        raise ValueError(f"shape must be [N, F, 3, H, W] of positive integers, got {shape!r}")
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)) or len(prompts) != shape[0]:
        raise ValueError(f"prompts must be a list of {shape[0]} strings, one per video")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    raw = memoryview(body)[cut + 1:]
    if len(raw) != math.prod(shape):
        raise ValueError(f"the body holds {len(raw)} video bytes, shape {shape} needs {math.prod(shape)} (uint8, one "
                         f"byte per value)")
    values = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(*shape)  # (N, F, 3, H, W), one copy
    return values, prompts, float(fps)


SERVER_HINT = ("start the server (python reward_server.py ...), then run again (a run that had started: "
               "--resume_from_checkpoint latest)")


def request_json(url: str, path: str, body: bytes | None, timeout: float, what: str, hint: str,
                 content_type: str = "application/json") -> dict:
    """The JSON answer of GET url + path (POST of the JSON `body`), retrying connection errors and 5xx with
    exponential backoff until `timeout` seconds (Deviations 2); otherwise RewardServerError naming the URL, in one
    line ending with `hint` (what to do). The client of reward_server.py and of the OpenAI-compatible judge."""
    deadline, wait, last = time.monotonic() + timeout, 0.5, None
    while True:
        request = urllib.request.Request(url + path, data=body, method="GET" if body is None else "POST",
                                         headers={"Content-Type": content_type})
        try:
            # Deviations 2: an attempt may wait until the deadline (a queued request is slow, not lost)
            with urllib.request.urlopen(request, timeout=max(1.0, deadline - time.monotonic())) as answer:
                text = answer.read()
            try:
                return json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise RewardServerError(f"--reward_url {url}: {path} answered something that is not JSON "
                                        f"({text[:60]!r}): is the URL the server's?") from None
        except urllib.error.HTTPError as err:
            reason = " ".join(err.read().decode(errors="replace").split())[:300]  # one line
            if err.code < 500:  # a bug in the request or a setting of the server: retrying would not help
                raise RewardServerError(f"--reward_url {url}: {path} answered {err.code}: {reason}") from None
            last = f"{err.code}: {reason}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            last = str(getattr(err, "reason", err))
        if time.monotonic() + wait > deadline:
            raise RewardServerError(f"--reward_url {url}: {path}: no answer within {timeout:g} s ({what}: {last}); "
                                    f"{hint}") from None
        time.sleep(wait)
        wait = min(wait * 2, 10.0)


class RemoteScorer:
    """A scorer (rewards.py's interface: `scorer(videos, prompts, fps)` -> {component: (n,), diagnostic: (n,)})
    that asks reward_server.py at `url`."""

    def __init__(self, url: str, timeout: float = 300.0, what: str = "--reward_timeout"):
        self.url, self.timeout, self.what = url.rstrip("/"), timeout, what

    def _request(self, path: str, body: bytes | None = None) -> dict:
        return request_json(self.url, path, body, self.timeout, self.what, SERVER_HINT, "application/octet-stream")

    def health(self) -> dict:
        return self._request("/health")

    def __call__(self, videos: torch.Tensor, prompts: list[str], fps: float) -> dict:
        answer = self._request("/score", encode(videos, prompts, fps))
        nan = float("nan")
        scores = torch.tensor([[nan if v is None else v for v in row] for row in answer["scores"]],
                              dtype=torch.float32).view(-1, len(COMPONENTS))
        if scores.shape[0] != videos.shape[0]:
            raise RewardServerError(f"--reward_url {self.url}: {scores.shape[0]} scores for {videos.shape[0]} videos")
        out = {name: scores[:, j] for j, name in enumerate(COMPONENTS)}
        for key, values in answer.get("diagnostics", {}).items():
            out[key] = torch.tensor([nan if v is None else v for v in values], dtype=torch.float32)
        return out


def check_server(url: str, reward: str, rubric_sha256: str | None, timeout: float) -> dict:
    """The server's health, checked against what the run asks for: the same scorer and, where the run names a
    rubric file, the same rubric. Raises RewardServerError naming the URL."""
    health = RemoteScorer(url, timeout, what="at start-up").health()
    if health.get("reward") != reward:
        raise RewardServerError(f"--reward_url {url} serves --reward {health.get('reward')!r}, not {reward!r}: "
                                f"start the server with --reward {reward}")
    if rubric_sha256 is not None and health.get("rubric_sha256") != rubric_sha256:
        raise RewardServerError(f"--reward_url {url} scores with another rubric than --reward_prompt_template "
                                f"(sha256 {health.get('rubric_sha256')} vs {rubric_sha256}): start it with the same file")
    return health
