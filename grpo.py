"""The GRPO objective for a flow-matching policy: group advantages, the clipped surrogate, and the
per-step loss that the equalizer weights and the dual trust region enter.

Equations (SPEC §4)
-------------------
Group advantage, G samples of one prompt:
    A_i = (r_i - mean_G r) / (std_G r + 1e-6)   (population std), then clipped to [-5, 5]     (choice, Deviations 5)
Per trained step t of sample i, with logp from sde.log_prob and logp_old stored at rollout:
    rho   = exp(logp_theta - logp_old)
    l_pol = S_t max(-A rho, -A clip(rho, 1 - eps, 1 + eps))                                  [SAGE] Eq. 10
    l     = l_pol + lambda_KL (beta_pos KL_pos + beta_vel KL_vel)                             [SAGE] Eq. 14
and the loss is the mean of l over the trained (i, t) pairs.

Conventions
-----------
- Groups are consecutive: rows g*G .. g*G + G - 1 of a batch share a prompt. The caller makes sure a
  group is never split across processes, or gathers it first ([dist] in train.py).
- logp is the per-element *mean* log-density (sde.py), so a ratio far from 1 means a large move of the
  whole latent; hence eps_clip = 1e-4 in every reference implementation rather than PPO's 0.2.
- Every function returns per-sample, un-reduced tensors where weights must still be applied, and a
  stats dict of detached 0-d tensors for logging (STYLE rule 14; docs/training.md "Metrics"). They stay on the
  device so the training loop does not synchronise with the host once per step; the caller averages
  them and calls .item() once per iteration.

Deviations / choices
--------------------
1. A group with zero reward spread gets A = 0 exactly (not (r - mean) / 1e-6 of round-off).
2. A group containing a non-finite reward gets A = 0 for all its samples and is counted in
   a warning: it is reported and dropped, never turned into a number.
3. Which steps are trained: every stochastic step by default, in a random order per sample ([SAGE]);
   `timestep_fraction` < 1 trains a random subset per sample ([Dance] uses 0.6). Deterministic steps
   (V = 0) are never selected: they have no log-prob.
4. Clip fractions count where the clip is *active* (the gradient is zeroed): rho > 1 + eps with A > 0
   (high) and rho < 1 - eps with A < 0 (low). approx_kl is the k3 estimator mean(rho - 1 - log rho).
5. The advantage's std and epsilon are our choice; the references differ from it and from each other.
   [FlowGRPO]'s code divides by the population std + 1e-4; [Dance]'s code divides by the unbiased std
   (Bessel, G - 1) + 1e-8, which is sqrt(G / (G - 1)) larger than the population std, so its advantages
   are sqrt(G / (G - 1)) smaller (x0.87 at G = 4, x0.98 at G = 24). With rewards in [0, 1] and a typical
   group std of 1e-2, the epsilons change A by 1e-2 (FlowGRPO) to 1e-4 (ours) relative.
6. The number of trained steps is ceil(timestep_fraction x K_stochastic), counted over the stochastic
   steps only. The reference codes train int(K x fraction) steps of all K: for K = 16, fraction 0.6
   they train 9 steps, we train 10; for cps (last step deterministic) they would count a step that has
   no log-prob.

Run: `python -m pytest tests/test_grpo.py -q`.
"""
from __future__ import annotations

import math
import warnings

import torch

import sde
import trust_region


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float = 5.0, eps: float = 1e-6):
    """(N,) advantages, normalised within consecutive groups of `group_size`; see Deviations 1-2 and 5."""
    N = rewards.shape[0]
    if group_size < 1 or N % group_size != 0:
        raise ValueError(f"group size {group_size} does not divide the batch of {N} rewards")
    # Groups are consecutive rows: the G samples of one prompt share its text and differ only in noise,
    # so normalising within a group removes how easy the prompt is and keeps how good the sample is.
    r = rewards.float().view(-1, group_size)  # (B, G)
    finite = torch.isfinite(r).all(dim=1, keepdim=True)  # (B, 1)
    if not bool(finite.all()):
        warnings.warn(f"{int((~finite).sum())} group(s) have non-finite rewards; their advantages are set to 0")
    r = torch.where(finite, r, torch.zeros_like(r))  # keep NaN out of the mean/std below
    mean = r.mean(dim=1, keepdim=True)  # (B, 1)
    std = r.std(dim=1, unbiased=False, keepdim=True)  # (B, 1) population std, as [FlowGRPO] (Deviations 5)
    A = (r - mean) / (std + eps)  # (B, G)
    # A group whose samples all score alike carries no preference; eps alone would leave 0 / eps = 0
    # anyway, but the explicit zero also covers groups dropped for NaN.
    A = torch.where((std > 0) & finite, A, torch.zeros_like(A))  # zero spread or dropped -> exactly 0
    return A.clamp(-clip, clip).view(N)  # (N,)


