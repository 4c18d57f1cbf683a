"""The generations' per-row sampling stream and inverse-CDF draw (props_ray/sampling.py), tested
statistically: the uniforms are uniform and independent across rows and steps, a row's stream does
not depend on its batch, and the draw follows the step's probabilities and never picks a token of
probability zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from props_ray.sampling import RowDraw, inverse_cdf, row_uniforms

ALPHA = 1e-4  # per test: a correct stream fails one of these with probability about this


def test_row_uniforms_are_uniform_across_rows_and_across_steps():
    across_rows = row_uniforms(11, np.arange(200_000), 3)
    across_steps = np.array([row_uniforms(11, np.array([7]), t)[0] for t in range(20_000)])
    for u in (across_rows, across_steps):
        assert u.min() >= 0.0 and u.max() < 1.0
        assert stats.kstest(u, "uniform").pvalue > ALPHA
        counts = np.bincount((u * 64).astype(int), minlength=64)  # 64 equal bins
        assert stats.chisquare(counts).pvalue > ALPHA


def test_neighbouring_rows_steps_and_seeds_are_uncorrelated():
    n = 100_000
    rows = np.arange(n)
    base = row_uniforms(5, rows, 0)
    for other in (row_uniforms(5, rows + 1, 0), row_uniforms(5, rows, 1), row_uniforms(6, rows, 0)):
        r = np.corrcoef(base, other)[0, 1]
        assert abs(r) < 4.5 / np.sqrt(n), r  # about 4.5 standard errors of a correlation under independence
        # and not merely uncorrelated: the pairs fill the unit square evenly (8 x 8 cells)
        cells = np.bincount((base * 8).astype(int) * 8 + (other * 8).astype(int), minlength=64)
        assert stats.chisquare(cells).pvalue > ALPHA


def test_a_rows_stream_does_not_depend_on_which_rows_share_its_batch():
    rows = np.array([3, 900, 41, 5_000_000])
    whole = row_uniforms(2, rows, 4)
    alone = np.array([row_uniforms(2, rows[i:i + 1], 4)[0] for i in range(len(rows))])
    assert np.array_equal(whole, alone)
    assert np.array_equal(whole[[2, 0]], row_uniforms(2, rows[[2, 0]], 4))
    assert len(set(whole.tolist())) == len(rows)


def test_inverse_cdf_draws_follow_the_probabilities():
    p = torch.tensor([0.4, 0.0, 0.25, 0.2, 0.0, 0.1, 0.05])
    n = 200_000
    u = torch.from_numpy(row_uniforms(0, np.arange(n), 0))
    drawn = inverse_cdf(p.expand(n, -1), u).numpy()
    counts = np.bincount(drawn, minlength=len(p))
    assert counts[1] == 0 and counts[4] == 0
    keep = p.numpy() > 0
    assert stats.chisquare(counts[keep], p.numpy()[keep] * n).pvalue > ALPHA


def test_inverse_cdf_reads_unnormalised_rows_and_the_extremes_of_u():
    p = torch.tensor([[0.0, 2.0, 6.0, 0.0],    # a total of 8: u scales to it
                      [0.0, 2.0, 6.0, 0.0],
                      [0.0, 2.0, 6.0, 0.0],
                      [0.0, 0.0, 1.0, 0.0]])
    u = torch.tensor([0.0, 0.25 - 1e-9, 1.0 - 2.0 ** -53, 0.5], dtype=torch.float64)
    # u = 0 must not take the zero-probability first token; u just below 1 must not step past the last
    # possible token into a zero-probability one
    assert inverse_cdf(p, u).tolist() == [1, 1, 2, 2]
    # nor u = 1 itself, which the stream never gives (a float32 uniform could round to it)
    assert inverse_cdf(p[:1], torch.tensor([1.0], dtype=torch.float64)).tolist() == [2]
    assert inverse_cdf(p[:1], torch.tensor([0.25], dtype=torch.float64)).tolist() == [2]


def test_row_draw_gives_each_row_its_own_stream_step_after_step():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6, 50), -1)
    rows = [10, 11, 12, 13, 14, 15]
    together, draw = [], RowDraw(9, rows)
    for _ in range(3):
        together.append(draw(p))
    for i, r in enumerate(rows):
        alone = RowDraw(9, [r])
        assert [alone(p[i:i + 1])[0] for _ in range(3)] == [step[i] for step in together]
    for t, step in enumerate(together):  # step t reads the rows' uniforms at t, not the same ones again
        assert step == inverse_cdf(p, torch.from_numpy(row_uniforms(9, np.array(rows), t))).tolist()
    assert together[0] != together[1] != together[2]
    assert RowDraw(9, rows)(p) == together[0]  # a new draw starts again at step 0
    assert RowDraw(8, rows)(p) != together[0] or RowDraw(8, rows)(p) != together[1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_inverse_cdf_refuses_probabilities_that_are_not_finite_or_all_zero(bad):
    p = torch.tensor([[0.2, 0.8, 0.0], [bad, bad, bad]])
    with pytest.raises(ValueError, match="not finite"):
        inverse_cdf(p, torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 2 ** 64 - 1, 123_456_789_012])
def test_any_seed_a_job_can_hold_gives_valid_uniforms(seed):
    u = row_uniforms(seed, np.arange(1000), 0)
    assert u.min() >= 0.0 and u.max() < 1.0 and len(set(u.tolist())) == 1000
