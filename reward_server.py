"""Serves one of the project's scorers over HTTP, so that the training processes need not hold it:

    python reward_server.py --reward videoalign --reward_model VideoReward --reward_prompt_template rubric.txt \
        --host 0.0.0.0 --port 8008
    accelerate launch train.py --backbone hunyuan15 --reward videoalign --reward_prompt_template rubric.txt \
        --reward_url http://rewardhost:8008 ...
    python reward_server.py --reward proxy --port 8008          # CPU: the tiny runs' scorer

GET /health names the scorer, its weights and the rubric's sha256; POST /score takes a batch of 8-bit videos with
their prompts and answers the three components and the scorer's diagnostics (reward_models/remote.py has the
format and the client). A bad request gets a 4xx with a one-line reason and the server goes on; at most
`--max_queue` requests wait, beyond that 503 (the client retries). The server prints one line when it listens
(`reward_server.py: serving <reward> on http://host:port`), then one line per request.

Deviations / choices: reward_models/remote.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import rewards
from reward_models import remote
from training.options import ConfigError, run_command


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--reward", required=True, choices=rewards.REWARDS, help="the scorer, as train.py's --reward")
    p.add_argument("--reward_model", help="folder or hub id of the model-based scorer ('tiny': the random tiny one)")
    p.add_argument("--reward_prompt_template", help="VideoAlign rubric (or judge template) file")
    p.add_argument("--reward_batch_size", type=int, default=2, help="videos per scorer call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=8008, help="0: any free port (printed)")
    p.add_argument("--max_request_mb", type=float, default=512, help="larger bodies get 413")
    p.add_argument("--max_queue", type=int, default=16, help="requests that may wait; more get 503")
    return p.parse_args(argv)


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
              "rubric_sha256": rubric, "components": list(rewards.COMPONENTS)}
    score_lock, waiting = threading.Lock(), threading.BoundedSemaphore(args.max_queue)
    limit = int(args.max_request_mb * 2**20)

    class Handler(BaseHTTPRequestHandler):
        def answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def fail(self, code: int, reason: str) -> None:
            self.answer(code, {"error": reason})

        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path != "/health":
                return self.fail(404, f"no {self.path}: GET /health or POST /score")
            self.answer(200, health)

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                return self.fail(404, f"no {self.path}: POST /score")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self.fail(411, "a Content-Length header is needed")
            if length > limit:
                return self.fail(413, f"the body has {length} bytes, more than --max_request_mb {args.max_request_mb:g}")
            body = self.rfile.read(length)
            try:
                videos, prompts, fps = remote.decode(body)
            except ValueError as err:
                return self.fail(400, str(err))
            if not waiting.acquire(blocking=False):
                return self.fail(503, f"{args.max_queue} requests are waiting already: retry")
            try:
                with score_lock:  # one scoring at a time: a model is not thread-safe, and the device is one
                    scores, diagnostics = rewards.score_batched(scorer, videos.to(device), prompts, fps,
                                                                args.reward_batch_size)
            except ValueError as err:  # e.g. a scorer's own check of its input
                return self.fail(400, str(err))
            finally:
                waiting.release()
            as_json = lambda t: [v if v == v and abs(v) != float("inf") else None for v in t.tolist()]  # noqa: E731
            self.answer(200, {"scores": [as_json(row) for row in scores.cpu()],
                              "diagnostics": {k: as_json(v.cpu()) for k, v in diagnostics.items()}})

        def log_message(self, fmt, *values):  # one line per request, on stderr
            sys.stderr.write(f"reward_server.py: {self.address_string()} {fmt % values}\n")

    server = ThreadingHTTPServer((args.host, args.port), Handler)
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
