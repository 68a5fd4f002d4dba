# Parameter counts behind docs/performance.md.   Run: python bench/count_params.py   (CPU, ~10 s, no weights)
# Every model is built on the `meta` device: shapes only, no memory, no download.
import os
import re
import sys

import torch
from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, Qwen2VLConfig, Qwen2VLModel, T5Config, T5EncoderModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from models import hunyuan  # LORA_TARGETS: the exact regexes add_lora() gives peft


def n(m):  # number of parameters of a module
    return sum(p.numel() for p in m.parameters())


with torch.device("meta"):
    # The class defaults ARE the 480p model (54 layers, 16 heads x 128 = 2048 hidden, in 65 / out 32, text dims
    # 3584 / 1472, image 1152, rope (16,56,56), target_size 640) except task_type, whose default is "i2v";
    # task_type changes no parameter (image_embedder exists in both), we pass "t2v" to match the hub config.
    dit = HunyuanVideo15Transformer3DModel(task_type="t2v")
    vae = AutoencoderKLHunyuanVideo15()  # class defaults: 32 latent ch, 16x spatial / 4x temporal compression
    # Qwen2_5_VLTextConfig() defaults to a 72B shape, so the 7B text tower's numbers are written out (hub config).
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064))
    # ByT5-small encoder (d_model 1472 = the DiT's text_embed_2_dim), 12 encoder layers, byte vocabulary.
    byt5 = T5EncoderModel(T5Config(vocab_size=384, d_model=1472, d_ff=3584, d_kv=64, num_heads=6, num_layers=12,
                                   feed_forward_proj="gated-gelu"))
    # VideoAlign = Qwen2-VL-2B (Qwen2VLModel: vision tower + language model, lm_head unused) + a 1536x1 head.
    reward = Qwen2VLModel(Qwen2VLConfig(
        text_config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
        vision_config=dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536)))

blocks = dit.transformer_blocks
print(f"DiT total                 {n(dit):>15,}")
print(f"  {len(blocks)} x HunyuanVideo15TransformerBlock {n(blocks):>15,}  ({n(blocks[0]):,} each)")
print(f"  everything else         {n(dit) - n(blocks):>15,}  (embedders, token refiner, final layer)")

# LoRA: each matched nn.Linear(in, out) gets A (r x in) and B (out x r): r * (in + out) parameters.
r = 32
for targets, regex in hunyuan.LORA_TARGETS.items():   # --lora_targets attn / attn_ffn
    hits = [(name, m) for name, m in dit.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(regex, name)]
    lora = sum(r * (m.in_features + m.out_features) for _, m in hits)
    print(f"LoRA r={r} {targets}: {len(hits)} Linear layers ({len(hits) // len(blocks)} per block) -> {lora:,} parameters")

for name, m in [("VAE", vae), ("Qwen2.5-VL-7B text tower", qwen), ("ByT5-small encoder", byt5),
                ("VideoAlign Qwen2-VL-2B (+rm_head 1536)", reward)]:
    print(f"{name:<40}{n(m) + (1536 if m is reward else 0):>15,}")

# Wan2.1 T2V ([SPG]'s backbones): the hub configs as wan.REAL_TRANSFORMER writes them out, the VAE's class
# defaults (= the Wan2.1 VAE) and umt5-xxl's encoder (text_encoder/config.json of the Diffusers folders).
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from models import wan

with torch.device("meta"):
    wan_vae = AutoencoderKLWan()
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                       num_heads=64, feed_forward_proj="gated-gelu"))
    for name, config in wan.REAL_TRANSFORMER.items():
        wan_dit = WanTransformer3DModel(**config)
        blocks = wan_dit.blocks
        print(f"{name} DiT total{n(wan_dit):>23,}  ({len(blocks)} x WanTransformerBlock {n(blocks[0]):,} each)")
        for targets, regex in wan.LORA_TARGETS.items():
            hits = [m for key, m in wan_dit.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(regex, key)]
            print(f"{name} LoRA r={r} {targets}: {len(hits)} Linear ({len(hits) // len(blocks)} per block) -> "
                  f"{sum(r * (m.in_features + m.out_features) for m in hits):,} parameters")
print(f"{'Wan2.1 VAE':<40}{n(wan_vae):>15,}")
print(f"{'umt5-xxl encoder':<40}{n(umt5):>15,}")
