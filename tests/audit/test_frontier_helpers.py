"""Unit tests of :func:`invdefend.allocation.placement_variances` (the frontier study's noise placements)."""

import pytest
import torch

from invdefend.allocation import placement_variances


def test_weak25_spreads_energy_evenly_on_the_weakest_quarter_only():
    s = torch.tensor([[8.0, 1.0, 4.0, 0.5, 2.0, 0.25, 6.0, 3.0]], dtype=torch.float64)
    tau = placement_variances(s, 2.0, "weak25")
    assert tau.shape == s.shape
    assert torch.allclose(tau.sum(1), torch.tensor([2.0], dtype=torch.float64))
    noisy = set(torch.nonzero(tau[0]).flatten().tolist())
    assert noisy == {3, 5}  # s = 0.5 and 0.25: the two weakest of eight
    assert torch.allclose(tau[0, 3], tau[0, 5])


def test_zero_singular_values_get_no_noise_and_rows_scale_separately():
    s = torch.tensor([[3.0, 2.0, 1.0, 0.0], [5.0, 4.0, 3.0, 2.0]], dtype=torch.float64)
    energy = torch.tensor([1.0, 4.0], dtype=torch.float64)
    for placement in ("weak25", "band_pass"):
        tau = placement_variances(s, energy, placement)
        assert tau[0, 3] == 0.0
        assert torch.allclose(tau.sum(1), energy)
        assert bool((tau >= 0).all())
    assert torch.nonzero(placement_variances(s, energy, "weak25")[0]).flatten().tolist() == [2]


def test_band_pass_follows_the_matrix_function_law():
    s = torch.logspace(-2, 1, 40, dtype=torch.float64).unsqueeze(0)
    tau = placement_variances(s, 1.0, "band_pass", percentile=25.0)
    s2 = s[0].pow(2)
    mu = torch.quantile(s2, 0.25)
    law = s2 / (s2 + mu).pow(2)
    assert torch.allclose(tau[0], law / law.sum())
    # largest where s² ≈ μ, far smaller for the strongest and the weakest directions
    peak = int(tau[0].argmax())
    assert abs(float(s2[peak] / mu) - 1.0) < 0.5
    assert float(tau[0, -1]) < 0.01 * float(tau[0].max())
    assert float(tau[0, 0]) < 0.15 * float(tau[0].max())  # rolls off as s²/μ² below the band


def test_placement_variances_rejects_bad_arguments():
    s = torch.ones(1, 4)
    with pytest.raises(ValueError, match="placement"):
        placement_variances(s, 1.0, "top")
    with pytest.raises(ValueError, match=r"\(B, k\)"):
        placement_variances(torch.ones(4), 1.0, "weak25")
    with pytest.raises(ValueError, match="energy"):
        placement_variances(s, -1.0, "weak25")
    with pytest.raises(ValueError, match="non-zero"):
        placement_variances(torch.zeros(1, 4), 1.0, "band_pass")
    with pytest.raises(ValueError, match="fraction"):
        placement_variances(s, 1.0, "weak25", fraction=0.0)
