"""Loss properties of grpo.py: normalisation, clipping directions, the REINFORCE limit, step selection."""

import pytest
import torch

import grpo


def test_advantages_zero_mean_unit_std_per_group():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 11.0])
    A = grpo.group_advantages(r, 4).view(2, 4)
    assert torch.allclose(A.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(A.std(1, unbiased=False), torch.ones(2), atol=1e-4)
    g = r[:4]
    assert torch.allclose(A[0], (g - g.mean()) / (g.std(unbiased=False) + 1e-6))


def test_zero_spread_group_gives_exactly_zero_and_clip():
    r = torch.full((3,), 0.1)  # 0.1 is not exact in binary: round-off must not leak through
    assert torch.equal(grpo.group_advantages(r, 3), torch.zeros(3))
    outlier = torch.zeros(64)
    outlier[0] = 1.0  # unclipped A = 7.9
    assert grpo.group_advantages(outlier, 64)[0] == 5.0


def test_nonfinite_group_is_dropped_with_a_warning_and_bad_group_size_fails():
    r = torch.tensor([1.0, float("nan"), 2.0, 0.0, 1.0, 2.0])
    with pytest.warns(UserWarning, match="non-finite"):
        A = grpo.group_advantages(r, 3)
    assert torch.equal(A[:3], torch.zeros(3)) and torch.isfinite(A).all() and A[3:].abs().sum() > 0
    with pytest.raises(ValueError, match="does not divide"):
        grpo.group_advantages(torch.zeros(6), 4)


def _grad_of_surrogate(ratio_value, A_value, clip=1e-4):
    logp = torch.tensor([0.0], requires_grad=True)
    logp_old = torch.tensor([-torch.log(torch.tensor(ratio_value)).item()])
    loss, _ = grpo.clipped_surrogate(logp, logp_old, torch.tensor([A_value]), clip)
    loss.sum().backward()
    return logp.grad.item()


def test_clipping_zeroes_the_gradient_outside_the_band_in_the_direction_of_A():
    # A > 0 wants the ratio up: beyond 1 + eps it is clipped, below 1 - eps it still pushes.
    assert _grad_of_surrogate(1.01, 1.0) == 0
    assert _grad_of_surrogate(0.99, 1.0) < 0
    # A < 0 wants the ratio down: below 1 - eps it is clipped, above 1 + eps it still pushes.
    assert _grad_of_surrogate(0.99, -1.0) == 0
    assert _grad_of_surrogate(1.01, -1.0) > 0


def test_at_ratio_one_the_gradient_is_reinforce():
    torch.manual_seed(0)
    theta = torch.randn(5, requires_grad=True)
    feats = torch.randn(8, 5)
    A = torch.randn(8)
    logp = feats @ theta  # a toy differentiable log-prob
    loss, stats = grpo.clipped_surrogate(logp, logp.detach(), A, 1e-4)
    (g_loss,) = torch.autograd.grad(loss.mean(), theta)
    (g_reinforce,) = torch.autograd.grad(-(A * (feats @ theta)).mean(), theta)
    assert torch.allclose(g_loss, g_reinforce, atol=1e-6)
    assert stats["ratio_mean"] == 1 and stats["clipfrac_high"] == 0 and stats["approx_kl"] == 0


def test_step_loss_assembles_the_equation():
    logp, logp_old = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 1e-3, -1e-3])
    A, S = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([2.0, 0.5, 1.0])
    kl_pos, kl_vel = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1.0, 2.0, 3.0])
    loss, stats = grpo.step_loss(logp, logp_old, A, S, kl_pos, kl_vel, lambda_kl=1e-2, beta_pos=1.0,
                                  beta_vel=0.1, clip_range=1e-4)
    ratio = torch.exp(logp - logp_old)
    pol = torch.maximum(-A * ratio, -A * ratio.clamp(1 - 1e-4, 1 + 1e-4))
    expected = (S * pol + 1e-2 * (kl_pos + 0.1 * kl_vel)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["kl_pos"].item() == pytest.approx(0.2)


def test_select_timesteps_permutes_stochastic_steps_per_sample():
    stochastic = torch.tensor([True] * 9 + [False])  # e.g. cps: last step deterministic
    idx = grpo.select_timesteps(16, stochastic, 1.0, torch.Generator().manual_seed(0))
    assert idx.shape == (16, 9)
    assert all(sorted(row.tolist()) == list(range(9)) for row in idx)
    assert len({tuple(row.tolist()) for row in idx}) > 1  # a random order per sample
    sub = grpo.select_timesteps(16, stochastic, 0.6, torch.Generator().manual_seed(0))
    assert sub.shape == (16, 6) and (sub < 9).all()
    assert all(len(set(row.tolist())) == 6 for row in sub)
    with pytest.raises(ValueError, match="no stochastic step"):
        grpo.select_timesteps(4, torch.zeros(5, dtype=torch.bool))


def test_advantage_normalisation_differs_from_the_reference_codes_as_documented():
    """Deviations 5: [Dance]'s unbiased std makes A sqrt(G / (G - 1)) smaller; [FlowGRPO]'s eps is 1e-4."""
    r = torch.tensor([0.2, 0.5, 0.9, 0.4])  # G = 4
    ours = grpo.group_advantages(r, 4)
    dance = (r - r.mean()) / (r.std(unbiased=True) + 1e-8)
    flowgrpo = (r - r.mean()) / (r.std(unbiased=False) + 1e-4)
    assert torch.allclose(ours / dance, torch.full((4,), (4 / 3) ** 0.5), rtol=1e-5)
    assert torch.allclose(ours / flowgrpo, torch.full((4,), 1 + (1e-4 - 1e-6) / r.std(unbiased=False).item()), rtol=1e-5)


def test_trained_step_count_is_ceil_over_stochastic_steps():
    """Deviations 6: K = 16 dance, fraction 0.6 -> ceil(9.6) = 10 (the references' int(16 x 0.6) = 9);
    cps K = 10 has 9 stochastic steps: fraction 0.5 -> ceil(4.5) = 5, never the deterministic last step."""
    assert grpo.select_timesteps(2, torch.ones(16, dtype=torch.bool), 0.6).shape == (2, 10)
    cps = torch.tensor([True] * 9 + [False])
    idx = grpo.select_timesteps(2, cps, 0.5)
    assert idx.shape == (2, 5) and (idx < 9).all()
