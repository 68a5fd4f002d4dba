"""HunyuanVideo-1.5 plumbing for GRPO: load the model parts, encode prompts, give the (CFG-guided) policy
velocity, and decode latents to frames. No RL maths lives here; the names are those every backbone module
exposes (backbones.py), which also holds the shared LoRA, checkpointing and freeze code.

What it reproduces from diffusers' `HunyuanVideo15Pipeline` (diffusers 0.42.1,
diffusers/pipelines/hunyuan_video1_5/pipeline_hunyuan_video1_5.py), text-to-video only:
- Prompt encoding (`_get_mllm_prompt_embeds`): the prompt goes into a system + user chat template, the
  Qwen2.5-VL language model runs on it, we keep `hidden_states[-3]` and crop the system-prompt tokens
  (108 at full scale), giving (N, 1000, 3584) + mask. ByT5 (`_get_byt5_prompt_embeds`) encodes only
  the text in quotes, `Text "..."`; a prompt without quotes gets zeros and an all-zero mask.
- The denoiser call: input = cat([latents, zero condition latents, zero mask], channels) (2C+1
  channels), timestep = 1000 sigma, both text streams, zero image embeddings (= text-to-video).
- Guidance: `ClassifierFreeGuidance` defaults, v = v_uncond + g (v_cond - v_uncond), no guidance
  rescale; the negative prompt is the empty string (the pipeline's default when none is given).
- Decoding: latents / vae.config.scaling_factor, VAE decode, [-1, 1] -> [0, 1] with a clamp. The VAE
  config has no shift factor and no latents mean/std, so nothing else is done.

Conventions (SPEC section 1): sigma in [0, 1], sigma = 1 is pure noise; the transformer gets
timestep = 1000 sigma; it predicts the velocity v = eps - x0. Latents are (N, C, F, H, W).

Deviations / choices:
1. Sampling state stays float32. The pipeline keeps latents in the transformer dtype (bf16); we cast
   only the transformer inputs, so the SDE maths outside (mu, V, logp) is float32. The timestep is
   cast to the transformer dtype as in the pipeline (its time embedding needs the weights' dtype), so in
   bf16 1000 sigma is rounded the same way the pipeline rounds it.
2. Cond and uncond go through ONE batched forward (the pipeline makes two calls). The transformer
   masks every sample separately, so the result is the same up to float reduction order.
3. One zero image token instead of the pipeline's 729. In text-to-video mode the transformer multiplies
   the image tokens by 0 and masks them out of attention, so the velocity is identical (the tests
   compare against a plain call with 729 tokens) while every block carries 728 fewer tokens.
4. Weights are never downloaded implicitly (about 35 GB): a hub id must already be in the local cache,
   a folder must hold the Diffusers layout. Otherwise we stop at once with the download command.
5. LoRA weights are kept in float32 on a bf16 transformer: a bf16 weight has 8 mantissa bits, so an
   AdamW update smaller than 1/256 of the weight would be lost. peft casts the input to the LoRA dtype
   and the sum back to the layer's dtype (backbones.add_lora, shared with wan.py).
6. The "tiny" backbone is the same classes with tiny configs, random weights from `seed`, a byte-level
   Qwen2 tokenizer built in code, a short system prompt and short text lengths (32 and 16 tokens).
   "small" is the same with a 4-layer, width-128 DiT and a 16-channel latent, for the CPU profile.
7. Text padding is trimmed: a batch's text streams are as long as its longest prompt, not 1000 + 256
   tokens. Padded tokens are masked and reordered behind the valid ones, so the velocity is the same
   (tested against the padded call) and a 33 x 320 x 576 forward runs ~1250 fewer tokens.
8. Parameters no gradient can reach (the last block's text-stream outputs: to_add_out, ff_context, and LoRA on
   them, which --lora_targets attn_ffn adds) are frozen by `freeze_unreachable`, which finds them with one
   backward instead of a hand-written list. The last block's text queries (add_q_proj, norm_added_q) stay
   trainable: they are on the graph but feed only the dropped text tokens' attention outputs, so their gradient
   is exactly 0 (tested for their LoRA). DDP and FSDP2 accept that; freezing them would change the tensors in
   the optimizer state of runs made before, whose checkpoints would then no longer resume.
9. The DiT blocks' attention runs without a mask (`ValidTokenAttnProcessor`): rows are grouped by their
   number of valid tokens and each group attends over its valid prefix only. diffusers builds a dense
   (N, 1, S, S) boolean mask per block, which rules out the flash kernels; the velocity is the same
   (tested against diffusers' processor, values and LoRA gradients).
10. Context parallelism (training/parallel.py) with a plan written here (CP_PLAN; diffusers 0.42.1 has none for
   this transformer) and Ulysses and ring attention written in ValidTokenAttnProcessor (`_split`), because the
   joint attention mixes a split stream (the video tokens) with a whole one (the text on every process), which
   diffusers' templates (every input a sequence shard) would count U x R times. The all-to-alls are torch's
   differentiable ones; the text output is gathered over the heads by `_Gather`, whose backward sums the
   processes' partial gradients. The ring gathers the video keys and values of the ring group (`_Gather` over
   the tokens) and runs one attention over [all video; text]: the text keys count once, on every process.
   diffusers' ring all-gathers the same keys and values (the same bytes and memory) and then merges per-chunk
   attentions by their log-sum-exp; with the text on every process its chunks would be uneven, and its
   uneven variant (`ring_anything`) has no backward in 0.42.1. One attention over the gathered keys gives the
   same result in one kernel call and needs no log-sum-exp, so it runs on every backend, CPU included. One
   difference in memory: without gradient checkpointing the attention keeps the gathered keys and values for
   its backward (R x a shard's), where diffusers' ring keeps its shard and gathers again in the backward; under
   checkpointing, which long clips need anyway, both hold one block's gathered keys and values at a time.

Test: `python -m pytest tests/test_hunyuan.py -q` (CPU, tiny backbone, about 10 s on 2 idle cores).
"""
import inspect
import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from diffusers import (AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline,
                       HunyuanVideo15Transformer3DModel)
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0
from transformers import (ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, Qwen2Tokenizer, T5Config,
                          T5EncoderModel)

