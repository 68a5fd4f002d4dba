"""The toy's claims, measured on one `--quick` run (about 20 s on 2 cores) with a fixed seed.

Margins were set from the measured quick-run values (in comments) with slack."""
import json
import math
import os

import pytest

from toy import run as toy_run

FIGURES = ["1_fan.png", "2_frontier.png", "3_variance.png", "4_training.png", "5_samples.png"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    summary = toy_run.main(["--quick", "--out", str(out), "--cache", str(out / "cache")])
    return out, summary


def _finite(obj):
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


def test_quick_run_writes_every_figure_and_a_finite_json(quick):
    out, summary = quick
    for name in FIGURES:
        assert os.path.getsize(out / name) > 10_000, name
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk["variants"]) == {v.name for v in toy_run.VARIANTS}
    assert _finite(on_disk)


def test_grpo_is_on_policy_at_the_first_recomputed_ratio(quick):
    for name, v in quick[1]["variants"].items():
        assert v["first_ratio_dev"] == 0.0, name


def test_sage_raises_the_reward_over_the_base_policy(quick):
    s = quick[1]
    assert s["variants"]["sage"]["total_equal_weights"] > s["base_ode"]["total_equal_weights"] + 0.15  # 0.61 vs 0.36


def test_trust_region_stops_reward_hacking(quick):
    v = quick[1]["variants"]
    # Semantic-heavy weights: without a trust region the policy leaves the ring for the hackable score.
    assert v["hack_no_tr"]["offring"] > 2 * v["hack_dual_tr"]["offring"]  # 0.56 vs 0.11
    assert v["hack_no_tr"]["visual"] < 0.5 * v["hack_dual_tr"]["visual"]


def test_moving_anchor_learns_more_than_a_fixed_anchor_at_the_same_lambda(quick):
    v = quick[1]["variants"]
    assert v["sage"]["total_equal_weights"] > v["sage_fixed_anchor"]["total_equal_weights"] + 0.1  # 0.61 vs 0.40


def test_curriculum_moves_weight_from_visual_to_semantic(quick):
    h = quick[1]["variants"]["sage_curriculum"]["history"]
    assert h["w_visual"][-1] < h["w_visual"][0] - 0.2
    assert h["w_semantic"][-1] > h["w_semantic"][0]
    assert h["stage"][-1] > h["stage"][0]


def test_sage_lands_closer_to_the_ring_than_flow_with_the_exact_velocity(quick):
    off = quick[1]["offring_eta0.5_K20_shift3"]
    assert off["sage"] < 0.85 * off["flow"]  # 0.046 vs 0.063
