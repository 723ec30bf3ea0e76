"""kernels.row_sums: the partial-sum buffers' reduction against a float64 sum, on the GPU and under Triton's
interpreter (see conftest.py): contiguous buffers summed over their first or second dimension, odd sizes, a row
selected from a (B, k, C) result (strided rows), an empty reduction, and the custom op's registration."""
from __future__ import annotations

import pytest
import torch

from kernels.row_sums import sum_rows
from tests.kernels.modes import DEVICE, pick

# (shape, dim): the layouts the backward kernels write (B, chunks, k, C) / (strips, 9 or 10, C2) / (strips, C2),
# with sizes that are not multiples of the tiles (rows 16, columns 128)
CASES = pick(small=[((3, 5, 2, 40), 1), ((7, 3, 24), 0), ((17, 130), 0), ((1, 1, 1), 0), ((2, 33, 3, 5), 1)],
             real=[((8, 66, 3, 2240), 1), ((64, 10, 11200), 0), ((64, 11200), 0), ((16, 33, 2, 1152), 1),
                   ((5, 1, 7), 1), ((300, 1), 0)])


@pytest.mark.parametrize("shape,dim", CASES)
def test_sum_rows_matches_float64(shape, dim):
    g = torch.Generator().manual_seed(sum(shape) + dim)
    x = torch.randn(shape, generator=g).to(DEVICE)
    out = sum_rows(x, dim)
    ref = x.double().sum(dim)
    assert out.shape == ref.shape and out.dtype == torch.float32
    # float32 sums of at most a few hundred unit-variance terms: relative 1e-6 of the terms' scale
    scale = x.double().abs().sum(dim).clamp_min(1.0)
    assert ((out.double() - ref).abs() / scale).max().item() < 1e-6


def test_sum_rows_strided_rows_and_runs_repeat_exactly():
    """A selected row of a (B, 3, C) result (row stride 3C), as the bias totals read; two runs agree bitwise."""
    g = torch.Generator().manual_seed(1)
    d = torch.randn(5, 3, 72, generator=g).to(DEVICE)
    out = sum_rows(d[:, 2], 0)
    torch.testing.assert_close(out.double(), d[:, 2].double().sum(0), rtol=1e-6, atol=1e-6)
    assert torch.equal(out, sum_rows(d[:, 2], 0))


def test_sum_rows_empty_and_refusals():
    assert torch.equal(sum_rows(torch.ones(0, 6, device=DEVICE), 0), torch.zeros(6, device=DEVICE))
    assert sum_rows(torch.ones(4, 0, device=DEVICE), 0).shape == (0,)
    with pytest.raises(ValueError, match="float32"):
        sum_rows(torch.ones(3, 4, dtype=torch.float64, device=DEVICE), 0)
    with pytest.raises(ValueError, match="contiguous"):
        sum_rows(torch.ones(4, 6, 5, device=DEVICE).transpose(1, 2), 0)
    with pytest.raises(ValueError, match="dim"):
        sum_rows(torch.ones(3, 4, device=DEVICE), 2)


def test_sum_rows_op_passes_opcheck():
    """Schema and fake implementation, as torch.compile traces the backward that calls it."""
    torch.library.opcheck(torch.ops.sana.sum_rows, (torch.randn(3, 5, 2, 8, device=DEVICE), 1))
    torch.library.opcheck(torch.ops.sana.sum_rows, (torch.randn(6, 9, device=DEVICE), 0))
