"""Reward traffic of one GRPO iteration in [SPG]'s setting, on paper: how many requests reach reward_server.py, their
bytes on the wire, and the scorer throughput that keeps scoring under 10 % of an iteration.

    python bench/reward_traffic.py             # the table in docs/performance.md (CPU, a few seconds, no weights)
    python bench/reward_traffic.py --measure   # also times the server's decoding of one request, against the
                                               # former JSON + base64 body, side by side (about 2 GB of RAM)

What each number comes from (constants below, each with its source):
- videos per iteration = processes x batch: [SPG] trains Wan2.1-1.3B with G = 16 on 16 GPUs; train.py's default
  batch is one group per process (batch_size = G), so 16 x 16 = 256 videos.
- requests = processes x ceil(batch / reward_batch_size): rewards.score_batched sends `--reward_batch_size` videos
  (default 2) per request, one request at a time per process.
- bytes of a request: exactly what remote.encode writes, the JSON header line, a newline and the n uint8 values
  (checked below against remote.encode on a small clip).
- the iteration's model time: FLOPs of one Wan2.1-1.3B forward row counted by torch's FlopCounterMode on the meta
  device (the hub config in models/wan.py, 32,760 video tokens + 512 text tokens), times the rows the preset runs
  (rollout K x batch x 2 CFG rows, anchor means and training K_train x batch x 2 rows, training at 3 forwards),
  over the H200 throughputs measured for HunyuanVideo-1.5 in docs/performance.md (an ESTIMATE: Wan at this clip
  size is not measured; its attention needs no mask, so the real figure is likely shorter).
- the budget: scoring time T_s <= 10 % of the whole iteration T_model + T_s, so T_s <= T_model / 9; the throughput
  needed is videos / T_s, and the wire must carry the iteration's bytes within T_s too.
- the judge's work per video (for scale): 2 x parameters x tokens of the prefill, the tokens from the judge's own
  video path (videoalign.preprocess_video: 2 fps, at most 200,704 pixels a frame, 4 patches per token) plus its
  three questions (about 200 tokens); the 72B's parameter count is reward_models/vlm_judge.py's.
"""
from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from models import wan  # noqa: E402
from reward_models import remote, videoalign  # noqa: E402

PROCESSES, GROUP_SIZE = 16, 16      # [SPG]: G = 16 on 16 GPUs (docs/training.md)
BATCH = GROUP_SIZE                  # train.py: --batch_size defaults to G, one group per process
REWARD_BATCH_SIZE = 2               # train.py --reward_batch_size default: videos per request
FRAMES, HEIGHT, WIDTH, FPS = 81, 480, 832, 16    # the wan21-1.3b preset ([SPG]'s clip)
NUM_STEPS = 20                      # the preset's K
TEXT_TOKENS = 512                   # Wan always carries its 512 padded text rows
ROLLOUT_TFLOPS, TRAIN_TFLOPS = 211.0, 158.0      # measured, H200, HunyuanVideo-1.5 (docs/performance.md, 2026-11-26)
PROMPT = "two children flying a red paper plane in a park"   # a prompt of prompts/eval_prompts.txt
JUDGE_PARAMS = 73.41e9              # Qwen2.5-VL-72B (reward_models/vlm_judge.py)
JUDGE_TEXT_TOKENS = 200             # system turn and the three questions' suffixes, about
LINKS_GBIT = (10, 25, 100)          # Ethernet speeds to the reward machine


def request_bytes(n_videos: int, frames: int, height: int, width: int) -> int:
    """Length of remote.encode's body for n_videos clips of this size (the prompt above for each)."""
    shape = [n_videos, frames, 3, height, width]
    return len(json.dumps({"prompts": [PROMPT] * n_videos, "fps": FPS, "shape": shape})) + 1 + math.prod(shape)


def forward_flops() -> float:
    """FLOPs of one forward row of Wan2.1-1.3B at the clip size, counted on the meta device."""
    from diffusers import WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    latent = (16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)  # Wan2.1 VAE: x4 in time, x8 in space
    with torch.device("meta"):
        model = WanTransformer3DModel(**wan.REAL_TRANSFORMER["wan21-1.3b"])
        x = torch.empty(1, *latent)  # (1, C, F', H', W')
        text = torch.empty(1, TEXT_TOKENS, wan.REAL_TRANSFORMER["wan21-1.3b"]["text_dim"])
        with FlopCounterMode(display=False) as counter:
            model(hidden_states=x, timestep=torch.empty(1, dtype=torch.long), encoder_hidden_states=text,
                  return_dict=False)
    return float(counter.get_total_flops())


