"""The shared orthogonal basis: reproducible, orthonormal, sliced per concept, with clear capacity errors."""

from __future__ import annotations

import pytest
import torch

from studio.core.errors import ConfigError
from studio.core.orthogonal_basis import basis_slice, check_capacity, orthogonal_basis, orthogonality_error


def test_basis_is_orthonormal_and_reproducible():
    q = orthogonal_basis(64, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(64, dtype=q.dtype), atol=1e-10)
    orthogonal_basis.cache_clear()
    assert torch.equal(orthogonal_basis(64, seed=3), q)
    assert not torch.equal(orthogonal_basis(64, seed=4), q)


def test_slices_of_one_basis_are_orthogonal():
    a, b = basis_slice(64, 8, 0, seed=1), basis_slice(64, 8, 1, seed=1)
    assert orthogonality_error(a, b) < 1e-6
    assert orthogonality_error(a, basis_slice(64, 8, 0, seed=2)) > 1e-3  # another seed: not orthogonal


def test_capacity_errors_say_which_widths():
    with pytest.raises(ConfigError, match="needs 40 basis rows, but input width 32"):
        basis_slice(32, 8, 4, seed=0)
    with pytest.raises(ConfigError, match=r"rank 8 x 5 concepts = 40 .*width 32 \(2 modules"):
        check_capacity({"a": 32, "b": 32, "c": 320}, rank=8, num_concepts=5, slice_index=0)
    with pytest.raises(ConfigError, match="outside 0..1"):
        check_capacity({"a": 320}, rank=8, num_concepts=2, slice_index=2)
