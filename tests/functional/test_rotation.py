"""Block layouts, rotations and Kronecker statistics, checked against explicit formulas."""

import pytest
import torch

from mlfop.functional import block_layout, kronecker_statistics, merge_small_dims, rotate, unrotate


@pytest.mark.parametrize(
    ("shape", "max_dim", "expected"),
    [
        ((64, 3, 3, 3), 10000, (1728,)),
        ((3, 4), 10000, (12,)),  # the shape pytorch_optimizer's merge crashes on
        ((20000, 5), 10000, (20000, 5)),
        ((5, 20000), 10000, (5, 20000)),
        ((8, 4, 3, 3), 16, (8, 12, 3)),
        ((1, 5), 10000, (5,)),
        ((1, 1), 10000, (1,)),
        ((2, 512, 1, 2048, 1, 3, 4), 1024, (1024, 2048, 12)),
    ],
)
def test_merge_small_dims(shape, max_dim, expected):
    assert merge_small_dims(shape, max_dim) == expected


def test_block_layout_kinds():
    assert block_layout((), max_precond_dim=10, merge_dims=False, precondition_1d=True) == ((), ())
    assert block_layout((7,), max_precond_dim=10, merge_dims=False, precondition_1d=False) == ((7,), (False,))
    assert block_layout((7,), max_precond_dim=10, merge_dims=False, precondition_1d=True) == ((7,), (True,))
    assert block_layout((11,), max_precond_dim=10, merge_dims=False, precondition_1d=True) == ((11,), (False,))
    assert block_layout((20, 8), max_precond_dim=10, merge_dims=False, precondition_1d=False) == ((20, 8), (False, True))
    assert block_layout((3, 4), max_precond_dim=100, merge_dims=True, precondition_1d=False) == ((12,), (True,))
    assert block_layout((3, 4), max_precond_dim=0, merge_dims=False, precondition_1d=False) == ((3, 4), (False, False))


def _orthonormal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_rotate_matrix_is_QLt_X_QR_and_unrotate_inverts():
    x = torch.randn(5, 7, dtype=torch.float64)
    ql, qr = _orthonormal(5, 1), _orthonormal(7, 2)
    torch.testing.assert_close(rotate(x, [ql, qr]), ql.T @ x @ qr)
    torch.testing.assert_close(unrotate(rotate(x, [ql, qr]), [ql, qr]), x)
    torch.testing.assert_close(rotate(x, [None, qr]), x @ qr)
    torch.testing.assert_close(rotate(x, [ql, None]), ql.T @ x)
    torch.testing.assert_close(unrotate(x, [ql, None]), ql @ x)


def test_rotate_nd_matches_einsum_with_skipped_dims():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    q0, q2 = _orthonormal(3, 3), _orthonormal(5, 4)
    expected = torch.einsum("abc,ai,ck->ibk", x, q0, q2)
    torch.testing.assert_close(rotate(x, [q0, None, q2]), expected)
    torch.testing.assert_close(unrotate(expected, [q0, None, q2]), x)
    # 1-D: Q^T g ; 0-D passes through.
    g = torch.randn(6, dtype=torch.float64)
    q = _orthonormal(6, 5)
    torch.testing.assert_close(rotate(g, [q]), q.T @ g)
    s = torch.tensor(2.5)
    assert torch.equal(rotate(s, []), s)


def test_kronecker_statistics_are_mode_gram_matrices():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    stats = kronecker_statistics(x, [True, False, True])
    torch.testing.assert_close(stats[0], torch.einsum("abc,dbc->ad", x, x))
    assert stats[1] is None
    torch.testing.assert_close(stats[2], torch.einsum("abc,abd->cd", x, x))
    m = torch.randn(4, 6, dtype=torch.float64)
    left, right = kronecker_statistics(m, [True, True])
    torch.testing.assert_close(left, m @ m.T)
    torch.testing.assert_close(right, m.T @ m)
    v = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(kronecker_statistics(v, [True])[0], torch.outer(v, v))


def test_leading_stream_dimension_is_carried_through_rotation_and_summed_in_statistics():
    streams = torch.randn(3, 4, 5, dtype=torch.float64)
    ql, qr = _orthonormal(4, 6), _orthonormal(5, 7)
    for bases in ([ql, qr], [None, qr], [ql, None]):
        stacked = rotate(streams, bases)
        for k in range(3):
            torch.testing.assert_close(stacked[k], rotate(streams[k], bases))
        torch.testing.assert_close(unrotate(stacked, bases), streams)
    cube = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    q0, q2 = _orthonormal(3, 8), _orthonormal(5, 9)
    stacked = rotate(cube, [q0, None, q2])
    torch.testing.assert_close(stacked[1], rotate(cube[1], [q0, None, q2]))
    stats = kronecker_statistics(streams, [True, True])
    torch.testing.assert_close(stats[0], sum(s @ s.T for s in streams))
    torch.testing.assert_close(stats[1], sum(s.T @ s for s in streams))
    stats = kronecker_statistics(cube, [True, False, True])
    torch.testing.assert_close(stats[2], sum(kronecker_statistics(c, [True, False, True])[2] for c in cube))
