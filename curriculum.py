"""Self-paced reward curriculum ([SPG]): mixes three reward components into one scalar per video, with
weights that move from visual fidelity to temporal coherence to text-video alignment as the generator
improves, tilted within each group toward the components that still tell its samples apart.

Equations (SPEC §6)
-------------------
Per prompt group of G videos, component scores r_j^i in [0, 1], j = 1..3 (visual, temporal, semantic):
    rbar_j = (1/G) sum_i r_j^i                                                     [SPG] v4 Eq. 4
    S_j    = (sqrt(G) - ||r_j||_1 / ||r_j||_2) / (sqrt(G) - 1),  S_4 = 0           [SPG] v4 Eq. 5 (Hoyer)
    g_j    = h(rbar_j - tau_j) + beta (S_j - S_{j+1}),  h(x) = sigmoid(k x)         [SPG] v4 Eq. 6
    w_j    = softmax_j(g_j);   rtilde_i = sum_j w_j r_j^i                           [SPG] v4 Eq. 7-8
Three variants share one interface, `reward(scores, G) -> (rtilde, stats)` plus `update(batch_mean)`:
    static      fixed weights (baseline; [SAGE] Setting B uses VQ 0.5, MQ 0.5, TA 1.0)
    taros       the v4 equations above, literally
    self_paced  (default) the v1 stage reading:
        competence c_j = EMA over iterations of the batch-mean score of component j
        gates      p_1 = h(c_1 - tau_1),  p_2 = h(c_2 - tau_2)
        stages     g = (1 - p_1,  p_1 (1 - p_2),  p_1 p_2)         soft "which stage are we in"
        weights    w = (1 - floor) g + floor / 3                   a mastered component is not forgotten
        per group  w_j <- w_j exp(beta (S_j - S_{j+1})) / Z        "dynamic grouping evaluation"

Conventions
-----------
- scores: (N, 3) in [0, 1], columns in COMPONENTS order; groups are consecutive rows of size G.
- `reward` is a pure function of the scores and the current state; `update` changes the state once per
  iteration (rollout batch) with the batch mean gathered over all processes, so every process holds the same
  curriculum (train.py calls it after a [dist] gather).

Deviations / choices
--------------------
1. self_paced is our reading of the v1 abstract (SPEC §6 choice): v1 publishes no equations, v4
   publishes the taros equations, which do not by themselves move focus from visual to semantic.
2. h(x) = sigmoid(k x) with a steepness k (default 20); with k = 1 the taros weights stay near uniform
   on [0, 1] rewards. [SPG] does not state k.
3. A third threshold for taros: tau_3 = tau_2 (the paper lists two for HunyuanVideo).
4. The Hoyer measure of an all-zero vector (and of G = 1) is defined as 0: no spread to exploit.
5. Competence starts at the first observed batch mean, not at 0, so the first stages are not decided
   by an arbitrary initial value; the EMA decay is 0.9 per iteration.
6. Thresholds are absolute scores in [0, 1]; the toy sets them relative to the base policy's scores.
7. Hoyer S_j uses the raw scores; the Hoyer measure is scale invariant, so sigmoid-mapped scores
   that sit near a constant give S near 0, which is the intended "no longer separates" signal.
8. A component whose batch mean is not finite (its reward model failed on every sample) leaves its
   competence unchanged, with a warning; the samples' own NaN scores already zero their groups' advantages.
9. train.py folds each iteration's batch mean into the competence before mixing that iteration's rewards,
   so the weights respond to the batch they score; the toy does the same.

Run: `python -m pytest tests/test_curriculum.py -q`.
"""
from __future__ import annotations

import math
import warnings

import torch

# The three reward components, in the order of the curriculum's stages (visual fidelity, then temporal
# coherence, then text-video alignment). Every scorer returns its scores in this order (rewards.py).
COMPONENTS = ("visual", "temporal", "semantic")


