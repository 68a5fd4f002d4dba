#!/usr/bin/env bash
# The GPU figures of docs/performance.md on one NVIDIA H100 / H200, in one script (about 8 minutes on an
# H200: an estimate from the 2026-11-26 H200 run, each section has its own timeout). It installs what a bare
# machine with CUDA torch lacks from wheels carried in .whl/, prints GPU, driver, torch, diffusers and the
# date, then runs benchmark.py (random weights, no download; its docstring defines every figure):
#   hunyuan         HunyuanVideo-1.5 8.3 B, 33x320x576, G=4, K=16, LoRA r=32, the valid-token processor (and the
#                   attention backends compared): rollout MFU, training MFU with all / 20 / no blocks
#                   checkpointed, AdamW vs Muon step, and a torch.profiler table of the top kernels of one
#                   training forward + backward (where the time goes if a target below is missed)
#   wan             Wan2.1-T2V-1.3B at 81x480x832, full fine-tune (checkpointing, the preset): rollout and
#                   training MFU, AdamW vs Muon on all 1.3 B weights; G=2, K=8 (MFU does not depend on them)
#   compile         HunyuanVideo-1.5 LoRA: one training step without / with compile_repeated_blocks (no blocks
#                   checkpointed on a >= 120 GiB GPU, else 20)
#   hunyuan_masked  as hunyuan with diffusers' masked attention processor (rollout and training MFU)
#   windows         Wan2.1-1.3B at 33x320x576, LoRA, K=20, G=2: iteration model time with all steps
#                   stochastic vs SDE windows of 2 and 4, with and without the shared prefix, and each window
#                   with the 16-18 steps before it in 6 UniPC calls (--ode_solver unipc --ode_steps 6), one round
# Targets (issue 15): training forward + backward >= 45 % MFU without checkpointing, >= 35 % with the H100
# preset (20 blocks); rollout >= 45 %.
#
# Wheels (once, on a machine with internet, from the repository root; .whl/ is git-ignored, travels with
# the run tool's `carry`, about 30 MB). PY is the GPU machine's Python (python3 -c 'import sys; print(sys.version)'):
#   PY=3.11; python3 -m pip download --no-deps -d .whl --only-binary=:all: --python-version $PY \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#       diffusers==0.42.1 transformers==5.23.0 accelerate==1.15.0 peft==0.21.2 safetensors huggingface_hub \
#       importlib_metadata zipp tokenizers regex tqdm psutil pyyaml packaging numpy pillow requests urllib3 \
#       idna certifi charset_normalizer httpx2 httpcore2 anyio h11 truststore
# That is everything `from bench import benchmark` and the LoRA path import (python -X importtime) beyond torch and
# torch's own dependencies (filelock, fsspec, jinja2, networkx, sympy, typing_extensions). A wheel whose
# distribution the image already has is skipped unless it is one of the pinned ones (PINNED below).
#
# Run:      bash bench/gpu.sh [section ...]          (default: all five, in the order above)
#           $OUT set: everything is tee'd to $OUT/gpu_bench.txt and each section's JSON goes to $OUT/<section>.json
# CPU dry run of the same commands at tiny sizes (small / tiny-wan backbones, no install):
#           BENCH_CPU=1 bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_bench.txt") 2>&1
fi
JSON_DIR=${OUT:-/tmp}
PINNED="diffusers transformers accelerate peft huggingface_hub safetensors tokenizers"

