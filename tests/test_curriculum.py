"""curriculum.py against the [SPG] equations written out by hand, and the stage behaviour SPEC §6 asks for."""
import math

import pytest
import torch

import curriculum as cur


def test_hoyer_sparsity_extremes():
    assert cur.hoyer_sparsity(torch.full((5,), 0.7)).item() == pytest.approx(0.0, abs=1e-6)
    assert cur.hoyer_sparsity(torch.tensor([0.0, 0.0, 1.0, 0.0])).item() == pytest.approx(1.0)
    assert cur.hoyer_sparsity(torch.zeros(4)).item() == 0.0
    mid = cur.hoyer_sparsity(torch.tensor([1.0, 0.5, 0.0, 0.0])).item()
    l1, l2 = 1.5, math.sqrt(1.25)
    assert mid == pytest.approx((2 - l1 / l2) / (2 - 1))


def test_taros_weights_match_the_v4_equations_by_hand():
    r = torch.tensor([[0.9, 0.6, 0.2], [0.8, 0.7, 0.9], [0.85, 0.8, 0.5], [0.7, 0.5, 0.3]])  # (G=4, 3)
    tau, beta, k = (0.70, 0.68), 0.3, 5.0
    w, _ = cur.taros_weights(r, tau, beta, k)

    def hoyer(col):
        l1, l2 = sum(abs(c) for c in col), math.sqrt(sum(c * c for c in col))
        return (2 - l1 / l2) / (2 - 1)  # sqrt(G) = 2

    cols = [[row[j] for row in r.tolist()] for j in range(3)]
    rbar = [sum(c) / 4 for c in cols]
    S = [hoyer(c) for c in cols] + [0.0]
    taus = [0.70, 0.68, 0.68]
    g = [1 / (1 + math.exp(-k * (rbar[j] - taus[j]))) + beta * (S[j] - S[j + 1]) for j in range(3)]
    z = sum(math.exp(x) for x in g)
    assert w.tolist() == pytest.approx([math.exp(x) / z for x in g], rel=1e-5)


def test_taros_with_unit_steepness_stays_near_uniform():
    r = torch.tensor([[0.85, 0.70, 0.60]]).expand(4, 3)  # zero spread: Hoyer terms vanish
    w, _ = cur.taros_weights(r, (0.70, 0.68), beta=0.3, k=1.0)
    assert w.tolist() == pytest.approx([0.343, 0.333, 0.324], abs=2e-3)  # SPEC §6: near uniform


def test_self_paced_moves_focus_visual_to_temporal_to_semantic():
    c = cur.SelfPacedCurriculum(tau=(0.7, 0.68), k=20, beta=0.0, floor=0.1)
    scores = torch.rand(8, 3, generator=torch.Generator().manual_seed(0))
    focus, w_vis, w_sem = [], [], []
    # Rising competence: visual is mastered first, then temporal (semantic keeps rising slowly).
    ramp = torch.cat([torch.linspace(0.3, 0.9, 30), torch.full((60,), 0.9)])
    for step in range(90):
        c.update(torch.tensor([ramp[step], ramp[max(step - 30, 0)], 0.3 + step / 300]))
        _, stats = c.reward(scores, 4)
        w = [stats[f"w/{n}"] for n in cur.COMPONENTS]
        focus.append(max(range(3), key=w.__getitem__))
        w_vis.append(w[0]), w_sem.append(w[2])
    # The argmax walks 0 -> 1 -> 2 without going back.
    assert focus[0] == 0 and focus[-1] == 2 and 1 in focus and focus == sorted(focus)
    assert w_vis[-1] < w_vis[0] and w_sem[-1] > w_sem[0]
    assert min(w_vis + w_sem) >= 0.1 / 3 - 1e-6  # the floor keeps mastered components alive


def test_self_paced_hoyer_tilt_and_reward():
    c = cur.SelfPacedCurriculum(beta=0.5)
    c.update(torch.tensor([0.5, 0.5, 0.5]))
    # Group 0: only semantic separates the samples; group 1: only visual does.
    scores = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 1.0], [0.0, 0.5, 0.5], [1.0, 0.5, 0.5]])
    rtilde, _ = c.reward(scores, 2)
    w0, _ = c.stage_weights()
    S = cur.hoyer_sparsity(scores.view(2, 2, 3).transpose(1, 2))  # (2, 3)
    Sd = S - torch.cat([S[:, 1:], torch.zeros(2, 1)], 1)
    w = torch.softmax(torch.log(w0) + 0.5 * Sd, dim=1)
    assert torch.allclose(rtilde, (scores.view(2, 2, 3) * w[:, None]).sum(-1).view(-1))
    assert w[0, 2] > w0[2] and w[1, 0] > w0[0]  # each group leans toward its separating component


def test_state_round_trip_and_static_and_errors():
    c = cur.SelfPacedCurriculum()
    for m in ([0.5, 0.4, 0.3], [0.9, 0.8, 0.2]):
        c.update(torch.tensor(m))
    d = cur.SelfPacedCurriculum()
    d.load_state_dict(c.state_dict())
    assert torch.equal(c.competence, d.competence) and d.initialized
    assert c.competence.tolist() == pytest.approx([0.54, 0.44, 0.29])  # 0.9 * first + 0.1 * second
    s = cur.StaticCurriculum((0.5, 0.5, 1.0))
    scores = torch.rand(6, 3)
    r, _ = s.reward(scores, 3)
    assert torch.allclose(r, scores @ torch.tensor([0.25, 0.25, 0.5]))
    with pytest.raises(ValueError, match="does not divide"):
        s.reward(scores, 4)
    with pytest.raises(ValueError, match="unknown curriculum"):
        cur.build_curriculum("linear")
    before = c.competence.clone()
    with pytest.warns(UserWarning, match="non-finite"):  # a failed component keeps its competence
        c.update(torch.tensor([float("nan"), 0.0, 0.0]))
    assert c.competence[0] == before[0] and c.competence[1] == pytest.approx(0.9 * before[1].item())
