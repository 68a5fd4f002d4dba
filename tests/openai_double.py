"""A test double for vLLM: a loopback OpenAI-compatible server answering the chat-completions subset that
reward_models/openai_judge.py sends, with the project's tiny random Qwen2.5-VL judge.

    python tests/openai_double.py --port 0 --serve tiny=all --serve tiny-top60=60 [--max_requests 200]
    -> prints one line once it listens: "openai_double.py: serving ['tiny', 'tiny-top60'] on http://127.0.0.1:P/v1"

    GET  /v1/models             {"object": "list", "data": [{"id": name, "object": "model", ...}, ...]}
    POST /v1/chat/completions   the subset vLLM answers for the judge: a system turn and a user turn holding one
                                `video_url` part (vLLM's frame-list data URL, "data:video/jpeg;base64,<frame>,...",
                                frames in any format PIL reads) and text parts; max_tokens 1, logprobs true,
                                top_logprobs; optional mm_processor_kwargs.fps (default 2, as the HF processor's)
                             -> the first token's log-probs in OpenAI's format (choices[0].logprobs.content[0]:
                                token, logprob, bytes, top_logprobs), the greedy token as the message

What it does is what vLLM does with Qwen2.5-VL, written apart from the client and from vlm_judge.py's cached
three-question path, so that agreeing scores mean something:
- the chat is rendered here from the OpenAI messages with Qwen2.5-VL's chat template (a default system turn if
  none, `<|im_start|>role\n ... <|im_end|>\n`, a video part as `<|vision_start|><|video_pad|><|vision_end|>`, the
  assistant's turn opened), and the one `<|video_pad|>` is expanded to prod(grid_thw) / 4 tokens, as vLLM's
  prompt replacement does;
- the frames are decoded from the data URL (PIL), smart-resized within the judge's pixel caps (an identity for
  frames already at Qwen's size), CLIP-normalised and patched with videoalign.py's functions, which stand in for
  the HF video processor (it needs torchvision, not installed here); second_per_grid_ts = 2 / fps;
- one forward of transformers' Qwen2_5_VLForConditionalGeneration on the whole chat (positions computed by
  transformers), then log_softmax over the vocabulary in float32 at the last position, and its top K.

`--serve NAME=K` serves the judge under NAME, answering every request with its top K log-probs whatever the
request asks: K = asked (as vLLM does, within its --max-logprobs), all (the whole vocabulary), or an integer. The
tiny random judge spreads its answer over all 263 tokens of its byte-level vocabulary (its ten digits rank as low
as about 240th), so K stands for how many digits a real judge's top 20 would hold: `all` covers the scale (the
in-process judge's scores), an integer leaves some digits out, 3 leaves them all out.

Bounded: it exits after --max_requests requests or --time_limit seconds, whichever comes first, so a test that
dies cannot leave it running. One forward at a time (a lock); connections are threads.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import threading
import time
from http.server import ThreadingHTTPServer

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from reward_models import remote, vlm_judge  # noqa: E402  (after the path above)
from reward_models.videoalign import normalize_clip, patchify, resize_for_qwen  # noqa: E402

DATA_URL = "data:video/jpeg;base64,"  # vLLM's frame list: base64 frames joined by commas


class BadRequest(ValueError):
    """A request outside the subset served here: answered 400 with this one-line reason."""


def render_chat(messages: list) -> str:
    """Qwen2.5-VL's chat template on OpenAI messages, as vLLM applies it (one <|video_pad|> per video part)."""
    text = ""
    if not messages or messages[0].get("role") != "system":
        text += "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # the template's default turn
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            body = content
        elif isinstance(content, list):
            body = ""
            for part in content:
                kind = part.get("type")
                if kind == "video_url":
                    body += "<|vision_start|><|video_pad|><|vision_end|>"
                elif kind == "text":
                    body += part["text"]
                else:
                    raise BadRequest(f"content part of type {kind!r}: this double serves video_url and text parts")
        else:
            raise BadRequest("a message's content must be a string or a list of parts")
        text += f"<|im_start|>{message.get('role')}\n{body}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def decode_frames(messages: list) -> torch.Tensor:
    """(T, 3, H, W) in [0, 1] from the one video_url part (vLLM's frame-list data URL, each frame read by PIL)."""
    from PIL import Image
    import numpy as np

    urls = [part["video_url"]["url"] for m in messages if isinstance(m.get("content"), list)
            for part in m["content"] if part.get("type") == "video_url"]
    if len(urls) != 1 or not urls[0].startswith(DATA_URL):
        raise BadRequest(f"need exactly one video_url part holding a {DATA_URL}<frame>,<frame>,... data URL")
    frames = []
    for data in urls[0][len(DATA_URL):].split(","):
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
            frames.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()))  # (H, W, 3) uint8
    return torch.stack(frames).permute(0, 3, 1, 2).float() / 255  # (T, 3, H, W)


