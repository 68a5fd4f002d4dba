"""Wan2.1 text-to-video as a GRPO policy: load the model parts, encode prompts, give the (CFG-guided)
velocity, and decode latents to frames. No RL maths lives here; the names are those every backbone module
exposes (backbones.py).

What it reproduces from diffusers' `WanPipeline` (diffusers/pipelines/wan/pipeline_wan.py, 0.42.1):
- Prompt encoding (`_get_t5_prompt_embeds`): each prompt is cleaned with the pipeline's own
  `prompt_clean` (ftfy if installed, HTML unescape, whitespace), tokenized to 512 tokens with the end token,
  and the UMT5 encoder's last hidden state is kept for the prompt's real tokens only: the rest of the 512
  rows are ZEROS (not the encoder's padding output), giving (N, 512, 4096). The transformer takes no text
  mask: the zero rows go through its text projection like any token.
- The denoiser call: hidden_states = latents (N, 16, F', H', W') in the transformer dtype, timestep =
  1000 sigma in float32 (N,), encoder_hidden_states = the embeddings; output = velocity v = eps - x0.
- Guidance: v = v_uncond + g (v_cond - v_uncond) when g > 1 (the pipeline's `do_classifier_free_guidance`).
- Decoding: z = latents * latents_std + latents_mean (the VAE config's 16 per-channel values), VAE decode,
  [-1, 1] -> [0, 1] with a clamp (the pipeline's output_type="pt" path).

Conventions (SPEC section 1): sigma in [0, 1], sigma = 1 is pure noise; timestep = 1000 sigma; the model
predicts v = eps - x0. Latents are (N, C, F', H', W') with C = 16, F' = (F - 1) / 4 + 1, H' = H / 8.

Deviations / choices:
1. Sampling state stays float32; only the transformer inputs are cast to its dtype. The timestep stays
   float32 as in the pipeline (the time embedder is one of `_keep_in_fp32_modules`).
2. Cond and uncond go through ONE batched forward (the pipeline makes two calls). Wan attends without any
   mask and mixes no rows, so the result is the same up to float reduction order (tested).
3. The negative prompt is the empty string, the pipeline's default when none is given. Wan's own
   generate script uses a long fixed negative prompt; [SPG] does not say which it used, and "" keeps both
   families alike (hunyuan.py uses the same default). A stronger negative prompt is a one-line change in
   `PromptCache.negative`.
4. Weights are never downloaded implicitly: a hub id must be in the local cache, a folder must hold the
   Diffusers layout of a WanPipeline (backbones.find_weights); otherwise we stop at once with the command.
5. `_keep_in_fp32_modules` (rope, time embedder, norms, modulation tables) stay float32 under bf16:
   `from_pretrained(dtype=...)` does it for checkpoints, `backbones.keep_in_fp32` replicates it for the
   tiny model. The VAE is always float32 (the model card's example does the same; it is 0.13 B params).
6. The prompt cache keeps each prompt's real rows only and pads a batch back to 512 zero rows when it is
   read, so a large prompt set costs (valid tokens x 4096) per prompt instead of 512 x 4096.
7. Nothing needs freezing: every parameter of the text-to-video transformer reaches the output (no text
   stream is dropped, unlike HunyuanVideo-1.5's last block). `freeze_unreachable` still runs its probe
   and returns [] (tested for --full and both --lora_targets), so train.py needs no family switch.
8. "tiny-wan" is the same classes with tiny configs (TINY_TRANSFORMER, TINY_VAE), random weights from
   `seed`, ByT5's byte tokenizer standing in for umt5-xxl's, and the real 512-token text length.
9. The prompt cache keeps every embedding on the device the text encoder had when the cache was made (the
   training device), also for prompts first seen after `offload_encoders()`, which are encoded on the CPU
   (slowly) and then moved there, as hunyuan.py's cache does.

Test: `python -m pytest tests/test_wan.py -q` (CPU, tiny-wan, compares with WanPipeline).
"""
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from torch import nn
from transformers import AutoTokenizer, ByT5Tokenizer, UMT5Config, UMT5EncoderModel

