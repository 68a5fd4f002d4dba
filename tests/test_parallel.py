"""Context parallelism (training/parallel.py): two gloo processes sharing one set of videos through Ulysses or
ring attention (diffusers' for Wan2.1, models/hunyuan.py's for HunyuanVideo-1.5) train what one process training
the same batch does, resume exactly, and each process's transformer computes half of every video's tokens. Bad
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
def test_ulysses_or_ring_over_two_processes_trains_what_one_process_does_and_resumes_exactly(tmp_path, backbone):
    """tiny-wan: diffusers' plan, Ulysses and ring attention (the ring on CPU through parallel.py Deviations 6);
    tiny: HunyuanVideo-1.5's classes with models/hunyuan.py's plan and joint-sequence Ulysses and ring (the
    valid-token processor). The resume is checked on tiny-wan under Ulysses."""
    one_metrics, one_samples = train(tmp_path / "one", "--backbone", backbone)
    for split in ("--ulysses_degree", "--ring_degree"):
        out = tmp_path / split.strip("-")
        two_metrics, two_samples = train(out, "--backbone", backbone, split, 2, "--checkpointing_steps", 1,
                                         processes=2)
        # the same videos: every reward and advantage equal to float32 round-off (the rollout latents decide them,
        # and the sharded attention sums in another order), each sample once in the log. The reward reads 8-bit
        # frames (rewards.py Deviations 5): round-off that moves one pixel across a level moves a score by 1.6e-6
        # (measured on tiny), so the bound is a few levels, not round-off itself
        for a, b in zip(one_samples, two_samples, strict=True):
            assert a["prompt"] == b["prompt"]
            assert torch.allclose(torch.tensor(a["scores"]), torch.tensor(b["scores"]), rtol=0, atol=1e-5)
            # an advantage divides by its group's reward spread (std 2.9e-3 here): ~350 x the difference
            assert torch.allclose(torch.tensor(a["advantage"]), torch.tensor(b["advantage"]), rtol=0, atol=1e-4)
        for a, b in zip(one_metrics, two_metrics):
            assert b["train/first_ratio_dev"] == 0.0  # on-policy: the ratio is exactly 1 under context parallelism
            assert b["cp/tokens_per_process"] * 2 == TOKENS[backbone]  # each process computes half of the tokens
            # the gradient is linear in the advantages, which carry the reward's 8-bit level crossings (above)
            assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
        # Adam divides each step by its gradient's running size, which turns round-off in near-zero gradient entries
        # into weight differences of a fraction of a step (lr 3e-4 per entry and update): measured 2.5e-5 to
        # 3.4e-5 on tiny-wan, 2.5e-7 on tiny. After one update tiny-wan's largest is 1.6e-5, in an entry whose
        # gradient is 1.3e-9 in one run and 2.0e-9 in the other (Adam's eps 1e-8; the gradient norm is 2e-3). A
        # shard's missing contribution would move entries by whole steps; a gradient scaled wrongly shows in
        # grad_norm above (Adam's step does not see it)
        difference = adapter_difference(tmp_path / "one", out)
        print(f"{backbone} {split} 2: adapter max |difference| {difference:.2e}")
        assert difference < 1e-4

    if backbone != "tiny-wan":
        return
    # resumed from its first checkpoint, the run makes its second iteration again, bit for bit
    run = tmp_path / "ulysses_degree"
    shutil.copytree(run, tmp_path / "uninterrupted")
    resumed_metrics, _ = train(run, "--backbone", backbone, "--ulysses_degree", 2, "--checkpointing_steps", 1,
                               "--resume_from_checkpoint", run / "checkpoints" / "checkpoint-1", processes=2)
    assert adapter_difference(tmp_path / "uninterrupted", run) == 0.0
    assert [r["kl/pos"] for r in resumed_metrics] == [r["kl/pos"] for r in logged(tmp_path / "uninterrupted")[0]]


@pytest.mark.slow
def test_sample_and_evaluate_under_a_split_make_the_videos_and_scores_of_one_process(tmp_path):
    """sample.py under Ulysses and under ring attention, evaluate.py under Ulysses."""
    backbone = "tiny-wan"
    train(tmp_path / "one", "--backbone", backbone, "--max_steps", 1)  # a trained adapter to sample from
    prompts = ["--prompt", "a red fox running through snow", "--prompt", "a blue whale swimming"]
    script("sample.py", tmp_path / "videos1", "--backbone", backbone, "--lora", tmp_path / "one", *prompts)
    script("sample.py", tmp_path / "videos2", "--backbone", backbone, "--lora", tmp_path / "one", *prompts,
           "--ulysses_degree", 2, processes=2)
    script("sample.py", tmp_path / "ring", "--backbone", backbone, "--lora", tmp_path / "one", *prompts,
           "--ring_degree", 2, processes=2)
    gifs = sorted(p.name for p in (tmp_path / "videos1").glob("*.gif"))
    for split in ("videos2", "ring"):
        assert len(gifs) == 2 and gifs == sorted(p.name for p in (tmp_path / split).glob("*.gif"))
        for name in gifs:  # uint8 frames: float32 round-off changes none of them here
            assert (iio.imread(tmp_path / "videos1" / name) == iio.imread(tmp_path / split / name)).all()
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


def forked(target, world, *args):
    """What target(rank, world, *args) returns on rank 0 of `world` gloo processes forked from this warm process
    (each joins the process group first and leaves it after)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    answers = ctx.Queue()
    workers = [ctx.Process(target=_in_group, args=(target, r, world, port, args, answers)) for r in range(world)]
    for w in workers:
        w.start()
    try:
        return answers.get(timeout=120)
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
        assert [w.exitcode for w in workers] == [0] * world