class Double:
    """The tiny judge behind the OpenAI subset: one request -> its answer dict, or BadRequest."""

    def __init__(self, serve: dict):
        self.judge = vlm_judge.build_tiny_judge()  # seed 0: the judge `--reward_model tiny` builds in process
        self.qwen, self.tokenizer = self.judge.qwen, self.judge.tokenizer
        self.video_id = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        self.serve, self.lock, self.count, self.counting = serve, threading.Lock(), 0, threading.Lock()

    def counted(self) -> None:
        with self.counting:  # handlers run in threads
            self.count += 1

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "openai_double"}
                                           for name in self.serve]}

    def first_token_logprobs(self, messages: list, fps: float) -> tuple[torch.Tensor, int]:
        """((V,) float32 log-probs of the first answer token, prompt length): one forward of the whole chat."""
        frames = resize_for_qwen(decode_frames(messages), self.judge.max_pixels, self.judge.min_pixels)
        pixel_values, grid_thw = patchify(normalize_clip(frames))  # the HF processor's output, (P, 1176), (1, 3)
        text = render_chat(messages).replace("<|video_pad|>", "<|video_pad|>" * (int(grid_thw.prod()) // 4))
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])  # (1, L)
        with self.lock, torch.no_grad():  # one forward at a time
            logits = self.qwen(input_ids=ids, pixel_values_videos=pixel_values, video_grid_thw=grid_thw,
                               second_per_grid_ts=torch.tensor([2 / fps]),  # the HF processor: temporal patch / fps
                               mm_token_type_ids=(ids == self.video_id).long() * 2).logits  # (1, L, V)
        return logits[0, -1].float().log_softmax(dim=-1), ids.shape[1]

    def entry(self, token_id: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token_id])  # vLLM returns the decoded text of each token
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def chat(self, request) -> dict:
        if not isinstance(request, dict):
            raise BadRequest("the body must be a JSON object")
        name = request.get("model")
        if name not in self.serve:
            raise BadRequest(f"The model `{name}` does not exist (served: {list(self.serve)})")
        if request.get("max_tokens") != 1 or request.get("logprobs") is not True:
            raise BadRequest("this double answers max_tokens 1 with logprobs true only")
        asked = request.get("top_logprobs")
        if not isinstance(asked, int) or not 0 <= asked <= 20:
            raise BadRequest(f"top_logprobs must be an integer in 0..20 (vLLM's default --max-logprobs), got {asked!r}")
        fps = float((request.get("mm_processor_kwargs") or {}).get("fps", 2.0))  # the HF processor's default
        messages = request.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("messages must be a list of objects")
        logp, prompt_tokens = self.first_token_logprobs(messages, fps)
        k = {"asked": asked, "all": logp.numel()}.get(self.serve[name], self.serve[name])
        values, token_ids = logp.topk(k)  # sorted, most probable first
        top = [self.entry(i, v) for i, v in zip(token_ids.tolist(), values.tolist())]
        greedy = self.entry(int(logp.argmax()), float(logp.max()))  # temperature 0: the argmax
        return {"id": f"chatcmpl-double-{self.count}", "object": "chat.completion", "created": int(time.time()),
                "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": greedy["token"]},
                             "logprobs": {"content": [{**greedy, "top_logprobs": top}]}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1}}


def parse_serve(values) -> dict:
    serve = {}
    for value in values or ["tiny=asked"]:
        name, _, k = value.partition("=")
        if not name or not (k in ("asked", "all") or k.isdigit()):
            raise SystemExit(f"--serve {value!r}: NAME=K with K one of asked, all, or an integer")
        serve[name] = k if k in ("asked", "all") else int(k)
    return serve


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--serve", action="append", help="NAME=K: serve the tiny judge as NAME with its top K log-probs "
                                                    "(asked | all | an integer); default tiny=asked")
    p.add_argument("--max_requests", type=int, default=200, help="exit after this many requests")
    p.add_argument("--time_limit", type=float, default=300.0, help="exit after this many seconds")
    args = p.parse_args(argv)
    double = Double(parse_serve(args.serve))

    class Handler(remote.JSONHandler):
        def fail(self, code: int, reason: str) -> None:  # OpenAI's error object
            self.answer(code, {"error": {"message": reason, "type": "BadRequestError", "code": code}})

        def do_GET(self):  # noqa: N802 (http.server's name)
            double.counted()
            if self.path.rstrip("/") != "/v1/models":
                return self.fail(404, f"no GET {self.path}: GET /v1/models or POST /v1/chat/completions")
            self.answer(200, double.models())

        def do_POST(self):  # noqa: N802
            double.counted()
            if self.path != "/v1/chat/completions":
                return self.fail(404, f"no POST {self.path}: POST /v1/chat/completions")
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                self.answer(200, double.chat(request))
            except (BadRequest, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                self.fail(400, " ".join(str(err).split()) or type(err).__name__)

        def log_message(self, fmt, *values):  # quiet: the tests read only the first line
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 64  # the client sends all 3n questions of a call at once
        daemon_threads = True

    server = Server(("127.0.0.1", args.port), Handler)
    server.timeout = 0.2  # handle_request returns this often to check the bounds below
    print(f"openai_double.py: serving {list(double.serve)} on http://127.0.0.1:{server.server_address[1]}/v1",
          flush=True)
    deadline = time.monotonic() + args.time_limit
    try:
        while double.count < args.max_requests and time.monotonic() < deadline:
            server.handle_request()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
