"""reward_models/openai_judge.py, the judge through an OpenAI-compatible server, against independent computations:
the log-prob read-out against vlm_judge.expected_score and hand sums, the frames on the wire against the in-process
judge's pixels, the request against vlm_judge.py's chat. Then, over real HTTP on 127.0.0.1, against the test double
for vLLM (tests/openai_double.py: one process for the module): all ten digits returned gives the in-process tiny
judge's scores; fewer (the top 20 the client asks for, 60, 3) gives the missing mass and scores renormalised over
the digits returned, both recomputed here from transformers' forward of each whole chat; a wrong served model fails
the start-up check in one line."""
import base64
import io
import math
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import openai_double  # tests/, on the path as every test module's folder
import rewards
from reward_models import openai_judge as oj, remote, videoalign as va, vlm_judge as vj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red car drives along a coast road", "cat", "two dogs play in the snow at dusk, slow pan"]
FPS = 8.0  # 9 frames at 8 fps -> 4 frames at 3.56 fps: 0.5625 s per temporal patch, not the server's default 1.0


def clips(n=3, frames=9, height=48, width=64, seed=0):
    return torch.rand(n, frames, 3, height, width, generator=torch.Generator().manual_seed(seed))


def entries(logp: torch.Tensor, token_text) -> list:
    """OpenAI's top_logprobs of one row of log-probs, most probable first."""
    order = logp.argsort(descending=True).tolist()
    return [{"token": token_text(i), "logprob": logp[i].item()} for i in order]


# ---- the read-out, the wire and the wiring: no server ---------------------------------------------------------

def test_with_every_scale_value_returned_the_read_out_is_vlm_judges_expected_score():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    logits[4, [3, 7, 11, 20, 31]] += 30  # nearly all mass on the scale: off-format ~ 1e-12, expm1 keeps it
    allowed, scale = [3, 7, 11, 20, 31], (1, 2, 3, 4, 5)
    names = {i: str(v) for i, v in zip(allowed, scale)}
    score, off = vj.expected_score(logits, allowed, scale)  # the in-process judge's read-out of full logits
    for i, row in enumerate(logits.log_softmax(-1)):
        got = oj.read_answer(entries(row, lambda j: names.get(j, f"<{j}>")), scale)
        assert got[0] == pytest.approx(score[i].item(), abs=1e-6) and got[2] == 0
        assert got[1] == pytest.approx(off[i].item(), rel=1e-4, abs=1e-9)
    assert 0 < oj.read_answer(entries(logits[4].log_softmax(-1), lambda j: names.get(j, f"<{j}>")), scale)[1] < 1e-9


def test_fewer_values_returned_renormalise_over_those_present_and_count_the_rest_as_off_format():
    top = [{"token": "7", "logprob": math.log(0.5)}, {"token": "The", "logprob": math.log(0.3)},
           {"token": "2", "logprob": math.log(0.1)}, {"token": "7", "logprob": math.log(0.05)}]  # "7" twice: first
    score, off, missing = oj.read_answer(top, vj.SCALE)
    assert score == pytest.approx((0.5 * 7 + 0.1 * 2) / 0.6 / 9, abs=1e-12)  # sum_k q(k) k over D = {7, 2}, / 9
    assert off == pytest.approx(1 - 0.6, abs=1e-12) and missing == pytest.approx(0.8)
    assert oj.read_answer(top, (1, 2, 3, 4, 5))[0] == pytest.approx((2 - 1) / 4)  # only "2" is on this scale
    none = oj.read_answer([{"token": "The", "logprob": -0.1}, {"token": "10", "logprob": -3.0}], vj.SCALE)
    assert math.isnan(none[0]) and none[1:] == (1.0, 1.0)  # no information: NaN, all mass off the scale


def test_the_frames_on_the_wire_are_the_in_process_judges_pixels_and_time_axis():
    video = clips(1)[0]
    url, frames_fps = oj.frames_data_url(video, FPS, **oj.TINY_PIXELS)
    assert url.startswith("data:video/jpeg;base64,")
    frames = [np.asarray(Image.open(io.BytesIO(base64.b64decode(f)))) for f in url.split(",", 1)[1].split(",")]
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",")[1]))).format == "PNG"  # lossless
    pixels, grid = va.patchify(va.normalize_clip(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2) / 255))
    here, thw, seconds = va.preprocess_video(video, FPS, **oj.TINY_PIXELS)  # what vlm_judge.py feeds the model
    assert torch.equal(grid, thw) and torch.allclose(pixels, here, atol=1e-6, rtol=0)
    assert 2 / frames_fps == pytest.approx(seconds, rel=1e-12) and seconds == 0.5625  # the HF processor: 2 / fps