def judge_tokens() -> int:
    """Video tokens of one clip on the judge's path (2 fps, Qwen's smart size, 2 x 2 patches of 14 per token,
    2 frames per temporal patch) plus the text."""
    frames = len(videoalign.frame_indices(FRAMES, FPS, 2.0))
    h, w = videoalign.smart_size(HEIGHT, WIDTH)
    return math.ceil(frames / 2) * (h // 28) * (w // 28) + JUDGE_TEXT_TOKENS


def json_base64_decode(body: bytes) -> torch.Tensor:
    """The former POST /score body's decoding (the videos in base64 inside one JSON object), for comparison."""
    request = json.loads(body)
    raw = base64.b64decode(request["videos"], validate=True)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(*request["shape"])


def measure_decode(rounds: int = 3) -> tuple[float, float]:
    """Seconds (best of `rounds`, the two interleaved) that remote.decode and the former JSON + base64 decoding take
    for one request of REWARD_BATCH_SIZE clips: the server's share of a request before scoring (it holds Python's
    lock, so one server decodes one request at a time)."""
    shape = [REWARD_BATCH_SIZE, FRAMES, 3, HEIGHT, WIDTH]
    raw = bytes(math.prod(shape))
    binary = remote.encode(torch.zeros(shape), [PROMPT] * REWARD_BATCH_SIZE, FPS)
    former = json.dumps({"prompts": [PROMPT] * REWARD_BATCH_SIZE, "fps": FPS, "shape": shape,
                         "videos": base64.b64encode(raw).decode("ascii")}).encode()
    del raw
    times = {"binary": [], "json": []}
    for _ in range(rounds):
        for name, decode, body in (("binary", remote.decode, binary), ("json", json_base64_decode, former)):
            start = time.perf_counter()
            decode(body)
            times[name].append(time.perf_counter() - start)
    return min(times["binary"]), min(times["json"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--measure", action="store_true", help="also time remote.decode of one request")
    args = p.parse_args()

    # The byte formula is remote.encode's, checked on a small clip
    small = torch.rand(2, 3, 3, 8, 12)  # (N, F, 3, H, W)
    assert len(remote.encode(small, [PROMPT] * 2, FPS)) == request_bytes(2, 3, 8, 12)

    videos = PROCESSES * BATCH
    requests = PROCESSES * math.ceil(BATCH / REWARD_BATCH_SIZE)
    per_request = request_bytes(REWARD_BATCH_SIZE, FRAMES, HEIGHT, WIDTH)
    per_iteration = requests * per_request
    video_bytes = FRAMES * 3 * HEIGHT * WIDTH
    row = forward_flops()
    judge_per_video = 2 * JUDGE_PARAMS * judge_tokens()

    print(f"[SPG] setting: {PROCESSES} processes x {BATCH} videos (G = {GROUP_SIZE}), {FRAMES} x {HEIGHT} x {WIDTH} "
          f"@ {FPS} fps, K = {NUM_STEPS}, --reward_batch_size {REWARD_BATCH_SIZE}\n")
    print("| quantity | value | from |\n| --- | ---: | --- |")
    print(f"| videos per iteration | {videos} | {PROCESSES} processes x {BATCH} |")
    print(f"| reward requests per iteration | {requests} | {PROCESSES} x ceil({BATCH} / {REWARD_BATCH_SIZE}) |")
    print(f"| one video as uint8 | {video_bytes / 1e6:.1f} MB | {FRAMES} x 3 x {HEIGHT} x {WIDTH} bytes |")
    print(f"| one request on the wire | {per_request / 1e6:.1f} MB | {REWARD_BATCH_SIZE} videos + the JSON header "
          f"({per_request - REWARD_BATCH_SIZE * video_bytes} B) |")
    print(f"| one iteration on the wire | {per_iteration / 1e9:.1f} GB | {requests} requests; the answers are "
          f"~100 B each |")
    for gbit in LINKS_GBIT:
        print(f"| its transfer at {gbit} Gbit/s | {per_iteration * 8 / (gbit * 1e9):.1f} s | into the one server |")
    print(f"| one forward row (Wan2.1-1.3B) | {row / 1e12:.1f} TFLOP | FlopCounterMode, meta device |")
    print(f"| judge prefill per video (72B) | {judge_per_video / 1e12:.0f} TFLOP | 2 x 73.41 B x "
          f"{judge_tokens():,} tokens |")

    # Two iteration lengths: the preset (every one of the K steps trained, with the anchor's means) and an SDE
    # window of 2 steps (--sde_window 2: 2 steps trained and anchored, the rollout unchanged), the shortest
    # iteration the options give for this clip, so the most demanding for the scorer.
    print("\n| iteration (per process, estimate) | model time | scoring budget (1/9 of it) | videos/s needed "
          "| wire needed | judge compute needed (72B) |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, trained in (("preset: K = 20 trained", NUM_STEPS), ("--sde_window 2", 2)):
        rollout = NUM_STEPS * BATCH * 2 * row / (ROLLOUT_TFLOPS * 1e12)
        anchor = trained * BATCH * 2 * row / (ROLLOUT_TFLOPS * 1e12)
        training = trained * BATCH * 2 * 3 * row / (TRAIN_TFLOPS * 1e12)
        model = rollout + anchor + training
        budget = model / 9  # T_s <= 0.1 (T_model + T_s)
        print(f"| {name} | {model:,.0f} s | {budget:,.0f} s | {videos / budget:.2f} | "
              f"{per_iteration * 8 / budget / 1e9:.2f} Gbit/s | {videos / budget * judge_per_video / 1e12:.0f} "
              f"TFLOP/s |")
    if args.measure:
        binary, former = measure_decode()
        print(f"\nremote.decode of one request ({per_request / 1e6:.0f} MB): {binary:.2f} s (best of 3, interleaved); "
              f"the former JSON + base64 body of the same videos: {former:.2f} s; ratio {former / binary:.1f}x. "
              f"One iteration's {requests} requests: {requests * binary:.0f} s of the server's CPU "
              f"(was {requests * former:.0f} s)")


if __name__ == "__main__":
    main()
