"""benchmark.py's SDE-window comparison counts the forward rows the README formula gives (counts, not times),
and bad options are refused before any model is built."""
import sys
from types import SimpleNamespace

import pytest
import torch

import sde
from models import backbones
from bench import benchmark


def test_window_comparison_rows_follow_the_formula(capsys):
    G, K, widths = 2, 3, [1]
    family, preset = backbones.module("tiny"), backbones.preset("tiny")   # micro-batch None: all G in one forward
    model, latent, cond1, negative = family.random_policy("tiny", torch.device("cpu"), torch.float32, 5, 32, 32, 8)
    params = family.add_lora(model, rank=4, alpha=4)
    x_T = torch.randn(G, *latent, generator=torch.Generator().manual_seed(0))
    M = 2   # the K - W steps before each window in 2 UniPC calls
    args = SimpleNamespace(micro_batch_size=None, shared_prefix=True, window_rounds=1, ode_solver="unipc", ode_steps=M)
    out = benchmark.compare_windows(args, widths, family, model, params, preset, cond1.repeat_interleave(G), negative,
                                    x_T, sde.sigma_schedule(K, 3.0), torch.device("cpu"))
    cfg = 2   # every forward row is doubled by the negative prompt
    assert out["full"]["rows"] == {"rollout": cfg * K * G, "anchor": cfg * K * G, "train": cfg * K * G}
    for W in widths:
        # only the window is trained and needs anchor means: W/K of the full run's rows; one backward per step
        assert out[f"window {W}"]["rows"] == {"rollout": cfg * K * G, "anchor": cfg * W * G, "train": cfg * W * G}
        assert out[f"window {W}"]["backwards"] == W
        # the shared prefix (the window at the last start) runs its K - W ODE steps once per group
        assert out[f"window {W} shared prefix"]["rows"]["rollout"] == cfg * ((K - W) * G // G + W * G)
        # the solver: M calls instead of K - W before the window, per sample, or per group with the shared prefix
        assert out[f"window {W} unipc M={M}"]["rows"] == {"rollout": cfg * (M + W) * G, "anchor": cfg * W * G,
                                                         "train": cfg * W * G}
        assert out[f"window {W} shared unipc M={M}"]["rows"]["rollout"] == cfg * (M + W * G)
    printed = capsys.readouterr().out   # one ratio line per window setup, measured side by side
    assert all(f"{label} / full: " in printed for label in out if label != "full")


@pytest.mark.parametrize("argv, option", [
    (["--windows", "0"], "--windows"), (["--windows", "2,x"], "--windows"), (["--shared_prefix"], "--shared_prefix"),
    (["--train_variants", "3:ckpt"], "--train_variants"), (["--modes", "lora,half"], "--modes"),
    (["--micro_batch_size", "3"], "--micro_batch_size"), (["--ode_steps", "2"], "--ode_steps"),
    (["--num_steps", "4", "--windows", "2", "--ode_steps", "3"], "--ode_steps"),
    (["--ring_degree", "0"], "--ring_degree"),
])
def test_bad_options_are_refused_before_any_model(monkeypatch, argv, option):
    monkeypatch.setattr(sys, "argv", ["benchmark.py", *argv])
    with pytest.raises(SystemExit, match=option):
        benchmark.check_args(benchmark.parse_args())