def hoyer_sparsity(r: torch.Tensor) -> torch.Tensor:
    """Hoyer sparsity over the last dim: 0 for a constant vector, 1 for a one-hot ([SPG] v4 Eq. 5)."""
    G = r.shape[-1]
    if G < 2:
        return torch.zeros(r.shape[:-1], dtype=r.dtype, device=r.device)
    # ||r||_1 / ||r||_2 runs from 1 (one non-zero entry) to sqrt(G) (all equal); the affine map turns it
    # into 0 for "every sample scores alike" and 1 for "one sample stands out". It is scale invariant, so
    # components on different score scales compare fairly.
    l1, l2 = r.abs().sum(-1), r.norm(dim=-1)  # (...,)
    ratio = torch.where(l2 > 0, l1 / l2.clamp(min=1e-12), torch.full_like(l1, math.sqrt(G)))
    return (math.sqrt(G) - ratio) / (math.sqrt(G) - 1)  # (...,) Deviations 4: zero vector -> 0


def _hoyer_diff(S: torch.Tensor) -> torch.Tensor:
    """(..., 3) S_j - S_{j+1} with S_4 = 0: favour a component that separates more than the next."""
    # The components are ordered by difficulty; a component gains weight when it separates the group
    # better than the next one does, so the curriculum does not push a component that has gone flat.
    return S - torch.cat([S[..., 1:], torch.zeros_like(S[..., :1])], dim=-1)


