"""The diagnostics record on its own: device tensors until read, then the documented dict."""

import math

import pytest
import torch

from mlfop.diagnostics import StepRecord, flatten
from mlfop.functional.fop import SystemTotals, combine_block, fop_system, stream_grams


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(2, 2, 12, generator=gen, dtype=torch.float64)
    flat[0, 1] = flat[0, 0] + 0.1 * flat[0, 1]  # block 0: the streams agree
    flat[1, 1] = -flat[1, 0]  # block 1: they point apart
    h = torch.rand(2, 12, generator=gen, dtype=torch.float64) + 0.5
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    system = fop_system(*stream_grams(flat, h), weights, 0.0)
    combination = combine_block(flat, (flat.square() * 0.5).sum(1), system, beta_max=1.0, eta_range=(1 / 3, 1.0))
    return flat, weights, system, combination


@pytest.mark.parametrize("detail", [1, 2])
def test_the_record_builds_the_documented_dict_once(detail):
    flat, weights, system, combination = _batch(0)
    params = [torch.zeros(1), torch.zeros(1)]
    record = StepRecord(["image", "text"], detail, {params[0]: "a", params[1]: "b"})
    record.add(params, system, combination, (1 / 3, 1.0))
    totals = SystemTotals.zeros(2, torch.device("cpu"))
    totals.add(system)
    record.finish(weights, totals, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    stats = record.as_dict()
    assert record.as_dict() is stats  # built once
    whole = flat.transpose(0, 1).reshape(2, -1)
    cos = float(whole[0] @ whole[1] / (whole[0].norm() * whole[1].norm()))
    assert stats["cos"] == pytest.approx(cos) and stats["conflict_fraction"] == 0.5
    assert stats["norms"] == pytest.approx({"image": float(whole[0].norm()), "text": float(whole[1].norm())})
    if detail == 1:
        assert "blocks" not in stats
        return
    assert list(stats["blocks"]) == ["a", "b"]
    assert stats["blocks"]["b"]["cos"] == pytest.approx(-1.0)
    assert stats["blocks"]["a"]["eta"] == pytest.approx(float(combination.eta[0]))
    assert all(math.isfinite(v) for v in flatten(stats).values())
