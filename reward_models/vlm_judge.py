"""A frozen VLM asked three questions about a video: Qwen2.5-VL as the visual / temporal / semantic judge.

[SPG] (Self-Paced GRPO) scores its Wan rollouts with a frozen Qwen2.5-VL-7B or -72B instead of VideoAlign,
which it finds content-biased; it does not publish its judge prompts. This module asks our own three
questions (QUESTIONS below, one per curriculum component) and reads each answer as an expectation:

    p(k)       = softmax(logits)[token(k)]                          next-token probability of scale value k
    q(k)       = p(k) / sum_j p(j)      = softmax(logits[allowed])  the judge's answer, restricted to the scale
    score      = (sum_k q(k) k - k_min) / (k_max - k_min)           in [0, 1], one per aspect
    off_format = 1 - sum_k p(k)                                     probability on tokens that are no answer

read at the first token of the assistant's reply. No generation, no sampling: deterministic, and finer than a
parsed integer. `off_format` is returned per video as the diagnostic "judge_off_format_mass" (rewards.py
logs its batch mean); a mean above OFF_FORMAT_WARN is logged as a warning (the judge ignores the format).

Conventions: videos (N, F, 3, H, W) float in [0, 1]; scores float32 in [0, 1], components in the order
visual, temporal, semantic (rewards.COMPONENTS); the chat is Qwen2.5-VL's (system turn, user turn with the
video first, then the question, then the assistant prefix).

Three questions for little more than the price of one: the video comes first, so the three chats share the prefix
    <system> <user> <vision_start> <video_pad> x n <vision_end>
(n = prod(grid_thw) / 4: 252 per pair of frames at 480x832); only the questions differ. The prefix
(and the vision tower) runs once per video with use_cache=True, its key/value cache is repeated for the
three aspects, and the three suffixes run as one batch of 3N rows on top of it. `python -m reward_models.vlm_judge
--benchmark` measures this against three independent forwards and against one batch of the three whole chats.

Memory (estimates, printed by `python -m reward_models.vlm_judge --benchmark`): bf16 weights are 2 bytes per parameter,
counted on the released configs built on the meta device: Qwen2.5-VL-7B 8.29 B parameters, 16.6 GB;
Qwen2.5-VL-72B 73.41 B, 146.8 GB. The KV cache adds 57 KB (7B) / 328 KB (72B) per token and row; [SPG]'s
480x832 clip of 81 frames at 16 fps gives 1,260 video tokens, so 2 videos x 3 questions x (1,260 + 200 text)
tokens hold 0.50 GB (7B) / 2.87 GB (72B). The 7B sits on the training GPU; the 72B's weights alone exceed one
80 GB GPU, hence `--reward_device_map auto` over at least two GPUs that it gets to itself.

Deviations / choices
1. Scale 0..9: Qwen's tokenizer splits numbers into single digits, so 0..9 is the widest integer scale whose
   every value is ONE token ("10" is two); a same-lab codebase asks for 0-100, which would need two tokens.
   A template file may choose another scale; each value is checked to be one token before weights load.
2. The score is the expectation under q, renormalised over the scale: a judge that puts little mass on the
   scale still gives a score in [0, 1], and the lost mass is reported rather than hidden.
3. Video path: videoalign.preprocess_video (2 fps, sides multiples of 28, <= 200,704 pixels per frame) is
   shared, not copied. qwen-vl-utils' default video pixel budget is larger; VideoAlign's smaller one keeps
   the judge cheap enough for every iteration and lets both scorers see the same frames.
4. Positions: transformers' own `get_rope_index` (M-RoPE with `second_per_grid_ts` for the time axis) on
   the whole chat; the prefix and the suffix take their slices of it, so the cached path sees exactly the
   positions of a single full forward (tested against transformers' forward, which computes them itself).
5. KV-cache reuse rather than one batch of the three chats: the prefix is most of the sequence, so the
   batch computes it three times; the benchmark prints both ratios.
6. The logits are read only at the answer position (lm_head on (3N, D), not (3N, L, V): a 7B row of
   1,460 tokens would be 152,064 logits per token), and the softmax, renormalisation and expm1 run in
   float32 (the logits themselves come out of the lm_head in the model's dtype).
7. Weights are never downloaded here: a hub id is taken from the local cache only, and a missing or
   wrong folder fails before any weight loads, with the download command.
8. The vision tower sees the video once per video (in the prefix); the per-aspect questions cannot change
   what it sees (the video comes first and attention is causal), which is what makes the cache reuse exact.

Template file (`--reward_prompt_template FILE`): four sections, each header alone on its line, in any order:
    [scale]      integers, increasing, separated by spaces (e.g. "1 2 3 4 5"); each must be one token
    [visual]     the visual-fidelity question
    [temporal]   the temporal-coherence question
    [semantic]   the text-video-alignment question; holds {prompt} exactly once (the caption goes there)
Leading and trailing blank lines of a section are dropped; nothing may come before the first header.

Run: `python -m pytest tests/test_vlm_judge.py -q` (tiny random Qwen2.5-VL, CPU);
`python -m reward_models.vlm_judge --benchmark` (tiny and mid-size random models, CPU; 56 s on a busy 2-core machine).
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reward_models.videoalign import CHAT_SPECIALS, MAX_PIXELS, MIN_PIXELS, byte_level_tokenizer, preprocess_video

logger = logging.getLogger(__name__)

# ---- What the judge is asked (Deviations 1); a template file may replace all four ---------------------------
SCALE = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
QUESTIONS = {
    "visual": ("How good does this video look, frame by frame? Judge sharpness, fine detail, lighting, colour "
               "and the absence of artefacts such as blur, noise, smears or malformed objects and faces. Do not "
               "judge the motion or the subject. Reply with one digit from 0 (very poor) to 9 (flawless)."),
    "temporal": ("How coherent is this video over time? Judge whether motion is smooth and physically plausible, "
                 "whether objects keep their shape, size and identity from frame to frame, and whether there is "
                 "flicker, jitter or sudden jumps. Do not judge image quality or the subject. Reply with one digit "
                 "from 0 (incoherent) to 9 (perfectly coherent)."),
    "semantic": ("This video was generated from the caption: \"{prompt}\". How well does the video show what the "
                 "caption says? Judge the objects, their attributes and counts, the actions and the scene. Reply "
                 "with one digit from 0 (unrelated to the caption) to 9 (matches it completely)."),
}
SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2.5-VL's default system turn
OFF_FORMAT_WARN = 0.5  # warn when the judge puts more than half its probability outside the scale
ASPECTS = tuple(QUESTIONS)  # = rewards.COMPONENTS: visual, temporal, semantic
DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
OPTION = "--reward_model"


def parse_template(text: str, source: str = "template") -> tuple[tuple[int, ...], dict]:
    """The template file format (module docstring) -> (scale, questions); every rule is checked here."""
    sections, name = {}, None
    for line in text.splitlines():
        header = re.fullmatch(r"\s*\[(\w+)\]\s*", line)
        if header:
            name = header.group(1)
            if name not in ("scale",) + ASPECTS:
                raise ValueError(f"--reward_prompt_template {source}: unknown section [{name}]; "
                                 f"the sections are [scale], [visual], [temporal], [semantic]")
            if name in sections:
                raise ValueError(f"--reward_prompt_template {source}: section [{name}] appears twice")
            sections[name] = []
        elif name is None:
            if line.strip():
                raise ValueError(f"--reward_prompt_template {source}: text before the first [section]: {line!r}")
        else:
            sections[name].append(line)
    body = {k: "\n".join(v).strip("\n") for k, v in sections.items()}
    missing = [k for k in ("scale",) + ASPECTS if not body.get(k, "").strip()]
    if missing:
        raise ValueError(f"--reward_prompt_template {source}: missing or empty sections {missing}")
    try:
        scale = tuple(int(v) for v in body["scale"].split())
    except ValueError:
        raise ValueError(f"--reward_prompt_template {source}: [scale] must be integers separated by spaces, "
                         f"got {body['scale']!r}") from None
    if len(scale) < 2 or any(b <= a for a, b in zip(scale, scale[1:])):
        raise ValueError(f"--reward_prompt_template {source}: [scale] needs at least two increasing integers, "
                         f"got {scale}")
    questions = {k: body[k] for k in ASPECTS}
    check_questions(questions, source)
    return scale, questions


def check_questions(questions: dict, source: str = "QUESTIONS") -> None:
    """{prompt} once in the semantic question and nowhere else; no chat tokens (they are added here)."""
    for k, q in questions.items():
        if q.count("{prompt}") != (k == "semantic"):
            raise ValueError(f"{source}: the [{k}] question must hold {{prompt}} "
                             f"{'exactly once' if k == 'semantic' else 'nowhere'}")
        if any(tok in q for tok in CHAT_SPECIALS):
            raise ValueError(f"{source}: the [{k}] question holds a chat token; the chat is built here")


def load_template(path) -> tuple[tuple[int, ...], dict]:
    """(scale, questions) from a template file, or the module's own when path is None."""
    if path is None:
        return SCALE, dict(QUESTIONS)
    if not Path(path).is_file():
        raise FileNotFoundError(f"--reward_prompt_template {path}: no such file (format: see vlm_judge.py)")
    return parse_template(Path(path).read_text(encoding="utf-8"), str(path))


