"""Options (training/options.py): each bad value fails before any model is built, in one line that names the
option and what to do; the command line reads what a user types (negative numbers, type errors, no
abbreviations); --help says each thing once; the SDE window is drawn from --sde_window_range; a run that cannot
fit its device is refused with the estimate. The tables below are the checks, one row per case."""
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import sde
import train
from models import backbones
from training import options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolved(*argv):
    return options.resolve(options.parse_args(["--backbone", "tiny", *map(str, argv)]))


def cli_error(capsys, monkeypatch, *argv) -> str:
    """Runs train.py's command line, which must exit 2 without building a model; returns its stderr."""
    for name in ("tiny", "tiny-wan"):  # building any model now is the failure this guards against
        monkeypatch.setattr(backbones.module(name), "load_backbone", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        train.cli(["--backbone", "tiny", "--max_steps", "1", *map(str, argv)])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# Values that used to reach torch or numpy (a traceback after the models loaded) or were taken for options.
BAD_VALUES = [
    (["--dist_timeout", 10**14], "--dist_timeout 100000000000000: must be a number of seconds in 1..604800"),
    (["--seed", 2**32], "--seed 4294967296: must be an integer in 0..2**32-1"),
    (["--learning_rate", "1e308"], "--learning_rate 1e+308: must be a number in (0, 1]"),
    (["--learning_rate", "-1e-4"], "--learning_rate -0.0001: must be a number in (0, 1]"),  # parsed as a number
    (["--lora_targets", "mlp"], "--lora_targets 'mlp': choose one of ('attn', 'attn_ffn')"),
    (["--full", "--lora_targets", "attn_ffn"], "--lora_targets attn_ffn chooses LoRA layers; --full trains every"),
    (["--sde_window", 2, "--sde_window_range", "3,4"], "--sde_window_range '3,4': two step indices A,B with 0 <= A"),
    (["--sde_window", 2, "--sde_window_range", "0,9"], "--sde_window_range '0,9': every number must be in [0, 4]"),
    (["--sde_window", 2, "--sde_window_range", "0.5,3"], "--sde_window_range '0.5,3': two step indices"),
    (["--sde_window", 2, "--sde_window_start", 1, "--sde_window_range", "0,4"], "a fixed start is its own range"),
    (["--sde_window_range", "0,2"], "--sde_window_range '0,2' applies to --sde_window W > 0"),
]


@pytest.mark.parametrize("argv, message", BAD_VALUES)
def test_a_bad_value_is_one_line_naming_the_option(capsys, monkeypatch, argv, message, tmp_path):
    err = cli_error(capsys, monkeypatch, "--output_dir", tmp_path / "out", *argv)
    assert message in err, err
    assert err.count("\n") == 1, err  # one line, no traceback


@pytest.mark.parametrize("argv, message", [
    (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["--eta"], "argument --eta: expected one argument"),
])
def test_a_type_error_is_one_line_not_the_usage(capsys, monkeypatch, argv, message):
    err = cli_error(capsys, monkeypatch, *argv)
    assert message in err and err.count("\n") == 1, err  # argparse alone prints the 40-line usage first


def test_help_states_each_default_once_and_the_negations_have_their_own_text():
    text = options.OptionParser(options.Config).format_help()
    entries = re.split(r"\n  (?=--)", text)  # one entry per option
    twice = [e.split()[0] for e in entries if len(re.findall(r"default", e, re.IGNORECASE)) > 1]
    assert not twice, twice
    by_name = {e.split()[0]: " ".join(e.split()) for e in entries}
    assert "turn --equalizer off" in by_name["--no_equalizer,"]
    assert "gradient norm equalizer" not in by_name["--no_equalizer,"]
    assert not re.search(r"(?<!\.py )Deviations \d", re.sub(r"\s+", " ", text)), \
        "a Deviations reference without its file"


def test_the_default_window_range_is_the_first_half_and_every_draw_lies_inside():
    """issue 18.3: at K = 20 the step std falls from 0.66 to 0.05; a 'random' window is drawn in the first half
    of the stochastic steps (FlowGRPO-Fast's sde_window_range), and an explicit range is obeyed."""
    cfg = resolved("--num_steps", 20, "--sde_window", 2, "--max_steps", 50)
    k_s = int((sde.step_variances(sde.sigma_schedule(20, 3.0), "sage", 0.5) > 0).sum())
    assert cfg.sde_window_range == f"0,{math.ceil(k_s / 2)}"
    stochastic = torch.ones(20, dtype=torch.bool)
    starts = {int(train.sde_window(cfg, stochastic, step).nonzero()[0]) for step in range(200)}
    assert starts == set(range(0, math.ceil(k_s / 2) - 1)), starts  # every start that fits, and no other
    cfg = resolved("--num_steps", 20, "--sde_window", 3, "--sde_window_range", "5,12", "--max_steps", 50)
    starts = {int(train.sde_window(cfg, stochastic, step).nonzero()[0]) for step in range(200)}
    assert starts == set(range(5, 10)), starts
    sliding = resolved("--num_steps", 20, "--sde_window", 3, "--sde_window_range", "5,12", "--max_steps", 10,
                       "--sde_window_start", "sliding")
    path = [int(train.sde_window(sliding, stochastic, step).nonzero()[0]) for step in range(10)]
    assert path[0] == 5 and path[-1] == 9 and path == sorted(path), path  # slides through the range, in order
    assert resolved("--sde_window", 3, "--num_steps", 4).sde_window_range == "0,3"  # W wider than half: W steps


def test_the_window_range_is_part_of_the_run_identity():
    from training import checkpoint

    identity = lambda *a: checkpoint.run_identity(resolved("--sde_window", 1, *a), 1, "no", ["p"], ["v"])
    assert identity("--sde_window_range", "0,2") != identity("--sde_window_range", "1,3")


def test_a_run_that_cannot_fit_is_refused_by_train_py_before_the_output_folder_or_a_model(capsys, monkeypatch,
                                                                                            tmp_path):
    """train.py asks backbones.check_memory with its resolved options (here a device of 1 MiB) after the launch
    checks: a usage error of one line with the estimate, and neither a model nor the output folder is made."""
    monkeypatch.setattr(backbones, "available_memory", lambda device: (2**20, "a 1 MiB test device"))
    out = tmp_path / "out"
    err = cli_error(capsys, monkeypatch, "--output_dir", out)
    assert err.count("\n") == 1 and err.startswith("train.py: error: --backbone tiny needs at least ")
    assert "more than the 1.0 MiB of a 1 MiB test device: " in err and "To fit, " in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# Every bad option fails before any model is built, naming itself


BAD_OPTIONS = [
    (["--checkpointing_steps", "-1"], "--checkpointing_steps -1: must be an integer >= 0"),
    (["--validation_steps", "-1"], "--validation_steps -1: must be an integer >= 0"),
    (["--batch_size", "0"], "--batch_size 0: must be an integer >= 1"),
    (["--batch_size", "-4"], "--batch_size -4: must be an integer >= 1"),
    (["--micro_batch_size", "-1"], "--micro_batch_size -1: must be an integer >= 1"),
    (["--reward_batch_size", "0"], "--reward_batch_size 0: must be an integer >= 1"),
    (["--fps", "0"], "--fps 0: must be an integer >= 1"),
    (["--num_steps", "0"], "--num_steps 0: must be an integer >= 1"),
    (["--learning_rate", "-1"], "--learning_rate -1.0: must be a number in (0, 1]"),
    (["--lora_rank", "0"], "--lora_rank 0: must be an integer >= 1"),
    (["--eta", "nan"], "--eta nan: must be a finite number > 0"),
    (["--dist_timeout", "0"], "--dist_timeout 0: must be a number of seconds in 1..604800"),
    (["--sde", "cps", "--eta", "1.5"], "--sde cps --eta 1.5"),
    (["--curriculum_tau", "0.7,1.7"], "--curriculum_tau '0.7,1.7': every number must be in"),
    (["--static_weights", "0,0,0"], "--static_weights '0,0,0': at least one weight must be > 0"),
    (["--prompts", "{tmp}/binary.txt"], "--prompts '{tmp}/binary.txt' is not a UTF-8 text file"),
    (["--reward_prompt_template", "{tmp}/none.txt"], "--reward_prompt_template '{tmp}/none.txt' does not exist"),
    (["--output_dir", "{tmp}/readonly/run"], "--output_dir {tmp}/readonly/run is not writable"),
    (["--num_steps", "200"], "--sde sage --eta 0.5 --num_steps 200: sage step variances"),  # with tiny's shift 3
    (["--lr_warmup_steps", "5"], "--lr_warmup_steps 5 does nothing with --lr_scheduler constant"),
    (["--sde_window", "2", "--sde_window_start", "\u00b2"], "--sde_window_start '\u00b2': 'random', 'sliding' or an index"),
    (["--sde_window", "5"], "--sde_window 5: must be in 0..4"),
    (["--shared_prefix"], "--shared_prefix needs --sde_window"),
    (["--sde_window", "2", "--ode_solver", "rk4"], "--ode_solver 'rk4': choose one of ('euler', 'unipc')"),
    (["--ode_solver", "unipc"], "without a window every step is stochastic and trained: set --sde_window W"),
    (["--sde_window", "2", "--ode_steps", "0"], "--ode_steps 0: a number of model calls >= 1"),
    (["--sde_window", "1", "--sde_window_start", "0", "--ode_steps", "4"],  # 3 steps after the window
     "--ode_steps 4 with the window at stochastic step 0: 4 solver calls for 1 run(s) of 3 deterministic steps"),
    (["--num_steps", "6", "--sde_window", "2", "--sde_window_range", "0,6", "--ode_steps", "1"],  # a window inside
     "--ode_steps 1 with the window at stochastic step 1: 1 solver calls for 2 run(s) of 4 deterministic steps"),
    (["--optimizer", "sgd"], "--optimizer 'sgd': choose adamw or muon"),
    (["--report_to", "comet"], "--report_to 'comet': choose one of"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS)
def test_each_bad_option_fails_in_milliseconds_before_any_model(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "readonly").mkdir()
    os.chmod(tmp_path / "readonly", 0o500)
    if os.access(tmp_path / "readonly", os.W_OK):  # root ignores permission bits: use a file in the way instead
        os.chmod(tmp_path / "readonly", 0o700)
        os.rmdir(tmp_path / "readonly")
        (tmp_path / "readonly").write_text("a file where a folder should be")
    for name in ("tiny", "tiny-wan"):  # building any model now is the failure this test guards against
        monkeypatch.setattr(backbones.module(name), "load_backbone", lambda *a, **k: pytest.fail("a model was built"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    argv = ["--backbone", "tiny", "--max_steps", "1", "--output_dir", str(tmp_path / "out"), *args]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        train.cli(argv)
    assert time.perf_counter() - start < 5
    assert exit_info.value.code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


def test_unknown_and_abbreviated_options_are_usage_errors(capsys):
    for argv in (["--max_step", "3"], ["--no_such_option"]):
        with pytest.raises(SystemExit) as exit_info:
            options.parse_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"unrecognized arguments: {argv[0]}" in err and err.count("(see --help)") == 1
    assert options.parse_args(["--gradient_checkpointing"]).gradient_checkpointing is True  # a bare flag
    assert options.parse_args(["--gradient_checkpointing", "False"]).gradient_checkpointing is False


@pytest.mark.parametrize("args, error, message", [
    (["--backbone", "nope"], ValueError, "'nope': unknown backbone; choose one of"),
    (["--sde", "euler"], ValueError, "'euler': unknown SDE kind"),
    (["--curriculum", "random"], ValueError, "'random': unknown curriculum"),
    (["--num_frames", "6"], ValueError, re.escape("num_frames must be 2k+1")),
    (["--height", "30"], ValueError, "height and width must be positive multiples of 4"),
    (["--batch_size", "6"], ValueError, "must be a multiple of --group_size 4"),
    (["--group_size", "1"], ValueError, "--group_size 1 >= 2"),
    (["--prompts", "{tmp}/missing.txt"], ValueError, "does not exist"),
    (["--prompts", "{tmp}/empty.txt"], ValueError, "holds no prompts"),
    (["--resume_from_checkpoint", "{tmp}/nowhere"], ValueError, "is not a folder"),
    (["--reward", "videoalign"], ValueError, "needs --reward_prompt_template"),
    (["--eta", "0"], ValueError, "--eta 0.0: must be a finite number > 0"),
    (["--checkpointed_blocks", "1"], ValueError, "needs --gradient_checkpointing True"),
    (["--gradient_checkpointing", "True", "--checkpointed_blocks", "0"], ValueError, "must be >= 1"),
    (["--gradient_checkpointing", "True", "--checkpointed_blocks", "3"], ValueError, r"has 2 blocks; choose 1\.\.2"),
    (["--timestep_fraction", "1.5"], ValueError, "must be in"),
    (["--updates_per_rollout", "3"], ValueError, "must divide the 4 trained steps"),
    (["--updates_per_rollout", "2", "--anchor_every", "3"], ValueError, "a multiple of --updates_per_rollout 2"),
    (["--curriculum_tau", "0.7"], ValueError, "expected 2 comma-separated numbers"),
    (["--static_weights", "a,b,c"], ValueError, "expected 3 comma-separated numbers"),
    (["--backbone", "hunyuan15", "--reward", "proxy"], ValueError, "hf download"),  # offline, no weights
    (["--backbone", "hunyuan15", "--reward", "proxy", "--num_frames", "32"], ValueError, re.escape("4k+1")),
])
def test_bad_input_fails_early_with_advice(tmp_path, args, error, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(error, match=message):
        train.main(options.parse_args(["--backbone", "tiny", "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                                       *args]))


@pytest.mark.slow
def test_command_line_reports_a_bad_option(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--backbone", "hunyuan16"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2 and "--backbone 'hunyuan16': unknown backbone; choose one of" in done.stderr
