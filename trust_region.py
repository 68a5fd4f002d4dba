"""The dual trust region of [SAGE]: a KL to a periodically moving anchor (position) plus a KL to the
policy that generated the batch (velocity), with a two-stage KL coefficient.

Equations (SPEC §5, [SAGE] Eq. 11-14)
-------------------------------------
Two Gaussian policies of the same step share the variance V_t (it depends on the schedule only), so
    KL(N(mu, V) || N(mu_ref, V)) = (mu - mu_ref)^2 / (2 V)   per element,
and we average it over the elements of a sample, like the log-prob (sde.py):
    KL_pos = mean (mu_theta - mu_anchor)^2 / (2 V_t)     anchor refreshed every `anchor_every` updates
    KL_vel = mean (mu_theta - mu_old)^2 / (2 V_t)        mu_old stored by the rollout
    lambda_KL(u) = linear ramp from 1e-7 to 1e-5 over the first `ramp_steps` updates, then constant

The variants of [SAGE] Fig. 8 are settings, not code paths:
    none          beta_pos = 0, beta_vel = 0
    fixed         beta_pos = 1, beta_vel = 0, anchor_every = 0   (the classic KL to the reference model)
    step-wise     beta_pos = 0, beta_vel = 0.1
    moving        beta_pos = 1, beta_vel = 0, anchor_every = 10
    dual moving   beta_pos = 1, beta_vel = 0.1, anchor_every = 10   (default)

Conventions
-----------
- mu_anchor is computed at rollout time for every stored (x_t, t) that will be trained, by swapping the
  anchor's weights into the live model under no_grad (`anchor_means`). The inner training loop never
  runs the anchor; it reads mu_anchor[:, j] for the j-th trained step column and calls `kl_terms`.
- The anchor holds a copy of the *trainable* parameters only: the LoRA adapter tensors with LoRA, all
  weights with full fine-tuning. Frozen weights are shared, so LoRA needs no second model.
- An "update" is one optimizer step. Right after a refresh the anchor equals the current weights, and
  `MovingAnchor.is_current` lets the caller skip the anchor forward (mu_anchor = mu_old then).

Deviations / choices
--------------------
1. KL_vel uses the closed-form Gaussian KL to mu_old (SPEC §5 choice). The [SAGE] code uses the
   one-sample estimate mean(logp_old - logp_theta); both vanish on-policy and differ only once a
   rollout batch feeds several optimizer steps.
2. lambda_KL follows the two-stage ramp; [SAGE]'s adaptive x0.9 / x1.1 controller is not implemented.
3. The swap copies tensors in place one parameter at a time (extra memory: the largest parameter), so
   it also works for FSDP-sharded parameters, each process swapping its own shards.
4. With anchor_every > 0 the first anchor is still the pretrained policy; it first moves after
   `anchor_every` updates.
5. The KL's scale differs between the codes, so beta and lambda_KL do not transfer between them as numbers:
   - [SAGE]'s code divides the squared mean difference by 2 (V + 1e-6); we divide by 2 V. The two agree
     to 1e-6 / V relative: 0.3 % at the smallest V of eta 0.5, K 20, shift 1 (V = 3e-4), 0.02 % at shift 5.
   - [FlowGRPO]'s KL for its flow SDE divides by 2 std_dev^2 with std_dev^2 = eta^2 sigma / (1 - sigma), the
     per-unit-time variance, not V = std_dev^2 Delta. Its KL is therefore Delta_t times ours (about 1/K of
     it per step), and a [FlowGRPO] beta corresponds to roughly beta / K here.
   tests/test_trust_region.py replays both forms against `gaussian_kl`.

Run: `python -m pytest tests/test_trust_region.py -q`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from torch import nn

import sde


def gaussian_kl(mu: torch.Tensor, mu_ref: torch.Tensor, var) -> torch.Tensor:
    """(N,) KL(N(mu, var) || N(mu_ref, var)) per element, averaged over non-batch elements."""
    var = torch.as_tensor(var, dtype=torch.float32, device=mu.device)
    var = var.reshape(var.shape + (1,) * (mu.dim() - var.dim())) if var.dim() == 1 else var  # (N,1,..)
    # Both Gaussians share the variance V_t (it depends on the schedule, not the weights), so the KL
    # reduces to the squared distance of the means over 2 V_t: closed form, no sampling noise. The
    # reference is detached: the trust region pulls the policy, never the anchor.
    kl = (mu.float() - mu_ref.detach().float()) ** 2 / (2 * var)  # 2 V, not 2 V^2 (SPEC §5)
    return kl.flatten(1).mean(dim=1)  # (N,)


def kl_terms(mu, mu_old, mu_anchor, var, beta_pos: float, beta_vel: float):
    """(KL_pos, KL_vel) of one trained step, each (N,), or None where its beta is 0 (the term is absent).

    mu: (N, ...) the policy's mean, with gradient. mu_old: (N, ...) the rollout policy's mean. mu_anchor:
    (N, ...) the anchor's mean from `anchor_means`, or None when the anchor equals the rollout policy (right
    after a refresh), in which case mu_old is the anchor's mean. var: (N,) or scalar V_t.
    """
    # A beta of 0 is the off switch of [SAGE] Fig. 8's variants: no term, no cost (SPEC §5).
    anchor = mu_old if mu_anchor is None else mu_anchor
    kl_pos = gaussian_kl(mu, anchor, var) if beta_pos > 0 else None  # position term (SPEC §5)
    kl_vel = gaussian_kl(mu, mu_old, var) if beta_vel > 0 else None  # velocity term (Deviations 1)
    return kl_pos, kl_vel


@torch.no_grad()
def anchor_means(anchor: "MovingAnchor", velocity_for: Callable, traj: sde.Trajectory, steps: torch.Tensor,
                 kind: str, eta: float, micro_batches: Sequence[slice], beta_pos: float):
    """(N, K_train, ...) the anchor policy's mean at every trained (sample, step), or None if not needed.

    The anchor pass of the update phase, run once per rollout before any optimizer step. steps: (N, K_train)
    from grpo.select_timesteps. velocity_for(mb) returns the velocity function of micro-batch mb (a slice
    of the N samples; for a video model it binds that micro-batch's prompt embeddings). Returns None when
    beta_pos = 0 (no position term) or the anchor equals the live weights (then mu_old is its mean, which
    `kl_terms` uses for None). Column j of the result pairs with column j of `steps`.
    """
    if beta_pos == 0 or anchor.is_current:
        return None
    parts = []
    with anchor.swapped_in():
        # Micro-batch outer, step inner: the velocity function (and for video its CFG batch) is built once
        # per micro-batch, and one forward sees a single micro-batch at one step column, as in training.
        for mb in micro_batches:
            rows, velocity = traj.rows(mb), velocity_for(mb)
            mus = [sde.policy_step(velocity, rows, steps[mb, j], kind, eta).mu for j in range(steps.shape[1])]
            parts.append(torch.stack(mus, dim=1))  # (n_mb, K_train, ...)
    return torch.cat(parts)  # (N, K_train, ...)


def kl_coefficient(update: int, start: float = 1e-7, end: float = 1e-5, ramp_steps: int = 100) -> float:
    """Two-stage lambda_KL: linear from `start` to `end` over `ramp_steps` updates, then `end`.

    A tiny coefficient early lets the policy leave the pretrained point at all; the full one later
    holds it near the anchor once rewards start to be exploitable ([SAGE] §4.3).
    """
    if ramp_steps <= 0:
        return end
    # Linear in the update count, so a resumed run (which restores the count) continues the same ramp.
    frac = min(update / ramp_steps, 1.0)
    return start + frac * (end - start)


class MovingAnchor:
    """A snapshot of a module's trainable parameters that is refreshed every `anchor_every` updates.

    anchor_every = 0 keeps the first snapshot forever (a fixed reference policy).
    """

    def __init__(self, module: nn.Module, anchor_every: int):
        if anchor_every < 0:
            raise ValueError(f"anchor_every must be >= 0 (0 = fixed anchor), got {anchor_every}")
        self.anchor_every = anchor_every
        # Only the trainable tensors: with LoRA the anchor is a few tens of MB of adapter weights, not a
        # second 8 B model; the frozen base weights are shared by construction.
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the module has no trainable parameters to anchor")
        self.snapshot = [p.detach().clone() for p in self.params]
        self.num_updates = 0  # optimizer steps seen
        self.num_refreshes = 0
        # is_current lets the caller skip the anchor's forward passes right after a refresh: the anchor's
        # means then equal mu_old, which the rollout already stored.
        self.is_current = True  # the snapshot equals the live weights

    @torch.no_grad()
    def refresh(self) -> None:
        # Copied into the existing snapshot tensors, not new ones, so they keep their device, dtype and
        # (under FSDP2) sharding, and no memory is allocated at a refresh.
        for s, p in zip(self.snapshot, self.params):
            s.copy_(p.detach())
        self.num_refreshes += 1
        self.is_current = True

    def step(self) -> bool:
        """Call after every optimizer step. Returns True when the anchor was refreshed."""
        self.num_updates += 1
        self.is_current = False
        # The anchor moves with the policy every anchor_every updates: KL_pos bounds the drift within one
        # period instead of the distance from the pretrained model, which a fixed anchor would (SPEC §5).
        if self.anchor_every > 0 and self.num_updates % self.anchor_every == 0:
            self.refresh()
            return True
        return False

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """Inside the block the module computes with the anchor's weights; they are swapped back after."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for s, p in zip(self.snapshot, self.params):
            # Swapping in place keeps the module, its hooks and any FSDP/DDP wrapping untouched; the extra
            # memory is one parameter at a time.
            buf = p.detach().clone()  # one parameter at a time (Deviations 3)
            p.detach().copy_(s)
            s.copy_(buf)

    def state_dict(self) -> dict:
        """Plain CPU tensors; under FSDP2 each process's own shard (DTensor.to_local), saved per process."""
        return {
            "snapshot": [_local(s).detach().cpu() for s in self.snapshot],
            "num_updates": self.num_updates,
            "num_refreshes": self.num_refreshes,
            "is_current": self.is_current,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if len(state["snapshot"]) != len(self.snapshot):
            raise ValueError(
                f"anchor checkpoint holds {len(state['snapshot'])} tensors, the model has {len(self.snapshot)} "
                f"trainable ones: was it saved with a different LoRA / full fine-tuning setting?"
            )
        for s, saved in zip(self.snapshot, state["snapshot"]):
            _local(s).copy_(saved)
        self.num_updates = state["num_updates"]
        self.num_refreshes = state["num_refreshes"]
        self.is_current = state["is_current"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of an FSDP2 DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t