def scale_token_ids(tokenizer, scale) -> list[int]:
    """The token id of each scale value; refuses a value that is not exactly one token (Deviations 1)."""
    ids = []
    for value in scale:
        pieces = tokenizer(str(value), add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise ValueError(f"scale value {value} is {len(pieces)} tokens "
                             f"{tokenizer.convert_ids_to_tokens(pieces)} in this tokenizer; every value must be "
                             f"one token (Qwen splits numbers into digits: use values from 0..9)")
        ids.append(pieces[0])
    return ids


def expected_score(logits: torch.Tensor, allowed_ids, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits (M, V) -> (score (M,) in [0, 1], off_format (M,)), the module docstring's equations."""
    logits = logits.float()  # Deviations 6: float32 island
    allowed = logits[:, list(allowed_ids)]  # (M, S)
    q = allowed.softmax(dim=-1)  # (M, S) the answer restricted to the scale
    values = torch.tensor(scale, dtype=torch.float32, device=logits.device)  # (S,)
    score = (q @ values - values[0]) / (values[-1] - values[0])  # (M,) expected value mapped to [0, 1]
    # off = 1 - exp(lse(allowed) - lse(all)); expm1 keeps it accurate when almost all mass is on the scale
    off_format = -torch.expm1(allowed.logsumexp(-1) - logits.logsumexp(-1))  # (M,)
    return score.clamp(0, 1), off_format.clamp(0, 1)


def chat_prefix(num_video_tokens: int) -> str:
    """What the three chats share: the system turn and the user turn up to the end of the video."""
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|>" + "<|video_pad|>" * num_video_tokens + "<|vision_end|>")


def chat_suffix(question: str, caption: str) -> str:
    """One aspect: the question (caption filled in), end of the user turn, the assistant's turn opened."""
    return question.replace("{prompt}", caption) + "<|im_end|>\n<|im_start|>assistant\n"


def resolve_checkpoint(path) -> Path:
    """A local Qwen2.5-VL folder, or a hub id already in the cache; everything checked without loading weights."""
    root = Path(path)
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) is not None and not root.exists()
    if hub_id:  # Deviations 7: the local cache only
        from huggingface_hub import snapshot_download
        try:
            root = Path(snapshot_download(str(path), local_files_only=True))
        except (FileNotFoundError, ValueError):  # not cached, or not a valid id: the message below says what to do
            root = None
    fetch = f"`hf download {path}`" if hub_id else f"`hf download {DEFAULT_MODEL} --local-dir {path}`"
    if root is None or not root.is_dir():
        raise RuntimeError(f"{OPTION} {path}: not found locally{' or in the Hugging Face cache' if hub_id else ''}; "
                           f"download it first: {fetch} (older huggingface_hub: `huggingface-cli download ...`)")
    config = root / "config.json"
    if not config.is_file():
        raise ValueError(f"{OPTION} {path}: {root} has no config.json, so it is not a Qwen2.5-VL checkpoint "
                         f"(the vlm judge needs e.g. {DEFAULT_MODEL})")
    cfg = json.loads(config.read_text())
    model_type, architectures = cfg.get("model_type"), cfg.get("architectures") or []
    if model_type != "qwen2_5_vl" or "Qwen2_5_VLForConditionalGeneration" not in architectures:
        raise ValueError(f"{OPTION} {path}: config.json has model_type={model_type!r}, architectures={architectures}; "
                         f"the vlm judge needs a Qwen2.5-VL checkpoint (model_type 'qwen2_5_vl', "
                         f"Qwen2_5_VLForConditionalGeneration), e.g. {DEFAULT_MODEL}")
    if not any(root.glob("*.safetensors")):
        raise RuntimeError(f"{OPTION} {path}: no *.safetensors weights in {root}; download them first: {fetch}")
    return root


def check_judge(path, prompt_template_file=None):
    """Every check that needs no weights: template, folder, config, tokenizer (tokenizer files only), scale.

    Returns (root, tokenizer, scale, questions). The tokenizer loads from tokenizer.json alone, so a scale
    whose values are not single tokens is refused here, at start, before any weight is read."""
    scale, questions = load_template(prompt_template_file)
    if str(path) == "tiny":
        tokenizer = tiny_tokenizer()
        scale_token_ids(tokenizer, scale)
        return None, tokenizer, scale, questions
    root = resolve_checkpoint(path)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    scale_token_ids(tokenizer, scale)
    return root, tokenizer, scale, questions


class VLMJudge(nn.Module):
    """Qwen2.5-VL asked the three QUESTIONS about each video; call it as judge(videos, prompts, fps)."""

    def __init__(self, qwen, tokenizer, scale=SCALE, questions=QUESTIONS, target_fps: float = 2.0,
                 max_pixels: int = MAX_PIXELS, min_pixels: int = MIN_PIXELS, batch_size: int = 2):
        super().__init__()
        self.qwen = qwen  # transformers' Qwen2_5_VLForConditionalGeneration: .model (visual + LM), .lm_head
        self.tokenizer, self.scale, self.questions = tokenizer, tuple(scale), dict(questions)
        check_questions(self.questions)
        self.allowed_ids = scale_token_ids(tokenizer, self.scale)
        self.video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
        self.special_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(CHAT_SPECIALS)))
        self.target_fps, self.max_pixels, self.min_pixels = target_fps, max_pixels, min_pixels
        self.batch_size = batch_size

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def prepare(self, videos: torch.Tensor, prompts, fps: float) -> dict:
        """Token ids and patches for B videos x 3 aspects; rows of the suffix batch are video-major (b * 3 + a).

        prefix_ids (B, Lp); suffix_ids, suffix_mask (3B, Ls), right-padded; position_ids (3, 3B, Lp + Ls)
        from transformers' get_rope_index on the whole chats (Deviations 4); pixel_values_videos, video_grid_thw
        (B, 3) and second_per_grid_ts (B,) from the shared video path."""
        pixels, grids, seconds, prefixes, suffixes = [], [], [], [], []
        for video, prompt in zip(videos, prompts):
            pv, thw, spg = preprocess_video(video, fps, self.target_fps, self.max_pixels, self.min_pixels)
            prefix = self.encode(chat_prefix(int(thw.prod()) // 4))  # 2x2 merge -> one token per 4 patches
            for aspect in ASPECTS:
                suffix = self.encode(chat_suffix(self.questions[aspect], prompt))
                if int(torch.isin(suffix, self.special_ids).sum()) != 2:  # <|im_end|>, <|im_start|> only
                    raise ValueError(f"the caption {prompt!r} holds a chat or vision token")
                suffixes.append(suffix)
            pixels.append(pv), grids.append(thw), seconds.append(spg), prefixes.append(prefix)
        # One video tensor (N, F, 3, H, W) gives every clip the same grid, hence the same prefix: no prefix padding
        prefix_ids = torch.stack(prefixes)  # (B, Lp)
        Ls = max(len(s) for s in suffixes)
        suffix_ids = torch.stack([F.pad(s, (0, Ls - len(s)), value=self.tokenizer.pad_token_id) for s in suffixes])
        suffix_mask = torch.stack([(torch.arange(Ls) < len(s)).long() for s in suffixes])  # (3B, Ls)
        grid, second_per_grid_ts = torch.cat(grids), torch.tensor(seconds, dtype=torch.float32)  # (B, 3), (B,)
        full_ids = torch.cat([prefix_ids.repeat_interleave(3, dim=0), suffix_ids], dim=1)  # (3B, Lp + Ls)
        full_mask = torch.cat([torch.ones_like(full_ids[:, :prefix_ids.shape[1]]), suffix_mask], dim=1)
        mm_token_type_ids = (full_ids == self.video_id).long() * 2  # transformers 5: 2 marks video tokens
        position_ids, _ = self.qwen.model.get_rope_index(
            full_ids, mm_token_type_ids, video_grid_thw=grid.repeat_interleave(3, dim=0),
            second_per_grid_ts=second_per_grid_ts.repeat_interleave(3), attention_mask=full_mask)  # (3, 3B, L)
        return {"prefix_ids": prefix_ids, "suffix_ids": suffix_ids, "suffix_mask": suffix_mask,
                "position_ids": position_ids, "mm_token_type_ids": mm_token_type_ids,
                "pixel_values_videos": torch.cat(pixels), "video_grid_thw": grid,
                "second_per_grid_ts": second_per_grid_ts}

    def answer_logits(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(R, L, D) hidden states -> (R, V) next-token logits at each row's last real token (Deviations 6)."""
        last = (mask.sum(dim=1) - 1).to(hidden.device)  # (R,) right padding: the last real token precedes the pads
        return self.qwen.lm_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])  # (R, V)

    def shared_prefix_logits(self, batch: dict) -> torch.Tensor:
        """(3B, V) answer logits: the prefix (vision tower included) once per video, its KV cache for 3 suffixes."""
        B, Lp = batch["prefix_ids"].shape
        out = self.qwen.model(input_ids=batch["prefix_ids"], attention_mask=torch.ones_like(batch["prefix_ids"]),
                              position_ids=batch["position_ids"][:, ::3, :Lp],  # aspect 0 of each video
                              pixel_values_videos=batch["pixel_values_videos"],
                              video_grid_thw=batch["video_grid_thw"], use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(3)  # (B, ...) -> (3B, ...), row b*3 + a reads video b
        mask = torch.cat([torch.ones_like(batch["suffix_mask"][:, :1]).expand(-1, Lp), batch["suffix_mask"]], 1)
        hidden = self.qwen.model(input_ids=batch["suffix_ids"], attention_mask=mask,
                                 position_ids=batch["position_ids"][:, :, Lp:], past_key_values=cache,
                                 use_cache=True).last_hidden_state  # (3B, Ls, D)
        return self.answer_logits(hidden, batch["suffix_mask"])

    def full_chat_logits(self, batch: dict, aspects=ASPECTS) -> torch.Tensor:
        """(B * len(aspects), V) answer logits from whole chats, positions left to transformers (the oracle
        of the tests and the baselines of the benchmark: one call per aspect, or all aspects in one batch)."""
        B, Lp = batch["prefix_ids"].shape
        rows = torch.tensor([b * 3 + ASPECTS.index(a) for b in range(B) for a in aspects])  # video-major
        n = len(aspects)
        ids = torch.cat([batch["prefix_ids"].repeat_interleave(n, 0), batch["suffix_ids"][rows]], 1)
        suffix_mask = batch["suffix_mask"][rows]
        mask = torch.cat([torch.ones_like(ids[:, :Lp]), suffix_mask], 1)
        per_video = batch["pixel_values_videos"].view(B, -1, batch["pixel_values_videos"].shape[-1])
        hidden = self.qwen.model(input_ids=ids, attention_mask=mask,
                                 pixel_values_videos=per_video.repeat_interleave(n, 0).flatten(0, 1),
                                 video_grid_thw=batch["video_grid_thw"].repeat_interleave(n, 0),
                                 second_per_grid_ts=batch["second_per_grid_ts"].repeat_interleave(n),
                                 mm_token_type_ids=batch["mm_token_type_ids"][rows], use_cache=False).last_hidden_state
        return self.answer_logits(hidden, mask)

    @torch.no_grad()
    def judge(self, videos: torch.Tensor, prompts, fps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3) scores in [0, 1] and (N, 3) off-format mass, `batch_size` videos per model call."""
        if videos.dim() != 5 or len(prompts) != videos.shape[0]:
            raise ValueError(f"need videos (N, F, 3, H, W) and N prompts: {tuple(videos.shape)}, {len(prompts)}")
        device = self.qwen.device
        scores, offs = [], []
        for s in range(0, len(prompts), self.batch_size):
            batch = self.prepare(videos[s:s + self.batch_size], prompts[s:s + self.batch_size], fps)
            logits = self.shared_prefix_logits({k: v.to(device) for k, v in batch.items()})  # (3B, V)
            score, off = expected_score(logits, self.allowed_ids, self.scale)  # (3B,), (3B,)
            scores.append(score.view(-1, 3)), offs.append(off.view(-1, 3))
        return torch.cat(scores).to(videos.device), torch.cat(offs).to(videos.device)  # (N, 3), (N, 3)

    def forward(self, videos: torch.Tensor, prompts, fps: float) -> dict:
        """The scorer: the three components (N,) in [0, 1] plus the diagnostic "judge_off_format_mass" (N,)."""
        score, off = self.judge(videos, prompts, fps)
        off_format = off.mean(dim=1)  # (N,) averaged over the three questions
        if off_format.mean() > OFF_FORMAT_WARN:  # a logger, not warnings.warn: it must not be deduplicated
            logger.warning("the vlm judge put %.0f%% of its answer probability outside the scale %s (videos %s); "
                           "its scores are renormalised over the scale, check the model and the questions",
                           100 * off_format.mean().item(), list(self.scale),
                           (off_format > OFF_FORMAT_WARN).nonzero().flatten().tolist())
        return {**{aspect: score[:, j] for j, aspect in enumerate(ASPECTS)}, "judge_off_format_mass": off_format}

    @classmethod
    def from_pretrained(cls, path=DEFAULT_MODEL, prompt_template_file=None, device="cpu", dtype=torch.bfloat16,
                        batch_size: int = 2, device_map=None):
        """Load a local (or cached) Qwen2.5-VL checkpoint, frozen; device_map="auto" spreads it over the GPUs."""
        root, tokenizer, scale, questions = check_judge(path, prompt_template_file)  # before any weight loads
        from transformers import Qwen2_5_VLForConditionalGeneration
        qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(root, dtype=dtype, device_map=device_map,
                                                                  local_files_only=True)
        if device_map is None:
            qwen = qwen.to(device)
        return cls(qwen.eval().requires_grad_(False), tokenizer, scale, questions, batch_size=batch_size)


def tiny_tokenizer():
    """Offline byte-level Qwen2 tokenizer: every ASCII character, hence every digit, is one token, as in Qwen."""
    return byte_level_tokenizer(["<|endoftext|>", "<|image_pad|>", *CHAT_SPECIALS])


def qwen25vl_config(tokenizer, hidden: int = 32, layers: int = 2, heads: int = 2, vision_hidden: int = 32,
                    vision_depth: int = 1):
    """A random Qwen2.5-VL config on `tokenizer`: tiny by default, mid-size for the benchmark."""
    from transformers import Qwen2_5_VLConfig
    ids = tokenizer.convert_tokens_to_ids
    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # the real 16:24:24 split of head_dim / 2
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": section},
                         bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=2, out_hidden_size=hidden, window_size=56, fullatt_block_indexes=[0],
                           tokens_per_second=2),  # tokens_per_second as the released checkpoints
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False)


def build_tiny_judge(prompt_template_file=None, seed: int = 0, batch_size: int = 2, **size) -> VLMJudge:
    """A random Qwen2.5-VL on exactly the real judge's chat / patch / score path (`--reward_model tiny`).

    Frames are capped at 112x112 pixels (at most 16 merged video tokens per frame pair) to keep CPU tests fast."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    _, tokenizer, scale, questions = check_judge("tiny", prompt_template_file)
    with torch.random.fork_rng(devices=[]):  # deterministic from `seed`, global RNG untouched
        torch.manual_seed(seed)
        qwen = Qwen2_5_VLForConditionalGeneration(qwen25vl_config(tokenizer, **size))
        # logits O(1) from unit-RMS hidden states (the default init, std 0.02, gives a near-uniform answer and
        # scores that barely differ between videos, which a tiny training run could not learn from)
        nn.init.normal_(qwen.lm_head.weight, std=qwen.config.text_config.hidden_size ** -0.5)
    return VLMJudge(qwen.eval().requires_grad_(False), tokenizer, scale, questions, max_pixels=112 * 112,
                    min_pixels=28 * 28, batch_size=batch_size)


# The released configs' sizes (config.json of Qwen/Qwen2.5-VL-7B-Instruct and -72B-Instruct), for the memory table
RELEASED = {"Qwen2.5-VL-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                  num_attention_heads=28, num_key_value_heads=4),
            "Qwen2.5-VL-72B": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                                   num_attention_heads=64, num_key_value_heads=8)}


def memory_table() -> list[str]:
    """bf16 weight memory from the parameter count of each released config, built on the meta device."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from reward_models.videoalign import frame_indices, smart_size
    h, w = smart_size(480, 832)  # [SPG]'s Wan clip: 480x832, 81 frames at 16 fps
    video = len(frame_indices(81, 16.0)) // 2 * (h // 28) * (w // 28)  # merged video tokens per clip
    lines = [f"[SPG]'s 480x832 clip, 81 frames at 16 fps -> {len(frame_indices(81, 16.0))} frames at {h}x{w}: "
             f"{video} video tokens"]
    for name, text in RELEASED.items():
        cfg = Qwen2_5_VLConfig(text_config=dict(vocab_size=152064, tie_word_embeddings=False, **text),
                               vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                                  out_hidden_size=text["hidden_size"]), tie_word_embeddings=False)
        with torch.device("meta"):
            n = sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(cfg).parameters())
        kv = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * 128 * 2  # K and V, head_dim 128, bf16
        lines.append(f"{name}: {n / 1e9:.2f} B parameters, bf16 weights {2 * n / 1e9:.1f} GB (estimate), "
                     f"KV cache {kv / 1e3:.0f} KB per token and row, {kv * 6 * (video + 200) / 1e9:.2f} GB for "
                     f"2 videos x 3 questions x ({video} video + 200 text tokens)")
    return lines


def benchmark():
    """Median seconds of the three ways to ask three questions, interleaved rounds, on random models (CPU).

    The byte-level tiny tokenizer spells each question one token per character, several times longer than Qwen's
    tokenizer would, so the suffixes here are longer than the real ones and the measured ratio understates
    what a real judge saves."""
    import statistics
    for line in memory_table():
        print(line)
    gen = torch.Generator().manual_seed(0)
    setups = [("tiny (112x112 pixel cap)", {}, False, torch.rand(2, 9, 3, 48, 64, generator=gen), 11),
              ("mid-size (hidden 128, 4 layers, vision 64 x 2; the real pixel budget)",
               dict(hidden=128, layers=4, heads=2, vision_hidden=64, vision_depth=2), True,
               torch.rand(2, 41, 3, 240, 416, generator=gen), 3)]  # 10 sampled frames, as [SPG]'s 81 at 16 fps
    for name, size, real_budget, videos, rounds in setups:
        judge = build_tiny_judge(**size)
        if real_budget:
            judge.max_pixels, judge.min_pixels = MAX_PIXELS, MIN_PIXELS
        prompts = ["a red car drives along a coast road at sunset", "two dogs play in the snow"]
        batch = judge.prepare(videos, prompts, 8.0)
        ways = {"shared prefix + KV cache": lambda: judge.shared_prefix_logits(batch),
                "three independent forwards": lambda: [judge.full_chat_logits(batch, (a,)) for a in ASPECTS],
                "one batch of the three chats": lambda: judge.full_chat_logits(batch)}
        times = {k: [] for k in ways}
        with torch.no_grad():
            for way in ways.values():  # warm-up
                way()
            for _ in range(rounds):
                for k, way in ways.items():
                    start = time.perf_counter()
                    way()
                    times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        Lp, Ls = batch["prefix_ids"].shape[1], batch["suffix_ids"].shape[1]
        print(f"{name}: 2 videos, prefix {Lp} tokens, suffix <= {Ls} tokens, {len(batch['pixel_values_videos'])} "
              f"patches; median of {rounds} interleaved rounds:")
        for k, v in med.items():
            print(f"  {k:30s} {1e3 * v:8.1f} ms   {v / med['shared prefix + KV cache']:.2f} x shared prefix")


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--benchmark", action="store_true", help="time the shared-prefix path against the others")
    args = parser.parse_args()
    if args.benchmark:
        benchmark()
    else:
        parser.print_help()