from models import backbones

FAMILY = "HunyuanVideo-1.5"
PIPELINE_CLASS = "HunyuanVideo15Pipeline"        # model_index.json `_class_name` of its Diffusers folders
BLOCK_CLASS = "HunyuanVideo15TransformerBlock"   # the FSDP wrap / checkpoint unit
BACKBONES = ("hunyuan15", "tiny", "small")   # TODO(remove once train.py uses backbones.NAMES)
DEFAULT_PRETRAINED = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v"
HUB_IDS = {"hunyuan15": DEFAULT_PRETRAINED}
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
ATTENTION_PROCESSORS = ("diffusers", "valid")   # diffusers' masked processor, ours (Deviation 9)
# Context parallelism (training/parallel.py): diffusers 0.42.1 has no plan for this transformer, so here is one.
# The video tokens enter the first block split along the sequence, with their rotary tables; the text stream
# stays whole on every process; the output projection gathers the video tokens. The joint attention itself is
# ValidTokenAttnProcessor's Ulysses and ring path (`_split`), which handles the whole text stream (Deviation 10).
RING_KEEPS_GATHERED = True   # `_split`'s ring keeps the gathered keys and values for the backward (Deviation 10)
CP_PLAN = {
    "rope": {0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
             1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)},
    "transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}

QWEN_LAYER = -3     # pipeline: num_hidden_layers_to_skip = 2 -> hidden_states[-(2 + 1)]
IMAGE_TOKENS = 1    # Deviation 3; the pipeline uses 729 (SigLIP 27 x 27), all masked out in t2v
# The pipeline's Qwen/ByT5 lengths and system-prompt crop (its constants, checked in the tests).
HUNYUAN_MAX_LENGTH, HUNYUAN_MAX_LENGTH_2, HUNYUAN_CROP_START = 1000, 256, 108
# --lora_targets: the regex (full module names, peft's re.fullmatch) each choice gives peft. Only the DiT
# blocks: plain "to_q" or "ff" would also hit the text token refiner (context_embedder.token_refiner).
# "attn": both streams' attention projections (video to_q/k/v/out, text add_q/k/v/to_add_out);
# "attn_ffn": also both streams' feed-forward Linears, FeedForward's net.0.proj (D -> 4D, before the GELU)
# and net.2 (4D -> D): the image stream's `ff` and the text stream's `ff_context`. At r = 32 and full size
# they add 2 x 2 x 32 x (2048 + 8192) = 1.31 M per block: 127.4 M LoRA parameters against attn's 56.6 M.
_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
LORA_TARGETS = {"attn": rf".*transformer_blocks\.\d+\.{_ATTN}",
                "attn_ffn": rf".*transformer_blocks\.\d+\.({_ATTN}|(ff|ff_context)\.net\.(0\.proj|2))"}

# For backbones.estimate_memory: the diffusers class, the configs of the backbones built in code, the block
# Linears that see only the text tokens (the text stream: added q / k / v, to_add_out, ff_context), and the
# fewest text tokens a row carries (1 image token + at least one Qwen and one ByT5 column after trimming).
TRANSFORMER_CLASS = HunyuanVideo15Transformer3DModel
TEXT_LINEARS = r".*transformer_blocks\.\d+\.(attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff_context\..*)"
MIN_TEXT_TOKENS = 3

# Tiny configs (built offline; tests/test_hunyuan.py checks them against the pipeline): same classes, a few thousand to a few million parameters, CPU-fast.
TINY_TRANSFORMER = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                        text_embed_2_dim=32, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16,
                        task_type="t2v")
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
                spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
                upsample_match_channel=False)
# "small": tiny's classes made wide enough that the model, not the loop, dominates a CPU iteration
# (4 layers of width 128, a 16-channel latent): the size of the CPU profile in docs/performance.md.
SMALL_TRANSFORMER = dict(TINY_TRANSFORMER, in_channels=33, out_channels=16, num_layers=4, num_attention_heads=4,
                         attention_head_dim=32, rope_axes_dim=(8, 12, 12))