from models import backbones

FAMILY = "Wan2.1"
PIPELINE_CLASS = "WanPipeline"           # model_index.json `_class_name` of its Diffusers folders
BLOCK_CLASS = "WanTransformerBlock"      # the FSDP wrap / checkpoint unit
HUB_IDS = {"wan21-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan21-14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers"}
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# (frames per latent frame after the first, pixels per token side = VAE factor 8 x patch 2) per backbone,
# for backbones.check_request before any weights are read (tests compare them with the built models).
VIDEO_FACTORS = {"wan21-1.3b": (4, 16), "wan21-14b": (4, 16), "tiny-wan": (4, 16)}
ATTENTION_PROCESSORS = ("diffusers",)    # diffusers' WanAttnProcessor: no mask, flash kernels apply
CP_PLAN = None   # context parallelism (training/parallel.py): diffusers' own WanTransformer3DModel._cp_plan
RING_KEEPS_GATHERED = False   # diffusers' ring keeps its shard's keys and values and gathers again in the backward
MAX_LENGTH = 512   # WanPipeline.__call__(max_sequence_length=512)
# --lora_targets: the regex (full module names, peft's re.fullmatch) each choice gives peft, inside the blocks
# only; the text and time embedders, patch embedding and output projection stay frozen.
# "attn": self-attention (attn1) and cross-attention (attn2) projections;
# "attn_ffn": also the feed-forward Linears, FeedForward's net.0.proj (D -> ffn_dim, before the GELU) and net.2
# (ffn_dim -> D), as Flow-Factory's Wan default and DiffSynth-Studio adapt them.
_ATTN = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)"
LORA_TARGETS = {"attn": rf"blocks\.\d+\.{_ATTN}",
                "attn_ffn": rf"blocks\.\d+\.({_ATTN}|ffn\.net\.(0\.proj|2))"}

# For backbones.estimate_memory: the diffusers class, the block Linears that see only the text tokens (the
# cross-attention's keys and values), and the text tokens every row carries (always padded to 512).
TRANSFORMER_CLASS = WanTransformer3DModel
TEXT_LINEARS = r"blocks\.\d+\.attn2\.(to_k|to_v)"
MIN_TEXT_TOKENS = MAX_LENGTH

# The hub configs (transformer/config.json of the Diffusers folders), for benchmark.py's random-weight
# model; loading always reads the folder's own config.
REAL_TRANSFORMER = {
    "wan21-1.3b": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                       out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                       cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
}
REAL_TRANSFORMER["wan21-14b"] = dict(REAL_TRANSFORMER["wan21-1.3b"], num_attention_heads=40, ffn_dim=13824,
                                     num_layers=40)
# Tiny configs (built offline; tests/test_wan.py checks them against WanPipeline): 28 k + 14 k parameters.
TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
# scheduler/scheduler_config.json of the Wan2.1 T2V hub folders (flow_shift 3 at 480p; the rest are UniPC's defaults):
# what WanPipeline samples with out of the box, and so what sample.py --ode_solver pipeline uses for tiny-wan.
HUB_SCHEDULER = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction", "use_flow_sigmas": True,
                 "flow_shift": 3.0, "solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
                 "final_sigmas_type": "zero", "num_train_timesteps": 1000}
BUILT_IN_CONFIGS = {"tiny-wan": TINY_TRANSFORMER}


@dataclass
class Backbone:
    name: str
    transformer: WanTransformer3DModel
    vae: AutoencoderKLWan
    text_encoder: UMT5EncoderModel
    tokenizer: object        # umt5-xxl's T5 tokenizer (real) or ByT5Tokenizer (tiny)
    shift: float             # SD3 time shift of the scheduler config (3.0 for T2V 480p)
    max_length: int          # text tokens per prompt (512)
    scheduler: dict | None = None  # the folder's scheduler config (tiny-wan: the hub's UniPC), for sample.py


