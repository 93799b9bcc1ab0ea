"""The folds on their own: the stream sums, the noise norms, the refusals and the finish."""

import pytest
import torch

from mlfop.folding import UNTAGGED_STREAMS, StreamFolds


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(6, 4, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen))]


def _accumulate(params, folds, micro, streams, tokens=None):
    """Add each micro-gradient to p.grad (as backward does) and fold it."""
    for i, (stream, grads) in enumerate(zip(streams, micro)):
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)
        folds.fold(stream, params, None if tokens is None else tokens[i])


def _micro(params, count, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(count)]


@pytest.mark.parametrize("names,track", [(("a", "b"), False), (("a", "b"), True), (("a", "b", "c"), True)])
def test_each_stream_sum_is_its_micro_gradients(names, track):
    params = _params()
    folds = StreamFolds(names, track_norms=track, head_layouts={params[0]: (3, 0)})
    streams = [names[i % len(names)] for i in range(2 * len(names) + 1)]
    micro = _micro(params, len(streams))
    _accumulate(params, folds, micro, streams)
    present = folds.present()
    for p_index, param in enumerate(params):
        sums = folds.sums(param, present)
        for k, name in enumerate(names):
            expected = sum(m[p_index] for s, m in zip(streams, micro) if s == name)
            torch.testing.assert_close(sums[k], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sums.sum(0), param.grad, rtol=1e-5, atol=1e-6)  # p.grad keeps the total


def test_noise_norms_are_the_micro_gradients_squared_norms_per_head():
    params = _params()
    folds = StreamFolds(("a", "b"), track_norms=True, head_layouts={params[0]: (3, 0)})
    micro = _micro(params, 4)
    _accumulate(params, folds, micro, ["a", "b", "a", "b"])
    folds.finish([(p, p.grad) for p in params], None)  # commits the last fold's norms
    noise, counts, measured = folds.noise_inputs(params[0], [0, 1])
    assert counts == [2, 2] and measured == [2, 2]
    for k, indices in ((0, (0, 2)), (1, (1, 3))):
        per_head = sum(micro[i][0].view(3, 2, 4).square().sum((1, 2)).double() for i in indices)
        torch.testing.assert_close(noise[k], per_head)
    vector, _, _ = folds.noise_inputs(params[1], [0, 1])
    torch.testing.assert_close(vector[0], sum(micro[i][1].square().sum().double() for i in (0, 2)).view(1))


def test_a_fold_with_nothing_new_in_p_grad_is_refused_but_a_fresh_tensor_is_not():
    params = _params()
    folds = StreamFolds(("a", "b"))
    _accumulate(params, folds, _micro(params, 1), ["a"])
    with pytest.raises(ValueError, match="p.grad unchanged since the previous fold"):
        folds.fold("b", params, None)
    for p in params:
        p.grad = p.grad.clone()  # a new tensor (a loop that assigns p.grad), even with the same values
    folds.fold("b", params, None)
    assert folds.present() == [0, 1]


def test_bad_folds_and_untagged_alternation():
    params = _params()
    folds = StreamFolds(("a", "b"))
    with pytest.raises(ValueError, match="found no gradient"):
        folds.fold("a", params, None)
    _accumulate(params, folds, _micro(params, 1), ["a"], tokens=[3])
    with pytest.raises(ValueError, match="for every fold of a step or for none"):
        _accumulate(params, folds, _micro(params, 1, seed=2), ["b"])
    untagged = StreamFolds(UNTAGGED_STREAMS)
    _accumulate(params, untagged, _micro(params, 3, seed=3), [None, None, None])
    assert untagged.shares(untagged.present()) == [2 / 3, 1 / 3]


def test_finish_recovers_a_global_rescale_refuses_a_local_one_and_reads_the_reach():
    params = [*_params(), torch.nn.Parameter(torch.zeros(3))]
    folds = StreamFolds(("a", "b"))
    micro = _micro(params, 2)
    micro[1][2] = torch.zeros(3)  # only stream a reaches the last parameter
    micro[0][2] = torch.ones(3)
    _accumulate(params, folds, micro, ["a", "b"])
    for p in params:
        p.grad.mul_(0.25)  # clip_grad_norm_ after the last fold
    finished = folds.finish([(p, p.grad) for p in params], None)
    assert float(finished.scale) == pytest.approx(0.25)
    assert finished.reach[params[0]] == (True, True) and finished.reach[params[2]] == (True, False)
    folds.reset()
    _accumulate(params, folds, micro, ["a", "b"])
    params[0].grad.mul_(0.5)  # one parameter only: not a global factor
    with pytest.raises(ValueError, match="no longer matches the folded streams"):
        folds.finish([(p, p.grad) for p in params], None)
