"""Context parallelism (training/parallel.py): two gloo processes sharing one set of videos through Ulysses
attention (diffusers' for Wan2.1, models/hunyuan.py's for HunyuanVideo-1.5) train what one process training the
same batch does, resume exactly, and each process's transformer computes half of every video's tokens. Bad
combinations fail before any model loads."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from training import options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--max_steps", "2", "--validation_steps", "0"]
# (backbone, video tokens per row of its clip): tiny-wan latent (16, 2, 4, 4) in 2 x 2 patches; tiny (32, 3, 8, 8)
TOKENS = {"tiny-wan": 2 * 2 * 2, "tiny": 3 * 8 * 8}


def train(out, *args, processes=1):
    """train.py in a subprocess: one process, or `processes` gloo processes through accelerate launch."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes",
              str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [*(launch if processes > 1 else [sys.executable]), os.path.join(ROOT, "train.py"), *RUN,
           "--output_dir", str(out), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in open(out / "metrics.jsonl")], [json.loads(line) for line in open(out / "samples.jsonl")]


def adapter_difference(a, b) -> float:
    x, y = load_file(a / "pytorch_lora_weights.safetensors"), load_file(b / "pytorch_lora_weights.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["tiny-wan", "tiny"])
def test_ulysses_over_two_processes_trains_what_one_process_does_and_resumes_exactly(tmp_path, backbone):
    """tiny-wan: diffusers' plan and Ulysses attention; tiny: HunyuanVideo-1.5's classes with models/hunyuan.py's
    plan and joint-sequence Ulysses (the valid-token processor). The resume is checked on tiny-wan."""
    one_metrics, one_samples = train(tmp_path / "one", "--backbone", backbone)
    two_metrics, two_samples = train(tmp_path / "two", "--backbone", backbone, "--ulysses_degree", 2, processes=2)
    # the same videos: every reward and advantage equal to float32 round-off (the rollout latents decide them,
    # and the sharded attention sums in another order), each sample once in the log
    for a, b in zip(one_samples, two_samples, strict=True):
        assert a["prompt"] == b["prompt"]
        assert torch.allclose(torch.tensor(a["scores"]), torch.tensor(b["scores"]), rtol=0, atol=1e-6)
        # an advantage divides by its group's reward spread (std 2.9e-3 here), so it carries ~350 x the difference
        assert torch.allclose(torch.tensor(a["advantage"]), torch.tensor(b["advantage"]), rtol=0, atol=1e-4)
    for a, b in zip(one_metrics, two_metrics):
        assert b["train/first_ratio_dev"] == 0.0  # on-policy: the ratio is exactly 1 under context parallelism
        assert b["cp/tokens_per_process"] * 2 == TOKENS[backbone]  # each process computes half of the tokens
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-5)
    assert adapter_difference(tmp_path / "one", tmp_path / "two") < 1e-5

    if backbone != "tiny-wan":
        return
    # stopped after its first checkpoint and resumed: the same adapter as the uninterrupted two-process run
    train(tmp_path / "resumed", "--backbone", backbone, "--ulysses_degree", 2, "--max_steps", 1, processes=2)
    train(tmp_path / "resumed", "--backbone", backbone, "--ulysses_degree", 2, "--resume_from_checkpoint", "latest",
          processes=2)
    assert adapter_difference(tmp_path / "two", tmp_path / "resumed") == 0.0


def launch_config(processes, device="cpu", kind=DistributedType.MULTI_CPU):
    return SimpleNamespace(num_processes=processes, mixed_precision="no", distributed_type=kind,
                           device=torch.device(device))


@pytest.mark.parametrize("argv, processes, kind, message", [
    (["--ulysses_degree", "2"], 3, DistributedType.MULTI_CPU, "--ulysses_degree 2 x --ring_degree 1 = 2 must divide "
                                                             "the number of processes (3)"),
    (["--ring_degree", "2"], 2, DistributedType.MULTI_CPU, "--ring_degree 2: ring attention merges partial"),
    (["--ulysses_degree", "2", "--full"], 2, DistributedType.FSDP, "with FSDP or DeepSpeed is not supported"),
])
def test_a_split_the_launch_cannot_run_is_refused_before_any_model(argv, processes, kind, message):
    cfg = options.resolve(options.parse_args(["--backbone", "tiny-wan", *argv]))
    with pytest.raises(options.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        options.check_launch(cfg, launch_config(processes, kind=kind))


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "tiny-wan", "--ulysses_degree", "3"], "--ulysses_degree 3 must divide the 2 attention heads"),
    (["--backbone", "tiny-wan", "--ulysses_degree", "2", "--num_frames", "1", "--height", "48", "--width", "48"],
     "must divide the 9 video tokens of --num_frames 1 --height 48 --width 48"),
    (["--backbone", "tiny", "--ring_degree", "2"], "--ring_degree 2: HunyuanVideo-1.5's context parallelism is "
                                                    "Ulysses only"),
    (["--backbone", "tiny-wan", "--ulysses_degree", "0"], "--ulysses_degree 0: must be an integer >= 1"),
])
def test_a_split_the_model_cannot_take_is_a_usage_error(argv, message):
    with pytest.raises(options.ConfigError, match=message):
        options.resolve(options.parse_args(argv))


def test_context_parallel_options_are_part_of_the_run_identity():
    from training import checkpoint

    make = lambda *argv: options.resolve(options.parse_args(["--backbone", "tiny-wan", *argv]))
    identity = lambda cfg: checkpoint.run_identity(cfg, 2, "no", ["p"], ["v"])
    assert identity(make()) != identity(make("--ulysses_degree", "2"))