SMALL_VAE = dict(TINY_VAE, latent_channels=16, block_out_channels=(32, 32))  # encoder groups need 32 >= 2 x 16
BUILT_IN_CONFIGS = {"tiny": TINY_TRANSFORMER, "small": SMALL_TRANSFORMER}
TINY_SYSTEM_MESSAGE = "Describe the video."
# Qwen2.5-VL's chat template reduced to plain-string messages, which is all the pipeline sends.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class Backbone:
    name: str
    transformer: HunyuanVideo15Transformer3DModel
    vae: AutoencoderKLHunyuanVideo15
    text_encoder: Qwen2_5_VLTextModel
    tokenizer: Qwen2Tokenizer
    text_encoder_2: T5EncoderModel
    tokenizer_2: ByT5Tokenizer
    shift: float            # SD3 time shift of the scheduler (5.0 at 480p, 3.0 tiny)
    spatial_factor: int     # VAE pixels per latent pixel (16 real, 4 tiny)
    temporal_factor: int    # VAE frames per latent frame after the first (4 real, 2 tiny)
    latent_channels: int    # C (32 real, 4 tiny)
    system_message: str     # Qwen system prompt, cropped away after encoding
    crop_start: int         # number of chat-template tokens before the user's prompt
    max_length: int         # Qwen tokens kept after the crop
    max_length_2: int       # ByT5 tokens
    scheduler: dict | None = None  # the folder's scheduler config (tiny: FlowMatchEuler at its shift), for sample.py


def load_backbone(name: str, pretrained: str | None = None, device="cpu", dtype=torch.float32,
                  seed: int = 0) -> Backbone:
    """Builds the transformer, VAE and both text encoders on `device` in `dtype`, all in eval mode; the
    VAE and text encoders are frozen. "tiny" and "small" ignore `pretrained` and draw their weights from `seed`."""
    if name == "tiny":
        backbone = _build_tiny(seed, dtype)
    elif name == "small":
        backbone = _build_tiny(seed, dtype, SMALL_TRANSFORMER, SMALL_VAE, "small")
    elif name == "hunyuan15":
        backbone = _load_hunyuan15(pretrained or DEFAULT_PRETRAINED, dtype)
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    use_valid_token_attention(backbone.transformer)   # Deviation 9
    for part in (backbone.transformer, backbone.vae, backbone.text_encoder, backbone.text_encoder_2):
        part.to(device).eval()
    for part in (backbone.vae, backbone.text_encoder, backbone.text_encoder_2):
        part.requires_grad_(False)
    return backbone


def _load_hunyuan15(pretrained: str, dtype: torch.dtype) -> Backbone:
    root = backbones.find_weights("hunyuan15", pretrained)   # Deviation 4
    tokenizer = Qwen2Tokenizer.from_pretrained(root, subfolder="tokenizer")
    tokenizer.padding_side = "right"   # the crop below assumes the template starts at position 0
    vae = AutoencoderKLHunyuanVideo15.from_pretrained(root, subfolder="vae", dtype=dtype)
    # The exact system prompt the model was trained with, read from the pipeline so the two cannot drift.
    system_message = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters[
        "system_message"].default
    scheduler = dict(FlowMatchEulerDiscreteScheduler.load_config(root, subfolder="scheduler"))
    return Backbone(
        name="hunyuan15",
        transformer=HunyuanVideo15Transformer3DModel.from_pretrained(root, subfolder="transformer", dtype=dtype),
        vae=vae,
        text_encoder=Qwen2_5_VLTextModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2", dtype=dtype),
        tokenizer_2=ByT5Tokenizer.from_pretrained(root, subfolder="tokenizer_2"),
        shift=float(scheduler["shift"]), scheduler=scheduler,
        spatial_factor=vae.config.spatial_compression_ratio, temporal_factor=vae.config.temporal_compression_ratio,
        latent_channels=vae.config.latent_channels, system_message=system_message,
        crop_start=HUNYUAN_CROP_START, max_length=HUNYUAN_MAX_LENGTH, max_length_2=HUNYUAN_MAX_LENGTH_2)


def _build_tiny(seed: int, dtype: torch.dtype, transformer_config: dict = TINY_TRANSFORMER,
                vae_config: dict = TINY_VAE, name: str = "tiny") -> Backbone:
    tokenizer, tokenizer_2 = _byte_level_qwen_tokenizer(), ByT5Tokenizer()
    # fork_rng: building the tiny model must not move the caller's global random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = HunyuanVideo15Transformer3DModel(**transformer_config)
        vae = AutoencoderKLHunyuanVideo15(**vae_config)
        # 3 layers, so hidden_states[-3] is the output of a real layer, not the token embeddings.
        text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, rope_theta=1e6,
            rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"))
    if dtype != torch.float32:   # skip the no-op cast: diffusers warns on every .to(dtype)
        for part in (transformer, vae, text_encoder, text_encoder_2):
            part.to(dtype)
    return Backbone(
        name=name, transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, shift=3.0, spatial_factor=4, temporal_factor=2,
        scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
        latent_channels=vae_config["latent_channels"], system_message=TINY_SYSTEM_MESSAGE,
        crop_start=_system_prefix_length(tokenizer, TINY_SYSTEM_MESSAGE), max_length=32, max_length_2=16)


