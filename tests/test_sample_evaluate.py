"""sample.py and evaluate.py on one tiny trained run (CPU): sample.py reproduces the run's own validation
videos (base and trained) from the same seed, and evaluate.py's rows are paired (same prompts, seeds and
noise), so a zero adapter ties the base everywhere."""
import os
import re

import imageio.v3 as iio
import numpy as np
import pytest

import evaluate
import sample
import train
from models import backbones
from training import export, options

PROMPTS = ["a green frog leaping from one lily pad to another", "a purple jellyfish pulsing through dark blue water"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One training step with validation (seed 0): the run's folder holds samples/base_<i>.gif (before the
    update) and samples/step000001_<i>.gif (after it) for options.VALIDATION_PROMPTS."""
    out = tmp_path_factory.mktemp("run")
    train.main(options.parse_args(["--backbone", "tiny", "--max_steps", "1", "--group_size", "2",
                                 "--validation_steps", "1", "--output_dir", str(out)]))
    return out


def frames(path) -> np.ndarray:
    return iio.imread(path, index=None)  # (F, H, W, 3) uint8


def sample_validation_prompts(out, *args) -> list[str]:
    argv = ["--backbone", "tiny", "--seed", "0", "--output_dir", str(out), *map(str, args)]
    for prompt in options.VALIDATION_PROMPTS:  # in the run's order: video k has the noise of validation video k
        argv += ["--prompt", prompt]
    return sample.main(sample.parse_args(argv))


def test_sample_reproduces_the_runs_validation_videos(run, tmp_path):
    trained = sample_validation_prompts(tmp_path / "lora", "--lora", run)
    base = sample_validation_prompts(tmp_path / "base")
    for k in range(len(options.VALIDATION_PROMPTS)):
        # the base model from the run's seed and the same noise: the run's validation video before training
        assert np.array_equal(frames(base[k] + ".gif"), frames(run / "samples" / f"base_{k}.gif"))
        # with the run's adapter: its validation video after the step, and not the base one
        assert np.array_equal(frames(trained[k] + ".gif"), frames(run / "samples" / f"step000001_{k}.gif"))
        assert not np.array_equal(frames(trained[k] + ".gif"), frames(base[k] + ".gif"))
    assert frames(trained[0] + ".gif").shape == (5, 32, 32, 3)
    assert (tmp_path / "lora" / "contact_sheet.png").stat().st_size > 0
    try:
        import imageio_ffmpeg  # noqa: F401  (requirements.txt; without it the GIF is the video)
        assert os.path.getsize(trained[0] + ".mp4") > 0
    except ImportError:
        pass


@pytest.mark.slow  # a second run
def test_sample_reproduces_the_validation_of_a_run_with_a_solver(tmp_path):
    """A run whose rollouts (and so its validation) use UniPC in W + M calls: sample.py without solver options
    samples as that validation did (found by review: it used to fall back to Euler, frames up to 57 levels off)."""
    out = tmp_path / "run"
    train.main(options.parse_args(["--backbone", "tiny", "--max_steps", "1", "--group_size", "2", "--num_steps", "6",
                                   "--sde_window", "2", "--sde_window_start", "0", "--ode_solver", "unipc",
                                   "--ode_steps", "2", "--validation_steps", "1", "--output_dir", str(out)]))
    videos = sample_validation_prompts(tmp_path / "videos", "--lora", out)
    for k in range(len(options.VALIDATION_PROMPTS)):
        assert np.array_equal(frames(videos[k] + ".gif"), frames(out / "samples" / f"step000001_{k}.gif"))
    euler = sample_validation_prompts(tmp_path / "euler", "--lora", out, "--ode_solver", "euler")
    assert not np.array_equal(frames(euler[0] + ".gif"), frames(videos[0] + ".gif"))  # the solver matters here


def evaluation(out, *runs) -> dict:
    prompts = out.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return evaluate.main(evaluate.parse_args(["--backbone", "tiny", "--runs", *map(str, runs), "--prompts",
                                              str(prompts), "--seeds", "2", "--output_dir", str(out)]))


def test_evaluate_rows_are_paired_and_a_zero_adapter_ties_the_base(run, tmp_path):
    # an exported adapter with B = 0 (the gaussian init) on the run's base model: the base policy itself
    family = backbones.module("tiny")
    zero = family.load_backbone("tiny", seed=0)
    family.add_lora(zero.transformer, rank=4, alpha=8)
    export.write_lora(zero.transformer, str(tmp_path / "zero"))

    one = evaluation(tmp_path / "one", run)
    two = evaluation(tmp_path / "two", tmp_path / "zero", run)
    assert [r["name"] for r in two["rows"]] == ["base", str(tmp_path / "zero"), str(run)]
    assert one["rows"][0]["per_video"] == two["rows"][0]["per_video"]  # the base row does not depend on --runs
    assert one["rows"][1]["per_video"] == two["rows"][2]["per_video"]  # nor does a run's row
    assert len(one["rows"][0]["per_video"]["proxy"]) == len(PROMPTS) * 2
    for column, versus in two["rows"][1]["vs_base"]["proxy"].items():
        assert versus["win_rate"] == 0.5, column  # every (prompt, seed) pair ties
        lo, hi = versus["diff"]["ci95"]
        assert versus["diff"]["mean"] == 0 and lo <= 0 <= hi, column
    # the statistics of a row, recomputed from its per-video scores (prompt-major, seeds inner)
    totals = np.array(one["rows"][1]["per_video"]["proxy"])[:, 3].reshape(len(PROMPTS), 2)
    assert one["rows"][1]["scores"]["proxy"]["total"]["mean"] == pytest.approx(totals.mean(), abs=1e-12)
    assert one["rows"][1]["scores"]["proxy"]["total"]["se"] == pytest.approx(
        totals.mean(1).std(ddof=1) / np.sqrt(len(PROMPTS)), abs=1e-12)
    table = (tmp_path / "two" / "eval.md").read_text()
    assert "| base |" in table and f"| {tmp_path / 'zero'} |" in table and "0.500" in table
    assert (tmp_path / "two" / "eval.png").stat().st_size > 0


def test_evaluate_through_the_pipeline_records_the_scheduler_it_sampled_with(run, tmp_path):
    """--ode_solver pipeline samples with the weights folder's scheduler (its own shift), so evaluate.json records
    that scheduler's config, not the preset's shift, which the pipeline does not read."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    result = evaluate.main(evaluate.parse_args(["--backbone", "tiny", "--runs", str(run), "--prompts", str(prompts),
                                                "--seeds", "1", "--ode_solver", "pipeline",
                                                "--output_dir", str(tmp_path / "eval")]))
    assert result["settings"]["shift"] is None
    folder = backbones.module("tiny").load_backbone("tiny", seed=0).scheduler   # the tiny folder's scheduler
    assert folder["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert result["settings"]["pipeline_scheduler"] == folder


@pytest.mark.parametrize("script, args, message", [
    (sample, ["--backbone", "tiny", "--lora", "/no/such/run", "--prompt", "x"], "--lora /no/such/run: .* does not exist"),
    (sample, ["--backbone", "wan22", "--prompt", "x"], "unknown backbone"),
    (sample, ["--backbone", "tiny", "--prompts", "/no/such/file.txt"], "--prompts '/no/such/file.txt' does not exist"),
    (sample, ["--backbone", "tiny"], "no prompt"),
    (sample, ["--backbone", "tiny-wan", "--lora", "RUN", "--prompt", "x"], "trained on --backbone tiny, not tiny-wan"),
    (sample, ["--backbone", "tiny", "--transformer", "RUN", "--prompt", "x"], "holds a LoRA adapter: pass it as --lora"),
    (evaluate, ["--backbone", "tiny", "--runs", "/no/such/run"], "--runs /no/such/run: .* does not exist"),
    (evaluate, ["--backbone", "tiny-wan", "--runs", "RUN"], "trained on --backbone tiny, not tiny-wan"),
    (evaluate, ["--backbone", "tiny", "--runs", "RUN", "--prompts", "/no/such/file.txt"], "does not exist"),
    (evaluate, ["--backbone", "tiny", "--runs", "RUN", "--reward", "clip"], "unknown --reward 'clip'"),
    (sample, ["--backbone", "tiny", "--prompt", "x", "--sde", "sage", "--ode_solver", "unipc"], "use --sde ode"),
    (sample, ["--backbone", "tiny", "--prompt", "x", "--ode_solver", "pipeline", "--ode_steps", "2"], "drop --ode_steps"),
    (sample, ["--backbone", "tiny", "--prompt", "x", "--ode_steps", "9"], r"--ode_steps 9: model calls in 1\.\.4"),
    (evaluate, ["--backbone", "tiny", "--runs", "RUN", "--ode_steps", "0"], r"--ode_steps 0: model calls in 1\.\.4"),
])
def test_bad_input_fails_before_any_model_loads(run, tmp_path, monkeypatch, capsys, script, args, message):
    monkeypatch.setattr(sample, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    args = [str(run) if a == "RUN" else a for a in args]
    with pytest.raises(SystemExit) as exit_:
        script.cli([*args, "--output_dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("script", [sample, evaluate])
def test_adapter_keys_that_fit_no_layer_are_a_usage_error(tmp_path, capsys, script):
    """An adapter file in another key layout (kohya's lora_down / lora_up) passes resolve_weights' header check;
    diffusers' loader then warns and leaves the gaussian-init adapter (B = 0: the base policy, silently).
    export.load_policy refuses it, and the scripts say so in one line."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    family = backbones.module("tiny")
    trained = family.load_backbone("tiny", seed=0)
    family.add_lora(trained.transformer, rank=4, alpha=8)
    ours = export.write_lora(trained.transformer, str(tmp_path / "ours"))
    with safe_open(ours, "pt") as f:
        metadata = f.metadata()
    foreign = tmp_path / "foreign.safetensors"
    save_file({k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v
               for k, v in load_file(ours).items()}, str(foreign), metadata=metadata)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    args = (["--lora", str(foreign), "--prompt", PROMPTS[0]] if script is sample else
            ["--runs", str(foreign), "--prompts", str(prompts), "--seeds", "1"])
    with pytest.raises(SystemExit) as exit_:
        script.cli(["--backbone", "tiny", *args, "--output_dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.fullmatch(r"(sample|evaluate)\.py: error: --(lora|runs) \S+foreign.safetensors: .*32 adapter keys do not "
                        r"name this transformer's LoRA layers .*", err.strip().splitlines()[-1]), err
