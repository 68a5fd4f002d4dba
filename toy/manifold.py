"""The toy's data manifold and its exact flow-matching velocity, so SDE figures show the samplers and not a
network's errors.

Data: a ring of radius R in the plane, made of M isotropic Gaussians of std c at angles 2 pi k / M.
For x_sigma = (1 - sigma) x0 + sigma eps with x0 from that mixture, every term is Gaussian, so the
velocity the network would learn, v(x, sigma) = E[eps - x0 | x_sigma = x], has a closed form:
    component k:  x_sigma ~ N((1 - sigma) m_k, s_k^2 I),   s_k^2 = (1 - sigma)^2 c^2 + sigma^2
    E[x0 | x, k]  = m_k + (1 - sigma) c^2 / s_k^2 (x - (1 - sigma) m_k)
    E[x0 | x]     = sum_k resp_k(x) E[x0 | x, k],  resp = softmax_k log N(x; (1 - sigma) m_k, s_k^2 I)
    E[eps | x]    = (x - (1 - sigma) E[x0 | x]) / sigma
    v             = E[eps | x] - E[x0 | x]
Points are (N, 2); a "video" of F frames is (N, F, 2) with the frames independent in this oracle.

Deviations / choices
--------------------
1. Equal mode weights and equal, isotropic stds, so the responsibilities are a softmax of squared
   distances and the normalising constants cancel. A ring is the simplest manifold whose off-manifold
   distance is one number (`ring_distance`), which is what [SAGE] Fig. 1 plots.
2. Float64 inside: at small sigma the posterior is a very sharp softmax and E[eps | x] divides by sigma,
   so float32 would put rounding error into the very figures that compare samplers.
3. sigma must be > 0. The velocity at sigma = 0 is undefined (E[eps | x] divides by sigma); no sampler
   evaluates it there, because the last step of a schedule evaluates at sigma_{K-1} > 0.

Tested in `tests/test_sde.py`: rollouts with this velocity reproduce `sample_mixture`'s ring as the
number of steps grows, and sage lands closer to the ring than flow at equal eta.
"""
from __future__ import annotations

import math

import torch


def ring_means(num_modes: int = 8, radius: float = 1.0) -> torch.Tensor:
    """(M, 2) mode centres m_k = R (cos, sin)(2 pi k / M)."""
    angle = torch.arange(num_modes, dtype=torch.float64) * 2 * math.pi / num_modes  # (M,)
    return radius * torch.stack([angle.cos(), angle.sin()], dim=1)  # (M, 2)


def sample_mixture(n: int, means: torch.Tensor, std: float, generator=None) -> torch.Tensor:
    """n draws x0 from the ring mixture: the data distribution the exact velocity transports noise to."""
    k = torch.randint(len(means), (n,), generator=generator)
    return (means[k] + std * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()  # (n, 2)


def mixture_velocity(x: torch.Tensor, sigma, means: torch.Tensor, std: float) -> torch.Tensor:
    """Exact v(x, sigma) for the ring of Gaussians; x (..., 2), sigma a float or (N,) for x (N, ..., 2)."""
    shape = x.shape
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    xd = x.double().reshape(shape[0], -1, 2) if x.dim() > 1 else x.double().reshape(1, 1, 2)  # (N, P, 2)
    s = sigma.reshape(-1, 1, 1, 1) if sigma.dim() == 1 else sigma  # (N,1,1,1) or ()
    m = means.double()  # (M, 2)
    # x_sigma given component k is Gaussian: the data's spread shrinks by (1 - sigma) and the noise adds sigma^2.
    var = (1 - s) ** 2 * std**2 + s**2  # component variance of x_sigma
    diff = xd[:, :, None, :] - (1 - s) * m  # (N, P, M, 2)
    logits = -(diff**2).sum(-1, keepdim=True) / (2 * var)  # (N, P, M, 1) equal priors, equal variances
    # Which mode x came from: at high sigma every mode is plausible and the velocity points to the ring's
    # centre of mass; as sigma falls one mode wins and the velocity points to it.
    resp = torch.softmax(logits, dim=2)
    # Gaussian conditioning (a Wiener filter): move from the mode centre towards x by the share of x's
    # variance that the data, not the noise, explains.
    x0_k = m + (1 - s) * std**2 / var * diff  # (N, P, M, 2) posterior mean given component k
    x0 = (resp * x0_k).sum(2)  # (N, P, 2)
    s2 = s.reshape(-1, 1, 1) if sigma.dim() == 1 else s
    # x = (1 - sigma) x0 + sigma eps holds for the posterior means too (expectation is linear), so the noise
    # estimate follows from the data estimate; this is where sigma > 0 is needed (Deviations 3).
    eps = (xd - (1 - s2) * x0) / s2
    # The flow-matching target eps - x0 (SPEC §1), the same convention as the video transformer.
    return (eps - x0).reshape(shape).to(x.dtype)


def ring_distance(x: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """| |x| - R | per point; x (..., 2) -> (...). The off-manifold distance of [SAGE] Fig. 1: with mode
    std 0.05, data points sit at about 0.04 from the ring, so a larger mean is noise the sampler added."""
    return (x.norm(dim=-1) - radius).abs()
