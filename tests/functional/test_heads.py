"""Head slicing and per-head Gram matrices against explicit slicing loops."""

import pytest
import torch

from mlfop.functional.fop import combine_block, fop_system, stream_grams
from mlfop.functional.heads import check_head_layout, combine_heads, rotate_heads, split_heads
from mlfop.functional.rotation import rotate


def _slice(x, num_heads, axis, head):
    """Head ``head`` of ``x`` (no leading dims) cut along ``axis``, by explicit indexing."""
    d = x.shape[axis] // num_heads
    index = [slice(None)] * x.dim()
    index[axis] = slice(head * d, (head + 1) * d)
    return x[tuple(index)]


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_split_heads_matches_explicit_slices_without_leading_dim(axis):
    x = torch.randn(12, 8)
    split = split_heads(x, 4, axis)
    assert split.shape[0] == 4
    for h in range(4):
        assert torch.equal(split[h], _slice(x, 4, axis, h))


@pytest.mark.parametrize("axis", [0, 1])
def test_split_heads_matches_explicit_slices_with_leading_dim(axis):
    stacked = torch.randn(3, 12, 8)  # K = 3 streams of a (12, 8) weight
    split = split_heads(stacked, 2, axis, leading=1)
    assert split.shape[:2] == (3, 2)
    for k in range(3):
        for h in range(2):
            assert torch.equal(split[k, h], _slice(stacked[k], 2, axis, h))


def test_split_heads_n_d_and_two_leading_dims():
    x = torch.randn(2, 3, 5, 6, 4)  # two leading dims, parameter shape (5, 6, 4)
    split = split_heads(x, 3, 1, leading=2)
    assert split.shape == (2, 3, 3, 5, 2, 4)
    for h in range(3):
        assert torch.equal(split[:, :, h], x[:, :, :, 2 * h : 2 * h + 2])


def test_split_heads_is_a_view():
    x = torch.zeros(4, 6)
    split_heads(x, 3, 1)[1].fill_(1.0)  # head 1 of the columns
    expected = torch.zeros(4, 6)
    expected[:, 2:4] = 1.0
    assert torch.equal(x, expected)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match=r"num_heads=5 does not divide axis 0 \(size 12\).*\(12, 8\)"):
        split_heads(torch.zeros(12, 8), 5, 0)
    with pytest.raises(ValueError, match="axis 2 is out of range.*\\(12, 8\\)"):
        check_head_layout((12, 8), 2, 2)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        check_head_layout((12, 8), 2.0, 0)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        check_head_layout((12, 8), 0, 0)
    assert check_head_layout((12, 8), 4, -2) == (4, 0)




@pytest.mark.parametrize(
    "shape,block_shape,num_heads,axis",
    [((8, 6), (8, 6), 4, 0), ((8, 6), (8, 6), 3, 1), ((4, 6, 3), (4, 6, 3), 2, 1), ((4, 6, 3), (4, 6, 3), 3, -1),
     ((4, 6, 3), (24, 3), 2, 1), ((8, 6), (48,), 4, 0), ((8, 6), (48,), 3, 1)],  # the last three: merged dims
)
@pytest.mark.parametrize("head_axis_rotated", [True, False])
def test_rotate_heads_equals_rotating_each_masked_tensor(shape, block_shape, num_heads, axis, head_axis_rotated):
    gen = torch.Generator().manual_seed(0)
    streams = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
    bases = [torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0] for n in block_shape]
    if not head_axis_rotated:
        bases[axis if block_shape == shape else 0] = None
    flat = streams.reshape(2, *block_shape)
    rotated = list(rotate_heads(flat, bases, shape, num_heads, axis % len(shape)))
    assert len(rotated) == num_heads
    for h, fast in enumerate(rotated):
        masked = torch.zeros_like(streams)
        split_heads(masked, num_heads, axis, leading=1)[:, h] = split_heads(streams, num_heads, axis, leading=1)[:, h]
        assert torch.allclose(fast, rotate(masked.reshape(2, *block_shape), bases), rtol=0, atol=1e-12)


def test_rotate_heads_of_a_batch_with_batched_bases_equals_each_block_alone():
    gen = torch.Generator().manual_seed(1)
    streams = torch.randn(3, 2, 8, 6, generator=gen, dtype=torch.float64)  # (B, K, *shape)
    bases = [torch.linalg.qr(torch.randn(3, n, n, generator=gen, dtype=torch.float64))[0] for n in (8, 6)]
    batched = list(rotate_heads(streams, bases, (8, 6), 4, 0))
    for b in range(3):
        alone = list(rotate_heads(streams[b], [q[b] for q in bases], (8, 6), 4, 0))
        for fast, single in zip(batched, alone):
            torch.testing.assert_close(fast[b], single, rtol=0, atol=1e-12)


def _head_inputs(heads, seed=2):
    gen = torch.Generator().manual_seed(seed)
    streams = torch.randn(2, 2, 8, 6, generator=gen, dtype=torch.float64)  # (B, K, 8, 6)
    bases = [torch.linalg.qr(torch.randn(2, n, n, generator=gen, dtype=torch.float64))[0] for n in (8, 6)]
    rotated = rotate(streams, bases)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    second_moment = 0.5 * rotated.square().sum(1)
    h = second_moment.sqrt() + 1e-3
    kwargs = dict(eps_fop=0.0, beta_max=1.0, eta_range=(1 / 3, 1.0))
    return streams, rotated, second_moment, h, bases, weights, kwargs


def test_one_head_is_the_layer_level():
    streams, rotated, second_moment, h, bases, weights, kwargs = _head_inputs(1)
    heads = combine_heads(streams, rotated, second_moment, h, bases, (8, 6), (1, 0), weights, None, **kwargs)
    flat = rotated.reshape(2, 2, -1)
    system = fop_system(*stream_grams(flat, h.reshape(2, -1)), weights, 0.0)
    layer = combine_block(flat, second_moment.reshape(2, -1), system, beta_max=1.0, eta_range=(1 / 3, 1.0))
    torch.testing.assert_close(heads.momentum, layer.momentum, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(heads.beta[:, 0], layer.beta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(heads.eta, layer.eta, rtol=1e-10, atol=1e-12)


def test_each_head_combines_its_masked_streams_and_the_sum_is_rotated_once():
    streams, rotated, second_moment, h, bases, weights, kwargs = _head_inputs(4)
    heads = combine_heads(streams, rotated, second_moment, h, bases, (8, 6), (4, 0), weights, None, **kwargs)
    expected = torch.zeros(2, 48, dtype=torch.float64)
    for head in range(4):
        masked = torch.zeros_like(streams)
        masked[:, :, 2 * head : 2 * head + 2] = streams[:, :, 2 * head : 2 * head + 2]
        flat = rotate(masked, bases).reshape(2, 2, -1)
        system = fop_system(*stream_grams(flat, h.reshape(2, -1)), weights, 0.0)
        alone = combine_block(flat, second_moment.reshape(2, -1), system, beta_max=1.0, eta_range=(1 / 3, 1.0))
        torch.testing.assert_close(heads.beta[:, head], alone.beta, rtol=1e-9, atol=1e-12)
        expected += alone.momentum
    torch.testing.assert_close(heads.momentum, expected, rtol=1e-10, atol=1e-12)
    assert heads.second_moment.shape == (2, 48) and bool((heads.second_moment >= heads.momentum.square()).all())
