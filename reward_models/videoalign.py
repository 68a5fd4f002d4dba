"""VideoAlign (VideoReward) as a scorer: decoded videos + prompts -> visual / temporal / semantic in [0, 1].

What of [VideoAlign] this reproduces (github KwaiVGI/VideoAlign, inference.py, vision_process.py,
train_reward.py, trainer.py; weights KwaiVGI/VideoReward, now also KlingTeam/VideoReward)
----------------------------------------------------------------------------------------------------
- Frames: uniform sampling at 2 fps, n = round_even(clamp(F / fps * 2, 4, floor_even(min(768, F))))
  frames at indices round(linspace(0, F - 1, n)) (qwen-vl-utils `smart_nframes`, "uniform" sample_type).
- Resize: Qwen's smart-resize (sides multiples of 28, 100,352 <= area <= 200,704 pixels, aspect kept),
  bicubic with antialias, on 8-bit frames; then x / 255 and the CLIP mean / std.
- Qwen2-VL patches: (T/2 * h/14 * w/14, 3*2*14*14) rows, grid_thw = (T/2, h/14, w/14).
  These three steps are `preprocess_video`, which the Qwen2.5-VL judge (vlm_judge.py) calls too.
- Prompt: Qwen2-VL's chat template (default system turn, video before the text, generation prompt)
  around the rubric, with prod(grid_thw) / 4 `<|video_pad|>` tokens and the three reward tokens
  `<|VQ_reward|>`, `<|MQ_reward|>`, `<|TA_reward|>` added to the tokenizer after its vocabulary.
- Model: Qwen2-VL-2B (LoRA r=64 merged) plus rm_head = Linear(1536, 1, bias=False) applied to the final,
  normed hidden state of the language model at the three reward tokens -> (N, 3) = (VQ, MQ, TA).
  VideoAlign's forward calls the language model without position_ids, so every token, video ones
  included, gets the plain 1-D position 0..L-1 on all three M-RoPE axes; we pass exactly that.
- Right padding with an attention mask (the processor is built with padding_side="right"); the whole
  model cast with .to(bfloat16) as VideoAlign's loader does (this also rounds the RoPE frequencies).

Conventions: videos (N, F, 3, H, W) float in [0, 1]; score_j = sigmoid((raw_j - mean_j) / std_j) with
(mean, std) from model_config.json's inference_config (fallback VQ 3.6757/2.2476, MQ 1.1646/1.3811,
TA 2.8105/2.5121); heads VQ -> "visual", MQ -> "temporal", TA -> "semantic" (SPEC §6).

Deviations / choices
1. Tensor path, no mp4 round trip and no torchvision: frames are rounded to 8-bit levels before and
   after the resize (what decoding and torchvision's uint8 resize do), but no codec artefacts.
2. sigmoid of the z-score maps each head to [0, 1] (SPEC §6 choice); VideoAlign reports the z-score.
3. rm_head is applied in float32 (VideoAlign: in bf16, a 0.016 step at |raw| ~ 3, which creates ties).
4. Hidden states come from transformers 5's Qwen2VLModel with explicit 1-D position_ids; its default
   (M-RoPE positions, which need `mm_token_type_ids`) would not be what the heads were trained on.
5. The rubric text is not shipped: the user names a file; `{text_prompt}` marks the caption (as in
   VideoAlign's template) and an optional `{video}` the video (default: before the text, as VideoAlign).
6. Weights are never downloaded here; from_pretrained reads local files only and fails fast.
7. A 1-frame clip is an error (VideoAlign's rule needs 2 frames); 2-3 frames give 2 (no repetition).

Test: `python -m pytest tests/test_videoalign.py -q` (tiny random Qwen2-VL, CPU, ~15 s, mostly importing
transformers).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
HEADS = (("visual", "VQ"), ("temporal", "MQ"), ("semantic", "TA"))
FALLBACK_STATS = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}
MAX_PIXELS, MIN_PIXELS = 200704, 128 * 28 * 28  # data_config.max_frame_pixels; qwen-vl-utils default
CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
PROMPT_HINT = ("the rubric is VideoAlign's DETAILED_PROMPT_WITH_SPECIAL_TOKEN in prompt_template.py of "
               "https://github.com/KwaiVGI/VideoAlign; write it to a file with: python -c \"from prompt_template "
               "import DETAILED_PROMPT_WITH_SPECIAL_TOKEN as p; open('videoalign_prompt.txt', 'w').write(p)\"")
WEIGHTS_HINT = ("download them first: `hf download KwaiVGI/VideoReward --local-dir {path}` and "
                "`hf download {base}` (older huggingface_hub: `huggingface-cli download ...`)")


def frame_indices(num_frames: int, fps: float, target_fps: float = 2.0, min_frames: int = 4,
                  max_frames: int = 768) -> torch.Tensor:
    """Indices of the frames VideoAlign keeps: an even count n at ~target_fps, spread uniformly."""
    cap = min(max_frames, num_frames) // 2 * 2  # floor to the temporal patch (2)
    n = min(max(num_frames / fps * target_fps, min_frames), cap)
    n = round(n / 2) * 2  # Python's round: half to even, as qwen-vl-utils' round_by_factor
    if not 2 <= n <= num_frames:
        raise ValueError(f"VideoAlign needs at least 2 frames, got a clip of {num_frames}")
    return torch.linspace(0, num_frames - 1, n).round().long()  # (n,)


def sample_frames(video: torch.Tensor, fps: float, target_fps: float = 2.0) -> torch.Tensor:
    """(F, 3, H, W) -> (n, 3, H, W), the frames VideoAlign samples at target_fps."""
    return video[frame_indices(video.shape[0], fps, target_fps).to(video.device)]


def smart_size(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Qwen's smart resize: sides multiples of `factor`, min_pixels <= area <= max_pixels, aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio above 200: {height}x{width}")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:  # shrink both sides by the same beta, then floor to the grid
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:  # grow both sides by the same beta, then ceil to the grid
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def to_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] values to the 256 levels an 8-bit frame can hold (Deviations 1)."""
    return (x.clamp(0, 1) * 255).round() / 255


