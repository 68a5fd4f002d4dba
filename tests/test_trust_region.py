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


def _linear_policy():
    torch.manual_seed(0)
    net = nn.Linear(5, 4)  # v(x, sigma) from (x, sigma): a per-sample velocity the anchor can swap
    velocity_for = lambda mb: (lambda x, sigma: net(torch.cat([x, sigma.view(-1, 1)], 1)))  # noqa: E731
    return net, velocity_for


def test_anchor_means_equal_a_separate_copy_of_the_anchor_weights():
    import copy

    import grpo
    import sde

    net, velocity_for = _linear_policy()
    frozen = copy.deepcopy(net)  # what the anchor should compute: the weights before the update
    anchor = tr.MovingAnchor(net, 0)
    sigmas = sde.sigma_schedule(6, 3.0)
    traj = sde.rollout(velocity_for(slice(None)), torch.randn(6, 4), sigmas, "sage", 0.7, torch.Generator().manual_seed(0))
    steps = grpo.select_timesteps(6, traj.is_stochastic, 0.5, torch.Generator().manual_seed(1))  # (6, 3)
    micro = [slice(0, 4), slice(4, 6)]
    # Right after construction the anchor is the live policy: no forward, mu_old stands in.
    assert tr.anchor_means(anchor, velocity_for, traj, steps, "sage", 0.7, micro, beta_pos=1.0) is None
    with torch.no_grad():
        net.weight.add_(0.1)
    anchor.step()
    live = net.weight.detach().clone()
    assert tr.anchor_means(anchor, velocity_for, traj, steps, "sage", 0.7, micro, beta_pos=0.0) is None
    mu_anchor = tr.anchor_means(anchor, velocity_for, traj, steps, "sage", 0.7, micro, beta_pos=1.0)
    assert mu_anchor.shape == (6, 3, 4) and torch.equal(net.weight, live)  # live weights restored
    frozen_v = lambda x, sigma: frozen(torch.cat([x, sigma.view(-1, 1)], 1))  # noqa: E731
    for j in range(3):
        expected = sde.policy_step(frozen_v, traj, steps[:, j], "sage", 0.7).mu
        assert torch.allclose(mu_anchor[:, j], expected, atol=1e-6)


def test_kl_terms_switch_off_with_beta_and_fall_back_to_mu_old():
    g = torch.Generator().manual_seed(2)
    mu, mu_old, mu_anchor = (torch.randn(3, 4, generator=g) for _ in range(3))
    var = torch.tensor([0.1, 0.2, 0.3])
    kl_pos, kl_vel = tr.kl_terms(mu, mu_old, mu_anchor, var, 1.0, 0.1)
    assert torch.equal(kl_pos, tr.gaussian_kl(mu, mu_anchor, var)) and torch.equal(kl_vel, tr.gaussian_kl(mu, mu_old, var))
    kl_pos, kl_vel = tr.kl_terms(mu, mu_old, None, var, 1.0, 0.0)
    assert torch.equal(kl_pos, tr.gaussian_kl(mu, mu_old, var)) and kl_vel is None
    assert tr.kl_terms(mu, mu_old, mu_anchor, var, 0.0, 0.0) == (None, None)


def test_reference_codes_kl_scales_differ_as_documented():
    """Deviations 5: [SAGE]'s 2 (V + 1e-6) agrees with 2 V to 1e-6 / V; [FlowGRPO]'s flow KL is Delta_t x ours."""
    import sde

    g = torch.Generator().manual_seed(3)
    mu, mu_ref = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)
    sigmas, eta = sde.sigma_schedule(20, 3.0), 0.7
    for t in range(1, 20):
        s, sn = float(sigmas[t]), float(sigmas[t + 1])
        V = sde.step_variance(s, sn, "flow", eta)
        ours = tr.gaussian_kl(mu, mu_ref, V).item()
        sage_code = ((mu - mu_ref) ** 2 / (2 * (V + 1e-6))).mean().item()
        assert sage_code == pytest.approx(ours / (1 + 1e-6 / V.item()), rel=1e-5)
        flowgrpo_code = ((mu - mu_ref) ** 2 / (2 * eta**2 * s / (1 - s))).mean().item()  # per-unit-time variance
        assert flowgrpo_code == pytest.approx(ours * (s - sn), rel=1e-5)
