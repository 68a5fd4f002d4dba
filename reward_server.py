"""Serves one of the project's scorers over HTTP, so that the training processes need not hold it:

    python reward_server.py --reward videoalign --reward_model VideoReward --reward_prompt_template rubric.txt \
        --host 0.0.0.0 --port 8008
    accelerate launch train.py --backbone hunyuan15 --reward videoalign --reward_prompt_template rubric.txt \
        --reward_url http://rewardhost:8008 ...
    python reward_server.py --reward proxy --port 8008          # CPU: the tiny runs' scorer

GET /health names the scorer, its weights and the rubric's sha256, and tells the requests waiting, the videos being
scored and the scorer calls and videos so far; POST /score takes a batch of 8-bit videos with their prompts and
answers the three components and the scorer's diagnostics (reward_models/remote.py has the format and the client).
A bad request gets a 4xx with a one-line reason and the server goes on. The server prints one line when it
listens (`reward_server.py: serving <reward> on http://host:port`), then one line per request.

Batching: each request thread decodes its body and puts it on a queue; one scoring thread takes the videos that
wait, in arrival order, up to `--reward_batch_size` per scorer call, from as many requests as fit (a large request
is split over several calls; only videos of the same fps and frame shape share a call), scores them with
rewards.score_batched, and hands each request its own rows. Every scorer is per video (VideoAlign and the judge
right-pad with an attention mask; tests/test_videoalign.py and tests/test_vlm_judge.py check one video alone
against the same video in a batch), so a request's scores do not depend on what it was batched with: the proxy's
are bitwise the same (tests/test_reward_server.py). At most `--max_queue` requests wait; beyond that 503 (the
client retries). A scorer error answers the requests of that call (400 for a ValueError, a scorer's check of its
input; 500 otherwise, which the client retries) after each of them was retried alone, so that one bad request does
not fail the others it was batched with; the server goes on.

Test: `python -m pytest -q tests/test_reward_server.py -n 0` (the slow tier: real server processes, real HTTP).
Deviations / choices: reward_models/remote.py.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import sys
import threading
import traceback
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

import torch

import rewards
from reward_models import remote
from training.options import ConfigError, run_command


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--reward", required=True, choices=rewards.REWARDS, help="the scorer, as train.py's --reward")
    p.add_argument("--reward_model", help="folder or hub id of the model-based scorer ('tiny': the random tiny one)")
    p.add_argument("--reward_prompt_template", help="VideoAlign rubric (or judge template) file")
    p.add_argument("--reward_batch_size", type=int, default=2,
                   help="videos per scorer call, taken from all the requests that wait")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=8008, help="0: any free port (printed)")
    p.add_argument("--max_request_mb", type=float, default=512, help="larger bodies get 413")
    p.add_argument("--max_queue", type=int, default=16, help="requests that may wait; more get 503")
    return p.parse_args(argv)


@dataclass(eq=False)
class Request:
    """One POST /score on its way through the queue: its videos, how many the scoring thread has taken, and the
    rows scored so far (in order: the one scoring thread takes a request's videos front to back)."""
    values: torch.Tensor                  # (n, F, 3, H, W) uint8: a quarter of float32 while it waits
    prompts: list[str]
    fps: float
    taken: int = 0                        # videos handed to the scorer
    scores: list = field(default_factory=list)        # (k, 3) chunks
    diagnostics: list = field(default_factory=list)   # {name: (k,)} chunks
    error: tuple[int, str] | None = None  # (status, one-line reason) once a scorer call failed it
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple:
        """What videos must share to go through one scorer call: the fps and the frame shape."""
        return (self.fps, *self.values.shape[1:])


class Batcher:
    """The queue of waiting requests and the one thread that scores them (one model, one device: scorer calls
    never overlap), `batch_size` videos at a time across requests."""

    def __init__(self, scorer, device: torch.device, batch_size: int, max_queue: int):
        self.scorer, self.device, self.batch_size, self.max_queue = scorer, device, batch_size, max_queue
        self.waiting: collections.deque[Request] = collections.deque()
        self.changed = threading.Condition()
        self.calls = self.videos = 0  # scorer calls made and the videos they held: /health shows batching at work
        self.scoring = 0  # videos in the scorer call under way (0: idle)
        threading.Thread(target=self._loop, name="scorer", daemon=True).start()

    def submit(self, request: Request) -> bool:
        """Queues `request`; False when `max_queue` requests wait already (the caller answers 503)."""
        with self.changed:
            if len(self.waiting) >= self.max_queue:
                return False
            self.waiting.append(request)
            self.changed.notify()
        return True

    def counts(self) -> dict:
        """What /health reports of the queue: the requests waiting, the videos being scored, the totals so far."""
        with self.changed:
            return {"waiting": len(self.waiting), "scoring": self.scoring, "scored_calls": self.calls,
                    "scored_videos": self.videos}

    def _take(self) -> list[tuple[Request, int, int]]:
        """The next call's videos as (request, start, end) parts, holding the lock. The oldest request sets the
        fps and frame shape and is always served first, so no request starves; later ones of the same key fill
        the call. A request leaves the queue once all its videos are taken."""
        key, room, parts = self.waiting[0].key, self.batch_size, []
        for request in list(self.waiting):
            if request.key != key:
                continue
            n = min(room, request.values.shape[0] - request.taken)
            parts.append((request, request.taken, request.taken + n))
            request.taken += n
            room -= n
            if request.taken == request.values.shape[0]:
                self.waiting.remove(request)
            if room == 0:
                break
        return parts

    def _loop(self) -> None:
        while True:
            with self.changed:
                while not self.waiting:
                    self.changed.wait()
                parts = self._take()
                self.scoring = sum(end - start for _, start, end in parts)
            try:
                self._score(parts)
            except Exception:  # a bug here must not stop the thread that every request waits on
                traceback.print_exc()
                self._fail(parts, 500, "the server failed while scoring (its log has the traceback)")
            with self.changed:
                self.scoring = 0
            for request, _, end in parts:
                if end == request.values.shape[0] or request.error is not None:
                    request.done.set()

    def _score(self, parts: list[tuple[Request, int, int]]) -> None:
        """One scorer call for `parts`; on an error, each request's part alone, so only the one at fault fails."""
        videos = torch.cat([r.values[s:e] for r, s, e in parts]).to(self.device).float() / 255  # (n, F, 3, H, W)
        prompts = [p for r, s, e in parts for p in r.prompts[s:e]]
        try:
            # n <= batch_size videos: one scorer call; score_batched adds the range check and the NaN report
            scores, diagnostics = rewards.score_batched(self.scorer, videos, prompts, parts[0][0].fps,
                                                        self.batch_size)
        except Exception as err:
            if len(parts) > 1:  # each request alone: a bad video must not fail the requests it was batched with
                for part in parts:  # (a request has at most one part in a call)
                    self._score([part])
                return
            # A ValueError is a scorer's check of its input: the request's fault (400, not retried). Anything
            # else is the server's (500: the client retries it, and the traceback goes to the server's log).
            status, reason = (400, "refused the videos") if isinstance(err, ValueError) else (500, "failed")
            if status == 500:
                traceback.print_exc()
            self._fail(parts, status, f"the scorer {reason}: " + " ".join(f"{type(err).__name__}: {err}".split()))
            return
        finally:
            with self.changed:
                self.calls += 1
                self.videos += videos.shape[0]
        row = 0
        for request, start, end in parts:
            n = end - start
            request.scores.append(scores[row : row + n].cpu())  # (n, 3)
            request.diagnostics.append({k: v[row : row + n].cpu() for k, v in diagnostics.items()})  # (n,) each
            row += n

    def _fail(self, parts, status: int, reason: str) -> None:
        """Fails the requests of `parts` and drops what of them still waits (it would be scored for nothing)."""
        with self.changed:
            for request, _, _ in parts:
                request.error = request.error or (status, reason)
                if request in self.waiting:
                    self.waiting.remove(request)


class Server(ThreadingHTTPServer):
    """A thread per connection (daemon threads), with room for every training process to connect at once: with the
    default listen backlog of 5, the sixth connection to arrive together waits out a TCP retransmission (1 s)."""
    request_queue_size = 128


def main(args: argparse.Namespace) -> None:
    if args.reward_batch_size < 1 or args.max_queue < 1 or not args.max_request_mb > 0 or not 0 <= args.port < 65536:
        raise ConfigError("--reward_batch_size and --max_queue must be >= 1, --max_request_mb > 0, --port in 0..65535")
    try:
        rewards.check_reward(args.reward, args.reward_model, args.reward_prompt_template)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(str(err)) from None
    device = torch.device(args.device)
    scorer = rewards.build_reward(args.reward, path=args.reward_model, prompt_template_file=args.reward_prompt_template,
                                  device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                  batch_size=args.reward_batch_size)
    rubric = None
    if args.reward_prompt_template:
        with open(args.reward_prompt_template, "rb") as f:
            rubric = hashlib.sha256(f.read()).hexdigest()
    health = {"reward": args.reward, "model": args.reward_model or rewards.DEFAULT_MODELS.get(args.reward),
              "rubric_sha256": rubric, "components": list(rewards.COMPONENTS),
              "reward_batch_size": args.reward_batch_size}
    batcher = Batcher(scorer, device, args.reward_batch_size, args.max_queue)
    limit = int(args.max_request_mb * 2**20)

    class Handler(remote.JSONHandler):
        def fail(self, code: int, reason: str) -> None:
            self.answer(code, {"error": reason})

        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path != "/health":
                return self.fail(404, f"no {self.path}: GET /health or POST /score")
            self.answer(200, {**health, **batcher.counts()})

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                return self.fail(404, f"no {self.path}: POST /score")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self.fail(411, "a Content-Length header is needed")
            if length > limit:
                return self.fail(413, f"the body has {length} bytes, more than --max_request_mb {args.max_request_mb:g}")
            try:  # the body is dropped once decoded: only the 8-bit values wait in the queue
                values, prompts, fps = remote.decode(self.rfile.read(length))
            except ValueError as err:
                return self.fail(400, str(err))
            request = Request(values, prompts, fps)
            if not batcher.submit(request):
                return self.fail(503, f"{args.max_queue} requests are waiting already: retry")
            request.done.wait()  # the scoring thread answers every request it takes, errors included
            if request.error is not None:
                return self.fail(*request.error)
            as_json = lambda t: [v if v == v and abs(v) != float("inf") else None for v in t.tolist()]  # noqa: E731
            scores = torch.cat(request.scores)  # (n, 3)
            diagnostics = {k: torch.cat([d[k] for d in request.diagnostics]) for k in request.diagnostics[0]}
            self.answer(200, {"scores": [as_json(row) for row in scores],
                              "diagnostics": {k: as_json(v) for k, v in diagnostics.items()}})

        def log_message(self, fmt, *values):  # one line per request, on stderr
            sys.stderr.write(f"reward_server.py: {self.address_string()} {fmt % values}\n")

    server = Server((args.host, args.port), Handler)
    host, port = server.server_address[:2]
    print(f"reward_server.py: serving {args.reward} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def cli(argv=None) -> None:
    run_command("reward_server.py", main, parse_args(argv))


if __name__ == "__main__":
    cli()