def _byte_level_qwen_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 tokenizer with no merges: one token per UTF-8 byte plus Qwen's three special tokens.
    GPT-2 byte-level BPE names each byte by a printable character: printable Latin-1 bytes stand for
    themselves, the other 68 bytes are shifted to chr(256 + k), in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Qwen2Tokenizer(vocab={s: i for i, s in enumerate(symbols + specials)}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})   # never split them into bytes
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def _chat(prompts: list[str], system_message: str) -> list[list[dict]]:
    # As the pipeline's format_text_input: an empty prompt becomes a single space.
    return [[{"role": "system", "content": system_message}, {"role": "user", "content": p or " "}] for p in prompts]


def _system_prefix_length(tokenizer, system_message: str) -> int:
    """Tokens before the user's text in the chat template: the crop that removes the system prompt."""
    marker = "\x00"
    text = tokenizer.apply_chat_template(_chat([marker], system_message)[0], tokenize=False)
    return len(tokenizer(text[: text.index(marker)]).input_ids)


# (frames per latent frame after the first, pixels per token side = VAE factor x patch size) per backbone,
# so backbones.check_request can reject a clip size before any weights are read.
VIDEO_FACTORS = {"hunyuan15": (4, 16), "tiny": (2, 4), "small": (2, 4)}
check_video_size = backbones.check_video_size   # TODO(remove once train.py calls backbones.check_request)


def _find_weights(pretrained: str) -> str:   # TODO(remove once train.py calls backbones.check_request)
    return backbones.find_weights("hunyuan15", pretrained)


def latent_shape(backbone, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, F', H', W') of the latent for a clip, with F' = (F - 1) / temporal + 1 (the VAE is causal: the
    first frame has its own latent) and H' = H / spatial."""
    t = backbone.temporal_factor
    backbones.check_video_size(t, backbone.spatial_factor * backbone.transformer.config.patch_size, num_frames, height, width)
    return backbone.latent_channels, (num_frames - 1) // t + 1, height // backbone.spatial_factor, \
        width // backbone.spatial_factor


@dataclass
class PromptEmbeds:
    """Both text streams for N rows: Qwen (N, L, D) + mask (N, L), ByT5 (N, L2, D2) + mask (N, L2)."""
    embeds: torch.Tensor
    mask: torch.Tensor
    embeds_2: torch.Tensor
    mask_2: torch.Tensor

    def _map(self, fn) -> "PromptEmbeds":
        return PromptEmbeds(fn(self.embeds), fn(self.mask), fn(self.embeds_2), fn(self.mask_2))

    def repeat_interleave(self, n: int) -> "PromptEmbeds":
        """Row i goes to rows i*n .. (i+1)*n - 1: the G samples of a prompt are contiguous."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def index(self, idx) -> "PromptEmbeds":
        """Rows selected by a LongTensor, list or slice (keeps the first dim)."""
        return self._map(lambda t: t[idx])

    __getitem__ = index

    def to(self, device) -> "PromptEmbeds":
        return self._map(lambda t: t.to(device))

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        """Rows of all parts; a part with shorter streams is right-padded with zeros and mask 0."""
        L = max(p.embeds.shape[1] for p in parts)
        L2 = max(p.embeds_2.shape[1] for p in parts)
        pad = lambda t, n: nn.functional.pad(t, (0, 0, 0, n - t.shape[1]) if t.dim() == 3 else (0, n - t.shape[1]))
        return PromptEmbeds(*(torch.cat([pad(getattr(p, f), n) for p in parts])
                              for f, n in (("embeds", L), ("mask", L), ("embeds_2", L2), ("mask_2", L2))))

    def trimmed(self) -> "PromptEmbeds":
        """Drops the padding columns beyond the longest valid prompt (at least one column per stream).

        The transformer masks padded text tokens out of attention and moves them behind the valid ones,
        so they change nothing in the output, but they cost compute: the pipeline pads Qwen to 1000 and
        ByT5 to 256 tokens, 1257 text tokens beside 6480 video tokens for a 33 x 320 x 576 clip. Lengths
        are read once here (a host sync), when a prompt enters the cache, never in the sampling loop."""
        n, n2 = max(int(self.mask.sum(1).max()), 1), max(int(self.mask_2.sum(1).max()), 1)
        return PromptEmbeds(self.embeds[:, :n], self.mask[:, :n], self.embeds_2[:, :n2], self.mask_2[:, :n2])


class PromptCache:
    """Encodes each distinct prompt once (no_grad) and keeps the result without its padding (Deviation 7),
    so text encoders can leave the GPU; a batch is padded only to its longest prompt."""

    def __init__(self, backbone: Backbone, chunk: int = 8):
        self.backbone, self.chunk = backbone, chunk
        self.device = next(backbone.text_encoder.parameters()).device   # where cached embeddings live
        self.cache: dict[str, PromptEmbeds] = {}

    def __call__(self, prompts: list[str]) -> PromptEmbeds:
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        for start in range(0, len(new), self.chunk):  # bounded batches: the 7B encoder keeps every layer's states
            chunk = new[start : start + self.chunk]
            encoded = _encode_prompts(self.backbone, chunk).to(self.device)
            self.cache.update({p: encoded[i:i + 1].trimmed() for i, p in enumerate(chunk)})
        return PromptEmbeds.cat([self.cache[p] for p in prompts])

    def negative(self, n: int) -> PromptEmbeds:
        """The pipeline's unconditional input when no negative prompt is given: the empty prompt."""
        return self([""]).repeat_interleave(n)

    def offload_encoders(self):
        """Moves both text encoders to CPU. Later, unseen prompts still work, only slowly (on CPU)."""
        self.backbone.text_encoder.to("cpu")
        self.backbone.text_encoder_2.to("cpu")


@torch.no_grad()
def _encode_prompts(backbone: Backbone, prompts: list[str]) -> PromptEmbeds:
    tokenizer, encoder = backbone.tokenizer, backbone.text_encoder
    device = next(encoder.parameters()).device
    # Qwen stream: pad system + prompt to crop + max_length tokens, then drop the system-prompt tokens.
    tokens = tokenizer.apply_chat_template(
        _chat(prompts, backbone.system_message), add_generation_prompt=True, tokenize=True, return_dict=True,
        padding="max_length", max_length=backbone.max_length + backbone.crop_start, truncation=True,
        return_tensors="pt").to(device)
    hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                     output_hidden_states=True).hidden_states[QWEN_LAYER]
    embeds, mask = hidden[:, backbone.crop_start:], tokens.attention_mask[:, backbone.crop_start:]

    # ByT5 stream: only prompts with quoted text run the encoder; the rest stay zero with a zero mask.
    encoder_2, length_2 = backbone.text_encoder_2, backbone.max_length_2
    embeds_2 = torch.zeros(len(prompts), length_2, encoder_2.config.d_model, device=device, dtype=encoder_2.dtype)
    mask_2 = torch.zeros(len(prompts), length_2, device=device, dtype=torch.long)
    glyphs = [_glyph_text(p) for p in prompts]
    rows = [i for i, g in enumerate(glyphs) if g is not None]
    if rows:
        tokens_2 = backbone.tokenizer_2([glyphs[i] for i in rows], padding="max_length", max_length=length_2,
                                        truncation=True, return_tensors="pt").to(device)
        embeds_2[rows] = encoder_2(input_ids=tokens_2.input_ids,
                                   attention_mask=tokens_2.attention_mask)[0].to(embeds_2.dtype)
        mask_2[rows] = tokens_2.attention_mask
    return PromptEmbeds(embeds, mask, embeds_2, mask_2)