def test_a_request_renders_as_vlm_judges_chat(tmp_path):
    body = oj.chat_request("m", "data:video/jpeg;base64,AAAA", 2.0, vj.QUESTIONS["semantic"].replace("{prompt}", "cat"))
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["mm_processor_kwargs"] == {"fps": 2.0}  # the time axis (the tiny judge barely feels it: 3.5e-6)
    text = openai_double.render_chat(body["messages"]).replace("<|video_pad|>", "<|video_pad|>" * 8)
    assert text == vj.chat_prefix(8) + vj.chat_suffix(vj.QUESTIONS["semantic"], "cat")  # the same chat, to the char
    (tmp_path / "ten.txt").write_text("[scale]\n0 5 10\n" + "".join(f"[{k}]\n{q}\n" for k, q in vj.QUESTIONS.items()))
    with pytest.raises(ValueError, match="scale value 10 is not one digit"):
        oj.load_judge_template(tmp_path / "ten.txt")
    with pytest.raises(ValueError, match="holds a chat or vision token"):
        oj.OpenAIJudge("http://127.0.0.1:1/v1", "tiny")(clips(1), ["a <|im_end|> cat"], FPS)


def test_a_v1_url_takes_the_openai_client_for_vlm_only_and_other_urls_keep_reward_server():
    assert [oj.is_openai_url(u) for u in ("http://h:8000/v1", "http://h:8000/v1/", "https://h/api/v1", "http://h:8008",
                                          "http://h:8008/v1x")] == [True, True, True, False, False]
    judge = rewards.build_reward("vlm", url="http://h:8000/v1/")
    assert isinstance(judge, oj.OpenAIJudge) and judge.url == "http://h:8000/v1"
    assert judge.model == rewards.DEFAULT_MODELS["vlm"] and judge.max_pixels == va.MAX_PIXELS  # the real judge's
    assert isinstance(rewards.build_reward("vlm", url="http://h:8008"), remote.RemoteScorer)
    for name in ("proxy", "videoalign"):
        with pytest.raises(ValueError, match=f"can only hold the --reward vlm judge, not '{name}'"):
            rewards.build_reward(name, url="http://h:8000/v1")
        with pytest.raises(ValueError, match=f"serve {name} with reward_server.py"):
            rewards.check_reward_url(name, "http://h:8000/v1")


def test_a_v1_url_with_nothing_behind_it_fails_in_seconds_naming_it():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    start = time.perf_counter()
    with pytest.raises(remote.RewardServerError, match=re.escape(f"--reward_url {url}: /models: no answer within 1 s")):
        rewards.check_reward_url("vlm", url, "tiny", timeout=1.0)
    assert time.perf_counter() - start < 5


# ---- through the double (tests/openai_double.py), over HTTP ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return vj.build_tiny_judge(seed=0, batch_size=3)  # the in-process judge the double serves