def _in_group(target, rank, world, port, args, answers):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        answer = target(rank, world, *args)
        if rank == 0:
            answers.put(answer)
    finally:
        dist.destroy_process_group()


def fsdp_worker(rank, world, name, ulysses, ring):
    """FSDP2 as accelerate's plugin applies it (fully_shard of every block, then the root, over the whole world),
    context parallelism U x R = world over the same processes, one CFG velocity loss scaled by C: (the largest
    gradient difference to one process computing the whole batch, the largest gradient)."""
    import copy

    from torch.distributed.fsdp import fully_shard

    from models import backbones
    from training import parallel

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
    parallel.enable(model, ulysses, ring, world, torch.device("cpu"), family.CP_PLAN)
    (loss(model) * parallel.loss_scale(parallel.layout(rank, world, ulysses, ring))).backward()
    diff = max((p.grad.full_tensor() - r.grad).abs().max().item()
               for p, r in zip(model.parameters(), reference.parameters()) if r.grad is not None)
    return diff, max(r.grad.abs().max().item() for r in reference.parameters() if r.grad is not None)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-wan", "tiny"])
@pytest.mark.parametrize("ulysses, ring", [(2, 1), (1, 2), (2, 2)])
def test_fsdp2_over_the_context_group_gives_the_one_process_gradients(name, ulysses, ring):
    """Full fine-tuning under FSDP2 with context parallelism (parallel.py Deviations 4): FSDP2 shards over all
    processes and averages over them, the context group's partial sums are scaled by C. accelerate does not run
    FSDP on CPU, so the two processes apply fully_shard as its FSDP2 plugin does; forked from this warm process.
    Under Ulysses, ring attention (diffusers' ring backward for Wan2.1, models/hunyuan.py's gather) and both in one
    group of four processes (diffusers' unified attention; hunyuan.py's all-to-all, then the ring's gather)."""
    from models import backbones

    backbones.module(name).random_policy(name, "cpu", torch.float32, 5, 32, 32, 5)  # imports done once, here
    world = ulysses * ring
    diff, scale = forked(fsdp_worker, world, name, ulysses, ring)
    print(f"{name} U={ulysses} R={ring}: gradients to {diff / scale:.1e} of the largest")
    # round-off grows with the partial sums added: measured up to 1.1e-6 with two processes, 5.0e-6 with four
    assert scale > 1e-3 and diff < 5e-6 * world * scale, (diff, scale)  # without the scale C: 1/C of the gradient