# ---- install: the carried wheels into /tmp/site, first on PYTHONPATH --------------------------------
if [[ -z "${BENCH_CPU:-}" ]]; then
    shopt -s nullglob
    wheels=(.whl/*.whl)
    if (( ${#wheels[@]} )); then
        # a wheel is installed when the image lacks its distribution or it is pinned (versions must match)
        mapfile -t chosen < <(PINNED="$PINNED" "$PY" - "${wheels[@]}" <<'EOF'
import importlib.metadata as md, os, re, sys
pinned = {re.sub(r"[-_.]+", "_", n).lower() for n in os.environ["PINNED"].split()}
for path in sys.argv[1:]:
    dist = re.sub(r"[-_.]+", "_", os.path.basename(path).split("-")[0]).lower()
    try:
        md.version(dist)
        have = True
    except md.PackageNotFoundError:
        have = False
    if dist in pinned or not have:
        print(path)
EOF
)
        echo "installing ${#chosen[@]} of ${#wheels[@]} wheels into /tmp/site"
        if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                "${chosen[@]}"; then
            echo "one install failed; installing the wheels one by one to name the one that does not fit"
            for w in "${chosen[@]}"; do
                "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                    "$w" || echo "NOT INSTALLED: $w (wrong Python version or platform? see the download command above)"
            done
        fi
    else
        echo "no .whl/*.whl: using the packages already installed"
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1

# ---- what this machine is -----------------------------------------------------------------------------
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(hostname)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
"$PY" - <<'EOF' || { echo "import failed: a wheel is missing (see the header)"; exit 1; }
import sys, torch, diffusers, transformers, accelerate, peft
from bench import benchmark  # everything bench/benchmark.py imports
cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}); diffusers {diffusers.__version__}; transformers {transformers.__version__}; "
      f"accelerate {accelerate.__version__}; peft {peft.__version__}; device "
      f"{torch.cuda.get_device_name() if cuda else 'cpu'}")
EOF
GIB=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30 if torch.cuda.is_available() else 0)")

# ---- sizes: the GPU figures, or the same commands at CPU sizes (BENCH_CPU=1) ----------------------------
if [[ -n "${BENCH_CPU:-}" ]]; then
    HY="--model small --frames 9 --height 64 --width 64 --num_steps 4 --group_size 2 --train_timesteps 1"
    HY_VARIANTS=1:ckpt,1:ckpt2,1:nockpt
    WAN="--model tiny-wan --frames 5 --height 32 --width 32 --num_steps 4 --group_size 2 --train_timesteps 1"
    WIN="--model tiny-wan --frames 5 --height 32 --width 32 --num_steps 8 --group_size 2"
    COMPILE_VARIANT=1:nockpt
    ODE_STEPS=2
else
    HY="--model hunyuan15 --frames 33 --height 320 --width 576 --num_steps 16 --group_size 4 --train_timesteps 1"
    HY_VARIANTS=1:ckpt,1:ckpt20,1:nockpt
    WAN="--model wan21-1.3b --frames 81 --height 480 --width 832 --num_steps 8 --group_size 2 --train_timesteps 1"
    WIN="--model wan21-1.3b --frames 33 --height 320 --width 576 --num_steps 20 --group_size 2"
    # 91 GiB measured without checkpointing at this size (H200, 2026-11-26): an 80 GB card takes 20 blocks
    COMPILE_VARIANT=$([[ $GIB -ge 120 ]] && echo 1:nockpt || echo 1:ckpt20)
    ODE_STEPS=6
fi

section() {   # name, timeout in seconds, benchmark.py arguments
    local name=$1 limit=$2
    shift 2
    echo
    echo "==== $name (timeout ${limit} s): $PY bench/benchmark.py $* --out $JSON_DIR/$name.json"
    echo "start $(date -u '+%H:%M:%S')"
    local t0=$SECONDS
    timeout -k 15 "$limit" "$PY" bench/benchmark.py "$@" --out "$JSON_DIR/$name.json"
    local rc=$?
    echo "==== $name: exit $rc after $((SECONDS - t0)) s$([[ $rc == 124 ]] && echo ' (timed out)')"
}

SECTIONS=("$@")
(( ${#SECTIONS[@]} )) || SECTIONS=(hunyuan wan compile hunyuan_masked windows)
for s in "${SECTIONS[@]}"; do
    case $s in
        hunyuan)        section hunyuan 210 $HY --train_variants $HY_VARIANTS --trace --optimizer_rounds 5 ;;
        wan)            section wan 150 $WAN --modes full --train_variants 1:ckpt --attention_rounds 2 \
                                --optimizer_rounds 3 ;;
        compile)        section compile 180 $HY --attention valid:native --attention_rounds 1 --num_steps 4 \
                                --train_variants $COMPILE_VARIANT --compile --optimizer_rounds 0 ;;
        hunyuan_masked) section hunyuan_masked 150 $HY --attention diffusers:native --attention_rounds 1 \
                                --train_variants $HY_VARIANTS --optimizer_rounds 0 ;;
        windows)        section windows 150 $WIN --attention diffusers:native --attention_rounds 1 \
                                --train_variants 1:ckpt --optimizer_rounds 0 --windows 2,4 --shared_prefix \
                                --ode_solver unipc --ode_steps $ODE_STEPS --window_rounds 1 ;;
        *) echo "unknown section $s (hunyuan, wan, compile, hunyuan_masked, windows)"; exit 2 ;;
    esac
done
echo "done $(date -u '+%H:%M:%S')"
