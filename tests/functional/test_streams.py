"""The stream math on its own: weights, reach, order-independent sums, statistics, rescale."""

import itertools

import pytest
import torch

from mlfop.functional.streams import (
    natural_shares,
    ordered_sum,
    reach_weight,
    rescale_factor,
    rescale_mismatch,
    stream_factor_statistics,
    stream_order,
    stream_second_moment,
    stream_weights,
    update_norm_ema,
)

CPU = torch.device("cpu")


def test_weight_modes():
    names, shares = ["image", "text"], [0.25, 0.75]
    assert stream_weights("tokens", names, shares, None, 0.5, CPU).tolist() == [0.25, 0.75]
    assert stream_weights("fixed", names, shares, None, 0.5, CPU).tolist() == [0.5, 0.5]
    assert stream_weights({"image": 3.0, "text": 1.0}, names, shares, None, 0.5, CPU).tolist() == [0.75, 0.25]
    assert stream_weights({"image": 0.0, "text": 0.0, "audio": 1.0}, names, shares, None, 0.5, CPU).tolist() == shares
    assert stream_weights("balanced", names, shares, None, 0.5, CPU).tolist() == [0.5, 0.5]  # no EMA yet
    balanced = stream_weights("balanced", names, shares, torch.tensor([4.0, 1.0], dtype=torch.float64), 1.0, CPU)
    torch.testing.assert_close(balanced, torch.tensor([0.2, 0.8], dtype=torch.float64))  # w ~ 1 / norm
    assert natural_shares([1.0, 3.0]) == [0.25, 0.75]


def test_reach_weight_and_norm_ema():
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert float(reach_weight(w, (True, False, True))) == pytest.approx(0.7)
    ema = update_norm_ema(torch.zeros(3, dtype=torch.float64), [False, True, False], [0, 1],
                          torch.tensor([2.0, 4.0], dtype=torch.float64), 0.9)
    torch.testing.assert_close(ema, torch.tensor([2.0, 0.4, 0.0], dtype=torch.float64))  # first value, then EMA


@pytest.mark.parametrize("k", [2, 3])
def test_sums_over_streams_do_not_depend_on_their_order(k):
    gen = torch.Generator().manual_seed(k)
    streams = torch.randn(4, k, 6, 5, generator=gen) * torch.arange(1, k + 1).view(1, k, 1, 1)
    weights = torch.softmax(torch.randn(k, generator=gen, dtype=torch.float64), 0)
    reach = torch.tensor(1.0, dtype=torch.float64)
    reference = stream_second_moment(streams, weights, reach, stream_order(streams))
    stats = stream_factor_statistics(streams, weights, reach, (True, True), stream_order(streams))
    for perm in itertools.permutations(range(k)):
        shuffled, w = streams[:, list(perm)], weights[list(perm)]
        assert torch.equal(stream_second_moment(shuffled, w, reach, stream_order(shuffled)), reference)
        for a, b in zip(stream_factor_statistics(shuffled, w, reach, (True, True), stream_order(shuffled)), stats):
            assert torch.equal(a, b)  # bitwise, so eigh cannot amplify a reordering


def test_identical_streams_give_exactly_one_streams_statistics():
    g = torch.randn(3, 1, 6, 5, generator=torch.Generator().manual_seed(0))
    same = torch.cat([g, g], dim=1)
    w, reach = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    assert torch.equal(stream_second_moment(same, w, reach, None), g[:, 0].square())
    left, right = stream_factor_statistics(same, w, reach, (True, True), None)
    assert torch.equal(left, g[:, 0] @ g[:, 0].mT) and torch.equal(right, g[:, 0].mT @ g[:, 0])


def test_a_block_one_stream_reaches_gets_that_streams_statistics_scaled_by_w():
    g = torch.randn(2, 1, 4, 3, generator=torch.Generator().manual_seed(1))
    streams = torch.cat([g, torch.zeros_like(g)], dim=1)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    reach = reach_weight(w, (True, False))
    # W w_1 g^2 = (w_1 g)^2: exactly the square of the shared component w_1 g.
    torch.testing.assert_close(stream_second_moment(streams, w, reach, None), (0.25 * g[:, 0]).square())


def test_shared_statistics_and_ordered_sum():
    streams = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    (left, _) = stream_factor_statistics(streams, w, torch.tensor(1.0), (True, True), None, shared_only=True)
    shared = (streams * w.float().view(1, 3, 1, 1)).sum(1)
    torch.testing.assert_close(left, shared @ shared.mT)
    torch.testing.assert_close(ordered_sum(streams, None), streams.sum(1))


def test_rescale_factor_and_mismatch():
    torch.testing.assert_close(rescale_factor(torch.tensor(4.0), torch.tensor(1.0)), torch.tensor(2.0))
    assert float(rescale_factor(torch.tensor(1.0 + 1e-7), torch.tensor(1.0))) == 1.0  # snapped
    assert float(rescale_factor(torch.tensor(0.0), torch.tensor(0.0))) == 1.0
    c = torch.tensor(1.0)
    assert not rescale_mismatch(torch.tensor(1e-12), torch.tensor(1.0), torch.tensor(1.0), c, 2)
    assert rescale_mismatch(torch.tensor(1e-6), torch.tensor(1.0), torch.tensor(1.0), c, 2)
