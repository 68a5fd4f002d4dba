"""trust_region.py against torch.distributions and a hand-driven anchor cadence (plain and LoRA modules)."""
import pytest
import torch
from torch import nn

import trust_region as tr


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, mu_ref = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    var = torch.tensor([0.1, 0.5, 2.0])
    std = var.sqrt().view(-1, 1, 1)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, std),
                                            torch.distributions.Normal(mu_ref, std)).flatten(1).mean(1)
    assert torch.allclose(tr.gaussian_kl(mu, mu_ref, var), ref, atol=1e-6)
    assert torch.equal(tr.gaussian_kl(mu, mu, 0.3), torch.zeros(3))


def test_two_stage_kl_coefficient():
    assert tr.kl_coefficient(0, 1e-7, 1e-5, 100) == 1e-7
    assert tr.kl_coefficient(50, 1e-7, 1e-5, 100) == pytest.approx((1e-7 + 1e-5) / 2)
    assert tr.kl_coefficient(100, 1e-7, 1e-5, 100) == 1e-5 == tr.kl_coefficient(1000, 1e-7, 1e-5, 100)


def _train_step(model, opt):
    loss = model(torch.ones(2, 4)).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("anchor_every,expected", [(3, [3, 6, 9]), (1, list(range(1, 11))), (0, [])])
def test_anchor_refreshes_exactly_every_n_updates(anchor_every, expected):
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    anchor = tr.MovingAnchor(model, anchor_every)
    initial = model.weight.detach().clone()
    refreshed = []
    for update in range(1, 11):
        _train_step(model, opt)
        if anchor.step():
            refreshed.append(update)
            assert anchor.is_current
            with torch.no_grad():  # KL_pos is zero right after a refresh
                mu = model(torch.ones(2, 4))
                with anchor.swapped_in():
                    mu_anchor = model(torch.ones(2, 4))
            assert torch.equal(tr.gaussian_kl(mu, mu_anchor, 0.1), torch.zeros(2))
    assert refreshed == expected
    if anchor_every == 0:
        assert torch.equal(anchor.snapshot[0], initial)  # a fixed anchor is the initial policy


def test_swap_gives_the_anchor_weights_and_restores_the_live_ones_exactly():
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    anchor = tr.MovingAnchor(model, 0)
    with torch.no_grad():
        before = model(torch.ones(1, 4))
    _train_step(model, opt)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), anchor.swapped_in():
        assert torch.equal(model(torch.ones(1, 4)), before)
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())


def test_lora_anchor_holds_only_adapter_tensors():
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"],
                                                      init_lora_weights="gaussian"))
    anchor = tr.MovingAnchor(model, 2)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(s.numel() for s in anchor.snapshot) == n_lora  # no copy of the frozen base weights
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with torch.no_grad():
        before = model(torch.ones(1, 4))
    _train_step(model, opt)
    assert not anchor.step()
    with torch.no_grad(), anchor.swapped_in():
        assert torch.allclose(model(torch.ones(1, 4)), before)


def test_anchor_state_round_trips():
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    anchor = tr.MovingAnchor(model, 2)
    for _ in range(3):
        _train_step(model, opt)
        anchor.step()
    state = anchor.state_dict()
    other = tr.MovingAnchor(nn.Linear(4, 3), 2)
    other.load_state_dict(state)
    assert other.num_updates == 3 and other.num_refreshes == 1 and not other.is_current
    assert all(torch.equal(a, b) for a, b in zip(other.snapshot, anchor.snapshot))
    with pytest.raises(ValueError, match="trainable"):
        tr.MovingAnchor(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)), 2).load_state_dict(state)
