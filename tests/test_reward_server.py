"""reward_server.py over real HTTP on 127.0.0.1 (a real server process): scores through it equal in-process scores
of the same videos (proxy exactly, the tiny random judge to 1e-5), concurrent requests are batched into fewer scorer
calls and each still gets its own scores, a scorer error fails only the request at fault, a full queue answers 503,
a run with --reward_url logs the rewards of the same run without it (two runs sharing one server too), a server
killed mid-run ends the run naming it and `latest` resumes to the uninterrupted run's adapter, a bad request gets
a 4xx with its reason and the server goes on, one attempt of the client waits until its timeout, and a URL with
nothing behind it fails in seconds, naming it."""
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import launcher  # tests/
import rewards
import train
from reward_models import remote
from training import checkpoint, export, logs, options

# Real server processes and training runs: the slow tier. One worker runs them all (the module's proxy server).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("reward_server")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red ball bouncing on green grass", "a blue car driving at night", "a yellow bird"]


def start_server(*args, code=None):
    """reward_server.py on a free port of 127.0.0.1 (or `code` run as `python -c`, which ends by starting it);
    returns (process, url) once it listens."""
    script = ["-c", code] if code else [os.path.join(ROOT, "reward_server.py")]
    proc = subprocess.Popen([sys.executable, *script, "--port", "0", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    line = proc.stdout.readline()  # "reward_server.py: serving <reward> on http://127.0.0.1:<port>"
    assert line.startswith("reward_server.py: serving"), line
    return proc, line.split()[-1]


# The module's server: the proxy scorer, with two test doubles on demand selected by a video's prompt: "sleep S"
# holds the scorer call for S seconds (so that the requests sent meanwhile queue up, as a slow model makes them
# do), "raise NAME" raises that exception. Every other prompt is scored by the real proxy.
HOOKED_PROXY = """
import builtins, time, rewards, reward_server
real = rewards.ProxyReward.__call__
def call(self, videos, prompts, fps=8.0):
    for prompt in prompts:
        word, _, arg = prompt.partition(" ")
        if word == "sleep":
            time.sleep(float(arg))
        if word == "raise":
            raise getattr(builtins, arg)(prompt)
    return real(self, videos, prompts, fps)
rewards.ProxyReward.__call__ = call
reward_server.cli()
"""
BATCH, MAX_QUEUE = 4, 8  # the module server's --reward_batch_size and --max_queue


@pytest.fixture(scope="module")
def proxy_server():
    proc, url = start_server("--reward", "proxy", "--reward_batch_size", str(BATCH), "--max_queue", str(MAX_QUEUE),
                             code=HOOKED_PROXY)
    yield url
    proc.kill()
    proc.wait()


def videos(n=3, seed=0, size=16):
    return torch.rand(n, 4, 3, size, size, generator=torch.Generator().manual_seed(seed))  # (N, F, 3, H, W)


def test_proxy_scores_through_the_server_equal_the_in_process_ones(proxy_server):
    health = remote.check_server(proxy_server, "proxy", None, timeout=10)
    assert health["components"] == list(rewards.COMPONENTS)
    v = videos()
    here, _ = rewards.score_batched(rewards.ProxyReward(), v, PROMPTS, 8, 2)
    there, _ = rewards.score_batched(remote.RemoteScorer(proxy_server, 10), v, PROMPTS, 8, 2)
    assert torch.equal(here, there)
    with pytest.raises(remote.RewardServerError, match="serves --reward 'proxy', not 'vlm'"):
        remote.check_server(proxy_server, "vlm", None, timeout=10)


def test_videos_laid_out_as_decoded_score_through_the_server_bitwise_as_in_process(proxy_server):
    """A decoded video is an (N, F, 3, H, W) view of (N, 3, F, H, W) memory (the VAE's layout), the wire sends it in
    C order, and float sums run in memory order: without one layout for both, the proxy's semantic and visual
    scores differed in the last bit (5.96e-8), and so did a run's adapter after 3 steps."""
    v = torch.rand(3, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0)).transpose(1, 2)  # (N, F, 3, H, W)
    here, _ = rewards.score_batched(rewards.ProxyReward(), v, PROMPTS, 8, 2)
    there, _ = rewards.score_batched(remote.RemoteScorer(proxy_server, 10), v, PROMPTS, 8, 2)
    assert torch.equal(here, there)


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
                                     headers={"Content-Type": "application/octet-stream", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


RAW = (videos(1) * 255).round().to(torch.uint8).numpy().tobytes()  # one video's uint8 values, C order


def good(**changes) -> dict:
    """The header of one good request (remote.encode's), with `changes`."""
    return {"prompts": PROMPTS[:1], "fps": 8, "shape": [1, 4, 3, 16, 16], **changes}


def wire(header, raw: bytes = RAW) -> bytes:
    return (header if isinstance(header, bytes) else json.dumps(header).encode()) + b"\n" + raw


BAD = [  # (body, status, reason)
    (wire(b"not json"), 400, "not JSON"),
    (wire(b"[1, 2]"), 400, "must be a JSON object"),
    (wire({k: v for k, v in good().items() if k != "prompts"}), 400, "missing prompts"),
    (wire(good(shape=[1, 4, 3, 16])), 400, "shape must be [N, F, 3, H, W]"),
    (wire(good(shape=[1, 4, 4, 16, 16])), 400, "shape must be [N, F, 3, H, W]"),
    (wire(good(prompts=PROMPTS[:2])), 400, "prompts must be a list of 1 strings"),
    (wire(good(fps=-8)), 400, "fps must be a positive number"),
    (json.dumps(good()).encode(), 400, "a JSON header line, a newline, then the uint8 values"),
    (wire(good(shape=[1, 4, 3, 16, 8])), 400, "video bytes, shape [1, 4, 3, 16, 8] needs 1536"),
    (wire(good(prompts=[1])), 400, "prompts must be a list of 1 strings"),
]


def test_the_body_is_the_header_line_and_the_raw_bytes():
    """remote.encode's body, byte for byte: what a client in another language would write."""
    assert remote.encode(videos(1), PROMPTS[:1], 8) == wire(good())
    values, prompts, fps = remote.decode(wire(good()))
    assert values.numpy().tobytes() == RAW
    assert (prompts, fps, list(values.shape)) == (PROMPTS[:1], 8.0, [1, 4, 3, 16, 16])


@pytest.mark.parametrize("body, status, reason", BAD, ids=[reason for _, _, reason in BAD])
def test_a_bad_request_gets_a_4xx_with_its_reason_and_the_server_goes_on(proxy_server, body, status, reason):
    code, answer = post(proxy_server, body)
    assert code == status and reason in answer["error"] and "\n" not in answer["error"]
    code, answer = post(proxy_server, wire(good()))  # the next good request is served
    assert code == 200 and len(answer["scores"]) == 1


def test_too_large_and_unknown_paths_are_refused(proxy_server):
    code, answer = post(proxy_server, b"{}", headers={"Content-Length": str(2**40)})
    assert code == 413 and "--max_request_mb" in answer["error"]
    assert post(proxy_server, b"{}", path="/nowhere")[0] == 404


def health(url) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as answer:
        return json.loads(answer.read())


def in_process(v, prompts, fps) -> torch.Tensor:
    """(n, 3) scores of the proxy in this process, `BATCH` videos a call."""
    return rewards.score_batched(rewards.ProxyReward(), v, prompts, fps, BATCH)[0]


def together(url, jobs, hold_s: float) -> list:
    """(status, answer) of each (videos, prompts, fps) of `jobs`, all POSTed at once while a "sleep" request of
    another frame shape holds the scorer for `hold_s` seconds, so that they all wait in the queue together."""
    hold = threading.Thread(target=post, args=(url, remote.encode(videos(1, size=8), [f"sleep {hold_s}"], 8)))
    hold.start()
    while health(url)["scoring"] == 0:  # until the scorer holds it
        time.sleep(0.01)
    answers, start = [None] * len(jobs), threading.Barrier(len(jobs))

    def ask(i):
        start.wait()
        answers[i] = post(url, remote.encode(*jobs[i]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads + [hold]:
        thread.join()
    return answers


def test_concurrent_requests_are_batched_and_each_gets_the_scores_of_its_own_videos(proxy_server):
    """Eight requests wait together: six of one fps and frame shape (12 videos), one at another fps, one of another
    frame shape. Each gets bitwise the scores of its videos scored alone in this process, from fewer scorer calls
    than requests, none holding more than --reward_batch_size videos."""
    jobs = [(videos(n, seed=i), PROMPTS[:n], 8) for i, n in enumerate([1, 2, 3, 1, 2, 3])]
    jobs += [(videos(2, seed=6), PROMPTS[:2], 16), (videos(1, seed=7, size=12), PROMPTS[:1], 8)]
    before = health(proxy_server)
    answers = together(proxy_server, jobs, hold_s=1.5)
    after = health(proxy_server)
    for (v, prompts, fps), (code, answer) in zip(jobs, answers):
        assert code == 200 and torch.equal(torch.tensor(answer["scores"]), in_process(v, prompts, fps))
    calls = after["scored_calls"] - before["scored_calls"]
    assert after["scored_videos"] - before["scored_videos"] == 1 + 12 + 2 + 1
    # The holding call, ceil(12 / BATCH) calls for the 12 alike videos, one for each odd one out: 6 calls if
    # every call is full, for 9 requests; a call over BATCH videos would make fewer.
    assert 1 + math.ceil(12 / BATCH) + 2 <= calls < 1 + len(jobs)


def test_a_scorer_error_fails_only_the_request_at_fault_and_the_server_goes_on(proxy_server):
    """Four one-video requests wait together and go to the scorer in one call, which fails: retried one at a time,
    the request whose scorer call raises ValueError gets 400, RuntimeError 500, the other two their scores."""
    jobs = [(videos(1, seed=10), PROMPTS[:1], 8), (videos(1, seed=11), ["raise ValueError"], 8),
            (videos(1, seed=12), PROMPTS[1:2], 8), (videos(1, seed=13), ["raise RuntimeError"], 8)]
    before = health(proxy_server)["scored_calls"]
    (good1, answer1), (bad, refused), (good2, answer2), (broken, failed) = together(proxy_server, jobs, hold_s=1.5)
    assert health(proxy_server)["scored_calls"] - before == 1 + 1 + 4  # the hold, the call of four, each alone
    assert bad == 400 and "the scorer refused the videos: ValueError: raise ValueError" in refused["error"]
    assert broken == 500 and "the scorer failed: RuntimeError: raise RuntimeError" in failed["error"]
    assert good1 == good2 == 200
    assert torch.equal(torch.tensor(answer1["scores"]), in_process(*jobs[0]))
    assert torch.equal(torch.tensor(answer2["scores"]), in_process(*jobs[2]))
    assert post(proxy_server, wire(good()))[0] == 200


def test_requests_beyond_max_queue_get_503(proxy_server):
    """While the scorer is busy, --max_queue requests wait and the next one is told to retry."""
    jobs = [(videos(1, seed=20 + i), PROMPTS[:1], 8) for i in range(MAX_QUEUE + 1)]
    answers = together(proxy_server, jobs, hold_s=1.5)
    assert sorted(code for code, _ in answers) == [200] * MAX_QUEUE + [503]
    assert all(f"{MAX_QUEUE} requests are waiting already: retry" in answer["error"]
               for code, answer in answers if code == 503)


# Every training run below: three steps, a checkpoint after each, the validation videos at the end (scored through
# the server too).
RUN = ("--max_steps", "3", "--checkpointing_steps", "1")
LOGGED = ("reward/mixed", "reward/visual", "reward/temporal", "reward/semantic", "val/total")


def run(out, *args) -> list[dict]:
    return train.main(options.parse_args(["--backbone", "tiny", "--output_dir", str(out), *args]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run without --reward_url: what every run through a server below must log and end with."""
    out = tmp_path_factory.mktemp("reference")
    return out, run(out, *RUN)


def same_as_reference(out, reference) -> None:
    """The rewards and validation score in `out`'s metrics.jsonl and its final adapter are bitwise the reference
    run's."""
    ref_out, ref_rows = reference
    rows = logs.read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [row["step"] for row in rows] == [1, 2, 3] and "val/total" in rows[-1]
    for key in LOGGED:
        assert [row.get(key) for row in rows] == [row.get(key) for row in ref_rows], key
    adapter, expected = export.read_adapter(str(out)), export.read_adapter(str(ref_out))
    assert adapter.keys() == expected.keys() and all(torch.equal(adapter[k], expected[k]) for k in expected)


def test_two_training_processes_share_one_server(proxy_server, reference, tmp_path):
    """train.py in another process (tests/launcher.py) and train.main in this process score through one server at the same time
    (this one starts once the server has scored the other's first videos); each logs the rewards and validation
    score of the run without the server and ends with its adapter, bit for bit."""
    start = health(proxy_server)["scored_videos"]
    other = launcher.Popen("train", ["--backbone", "tiny", *RUN, "--output_dir", tmp_path / "other", "--reward_url",
                                     proxy_server], dict(os.environ))
    try:
        while health(proxy_server)["scored_videos"] == start and other.poll() is None:
            time.sleep(0.05)
        run(tmp_path / "here", *RUN, "--reward_url", proxy_server)
        err = other.communicate(timeout=300)[1]
    finally:
        other.kill()
    assert other.returncode == 0, err[-3000:]
    same_as_reference(tmp_path / "here", reference)
    same_as_reference(tmp_path / "other", reference)


def test_a_server_killed_mid_run_ends_the_run_naming_it_and_latest_resumes_to_the_same_adapter(
        proxy_server, reference, tmp_path, monkeypatch, capsys):
    """The server is killed (SIGKILL) right after the first checkpoint is written: the run stops within
    --reward_timeout (3 s) with the URL and the resume command in one line, exit 1. With a server up again (the
    module's: the URL is not part of a run's identity), `--resume_from_checkpoint latest` ends where the
    uninterrupted run did, bit for bit. The run is train.py's command line in this process: the kill comes at a
    fixed point, and no interpreter starts."""
    proc, url = start_server("--reward", "proxy")
    real_save, killed = checkpoint.save, []

    def save_then_kill(output_dir, step, *args, **kwargs):
        real_save(output_dir, step, *args, **kwargs)
        if step == 1:
            proc.kill()
            proc.wait()
            killed.append(time.perf_counter())

    monkeypatch.setattr(checkpoint, "save", save_then_kill)
    out = tmp_path / "run"
    try:
        with pytest.raises(SystemExit) as stop:
            train.cli(["--backbone", "tiny", *RUN, "--output_dir", str(out), "--reward_url", url,
                       "--reward_timeout", "3"])
    finally:
        proc.kill()
        proc.wait()
    stopped_after = time.perf_counter() - killed[0]
    monkeypatch.undo()
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 1 and message.startswith(f"train.py: error: --reward_url {url}: /score: no answer within 3 s")
    assert "--resume_from_checkpoint latest" in message
    assert stopped_after < 3 + 5  # the timeout, and step 2's rollout before its reward request
    assert os.listdir(out / "checkpoints") == ["checkpoint-1"]
    run(out, *RUN, "--reward_url", proxy_server, "--resume_from_checkpoint", "latest")
    same_as_reference(out, reference)


def test_one_attempt_waits_as_long_as_the_deadline_allows(monkeypatch):
    """A request queued behind other processes' videos is slow, not lost: one attempt may wait until the client's
    timeout, where a fixed minute made the client send it again, queueing it twice (remote.py Deviations 2)."""
    waited = []

    def urlopen(request, timeout):
        waited.append(timeout)
        return io.BytesIO(b"{}")

    monkeypatch.setattr(remote.urllib.request, "urlopen", urlopen)
    assert remote.RemoteScorer("http://127.0.0.1:9", timeout=300).health() == {}
    assert 299 < waited[0] <= 300


def test_a_url_with_nothing_behind_it_fails_in_seconds_naming_it():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.perf_counter()
    with pytest.raises(options.ConfigError, match=f"--reward_url {url}: /health: no answer within 5 s"):
        options.resolve(options.parse_args(["--backbone", "tiny", "--reward_url", url]))
    assert time.perf_counter() - start < 10