def load_backbone(name: str, pretrained: str | None = None, device="cpu", dtype=torch.float32,
                  seed: int = 0) -> Backbone:
    """Builds the transformer (in `dtype`, fp32 islands kept), the float32 VAE and the text encoder on
    `device`, all in eval mode; the VAE and text encoder are frozen. "tiny-wan" ignores `pretrained` and
    draws its weights from `seed`."""
    if name == "tiny-wan":
        backbone = _build_tiny(seed, dtype)
    elif name in HUB_IDS:
        backbone = _load(name, backbones.find_weights(name, pretrained), dtype)
    else:
        raise ValueError(f"unknown backbone {name!r}; the Wan backbones are {tuple(VIDEO_FACTORS)}")
    for part in (backbone.transformer, backbone.vae, backbone.text_encoder):
        part.to(device).eval()
    backbone.vae.requires_grad_(False)
    backbone.text_encoder.requires_grad_(False)
    return backbone


def _load(name: str, root: str, dtype: torch.dtype) -> Backbone:
    # The hub folders ship a UniPC scheduler (`flow_shift`); a FlowMatchEuler one calls it `shift`.
    scheduler = FlowMatchEulerDiscreteScheduler.load_config(root, subfolder="scheduler")
    return Backbone(
        name=name,
        transformer=WanTransformer3DModel.from_pretrained(root, subfolder="transformer", dtype=dtype),  # Deviation 5
        vae=AutoencoderKLWan.from_pretrained(root, subfolder="vae", dtype=torch.float32),
        text_encoder=UMT5EncoderModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype),
        tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer"),
        shift=float(scheduler.get("flow_shift", scheduler.get("shift"))), scheduler=dict(scheduler),
        max_length=MAX_LENGTH)


def _build_tiny(seed: int, dtype: torch.dtype) -> Backbone:
    tokenizer = ByT5Tokenizer()
    # fork_rng: building the tiny model must not move the caller's global random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TINY_TRANSFORMER)
        vae = AutoencoderKLWan(**TINY_VAE)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=TINY_TRANSFORMER["text_dim"], d_kv=8, d_ff=37, num_layers=2,
            num_heads=4, relative_attention_num_buckets=8))
    if dtype != torch.float32:
        backbones.keep_in_fp32(transformer, dtype)   # Deviation 5, as from_pretrained(dtype=) would
        text_encoder.to(dtype)
    return Backbone(name="tiny-wan", transformer=transformer, vae=vae, text_encoder=text_encoder,
                    tokenizer=tokenizer, shift=3.0, max_length=MAX_LENGTH, scheduler=HUB_SCHEDULER)


def pipeline_scheduler(backbone: Backbone, num_steps: int):
    """The scheduler as WanPipeline sets it for `num_steps`: the folder's (UniPC in the hub folders) with
    set_timesteps(K), its own grid, which is not the training grid (README, "Which grid")."""
    scheduler = backbones.scheduler_from_config(backbone.scheduler)
    scheduler.set_timesteps(num_steps)
    return scheduler


