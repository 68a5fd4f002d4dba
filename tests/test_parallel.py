"""Context parallelism (training/parallel.py): two gloo processes sharing one set of videos through Ulysses
attention (diffusers' for Wan2.1, models/hunyuan.py's for HunyuanVideo-1.5) train what one process training the
same batch does, resume exactly, and each process's transformer computes half of every video's tokens. Bad
combinations fail before any model loads."""
import json
import os
import shutil
import socket
from types import SimpleNamespace

import imageio.v3 as iio
import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

import launcher  # tests/
from training import options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--max_steps", "2", "--validation_steps", "0"]
# (backbone, video tokens per row of its clip): tiny-wan latent (16, 2, 4, 4) in 2 x 2 patches; tiny (32, 3, 8, 8)
TOKENS = {"tiny-wan": 2 * 2 * 2, "tiny": 3 * 8 * 8}


def train(out, *args, processes=1):
    """train.py: one process in this one, or `processes` gloo processes."""
    if processes == 1:
        import train as train_py

        train_py.main(options.parse_args([*RUN, "--output_dir", str(out), *map(str, args)]))
        return logged(out)
    launch("train.py", *RUN, "--output_dir", out, *args, processes=processes)
    return logged(out)


def launch(name, *args, processes):
    """`name` as `processes` gloo processes, started by hand as accelerate launch would (RANK, WORLD_SIZE, ...;
    forked from tests/launcher.py's forkserver, which imported the scripts once); fails with the first failing
    process's stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true",
               WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    procs = [launcher.Popen(name.removesuffix(".py"), args, dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(processes)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]


def logged(out):
    """(metrics rows, samples rows) of a run."""
    return tuple([json.loads(line) for line in open(out / f"{name}.jsonl")] for name in ("metrics", "samples"))


def script(name, out, *args, processes=1):
    """sample.py or evaluate.py as train() runs train.py."""
    if processes == 1:
        module = __import__(name.removesuffix(".py"))
        module.main(module.parse_args(["--output_dir", str(out), *map(str, args)]))
        return
    launch(name, "--output_dir", out, *args, processes=processes)


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
    two_metrics, two_samples = train(tmp_path / "two", "--backbone", backbone, "--ulysses_degree", 2,
                                     "--checkpointing_steps", 1, processes=2)
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
    # The reward reads 8-bit frames (rewards.py Deviations 5): float32 round-off can move a frame value across a
    # level, which the small reward spread (above) amplifies; measured 1.4e-5 on tiny-wan
    difference = adapter_difference(tmp_path / "one", tmp_path / "two")
    print(f"{backbone}: adapter max |difference| {difference:.2e}")
    assert difference < 5e-5

    if backbone != "tiny-wan":
        return
    # resumed from its first checkpoint, the run makes its second iteration again, bit for bit
    shutil.copytree(tmp_path / "two", tmp_path / "uninterrupted")
    resumed_metrics, _ = train(tmp_path / "two", "--backbone", backbone, "--ulysses_degree", 2, "--checkpointing_steps",
                               1, "--resume_from_checkpoint", tmp_path / "two" / "checkpoints" / "checkpoint-1",
                               processes=2)
    assert adapter_difference(tmp_path / "uninterrupted", tmp_path / "two") == 0.0
    assert [r["kl/pos"] for r in resumed_metrics] == [r["kl/pos"] for r in two_metrics]


@pytest.mark.slow
def test_sample_and_evaluate_under_ulysses_make_the_videos_and_scores_of_one_process(tmp_path):
    backbone = "tiny-wan"
    train(tmp_path / "one", "--backbone", backbone, "--max_steps", 1)  # a trained adapter to sample from
    prompts = ["--prompt", "a red fox running through snow", "--prompt", "a blue whale swimming"]
    script("sample.py", tmp_path / "videos1", "--backbone", backbone, "--lora", tmp_path / "one", *prompts)
    script("sample.py", tmp_path / "videos2", "--backbone", backbone, "--lora", tmp_path / "one", *prompts,
           "--ulysses_degree", 2, processes=2)
    gifs = sorted(p.name for p in (tmp_path / "videos1").glob("*.gif"))
    assert len(gifs) == 2 and gifs == sorted(p.name for p in (tmp_path / "videos2").glob("*.gif"))
    for name in gifs:  # uint8 frames: float32 round-off changes none of them here
        assert (iio.imread(tmp_path / "videos1" / name) == iio.imread(tmp_path / "videos2" / name)).all()
    (tmp_path / "eval_prompts.txt").write_text("a red fox running through snow\na blue whale swimming\n")
    evaluation = ["--backbone", backbone, "--runs", tmp_path / "one", "--seeds", 1, "--prompts",
                  tmp_path / "eval_prompts.txt"]
    script("evaluate.py", tmp_path / "eval1", *evaluation)
    script("evaluate.py", tmp_path / "eval2", *evaluation, "--ulysses_degree", 2, processes=2)
    rows = [json.load(open(tmp_path / folder / "eval.json"))["rows"] for folder in ("eval1", "eval2")]
    for a, b in zip(*rows, strict=True):
        assert torch.allclose(torch.tensor(a["per_video"]["proxy"]), torch.tensor(b["per_video"]["proxy"]), atol=1e-6)


def launch_config(processes, device="cpu", kind=DistributedType.MULTI_CPU, fsdp_version=2):
    return SimpleNamespace(num_processes=processes, mixed_precision="no", distributed_type=kind,
                           device=torch.device(device),
                           state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version)))


def fsdp_worker(rank, world, port, name, answers):
    """One of `world` gloo processes: FSDP2 as accelerate's plugin applies it (fully_shard of every block, then the
    root, over the whole world), diffusers' Ulysses over the same processes, one CFG velocity loss scaled by C; puts
    the largest gradient difference to one process computing the whole batch."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from models import backbones
    from training import parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        family = backbones.module(name)
        torch.manual_seed(0)
        reference, latent, cond, uncond = family.random_policy(name, "cpu", torch.float32, 5, 32, 32, 5)
        model = copy.deepcopy(reference)
        g = torch.Generator().manual_seed(1)
        x, target = torch.randn(2, *latent, generator=g), torch.randn(2, *latent, generator=g)
        loss = lambda m: ((family.velocity(m, x, 0.7, cond.repeat_interleave(2), uncond.repeat_interleave(2), 4.5)  # noqa: E731
                           - target) ** 2).mean()
        loss(reference).backward()  # one process, the whole batch and every token
        for block in model.modules():
            if type(block).__name__ == family.BLOCK_CLASS:
                fully_shard(block)
        fully_shard(model)
        parallel.enable(model, world, 1, world, torch.device("cpu"), family.CP_PLAN)
        (loss(model) * parallel.loss_scale(parallel.layout(rank, world, world, 1))).backward()
        diff = max((p.grad.full_tensor() - r.grad).abs().max().item()
                   for p, r in zip(model.parameters(), reference.parameters()) if r.grad is not None)
        scale = max(r.grad.abs().max().item() for r in reference.parameters() if r.grad is not None)
        if rank == 0:
            answers.put((diff, scale))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-wan", "tiny"])
