"""Head slicing and per-head Gram matrices against explicit slicing loops."""

import pytest
import torch

from mlfop.functional.heads import check_head_layout, head_gram, rotate_heads, split_heads
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


def _gram_loop(a, b, num_heads, axis):
    k = a.shape[0]
    out = torch.zeros(num_heads, k, k, dtype=torch.float64)
    for h in range(num_heads):
        for i in range(k):
            for j in range(k):
                slice_a, slice_b = _slice(a[i], num_heads, axis, h), _slice(b[j], num_heads, axis, h)
                out[h, i, j] = (slice_a.double() * slice_b.double()).sum()
    return out


@pytest.mark.parametrize(
    "shape,num_heads,axis", [((12, 5), 4, 0), ((5, 12), 3, 1), ((4, 6, 3), 2, 1), ((6, 3, 2), 3, -3)]
)
def test_head_gram_equals_loop_of_slice_dot_products(shape, num_heads, axis):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    b = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    gram = head_gram(a, b, num_heads, axis)
    assert gram.dtype == torch.float64 and gram.shape == (num_heads, 3, 3)
    torch.testing.assert_close(gram, _gram_loop(a, b, num_heads, axis), rtol=1e-12, atol=1e-12)


def test_head_gram_non_contiguous_float32_input():
    a = torch.randn(2, 8, 12).transpose(1, 2)  # (2, 12, 8), non-contiguous
    b = torch.randn(2, 12, 8)
    gram = head_gram(a, b, 4, 1)
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, _gram_loop(a, b, 4, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1])
def test_single_head_gram_equals_whole_block_gram(axis):
    a, b = torch.randn(4, 6, 10, dtype=torch.float64), torch.randn(4, 6, 10, dtype=torch.float64)
    whole = a.reshape(4, -1) @ b.reshape(4, -1).T
    torch.testing.assert_close(head_gram(a, b, 1, axis)[0], whole, rtol=1e-12, atol=1e-12)
    # and the heads of any layout add up to it
    torch.testing.assert_close(head_gram(a, b, 2, axis).sum(0), whole, rtol=1e-12, atol=1e-12)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match=r"num_heads=5 does not divide axis 0 \(size 12\).*\(12, 8\)"):
        split_heads(torch.zeros(12, 8), 5, 0)
    with pytest.raises(ValueError, match="axis 2 is out of range.*\\(12, 8\\)"):
        check_head_layout((12, 8), 2, 2)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        check_head_layout((12, 8), 2.0, 0)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        check_head_layout((12, 8), 0, 0)
    with pytest.raises(ValueError, match="same shape"):
        head_gram(torch.zeros(2, 4, 4), torch.zeros(3, 4, 4), 2, 0)
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