def latent_shape(backbone, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, F', H', W') of the latent for a clip, with F' = (F - 1) / temporal + 1 (the VAE is causal: the
    first frame has its own latent) and H' = H / spatial; read from the VAE and transformer configs."""
    vae, patch = backbone.vae.config, backbone.transformer.config.patch_size
    t, s = vae.scale_factor_temporal, vae.scale_factor_spatial
    backbones.check_video_size(t, s * patch[1], num_frames, height, width)
    return vae.z_dim, (num_frames - 1) // t + 1, height // s, width // s


@dataclass
class PromptEmbeds:
    """UMT5 embeddings of N prompts, (N, L, D), zero past each prompt's length (L = 512 in a batch)."""
    embeds: torch.Tensor

    def repeat_interleave(self, n: int) -> "PromptEmbeds":
        """Row i goes to rows i*n .. (i+1)*n - 1: the G samples of a prompt are contiguous."""
        return PromptEmbeds(self.embeds.repeat_interleave(n, dim=0))

    def __getitem__(self, idx) -> "PromptEmbeds":
        """Rows selected by a LongTensor, list or slice (keeps the first dim)."""
        return PromptEmbeds(self.embeds[idx])

    index = __getitem__

    def to(self, device) -> "PromptEmbeds":
        return PromptEmbeds(self.embeds.to(device))

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(torch.cat([p.embeds for p in parts]))


class PromptCache:
    """Encodes each distinct prompt once (no_grad) and keeps its real rows only (Deviation 6), so the text
    encoder can leave the GPU; a batch is zero-padded back to `max_length` rows, as the pipeline feeds it."""

    def __init__(self, backbone: Backbone, chunk: int = 8):
        self.backbone, self.chunk = backbone, chunk
        self.device = next(backbone.text_encoder.parameters()).device   # where cached embeddings live
        self.cache: dict[str, torch.Tensor] = {}   # prompt -> (L_prompt, D)

    def __call__(self, prompts: list[str]) -> PromptEmbeds:
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        for start in range(0, len(new), self.chunk):   # bounded batches: umt5-xxl on 512 tokens each
            chunk = new[start:start + self.chunk]
            # Stored on the cache's device, wherever the encoder runs: after offload_encoders() it runs on the
            # CPU, and a batch mixing such prompts with earlier ones must stack on one device (Deviation 9).
            self.cache.update(zip(chunk, (e.to(self.device) for e in _encode_prompts(self.backbone, chunk))))
        L = self.backbone.max_length
        return PromptEmbeds(torch.stack([nn.functional.pad(self.cache[p], (0, 0, 0, L - len(self.cache[p])))
                                         for p in prompts]))   # (N, L, D)

    def negative(self, n: int) -> PromptEmbeds:
        """The pipeline's unconditional input when no negative prompt is given: the empty prompt (Deviation 3)."""
        return self([""]).repeat_interleave(n)

    def offload_encoders(self):
        """Moves the text encoder to CPU. Later, unseen prompts still work, only slowly (on CPU)."""
        self.backbone.text_encoder.to("cpu")


@torch.no_grad()
def _encode_prompts(backbone: Backbone, prompts: list[str]) -> list[torch.Tensor]:
    """Each prompt's real rows of the encoder output, [(L_i, D)], as `_get_t5_prompt_embeds` computes them."""
    encoder = backbone.text_encoder
    device = next(encoder.parameters()).device
    tokens = backbone.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                                max_length=backbone.max_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
    hidden = encoder(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state  # (N, L, D)
    lengths = tokens.attention_mask.sum(1).tolist()   # one host read per chunk of new prompts
    return [hidden[i, :n] for i, n in enumerate(lengths)]


def velocity(transformer, x, sigma, cond: PromptEmbeds, uncond: PromptEmbeds | None, guidance: float) -> torch.Tensor:
    """Policy velocity v(x, sigma) (N, C, F, H, W) float32; CFG-combined when `uncond` is given and
    guidance > 1 (the pipeline's rule). Differentiable."""
    core = getattr(transformer, "module", transformer)   # [dist] DDP wraps the model; config lives inside
    dtype = core.patch_embedding.weight.dtype            # the input dtype (norms and rope may be fp32)
    N = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(N)  # (N,)
    guided = uncond is not None and guidance > 1
    if guided:   # one forward for both halves (Deviation 2); uncond first, as below
        x, sigma, text = torch.cat([x, x]), torch.cat([sigma, sigma]), PromptEmbeds.cat([uncond, cond])
    else:
        text = cond
    v = transformer(hidden_states=x.to(dtype), timestep=1000 * sigma,   # SPEC 1; float32 as the pipeline
                    encoder_hidden_states=text.embeds.to(x.device, dtype),
                    return_dict=False)[0].float()   # (N or 2N, C, F, H, W), float32 island for the SDE maths
    if not guided:
        return v
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)   # the pipeline's CFG


@torch.no_grad()
def decode(backbone: Backbone, latents: torch.Tensor) -> torch.Tensor:
    """Latents (N, C, F', H', W') -> frames (N, F, 3, H, W) float32 in [0, 1]. One sample per VAE call:
    the VAE takes batches, but a batch of 480p x 81-frame clips multiplies its activation memory."""
    vae = backbone.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(vae.device, vae.dtype)   # (1, C, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(vae.device, vae.dtype)
    videos = []
    for z in latents.split(1):
        video = vae.decode(z.to(vae.device, vae.dtype) * std + mean, return_dict=False)[0]   # (1, 3, F, H, W)
        videos.append((video.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(videos).permute(0, 2, 1, 3, 4)


def add_lora(transformer, rank: int = 32, alpha: int = 64, targets: str = "attn") -> list[nn.Parameter]:
    """LoRA on the blocks' self- and cross-attention projections, with targets="attn_ffn" also on their
    feed-forward Linears (LORA_TARGETS), float32 (backbones.add_lora). Returns the trainable parameters."""
    return backbones.add_lora(transformer, backbones.lora_regex(LORA_TARGETS, targets), rank, alpha)


def enable_gradient_checkpointing(transformer, blocks: int | None = None) -> None:
    """Checkpoint the first `blocks` WanTransformerBlocks (None: all); see backbones.enable_gradient_checkpointing."""
    core = getattr(transformer, "module", transformer)
    backbones.enable_gradient_checkpointing(transformer, core.blocks, blocks)


def freeze_unreachable(transformer) -> list[str]:
    """Freezes parameters no gradient reaches (none for Wan2.1 T2V, Deviation 7); returns their names.
    Probe: a one-token latent (1 x 2 x 2 pixels of latent = one 2 x 2 patch) and two text tokens."""
    def probe(core):
        cfg, param = core.config, core.patch_embedding.weight
        x = torch.randn(1, cfg.in_channels, 1, 2, 2, device=param.device)
        text = PromptEmbeds(torch.randn(1, 2, cfg.text_dim, device=param.device))
        return velocity(core, x, 0.5, text, None, 1.0)
    return backbones.freeze_unreachable(transformer, probe)


# ----------------------------------------------------------------------------------------------------
# benchmark.py: the full-size transformer with random weights, without any download


def use_attention_processor(transformer, processor: str) -> None:
    """Wan has one attention processor, diffusers' own (it takes no mask, so flash kernels already apply)."""
    if processor not in ATTENTION_PROCESSORS:
        raise ValueError(f"attention processor {processor!r}: {FAMILY} has {ATTENTION_PROCESSORS}")


def random_policy(name: str, device, dtype, num_frames: int, height: int, width: int, text_tokens: int):
    """(transformer, latent (C, F', H', W'), cond, uncond) for `name`'s architecture with random weights:
    the real config values for wan21-*, the tiny ones for tiny-wan. cond has `text_tokens` valid rows, uncond
    one (the empty prompt's end token), both zero-padded to 512 rows like the cache output."""
    config = REAL_TRANSFORMER.get(name, TINY_TRANSFORMER)
    backbones.check_video_size(*VIDEO_FACTORS[name], num_frames, height, width)
    with torch.device(device):   # allocate on the GPU directly
        model = WanTransformer3DModel(**config)
    backbones.keep_in_fp32(model, dtype)
    latent = (config["in_channels"], (num_frames - 1) // 4 + 1, height // 8, width // 8)   # Wan2.1 VAE: x4, x8
    g = torch.Generator(device).manual_seed(text_tokens)
    text = torch.zeros(2, MAX_LENGTH, config["text_dim"], device=device)
    text[0, :text_tokens] = torch.randn(text_tokens, config["text_dim"], device=device, generator=g)
    text[1, :1] = torch.randn(1, config["text_dim"], device=device, generator=g)
    return model.eval(), latent, PromptEmbeds(text[:1]), PromptEmbeds(text[1:])

