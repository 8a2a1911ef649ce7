import pytest
import torch

from flora.reductions import column_sum_of_squares, run_sums, sum_of_squares


@pytest.mark.parametrize("shape", [(7, 5), (3, 7, 5), (1, 9), (9, 1), (2, 0, 4), (0, 3)])
@pytest.mark.parametrize("block", [4, 2**18])  # blocks of rows; one block
def test_column_sums_of_squares_match_float64(monkeypatch, shape, block):
    """Blocked products (several blocks of rows with ``block=4``) give the float64 sums
    to float32 rounding, kept as (..., 1, n); no rows give zeros."""
    monkeypatch.setattr("flora.reductions.BLOCK_NUMEL", block)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    got = column_sum_of_squares(x)
    want = x.double().square().sum(dim=-2, keepdim=True)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_sum_of_squares_over_rows_or_columns():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sum_of_squares(x, -1), x.square().sum(-1, keepdim=True))
    torch.testing.assert_close(sum_of_squares(x, -2), x.square().sum(-2, keepdim=True))
    with pytest.raises(ValueError, match="dim"):
        sum_of_squares(x, 0)


def test_run_sums_drives_a_body_and_refuses_a_request_without_a_reducer():
    """A :data:`ShardSums` body's requests are summed in place by the reducer it is run
    with; one without a reducer (an unsharded step) must never ask."""

    def body():
        t = torch.ones(2)
        yield t
        return float(t.sum())

    assert run_sums(body(), lambda t: t.mul_(3)) == 6.0
    with pytest.raises(RuntimeError, match="unsharded"):
        run_sums(body(), None)