def select_timesteps(num_samples: int, stochastic: torch.Tensor, fraction: float = 1.0, generator=None):
    """(N, K_train) step indices to train, a random order per sample over the stochastic steps.

    K_train = ceil(fraction * number of stochastic steps) (Deviations 6: the references take int(K * fraction)).
    Each row is a random permutation (or subset), so one forward pass over the batch mixes timesteps, which
    is why sde.py takes per-sample sigmas.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {fraction}")
    steps = torch.nonzero(stochastic.cpu(), as_tuple=True)[0]  # (K_s,)
    if len(steps) == 0:
        raise ValueError("no stochastic step to train: eta = 0 or kind 'ode' gives a deterministic policy")
    k_train = math.ceil(fraction * len(steps))
    # A random order per sample, so every micro-batch mixes noise levels and no update sees only the
    # high- or only the low-noise steps.
    order = torch.rand(num_samples, len(steps), generator=generator).argsort(dim=1)  # (N, K_s)
    return steps[order[:, :k_train]]  # (N, K_train)


def clipped_surrogate(logp, logp_old, A, clip_range: float):
    """(N,) PPO-clipped policy loss max(-A rho, -A clip(rho)) and its diagnostics."""
    # logp_old is a stored constant; at unchanged weights the ratio is exactly 1 and the gradient of
    # -A ratio is -A d logp, i.e. REINFORCE with the group advantage.
    ratio = torch.exp(logp - logp_old.detach())  # (N,)
    unclipped = -A * ratio
    clipped = -A * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    # The max of the two is PPO's pessimistic bound: once the ratio has left the band in the direction
    # A rewards, the clipped branch wins and its gradient is 0, so one batch cannot push a step far.
    loss = torch.maximum(unclipped, clipped)  # (N,) pessimistic bound [FlowGRPO]
    with torch.no_grad():
        log_ratio = logp.detach() - logp_old
        stats = {
            "ratio_mean": ratio.mean(),
            "ratio_dev_max": (ratio - 1).abs().max(),
            "clipfrac_high": ((ratio > 1 + clip_range) & (A > 0)).float().mean(),
            "clipfrac_low": ((ratio < 1 - clip_range) & (A < 0)).float().mean(),
            # k3 = (ratio - 1) - log ratio: an unbiased, non-negative estimate of KL(old || new).
            "approx_kl": (torch.expm1(log_ratio) - log_ratio).mean(),  # k3, >= 0
        }
    return loss, stats


def step_loss(logp, logp_old, A, weight, kl_pos, kl_vel, *, lambda_kl, beta_pos, beta_vel, clip_range):
    """Mean over the batch of one trained step's loss (SPEC §4-5) and its stats.

    weight: (N,) equalizer S_t of each sample's step (ones to disable). kl_pos / kl_vel: (N,) from
    trust_region.gaussian_kl, or None when their beta is 0. The equalizer scales the policy term only:
    it exists to balance reward gradients across noise levels, not to loosen the trust region.
    """
    # [SAGE] Eq. 14: L = S_t l_pol + lambda_KL (beta_pos KL_pos + beta_vel KL_vel). A KL term whose beta is 0
    # is absent (None) and costs nothing, which is how the Fig. 8 variants are expressed.
    l_pol, stats = clipped_surrogate(logp, logp_old, A, clip_range)
    loss = weight * l_pol  # (N,)
    zero = torch.zeros_like(loss)
    kl_pos = zero if kl_pos is None else kl_pos
    kl_vel = zero if kl_vel is None else kl_vel
    loss = loss + lambda_kl * (beta_pos * kl_pos + beta_vel * kl_vel)  # [SAGE] Eq. 14
    stats.update(
        policy_loss=(weight * l_pol).detach().mean(),
        kl_pos=kl_pos.detach().mean(),
        kl_vel=kl_vel.detach().mean(),
    )
    return loss.mean(), stats


def trained_step_loss(velocity_fn, traj, t, A, *, kind, eta, weight, mu_anchor, lambda_kl, beta_pos, beta_vel,
                      clip_range):
    """Loss of one trained step per sample: the inner-loop body shared by train.py and the toy.

    t: (N,) the step each sample trains now (column j of select_timesteps). weight: (K,) equalizer
    (ones to disable). mu_anchor: (N, ...) anchor means of those steps, column j of
    trust_region.anchor_means, or None when that returned None (then mu_old stands in for the anchor).
    """
    # One transformer forward per call: the policy's mean at the stored x_t, then everything else is
    # read from the rollout record (mu_old, logp_old) or was computed at rollout time (mu_anchor).
    policy = sde.policy_step(velocity_fn, traj, t, kind, eta)  # mu, std, logp of the current weights
    stored = traj.at(t)  # mu_old, logp_old of the rollout policy
    # One variance for theta, anchor and old policy: V_t depends on the schedule only.
    kl_pos, kl_vel = trust_region.kl_terms(policy.mu, stored.mu_old, mu_anchor, policy.std**2, beta_pos, beta_vel)
    return step_loss(policy.logp, stored.logp_old, A, weight.to(t.device)[t], kl_pos, kl_vel, lambda_kl=lambda_kl,
                     beta_pos=beta_pos, beta_vel=beta_vel, clip_range=clip_range)