def resize_for_qwen(frames: torch.Tensor, max_pixels: int = MAX_PIXELS, min_pixels: int = MIN_PIXELS,
                    factor: int = 28) -> torch.Tensor:
    """(T, 3, H, W) in [0, 1] -> (T, 3, h, w) at Qwen's smart size, bicubic + antialias, 8-bit levels."""
    h, w = smart_size(frames.shape[-2], frames.shape[-1], factor, min_pixels, max_pixels)
    out = F.interpolate(frames.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return to_uint8_levels(out)  # torchvision resizes uint8 frames to uint8


def normalize_clip(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, h, w) in [0, 1] -> CLIP-normalised, as Qwen2-VL's processor does after x / 255."""
    mean = torch.tensor(CLIP_MEAN, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=frames.device).view(1, 3, 1, 1)
    return (frames - mean) / std


def patchify(frames: torch.Tensor, patch: int = 14, temporal: int = 2, merge: int = 2):
    """(T, C, h, w) -> pixel_values (T/2 * h/14 * w/14, C*2*14*14) and grid_thw (1, 3).

    Rows come in the order the vision tower expects: time pair, then 2x2 merge block (row-major),
    then position inside the block; each row is one Conv3d input (C, 2, 14, 14), flattened."""
    T, C, h, w = frames.shape
    if T % temporal:  # Qwen pads an odd clip by repeating its last frame
        frames = torch.cat([frames, frames[-1:].expand(temporal - T % temporal, -1, -1, -1)])
    t = frames.shape[0] // temporal
    x = frames.reshape(t, temporal, C, h // (patch * merge), merge, patch, w // (patch * merge), merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/28, w/28, 2, 2, C, 2, 14, 14)
    pixel_values = x.reshape(t * (h // patch) * (w // patch), C * temporal * patch * patch)
    return pixel_values, torch.tensor([[t, h // patch, w // patch]])


def preprocess_video(video: torch.Tensor, fps: float, target_fps: float = 2.0, max_pixels: int = MAX_PIXELS,
                     min_pixels: int = MIN_PIXELS):
    """One decoded clip (F, 3, H, W) in [0, 1] -> (pixel_values, grid_thw, seconds_per_grid): the Qwen-VL
    video path, shared by VideoAlign (Qwen2-VL) and the vlm judge (Qwen2.5-VL, vlm_judge.py).

    seconds_per_grid = 2 / sample_fps with sample_fps = n / F * fps (qwen-vl-utils' definition): the
    seconds one temporal patch spans, which Qwen2.5-VL's M-RoPE turns into time positions
    (`second_per_grid_ts`); Qwen2-VL has no time axis and VideoAlign ignores it."""
    frames = to_uint8_levels(sample_frames(video, fps, target_fps).float())  # decoded frames are 8-bit
    pixel_values, grid_thw = patchify(normalize_clip(resize_for_qwen(frames, max_pixels, min_pixels)))
    seconds_per_grid = 2 * video.shape[0] / (frames.shape[0] * fps)  # 2 frames per temporal patch
    return pixel_values, grid_thw, seconds_per_grid


def find_weights(path, base_model: str = "Qwen/Qwen2-VL-2B-Instruct") -> tuple[Path, Path, bool]:
    """(folder, its latest checkpoint-<step>, whether that holds a full model.pth rather than a LoRA split) of a
    local KwaiVGI/VideoReward folder or a hub id in the local cache (Deviations 6). Reads file names only, so
    rewards.check_reward runs it before any model loads; a RuntimeError with the download command otherwise."""
    root = Path(path)
    if not root.is_dir():  # a hub id: take it from the local cache only
        from huggingface_hub import snapshot_download
        try:
            root = Path(snapshot_download(str(path), local_files_only=True))
        except (FileNotFoundError, ValueError):  # not cached, or not a valid id: the error below says what to do
            pass
    steps = [p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    ckpts = sorted(steps, key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    ckpt = ckpts[0] if ckpts else None  # the latest step, as VideoAlign's loader picks
    full = ckpt is not None and (ckpt / "model.pth").is_file()
    split = ckpt is not None and (ckpt / "adapter_model.safetensors").is_file()
    if not (root / "model_config.json").is_file() or not (full or split):
        raise RuntimeError(f"no VideoReward weights in {root}; {WEIGHTS_HINT.format(path=root, base=base_model)}")
    return root, ckpt, full


def check_template(text: str) -> str:
    """A rubric must hold {text_prompt} once, each reward token once in VQ, MQ, TA order, {video} at most once."""
    counts = {tok: text.count(tok) for tok in ("{text_prompt}",) + REWARD_TOKENS}
    if any(c != 1 for c in counts.values()) or text.count("{video}") > 1:
        raise ValueError(f"prompt template needs each of these exactly once, got {counts}; {PROMPT_HINT}")
    if sorted(REWARD_TOKENS, key=text.index) != list(REWARD_TOKENS):
        # VideoAlign reads the heads by position, so the order fixes which head is which
        raise ValueError(f"reward tokens must appear in the order {REWARD_TOKENS}")
    if any(tok in text for tok in CHAT_SPECIALS):
        raise ValueError("the template is the user text only; the chat and vision tokens are added here")
    return text


def load_prompt_template(path) -> str:
    """Read the rubric file verbatim (leading / trailing newlines are part of VideoAlign's prompt)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"VideoAlign prompt template not found at {path}: {PROMPT_HINT}")
    return check_template(Path(path).read_text(encoding="utf-8"))


def build_chat_text(template: str, caption: str, num_video_tokens: int) -> str:
    """Qwen2-VL's chat template applied to [video, rubric(caption)] with add_generation_prompt=True."""
    vision = "<|vision_start|>" + "<|video_pad|>" * num_video_tokens + "<|vision_end|>"
    user = template.replace("{video}", vision) if "{video}" in template else vision + template
    user = user.replace("{text_prompt}", caption)  # = VideoAlign's str.format (no other braces)
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


def remap_released_state_dict(state_dict: dict, lora_scale: float | None = None, base: dict | None = None) -> dict:
    """VideoReward's checkpoint (transformers-4.45 names inside a peft wrapper) -> VideoAlignReward names.

    `base_model.model.` is stripped, `visual.*` -> `qwen.visual.*`, `model.*` (the language model)
    -> `qwen.language_model.*`, `rm_head.*` kept, `lm_head.*` dropped (unused, tied to the embedding).
    LoRA is merged: W = W0 + lora_scale * B @ A, with W0 from `<module>.base_layer.weight` or, for the
    adapter-only layout, from `base` (already in the new names)."""
    def rename(key):
        if key.startswith("visual."):
            return "qwen." + key
        if key.startswith("model."):
            return "qwen.language_model." + key[len("model."):]
        if key.startswith("rm_head."):
            return key
        raise KeyError(f"unexpected key in a VideoReward checkpoint: {key}")

    out, lora = {}, {}
    for key, value in state_dict.items():
        key = key.removeprefix("base_model.model.")
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)  # adapter name optional
        if match:
            lora.setdefault(match.group(1), {})[match.group(2)] = value
        elif not key.startswith("lm_head."):
            out[rename(key.replace(".base_layer.", "."))] = value
    for module, ab in lora.items():
        name = rename(module + ".weight")
        w0 = out[name] if name in out else base[name]
        out[name] = (w0.float() + lora_scale * ab["B"].float() @ ab["A"].float()).to(w0.dtype)
    return out


class VideoAlignReward(nn.Module):
    """Qwen2-VL + rm_head read at the three reward tokens; call it as scorer(videos, prompts, fps)."""

    def __init__(self, qwen, tokenizer, template: str, stats: dict = FALLBACK_STATS, target_fps: float = 2.0,
                 max_pixels: int = MAX_PIXELS, min_pixels: int = MIN_PIXELS, batch_size: int = 2):
        super().__init__()
        self.qwen = qwen  # transformers' Qwen2VLModel: .visual and .language_model
        self.rm_head = nn.Linear(qwen.config.text_config.hidden_size, 1, bias=False)
        self.tokenizer, self.template = tokenizer, check_template(template)
        self.reward_ids = tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
        self.video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
        # (mean, std) per head, float32 and outside the module's tensors so .to(bfloat16) cannot round them
        self.stats = torch.tensor([stats[h] for _, h in HEADS], dtype=torch.float32).T  # (2, 3)
        self.target_fps, self.max_pixels, self.min_pixels = target_fps, max_pixels, min_pixels
        self.batch_size = batch_size

    def prepare(self, videos: torch.Tensor, prompts, fps: float) -> dict:
        """Tokenised, right-padded chat texts plus the concatenated patches of every clip."""
        pixels, grids, ids = [], [], []
        for video, prompt in zip(videos, prompts):
            pv, thw, _ = preprocess_video(video, fps, self.target_fps, self.max_pixels, self.min_pixels)
            text = build_chat_text(self.template, prompt, int(thw.prod()) // 4)  # 2x2 merge -> 1 token
            tok = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            counts = [int((tok == i).sum()) for i in [self.video_id] + self.reward_ids]
            if counts != [int(thw.prod()) // 4, 1, 1, 1]:  # e.g. a caption that contains a special token
                raise ValueError(f"bad special-token counts {counts} for prompt {prompt!r}")
            pixels.append(pv), grids.append(thw), ids.append(tok)
        L = max(len(t) for t in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.stack([F.pad(t, (0, L - len(t)), value=pad) for t in ids])  # (B, L) right-padded
        mask = torch.stack([(torch.arange(L) < len(t)).long() for t in ids])  # (B, L)
        return {"input_ids": input_ids, "attention_mask": mask,
                "pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.cat(grids)}

    def head_outputs(self, input_ids, attention_mask, pixel_values_videos, video_grid_thw) -> torch.Tensor:
        """Raw head outputs (B, 3) = (VQ, MQ, TA) in float32 for a batch from `prepare`."""
        B, L = input_ids.shape
        position_ids = torch.arange(L, device=input_ids.device).view(1, 1, L).expand(3, B, L)  # Deviations 4
        hidden = self.qwen(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                           use_cache=False).last_hidden_state  # (B, L, D), after the final norm
        ids = torch.tensor(self.reward_ids, device=input_ids.device)
        where = (input_ids[:, None, :] == ids[None, :, None]).long().argmax(-1)  # (B, 3) token positions
        h = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, 3, D)
        return F.linear(h.float(), self.rm_head.weight.float()).squeeze(-1)  # (B, 3); Deviations 3

    @torch.no_grad()
    def raw_scores(self, videos: torch.Tensor, prompts, fps: float) -> torch.Tensor:
        """(N, 3) raw VQ, MQ, TA head outputs, scored `batch_size` clips at a time (for logging)."""
        if videos.dim() != 5 or len(prompts) != videos.shape[0]:
            raise ValueError(f"need videos (N, F, 3, H, W) and N prompts: {tuple(videos.shape)}, {len(prompts)}")
        device = self.rm_head.weight.device
        out = []
        for s in range(0, len(prompts), self.batch_size):
            batch = self.prepare(videos[s:s + self.batch_size], prompts[s:s + self.batch_size], fps)
            out.append(self.head_outputs(**{k: v.to(device) for k, v in batch.items()}))
        return torch.cat(out).to(videos.device)  # (N, 3)

    def forward(self, videos: torch.Tensor, prompts, fps: float) -> dict:
        """The scorer: {"visual", "temporal", "semantic"} -> (N,) float32 in [0, 1] on the videos' device."""
        mean, std = self.stats.to(videos.device)  # (3,), (3,)
        score = torch.sigmoid((self.raw_scores(videos, prompts, fps) - mean) / std)  # (N, 3); SPEC §6 choice
        return {name: score[:, j] for j, (name, _) in enumerate(HEADS)}

    @classmethod
    def from_pretrained(cls, path, prompt_template_file, device="cpu", dtype=torch.bfloat16,
                        base_model: str = "Qwen/Qwen2-VL-2B-Instruct", batch_size: int = 2):
        """Load a local KwaiVGI/VideoReward folder (model_config.json + checkpoint-<step>/) on base_model."""
        template = load_prompt_template(prompt_template_file)
        root, ckpt, full = find_weights(path, base_model)
        cfg = json.loads((root / "model_config.json").read_text())
        inference, data, peft = (cfg.get(k) or {} for k in ("inference_config", "data_config", "peft_lora_config"))
        stats = {h: (inference.get(f"{h}_mean", m), inference.get(f"{h}_std", s))
                 for h, (m, s) in FALLBACK_STATS.items()}
        if data.get("num_frames") is not None or data.get("sample_type", "uniform") != "uniform":
            raise ValueError("only VideoAlign's fps-based uniform frame sampling is implemented")
        r, alpha = peft.get("lora_r", 64), peft.get("lora_alpha", 128)
        lora_scale = alpha / (math.sqrt(r) if peft.get("use_rslora") else r)

        from tokenizers import AddedToken
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
        try:  # local files only: a missing base model fails in seconds instead of downloading
            tokenizer = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
            qwen = Qwen2VLForConditionalGeneration.from_pretrained(base_model, dtype=dtype, local_files_only=True).model
        except OSError as err:
            raise RuntimeError(f"base model {base_model} not available offline; "
                               + WEIGHTS_HINT.format(path=root, base=base_model)) from err
        tokenizer.add_tokens([AddedToken(t, special=True) for t in REWARD_TOKENS], special_tokens=True)
        old = qwen.get_input_embeddings().weight.data  # (151936, D); VideoAlign resizes to len(tokenizer)
        qwen.set_input_embeddings(nn.Embedding.from_pretrained(old[:len(tokenizer)].clone(), freeze=True))
        model = cls(qwen, tokenizer, template, stats, float(data.get("fps", 2.0)),
                    int(data.get("max_frame_pixels", MAX_PIXELS)), MIN_PIXELS, batch_size)
        if full:  # the released layout: one torch state dict of the whole peft-wrapped model
            state = torch.load(ckpt / "model.pth", map_location="cpu", weights_only=True, mmap=True)
        else:  # adapter-only layout: LoRA in safetensors + the trained non-LoRA tensors
            from safetensors.torch import load_file
            state = {**torch.load(ckpt / "non_lora_state_dict.pth", map_location="cpu", weights_only=True),
                     **load_file(ckpt / "adapter_model.safetensors")}
        own = model.state_dict()
        new = remap_released_state_dict(state, lora_scale, base=own)
        missing, extra = set(own) - set(new), set(new) - set(own)
        if extra or (full and missing):
            raise RuntimeError(f"checkpoint does not fit: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
        model.load_state_dict({**own, **new})
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def byte_level_tokenizer(specials):
    """An offline byte-level Qwen2Tokenizer: the 256 GPT-2 byte symbols (no merges) plus `specials`."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    # GPT-2's byte alphabet: printable bytes stand for themselves, the other 68 map to U+0100 onwards
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    symbols, shift = [], 0
    for b in range(256):
        symbols.append(chr(b) if b in printable else chr(256 + shift))
        shift += b not in printable
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s: 256 + i for i, s in enumerate(specials)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], pad_token=specials[0], eos_token=specials[0])
    tokenizer.add_tokens([AddedToken(s, special=True) for s in specials], special_tokens=True)
    return tokenizer


def tiny_qwen2vl_config(tokenizer, vocab_size: int | None = None):
    """A Qwen2-VL config small enough for CPU tests: hidden 32, 2 layers, a 1-layer vision tower."""
    from transformers import Qwen2VLConfig
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config=dict(vocab_size=vocab_size or len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, rope_theta=1e6,
                         bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
                         rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


# A stand-in rubric with the real one's structure (caption slot, the three reward tokens in order) for tests
# and `--reward_model tiny`; it is not VideoAlign's wording, which the user supplies (Deviations 5).
STAND_IN_TEMPLATE = ("\nRate the clip.\nLooks: <|VQ_reward|>\nEND\nMotion: <|MQ_reward|>\nEND\n"
                     "Caption - {text_prompt}\nMatch: <|TA_reward|>\nEND\n")


def build_tiny_videoalign(prompt_template_file_or_text=STAND_IN_TEMPLATE, seed: int = 0,
                          batch_size: int = 2) -> VideoAlignReward:
    """A random tiny Qwen2-VL on exactly the real model's prompt / patch / reward-token path.

    Frames are capped at 112x112 pixels (at most 16 merged video tokens per frame pair) to keep CPU tests fast."""
    from tokenizers import AddedToken
    from transformers import Qwen2VLModel
    text = str(prompt_template_file_or_text)
    template = check_template(text) if "{text_prompt}" in text else load_prompt_template(text)
    tokenizer = byte_level_tokenizer(["<|endoftext|>", "<|image_pad|>", *CHAT_SPECIALS])
    tokenizer.add_tokens([AddedToken(t, special=True) for t in REWARD_TOKENS], special_tokens=True)  # as VideoAlign
    with torch.random.fork_rng(devices=[]):  # deterministic from `seed`, global RNG untouched
        torch.manual_seed(seed)
        model = VideoAlignReward(Qwen2VLModel(tiny_qwen2vl_config(tokenizer)), tokenizer, template,
                                 max_pixels=112 * 112, min_pixels=28 * 28, batch_size=batch_size)
        nn.init.normal_(model.rm_head.weight, std=32 ** -0.5)  # raw scores O(1) from unit-RMS hidden states
    return model.eval().requires_grad_(False)