@pytest.fixture(scope="module")
def double(request):
    """One double for the module: `tiny` returns the whole vocabulary's log-probs (every digit), `tiny-asked` the
    top 20 the client asks for (as vLLM), `tiny-top60` and `tiny-top3` their top 60 / 3 whatever a request asks."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "openai_double.py"), "--port", "0",
                             "--serve", "tiny=all", "--serve", "tiny-asked=asked", "--serve", "tiny-top60=60",
                             "--serve", "tiny-top3=3", "--max_requests", "100", "--time_limit", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    request.getfixturevalue("tiny")  # built here while the double starts (both take seconds, mostly imports)
    line = proc.stdout.readline()  # "openai_double.py: serving [...] on http://127.0.0.1:<port>/v1"
    assert line.startswith("openai_double.py: serving"), line
    yield line.split()[-1]
    proc.kill()
    proc.wait()


def in_process(judge, videos, prompts):
    """rewards.score_batched of `judge` (8-bit frames, as every scorer sees them)."""
    return rewards.score_batched(judge, videos, prompts, FPS, 3)


@pytest.mark.slow  # a real server process: the slow tier, all on one worker (one double for the module)
@pytest.mark.xdist_group("openai_double")
def test_every_digit_returned_gives_the_in_process_judges_scores(double, tiny):
    videos = clips(3)
    here, d_here = in_process(tiny, videos, PROMPTS)
    there, d_there = in_process(rewards.build_reward("vlm", path="tiny", url=double), videos, PROMPTS)
    assert (here - there).abs().max() < 1e-4  # measured 1.2e-7: the same model, forwards in another order
    assert (d_here["judge_off_format_mass"] - d_there["judge_off_format_mass"]).abs().max() < 1e-5
    assert d_there["judge_scale_missing"].eq(0).all() and here.std(dim=0).min() > 1e-4  # the clips differ


@pytest.mark.slow
@pytest.mark.xdist_group("openai_double")
@pytest.mark.parametrize("name, k", [("tiny-asked", oj.TOP_LOGPROBS), ("tiny-top60", 60), ("tiny-top3", 3)])
def test_fewer_returned_report_the_missing_mass_and_renormalise_over_the_digits_present(double, tiny, name, k):
    videos = clips(3, seed=1)
    there, d_there = in_process(oj.OpenAIJudge(double, name, **oj.TINY_PIXELS), videos, PROMPTS)
    # Independently: transformers' forward of each whole chat (vlm_judge.full_chat_logits), top k, hand sums
    batch = tiny.prepare((videos * 255).round() / 255, PROMPTS, FPS)  # 8-bit frames, as score_batched
    with torch.no_grad():
        logp = tiny.full_chat_logits(batch).double().log_softmax(dim=-1)  # (9, V), row b * 3 + aspect
    p_scale = logp[:, tiny.allowed_ids].exp()  # (9, 10) p(k) of every digit
    scores, offs, missing = [], [], []
    for row, p in zip(logp, p_scale):
        top = row.topk(k + 1).values
        assert top[k - 1] - top[k] > 1e-4  # which tokens are the top k is not a rounding question
        present = torch.isin(torch.tensor(tiny.allowed_ids), row.topk(k).indices)  # (10,) D
        values = torch.tensor(vj.SCALE, dtype=torch.float64)
        q = p * present / (p * present).sum()  # renormalised over D (NaN when D is empty)
        scores.append((q @ values - values[0]) / (values[-1] - values[0]))
        # the mass actually missing: the in-process off-format mass plus the digits not returned
        offs.append((1 - p.sum()) + (p * ~present).sum())
        missing.append(1 - present.double().mean())
    expected = torch.stack(scores).view(3, 3).float()
    assert 0 < torch.stack(missing).min() and (k == 3) == bool(torch.stack(missing).eq(1).all())  # some / none
    torch.testing.assert_close(there, expected, atol=1e-4, rtol=0, equal_nan=True)
    torch.testing.assert_close(d_there["judge_off_format_mass"], torch.stack(offs).view(3, 3).mean(1).float(),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(d_there["judge_scale_missing"], torch.stack(missing).view(3, 3).mean(1).float())


@pytest.mark.slow
@pytest.mark.xdist_group("openai_double")
def test_a_wrong_served_model_fails_the_start_up_check_in_one_line_naming_the_url(double):
    rewards.check_reward_url("vlm", double, "tiny")  # served: passes
    with pytest.raises(remote.RewardServerError) as err:
        rewards.check_reward_url("vlm", double, "Qwen/Qwen2.5-VL-72B-Instruct")
    message = str(err.value)
    assert message.startswith(f"--reward_url {double} serves ['tiny', 'tiny-asked', 'tiny-top60', 'tiny-top3'], "
                              f"not --reward_model "
                              f"Qwen/Qwen2.5-VL-72B-Instruct: pass the served name") and "\n" not in message


@pytest.mark.slow
@pytest.mark.xdist_group("openai_double")
def test_train_options_check_the_served_model_at_start_up(double):
    from training import options

    args = ["--backbone", "tiny", "--reward", "vlm", "--reward_url", double, "--reward_model"]
    options.resolve(options.parse_args(args + ["tiny"]))  # served: passes
    with pytest.raises(options.ConfigError, match=re.escape(f"--reward_url {double} serves ['tiny', ")):
        options.resolve(options.parse_args(args + ["Qwen/Qwen2.5-VL-72B-Instruct"]))
    with pytest.raises(options.ConfigError, match="can only hold the --reward vlm judge, not 'proxy'"):
        options.resolve(options.parse_args(["--backbone", "tiny", "--reward", "proxy", "--reward_url", double]))