def _glyph_text(prompt: str) -> str | None:
    """The pipeline's extract_glyph_texts: text inside "..." or “...”, de-duplicated, as 'Text "a". '."""
    found = [a or b for a, b in re.findall(r"\"(.*?)\"|“(.*?)”", prompt)]
    found = list(dict.fromkeys(found))
    return ". ".join(f'Text "{t}"' for t in found) + ". " if found else None


def velocity(transformer, x, sigma, cond: PromptEmbeds, uncond: PromptEmbeds | None, guidance: float) -> torch.Tensor:
    """Policy velocity v(x, sigma) (N, C, F, H, W) float32; CFG-combined when `uncond` is given and
    guidance != 1 (the ClassifierFreeGuidance guider also switches off at exactly 1). Differentiable."""
    core = getattr(transformer, "module", transformer)   # [dist] DDP wraps the model; config lives inside
    dtype = next(core.parameters()).dtype
    N = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(N)  # (N,)
    guided = uncond is not None and not math.isclose(guidance, 1.0)
    if guided:   # one forward for both halves (Deviation 2); uncond first, as below
        x, sigma, text = torch.cat([x, x]), torch.cat([sigma, sigma]), PromptEmbeds.cat([uncond, cond])
    else:
        text = cond
    zeros = torch.zeros_like(x[:, :1])
    # t2v input: noisy latents, zero condition latents, zero condition mask -> (N, 2C+1, F, H, W)
    hidden = torch.cat([x, torch.zeros_like(x), zeros], dim=1).to(dtype)
    image_embeds = torch.zeros(x.shape[0], IMAGE_TOKENS, core.config.image_embed_dim, device=x.device, dtype=dtype)
    v = transformer(
        hidden_states=hidden, timestep=(1000 * sigma).to(dtype),   # SPEC 1: timestep = 1000 sigma
        encoder_hidden_states=text.embeds.to(x.device, dtype), encoder_attention_mask=text.mask.to(x.device),
        encoder_hidden_states_2=text.embeds_2.to(x.device, dtype), encoder_attention_mask_2=text.mask_2.to(x.device),
        image_embeds=image_embeds, return_dict=False)[0].float()   # float32 island for the SDE maths
    if not guided:
        return v
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)   # diffusers' CFG; guidance_rescale = 0 by default