def saved_bytes_worker(rank, world, name, ulysses, ring):
    """The bytes of the tensors one CFG velocity forward keeps for its backward (distinct storages, parameters
    included), under context parallelism U x R = world."""
    from models import backbones
    from training import parallel

    family = backbones.module(name)
    torch.manual_seed(0)
    model, latent, cond, uncond = family.random_policy(name, "cpu", torch.float32, 5, 32, 32, 5)
    parallel.enable(model, ulysses, ring, world, torch.device("cpu"), family.CP_PLAN)
    x = torch.randn(1, *latent, generator=torch.Generator().manual_seed(1))
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        family.velocity(model, x, 0.7, cond, uncond, 4.5)
    return sum(kept.values())


@pytest.mark.slow
def test_the_memory_estimate_counts_the_keys_and_values_hunyuans_ring_keeps():
    """HunyuanVideo-1.5's ring keeps every block's gathered keys and values for the backward (hunyuan.py Deviation
    10): what a process keeps beyond Ulysses' share, measured with saved-tensor hooks, is at least what
    estimate_memory adds for it (the estimate is a floor) and not much more (the text's queries, all heads)."""
    from models import backbones

    name = "tiny"
    backbones.module(name).random_policy(name, "cpu", torch.float32, 5, 32, 32, 5)  # imports done once, here
    measured = forked(saved_bytes_worker, 2, name, 1, 2) - forked(saved_bytes_worker, 2, name, 2, 1)
    estimate = lambda **split: backbones.estimate_memory(  # noqa: E731
        name, None, num_frames=5, height=32, width=32, num_steps=4, batch_size=1, micro_batch_size=1, lora_rank=4,
        lora_targets="attn", full=False, guidance=4.5, dtype=torch.float32, gradient_checkpointing=False,
        checkpointed_blocks=None, context_parallel=2, **split).activations
    estimated = estimate(ring_degree=2) - estimate(ring_degree=1)
    print(f"ring keeps {measured:,} bytes more than Ulysses; estimated {estimated:,}")
    assert 0 < estimated <= measured <= 1.25 * estimated


@pytest.mark.parametrize("argv, processes, kind, message", [
    (["--ulysses_degree", "2"], 3, DistributedType.MULTI_CPU, "--ulysses_degree 2 x --ring_degree 1 = 2 must divide "
                                                             "the number of processes (3)"),
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
    (["--backbone", "tiny", "--ulysses_degree", "2", "--ring_degree", "2", "--num_frames", "1", "--height", "8",
      "--width", "12"],
     "--ulysses_degree 2 x --ring_degree 2 must divide the 6 video tokens"),
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
    """On a GPU, diffusers' default (native) backend cannot merge ring attention's partial results (Wan2.1's ring is
    diffusers'); on CPU parallel.enable provides one; HunyuanVideo-1.5's ring (models/hunyuan.py) needs none."""
    from models import hunyuan
    from training import parallel

    assert parallel.check_ring(1, "cuda") is None
    assert "active backend is 'native'" in parallel.check_ring(2, "cuda")
    assert parallel.check_ring(2, "cpu") is None
    assert "needs a CUDA GPU" in parallel.check_ring(2, "mps")
    assert parallel.check_ring(2, "cuda", hunyuan.CP_PLAN) is None


def test_the_cpu_flash_kernel_gives_the_attention_its_log_sum_exp_and_its_gradients():
    """parallel.register_cpu_flash_attention (Deviations 6) against the closed form: softmax(q k^T / sqrt(d)) v, the
    log-sum-exp of the scores, and autograd's gradients of the attention, through the ops diffusers' ring calls."""
    from training import parallel

    parallel.register_cpu_flash_attention()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64).float().requires_grad_() for _ in range(3))
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5
    out_ref, lse_ref = scores.softmax(-1) @ v, scores.logsumexp(-1)
    grad_out = torch.randn_like(out_ref)
    ref = torch.autograd.grad((out_ref * grad_out).sum(), (q, k, v))
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
        q.detach(), k.detach(), v.detach())
    assert torch.allclose(out, out_ref, atol=1e-6) and torch.allclose(lse, lse_ref, atol=1e-6)
    assert (max_q, max_k) == (7, 7)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_out, q.detach(), k.detach(), v.detach(), out, lse, cum_q, cum_k, max_q, max_k, 0.0, False, seed, offset)
    for a, b in zip(grads, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
