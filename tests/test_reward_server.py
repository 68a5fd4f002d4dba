"""reward_server.py over real HTTP on 127.0.0.1 (a real server process): scores through it equal in-process scores
of the same videos (proxy exactly, the tiny random judge to 1e-5), a run with --reward_url logs the rewards of the
same run without it, a bad request gets a 4xx with its reason and the server goes on, and a URL with nothing
behind it fails in seconds, naming it."""
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

import rewards
import train
from reward_models import remote
from training import options

# Real server processes and training runs: the slow tier. One worker runs them all (the module's proxy server).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("reward_server")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red ball bouncing on green grass", "a blue car driving at night", "a yellow bird"]


def start_server(*args):
    """reward_server.py on a free port of 127.0.0.1; returns (process, url) once it listens."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "reward_server.py"), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    line = proc.stdout.readline()  # "reward_server.py: serving <reward> on http://127.0.0.1:<port>"
    assert line.startswith("reward_server.py: serving"), line
    return proc, line.split()[-1]


@pytest.fixture(scope="module")
def proxy_server():
    proc, url = start_server("--reward", "proxy")
    yield url
    proc.kill()
    proc.wait()


def videos(n=3, seed=0):
    return torch.rand(n, 4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))  # (N, F, 3, H, W)


def test_proxy_scores_through_the_server_equal_the_in_process_ones(proxy_server):
    health = remote.check_server(proxy_server, "proxy", None, timeout=10)
    assert health["components"] == list(rewards.COMPONENTS)
    v = videos()
    here, _ = rewards.score_batched(rewards.ProxyReward(), v, PROMPTS, 8, 2)
    there, _ = rewards.score_batched(remote.RemoteScorer(proxy_server, 10), v, PROMPTS, 8, 2)
    assert torch.equal(here, there)
    with pytest.raises(remote.RewardServerError, match="serves --reward 'proxy', not 'vlm'"):
        remote.check_server(proxy_server, "vlm", None, timeout=10)


def test_the_tiny_judge_through_the_server_equals_the_in_process_judge():
    proc, url = start_server("--reward", "vlm", "--reward_model", "tiny")
    try:
        v = videos(2, seed=1)
        here, d_here = rewards.score_batched(rewards.build_reward("vlm", path="tiny"), v, PROMPTS[:2], 8, 2)
        there, d_there = rewards.score_batched(remote.RemoteScorer(url, 30), v, PROMPTS[:2], 8, 2)
    finally:
        proc.kill()
        proc.wait()
    assert torch.allclose(here, there, atol=1e-5) and d_here.keys() == d_there.keys()
    assert all(torch.allclose(d_here[k], d_there[k], atol=1e-5) for k in d_here)


def post(url, body: bytes, path="/score", headers=None):
    """(status, answer) of one request, 4xx included."""
    request = urllib.request.Request(url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def good(**changes) -> dict:
    v = (videos(1) * 255).round().to(torch.uint8)
    body = {"prompts": PROMPTS[:1], "fps": 8, "shape": list(v.shape),
            "videos": base64.b64encode(v.numpy().tobytes()).decode()}
    return {**body, **changes}


BAD = [  # (body, status, reason)
    (b"not json", 400, "not JSON"),
    (json.dumps([1, 2]).encode(), 400, "must be a JSON object"),
    (json.dumps({k: v for k, v in good().items() if k != "prompts"}).encode(), 400, "missing prompts"),
    (json.dumps(good(shape=[1, 4, 3, 16])).encode(), 400, "shape must be [N, F, 3, H, W]"),
    (json.dumps(good(shape=[1, 4, 4, 16, 16])).encode(), 400, "shape must be [N, F, 3, H, W]"),
    (json.dumps(good(prompts=PROMPTS[:2])).encode(), 400, "prompts must be a list of 1 strings"),
    (json.dumps(good(fps=-8)).encode(), 400, "fps must be a positive number"),
    (json.dumps(good(videos="%%%")).encode(), 400, "not valid base64"),
    (json.dumps(good(shape=[1, 4, 3, 16, 8])).encode(), 400, "bytes, shape [1, 4, 3, 16, 8] needs 1536"),
    (json.dumps(good(prompts=[1])).encode(), 400, "prompts must be a list of 1 strings"),
]


@pytest.mark.parametrize("body, status, reason", BAD)
def test_a_bad_request_gets_a_4xx_with_its_reason_and_the_server_goes_on(proxy_server, body, status, reason):
    code, answer = post(proxy_server, body)
    assert code == status and reason in answer["error"] and "\n" not in answer["error"]
    code, answer = post(proxy_server, json.dumps(good()).encode())  # the next good request is served
    assert code == 200 and len(answer["scores"]) == 1


def test_too_large_and_unknown_paths_are_refused(proxy_server):
    code, answer = post(proxy_server, b"{}", headers={"Content-Length": str(2**40)})
    assert code == 413 and "--max_request_mb" in answer["error"]
    assert post(proxy_server, b"{}", path="/nowhere")[0] == 404


def test_a_run_through_the_server_logs_the_rewards_of_the_run_without_it(proxy_server, tmp_path):
    run = lambda out, *args: train.main(options.parse_args(["--backbone", "tiny", "--max_steps", "2",  # noqa: E731
                                                            "--output_dir", str(out), *args]))
    here = run(tmp_path / "here")
    there = run(tmp_path / "there", "--reward_url", proxy_server)
    for key in ("reward/mixed", "reward/visual", "reward/temporal", "reward/semantic", "val/total"):
        assert [row.get(key) for row in here] == [row.get(key) for row in there], key
    assert here[-1]["val/total"] == there[-1]["val/total"]  # the validation videos are scored there too


def test_a_url_with_nothing_behind_it_fails_in_seconds_naming_it():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.perf_counter()
    with pytest.raises(options.ConfigError, match=f"--reward_url {url}: no answer within 5 s"):
        options.resolve(options.parse_args(["--backbone", "tiny", "--reward_url", url]))
    assert time.perf_counter() - start < 10