class ValidTokenAttnProcessor(HunyuanVideo15AttnProcessor2_0):
    """The DiT blocks' joint attention with the same output for every valid token (up to float rounding:
    the reduction order differs), and no attention mask
    (Deviation 9), so torch can pick its flash / cuDNN kernels instead of a masked one.

    diffusers' processor turns the (N, T) text mask into a dense (N, 1, S, S) boolean mask, S = video + T
    tokens: valid tokens see valid tokens only, and padded text tokens see nothing. The transformer has
    already moved each row's valid text tokens in front of its padding, so row n's valid tokens are exactly
    its first L_n = video + valid_n positions. Here rows with the same L_n form a group, and each group
    runs plain attention over its first L_n tokens; the padded positions get 0. A valid token therefore
    attends to exactly the keys it attended to before. Padded tokens get other values than before (they
    attended to nothing), but no valid token ever reads them and the transformer drops all text tokens
    after the last block, so the velocity is the same (tests compare it with diffusers' processor).

    The groups are read once per forward (one host sync) and reused by every block: all blocks receive the
    same mask tensor. With training micro-batch 1 a CFG forward has two groups (prompt and empty prompt);
    a rollout of G videos of one prompt has the same two."""

    def __init__(self):
        super().__init__()
        self._last = (None, None, None)   # (mask, sequence length, groups) of the last forward

    def _row_groups(self, text_mask: torch.Tensor | None, total: int) -> list[tuple]:
        if text_mask is None:
            return [(slice(None), total)]
        mask, seen_total, groups = self._last
        if text_mask is not mask or total != seen_total:   # a new forward: one host sync for all of its blocks
            lengths = (total - text_mask.shape[1] + text_mask.sum(1)).tolist()   # (N,) video + valid text
            rows = {}
            for row, length in enumerate(lengths):
                rows.setdefault(length, []).append(row)
            groups = [(_as_index(r, text_mask.device), length) for length, r in rows.items()]
            self._last = (text_mask, total, groups)   # holding the mask keeps its id from being reused
        return groups

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if self._parallel_config is not None:   # context parallelism: this process holds a shard of the video
            return self._split(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        # Projections, QK-norm and rotary embedding on the video stream: as in diffusers' processor.
        query, key, value = (proj(hidden_states).unflatten(2, (attn.heads, -1))
                             for proj in (attn.to_q, attn.to_k, attn.to_v))   # (N, V, heads, head_dim)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if encoder_hidden_states is not None:   # the text stream, appended after the video tokens
            e_query, e_key, e_value = _text_qkv(attn, encoder_hidden_states)
            query, key, value = (torch.cat(pair, dim=1) for pair in
                                 ((query, e_query), (key, e_key), (value, e_value)))   # (N, S, heads, head_dim)

        # The only change: each group of rows attends over its valid prefix, without a mask.
        out = query.new_zeros(query.shape)
        for rows, length in self._row_groups(attention_mask, query.shape[1]):
            out[rows, :length] = dispatch_attention_fn(
                query[rows, :length], key[rows, :length], value[rows, :length], attn_mask=None, dropout_p=0.0,
                is_causal=False, backend=self._attention_backend).to(out.dtype)   # autocast may return bf16
        hidden_states = out.flatten(2, 3)

        if encoder_hidden_states is None:
            return hidden_states, None
        T = encoder_hidden_states.shape[1]
        hidden_states, encoder_hidden_states = hidden_states[:, :-T], hidden_states[:, -T:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))   # linear, dropout
        return hidden_states, attn.to_add_out(encoder_hidden_states)


    def _split(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        """Ulysses and ring attention over the joint sequence (Deviation 10). This process holds 1/(U x R) of the
        video tokens (split by CP_PLAN) and the whole text stream.
        - Ulysses (U > 1): the video q, k, v go through an all-to-all from "my tokens, all heads" to "the U shards
          of my Ulysses group, my heads"; the text's are sliced to my heads (every process holds them whole).
        - Ring (R > 1): the video k, v of the ring group's R processes are gathered, so my queries see every video
          key once; the text's keys are appended once.
        Then the same valid-prefix attention as above runs: my video queries and all text queries over all video
        keys and the valid text keys. The video output goes back by the inverse all-to-all; the text output, the
        same on every process of a ring, is gathered over the heads of the Ulysses group."""
        import torch.distributed.nn.functional as dist_fn

        config = self._parallel_config.context_parallel_config
        U, R = config.ulysses_degree, config.ring_degree
        query, key, value = (proj(hidden_states).unflatten(2, (attn.heads, -1))
                             for proj in (attn.to_q, attn.to_k, attn.to_v))   # (N, V/(U R), heads, head_dim)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:   # the rotary tables of my tokens (split by CP_PLAN)
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        N, V_local, H, D = query.shape
        h = H // U   # my heads: rank * h .. (rank + 1) * h of the Ulysses group
        if U > 1:
            group, rank = config._ulysses_mesh.get_group(), config._ulysses_local_rank

            def tokens_to_heads(x):   # (N, V/(U R), H, D) -> (N, V/R, H/U, D)
                x = x.reshape(N, V_local, U, h, D).permute(2, 0, 1, 3, 4).contiguous()   # (U: their heads, ...)
                x = dist_fn.all_to_all_single(torch.empty_like(x), x, group=group)   # (U: their tokens, ...)
                return x.permute(1, 0, 2, 3, 4).reshape(N, U * V_local, h, D)

            query, key, value = tokens_to_heads(query), tokens_to_heads(key), tokens_to_heads(value)
        if R > 1:   # every video key and value of the ring, in ring order (attention does not depend on it)
            ring = config._ring_mesh.get_group()
            key, value = _Gather.apply(key, ring, R, 1), _Gather.apply(value, ring, R, 1)   # (N, V, H/U, D)
        V_query, V_key = query.shape[1], key.shape[1]
        T = 0
        if encoder_hidden_states is not None:   # the text stream, whole on every process: my heads of it
            T = encoder_hidden_states.shape[1]
            mine = slice(config._ulysses_local_rank * h, (config._ulysses_local_rank + 1) * h)
            query, key, value = (torch.cat([x, e[:, :, mine]], dim=1) for x, e in
                                 zip((query, key, value), _text_qkv(attn, encoder_hidden_states)))
        out = query.new_zeros(query.shape)
        for rows, valid in self._row_groups(attention_mask, T):   # (rows, their valid text tokens)
            out[rows, :V_query + valid] = dispatch_attention_fn(
                query[rows, :V_query + valid], key[rows, :V_key + valid], value[rows, :V_key + valid],
                attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend).to(out.dtype)
        video = out[:, :V_query]   # (N, V/R, H/U, D)
        if U > 1:   # (N, V/R, H/U, D) -> (N, V/(U R), H, D)
            video = video.reshape(N, U, V_local, h, D).permute(1, 0, 2, 3, 4).contiguous()   # (U: their tokens)
            video = dist_fn.all_to_all_single(torch.empty_like(video), video, group=group)   # (U: their heads)
            video = video.permute(1, 2, 0, 3, 4).reshape(N, V_local, H, D)
        video = video.flatten(2, 3)   # (N, V/(U R), H * D)
        if encoder_hidden_states is None:   # as diffusers' processor: no output projection without the text
            return video, None
        video = attn.to_out[1](attn.to_out[0](video))
        text = out[:, V_query:]
        if U > 1:
            text = _Gather.apply(text, group, U, 2)   # (N, T, H, D), the same on every process
        return video, attn.to_add_out(text.flatten(2, 3))


def _text_qkv(attn, encoder_hidden_states):
    """The text stream's query, key and value (N, T, heads, head_dim), QK-normalised, as diffusers' processor."""
    e_query, e_key, e_value = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                               for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        e_query = attn.norm_added_q(e_query)
    if attn.norm_added_k is not None:
        e_key = attn.norm_added_k(e_key)
    return e_query, e_key, e_value


class _Gather(torch.autograd.Function):
    """All-gather over a process group along `dim`: the text output over the heads (dim 2), the ring's video keys
    and values over the tokens (dim 1). Backward: the processes' gradients of the gathered tensor are partial
    sums (each process's own tokens' share of the loss), so each process receives the group's sum of its own part
    (a reduce-scatter; Deviation 10)."""

    @staticmethod
    def forward(ctx, x, group, size, dim):
        import torch.distributed as dist

        ctx.group, ctx.size, ctx.rank, ctx.dim = group, size, dist.get_rank(group), dim
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        parts = grad.movedim(ctx.dim, 0).contiguous()   # the processes' parts, one after another
        mine = parts.new_empty(parts.shape[0] // ctx.size, *parts.shape[1:])
        dist.reduce_scatter_tensor(mine, parts, group=ctx.group)   # the sum over the group of my part
        return mine.movedim(0, ctx.dim), None, None, None


def _as_index(rows: list[int], device) -> slice | torch.Tensor:
    """Ascending row numbers as a slice when they are contiguous (a view, no copy), else an index tensor."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


def use_valid_token_attention(transformer, enable: bool = True) -> None:
    """Gives every DiT block `ValidTokenAttnProcessor` (enable=False: diffusers' processor back). The text
    token refiner keeps its own attention: it runs on the text alone and costs next to nothing."""
    core = getattr(transformer, "module", transformer)
    processor = ValidTokenAttnProcessor() if enable else HunyuanVideo15AttnProcessor2_0()
    for block in core.transformer_blocks:
        block.attn.set_processor(processor)


def pipeline_scheduler(backbone: Backbone, num_steps: int):
    """The scheduler as HunyuanVideo15Pipeline sets it for `num_steps`: the folder's FlowMatchEuler on the sigmas
    linspace(1, 0, K + 1)[:-1] it passes, shifted: the training grid (sde.sigma_schedule) itself."""
    scheduler = backbones.scheduler_from_config(backbone.scheduler)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)[:-1].numpy())
    return scheduler


@torch.no_grad()
def decode(backbone: Backbone, latents: torch.Tensor) -> torch.Tensor:
    """Latents (N, C, F', H', W') -> frames (N, F, 3, H, W) float32 in [0, 1], one sample at a time
    (the VAE's mid-block attention breaks for batch > 1, diffusers PR #13133). For long 480p+ clips,
    `backbone.vae.enable_tiling()` bounds memory as the diffusers example does."""
    vae = backbone.vae
    videos = []
    for z in latents.split(1):
        z = z.to(vae.device, vae.dtype) / vae.config.scaling_factor
        video = vae.decode(z, return_dict=False)[0]   # (1, 3, F, H, W) in about [-1, 1]
        videos.append((video.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(videos).permute(0, 2, 1, 3, 4)


def enable_gradient_checkpointing(transformer, blocks: int | None = None) -> None:
    """Checkpoint the first `blocks` DiT blocks (None: all); see backbones.enable_gradient_checkpointing."""
    core = getattr(transformer, "module", transformer)
    backbones.enable_gradient_checkpointing(transformer, core.transformer_blocks, blocks)


def freeze_unreachable(transformer) -> list[str]:
    """Freezes the trainable parameters no gradient can reach, and returns their names (Deviation 8).

    The last block's text-stream outputs (its text output projection and text MLP, and LoRA on them: attn
    targets to_add_out, attn_ffn also ff_context) feed nothing: the transformer drops the text tokens after the
    last block. Found by one backward
    (backbones.freeze_unreachable) on a 4-token latent with both text streams valid, so every input path
    is exercised."""
    def probe(core):
        cfg, param = core.config, next(p for p in core.parameters() if p.requires_grad)
        x = torch.randn(1, cfg.out_channels, 1, 2, 2, device=param.device)
        ones = torch.ones(1, 2, dtype=torch.long, device=param.device)
        text = PromptEmbeds(torch.randn(1, 2, cfg.text_embed_dim, device=param.device), ones,
                            torch.randn(1, 2, cfg.text_embed_2_dim, device=param.device), ones)
        return velocity(core, x, 0.5, text, None, 1.0)
    return backbones.freeze_unreachable(transformer, probe)


def add_lora(transformer, rank: int = 32, alpha: int = 64, targets: str = "attn") -> list[nn.Parameter]:
    """LoRA on the DiT blocks' attention projections, with targets="attn_ffn" also on both streams'
    feed-forward Linears (LORA_TARGETS; never the token refiner), float32 (Deviation 5, backbones.add_lora).
    Returns the trainable parameters."""
    return backbones.add_lora(transformer, backbones.lora_regex(LORA_TARGETS, targets), rank, alpha)


# ----------------------------------------------------------------------------------------------------
# benchmark.py: the full-size transformer with random weights, without any download


def use_attention_processor(transformer, processor: str) -> None:
    """"valid": ValidTokenAttnProcessor (Deviation 9, what load_backbone sets); "diffusers": diffusers' own."""
    if processor not in ATTENTION_PROCESSORS:
        raise ValueError(f"attention processor {processor!r}: {FAMILY} has {ATTENTION_PROCESSORS}")
    use_valid_token_attention(transformer, enable=processor == "valid")


def random_policy(name: str, device, dtype, num_frames: int, height: int, width: int, text_tokens: int):
    """(transformer, latent (C, F', H', W'), cond, uncond) for `name`'s DiT with random weights: the 480p t2v
    architecture (diffusers' class defaults with task_type="t2v") for hunyuan15, the tiny / small configs
    otherwise. cond has `text_tokens` valid Qwen tokens and no glyph text, uncond ~14 (the empty prompt's
    chat-template tokens), both trimmed like the cache output (Deviation 7)."""
    if name == "hunyuan15":
        with torch.device(device):   # allocate on the GPU directly: 8.3 B parameters
            model = HunyuanVideo15Transformer3DModel(task_type="t2v").to(dtype)
        channels = 32
    else:
        config = {"tiny": TINY_TRANSFORMER, "small": SMALL_TRANSFORMER}[name]
        model = HunyuanVideo15Transformer3DModel(**config).to(device, dtype)
        channels = config["out_channels"]
    use_valid_token_attention(model)   # as load_backbone does for train.py
    temporal, pixels = VIDEO_FACTORS[name]
    backbones.check_video_size(temporal, pixels, num_frames, height, width)
    spatial = pixels // model.config.patch_size
    latent = (channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)

    def embeds(tokens):
        g = torch.Generator(device).manual_seed(tokens)
        return PromptEmbeds(embeds=torch.randn(1, tokens, model.config.text_embed_dim, device=device, generator=g),
                            mask=torch.ones(1, tokens, dtype=torch.long, device=device),
                            embeds_2=torch.zeros(1, 1, model.config.text_embed_2_dim, device=device),
                            mask_2=torch.zeros(1, 1, dtype=torch.long, device=device))
    return model.eval(), latent, embeds(text_tokens), embeds(14)