def test_fsdp2_over_the_context_group_gives_the_one_process_gradients(name):
    """Full fine-tuning under FSDP2 with context parallelism (parallel.py Deviations 4): FSDP2 shards over all
    processes and averages over them, the context group's partial sums are scaled by C. accelerate does not run
    FSDP on CPU, so the two processes apply fully_shard as its FSDP2 plugin does; forked from this warm process."""
    import torch.multiprocessing as mp

    from models import backbones

    backbones.module(name).random_policy(name, "cpu", torch.float32, 5, 32, 32, 5)  # imports done once, here
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    answers = ctx.Queue()
    workers = [ctx.Process(target=fsdp_worker, args=(r, 2, port, name, answers)) for r in range(2)]
    for w in workers:
        w.start()
    try:
        diff, scale = answers.get(timeout=120)
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    assert [w.exitcode for w in workers] == [0, 0]
    assert scale > 1e-3 and diff < 1e-5 * scale, (diff, scale)  # without the scale C they would be half


@pytest.mark.parametrize("argv, processes, kind, message", [
    (["--ulysses_degree", "2"], 3, DistributedType.MULTI_CPU, "--ulysses_degree 2 x --ring_degree 1 = 2 must divide "
                                                             "the number of processes (3)"),
    (["--ring_degree", "2"], 2, DistributedType.MULTI_CPU, "--ring_degree 2: ring attention needs a GPU"),
    (["--ulysses_degree", "2", "--full"], 2, DistributedType.DEEPSPEED, "with DeepSpeed is not supported"),
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


def test_full_fine_tuning_under_fsdp2_with_context_parallelism_is_accepted_and_under_fsdp1_refused():
    cfg = options.resolve(options.parse_args(["--backbone", "tiny-wan", "--ulysses_degree", "2", "--full"]))
    options.check_launch(cfg, launch_config(2, kind=DistributedType.FSDP))  # Deviations 4: no refusal
    with pytest.raises(options.ConfigError, match="with FSDP needs FSDP2"):
        options.check_launch(cfg, launch_config(2, kind=DistributedType.FSDP, fsdp_version=1))


def test_context_parallel_options_are_part_of_the_run_identity():
    from training import checkpoint

    make = lambda *argv: options.resolve(options.parse_args(["--backbone", "tiny-wan", *argv]))
    identity = lambda cfg: checkpoint.run_identity(cfg, 2, "no", ["p"], ["v"])
    assert identity(make()) != identity(make("--ulysses_degree", "2"))


def test_ring_attention_needs_a_backend_that_returns_the_log_sum_exp():
    """On a GPU too: diffusers' default (native) backend cannot merge ring attention's partial results."""
    from training import parallel

    assert parallel.check_ring(1, "cuda") is None
    assert "active backend is 'native'" in parallel.check_ring(2, "cuda")