def _groups(scores: torch.Tensor, G: int) -> torch.Tensor:
    N = scores.shape[0]
    if scores.dim() != 2 or scores.shape[1] != len(COMPONENTS):
        raise ValueError(f"scores must be (N, {len(COMPONENTS)}) in order {COMPONENTS}, got {tuple(scores.shape)}")
    if G < 1 or N % G != 0:
        raise ValueError(f"group size {G} does not divide the batch of {N} samples")
    # Same layout as grpo.group_advantages: G consecutive rows are one prompt's group.
    return scores.float().view(N // G, G, -1)  # (B, G, 3)


def _group_stats(r: torch.Tensor, w: torch.Tensor, S: torch.Tensor) -> dict:
    """Logged per step for every variant (SPEC §6): weights, Hoyer S, within-group std per component."""
    stats = {}
    for j, name in enumerate(COMPONENTS):
        stats[f"w/{name}"] = w[..., j].mean().item()
        stats[f"hoyer/{name}"] = S[..., j].mean().item()
        stats[f"group_std/{name}"] = r[..., j].std(dim=1, unbiased=False).mean().item()
    return stats


def taros_weights(r: torch.Tensor, tau, beta: float = 0.3, k: float = 20.0):
    """[SPG] v4 Eq. 4-7 for one group r (G, 3) -> (w (3,), g (3,)); batched groups (B, G, 3) work too."""
    tau = torch.as_tensor(tau, dtype=r.dtype, device=r.device)
    if tau.numel() == 2:
        tau = torch.cat([tau, tau[-1:]])  # Deviations 3: tau_3 = tau_2
    # g_j = gate(mean score - threshold) + beta x (Hoyer difference): a component is emphasised once the
    # group is good at it ("mastered") and while it still tells the samples apart.
    rbar = r.mean(dim=-2)  # (..., 3)                                       Eq. 4
    S = hoyer_sparsity(r.transpose(-1, -2))  # (..., 3) over the G samples    Eq. 5
    g = torch.sigmoid(k * (rbar - tau)) + beta * _hoyer_diff(S)  # (..., 3)  Eq. 6
    return torch.softmax(g, dim=-1), g  # Eq. 7


class StaticCurriculum:
    """Fixed weights (normalised to sum to 1): the baseline without a curriculum."""

    def __init__(self, weights=(1.0, 1.0, 1.0)):
        w = torch.as_tensor(weights, dtype=torch.float32)
        # Normalised so the mixed reward stays in [0, 1] like its components.
        self.w = w / w.sum()

    def reward(self, scores: torch.Tensor, G: int):
        r = _groups(scores, G)  # (B, G, 3)
        S = hoyer_sparsity(r.transpose(1, 2))  # (B, 3)
        w = self.w.to(r.device).expand_as(S)
        return (r * w[:, None]).sum(-1).view(-1), {**_group_stats(r, w, S), "stage": 0.0}

    def update(self, batch_mean: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TarosCurriculum(StaticCurriculum):
    """[SPG] v4 weights, recomputed from each group's own scores; stateless."""

    def __init__(self, tau=(0.70, 0.68), beta: float = 0.3, k: float = 20.0):
        self.tau, self.beta, self.k = tau, beta, k

    def reward(self, scores: torch.Tensor, G: int):
        r = _groups(scores, G)  # (B, G, 3)
        w, g = taros_weights(r, self.tau, self.beta, self.k)  # (B, 3)
        S = hoyer_sparsity(r.transpose(1, 2))  # (B, 3)
        # taros keeps no global state, so its "stage" for the logs is the component the groups weight most
        # on average (1 visual, 2 temporal, 3 semantic): the 1-3 scale of self_paced's soft stage.
        stats = {**_group_stats(r, w, S), "stage": float(w.mean(0).argmax()) + 1}
        return (r * w[:, None]).sum(-1).view(-1), stats  # Eq. 8


class SelfPacedCurriculum:
    """The default `self_paced` curriculum: EMA competence -> soft stages -> weights, tilted per group."""

    def __init__(self, tau=(0.70, 0.68), k: float = 20.0, beta: float = 0.3, floor: float = 0.1, decay: float = 0.9):
        if len(tau) != 2:
            raise ValueError(f"self_paced takes two thresholds (visual, temporal), got {tau}")
        self.tau, self.k, self.beta, self.floor, self.decay = tuple(tau), k, beta, floor, decay
        self.competence = torch.zeros(len(COMPONENTS))  # (3,) c_j
        self.initialized = False

    def stage_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w (3,), g (3,)): the floored weights and the soft stage indicators from the competence."""
        c = self.competence
        # Soft gates on the running competence: p1 opens when visual fidelity passes tau_1, p2 when temporal
        # coherence passes tau_2. The stages are products of gates, so they sum to 1 and move smoothly.
        p1 = torch.sigmoid(self.k * (c[0] - self.tau[0]))  # visual mastered?
        p2 = torch.sigmoid(self.k * (c[1] - self.tau[1]))  # temporal mastered?
        g = torch.stack([1 - p1, p1 * (1 - p2), p1 * p2])  # (3,) sums to 1
        # The floor keeps every component in the reward: a mastered component still counts, so the policy
        # cannot trade it away while it learns the next one.
        return (1 - self.floor) * g + self.floor / len(COMPONENTS), g

    def reward(self, scores: torch.Tensor, G: int):
        r = _groups(scores, G)  # (B, G, 3)
        w0, g = self.stage_weights()
        S = hoyer_sparsity(r.transpose(1, 2))  # (B, 3)
        # Dynamic grouping: multiply by exp(beta (S_j - S_{j+1})) and renormalise, i.e. Eq. 6-7 with
        # the stage weights as the prior; a component every sample of a group scores alike gets less.
        w = torch.softmax(torch.log(w0.to(r.device)) + self.beta * _hoyer_diff(S), dim=-1)  # (B, 3)
        stats = {**_group_stats(r, w, S), "stage": float((g * torch.arange(1.0, 4.0)).sum())}
        stats.update({f"competence/{n}": self.competence[j].item() for j, n in enumerate(COMPONENTS)})
        return (r * w[:, None]).sum(-1).view(-1), stats

    def update(self, batch_mean: torch.Tensor) -> None:
        """Fold one iteration's batch-mean scores (3,) into the competence EMA (Deviations 8 for NaN)."""
        batch_mean = batch_mean.detach().float().cpu()
        finite = torch.isfinite(batch_mean)  # (3,)
        if not bool(finite.all()):
            warnings.warn(f"non-finite batch-mean scores {batch_mean.tolist()}: those components keep their competence")
        if not self.initialized:
            if not bool(finite.all()):
                return  # wait for a batch that scores every component
            self.competence, self.initialized = batch_mean.clone(), True
        else:
            # An EMA over iterations rather than the raw batch mean: one noisy batch must not flip the stage.
            ema = self.decay * self.competence + (1 - self.decay) * batch_mean
            self.competence = torch.where(finite, ema, self.competence)

    def state_dict(self) -> dict:
        return {"competence": self.competence.tolist(), "initialized": self.initialized}

    def load_state_dict(self, state: dict) -> None:
        self.competence = torch.tensor(state["competence"], dtype=torch.float32)
        self.initialized = bool(state["initialized"])


CURRICULA = {"self_paced": SelfPacedCurriculum, "taros": TarosCurriculum, "static": StaticCurriculum}


def build_curriculum(name: str, **kwargs):
    if name not in CURRICULA:
        raise ValueError(f"unknown curriculum {name!r}; choose one of {tuple(CURRICULA)}")
    return CURRICULA[name](**kwargs)
