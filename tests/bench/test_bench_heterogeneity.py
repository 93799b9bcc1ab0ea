"""The heterogeneity probe: the same numbers as ML-FOP-SOAP's block diagnostics, whatever the route."""

import pytest
import torch

import mlfop
from mlfop.bench.heterogeneity import StreamProbe, layer_of
from mlfop.bench.optimizers import GradientRoute, UPGradRoute


def test_layer_of_cuts_at_the_layer_index_or_the_module():
    assert layer_of("hf.model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_of("hf.model.vision_model.encoder.layers.1.fc1.bias") == "model.vision_model.encoder.layers.1"
    assert layer_of("hf.model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_of("hf.lm_head.weight") == "lm_head"


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Tanh(), torch.nn.Linear(3, 2, bias=False))


def _probed_steps(net, route, optimizer=None, steps=2):
    """Two steps of two micro-batches per stream (stream losses weighted differently), probed."""
    probe = StreamProbe(list(net.named_parameters()), {"gen": 0.5, "und": 0.5})
    generator = torch.Generator().manual_seed(1)
    weights = {"gen": torch.tensor([1.0, 0.0]), "und": torch.tensor([0.3, 1.0])}
    for _ in range(steps):
        probe.start()
        for stream in ("gen", "und", "gen", "und"):
            x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 2, generator=generator)
            (0.25 * ((net(x) - y) ** 2 * weights[stream]).sum()).backward()
            probe.collect(stream)
            route(stream)
            probe.rebase()
        if optimizer is not None:
            optimizer.step()
        for p in net.parameters():
            p.grad = None
    return probe.summary()


def test_probe_equals_mlfop_block_diagnostics():
    net = _net()
    optimizer = mlfop.MLFOPSOAP(net.named_parameters(), streams=("gen", "und"), levels=("global", "layer"),
                                diagnostics="block")
    summary = _probed_steps(net, optimizer.fold, optimizer)
    blocks = optimizer.diagnostics()["blocks"]
    for layer, name in (("0", "0.weight"), ("2", "2.weight")):
        assert summary["layers"][layer]["cos"] == pytest.approx(blocks[name]["cos"], rel=1e-5)
        assert summary["layers"][layer]["norm_ratio"] == pytest.approx(blocks[name]["norm_ratio"], rel=1e-5)
    assert summary["conflict"] == optimizer.diagnostics()["conflict_fraction"]
    assert {summary["layers"][k]["conflict"] for k in ("0", "2")} <= {0.0, 1.0}


def test_probe_sees_the_same_streams_through_a_route_that_moves_the_gradients():
    plain = _probed_steps(_net(), lambda stream: GradientRoute().after_backward(stream, tokens=1))
    net = _net()
    upgrad = UPGradRoute(list(net.parameters()), ("gen", "und"))
    moved = _probed_steps(net, lambda stream: upgrad.after_backward(stream, tokens=1))
    for key in ("cos", "norm_ratio", "conflict"):
        assert moved[key] == pytest.approx(plain[key], abs=1e-6)
        assert [v[key] for v in moved["layers"].values()] == pytest.approx(
            [v[key] for v in plain["layers"].values()], abs=1e-6)
    assert -1 <= plain["cos"] <= 1 and plain["norm_ratio"] > 0


def test_a_layer_one_stream_does_not_reach_has_no_values():
    net = _net()
    probe = StreamProbe(list(net.named_parameters()), {"gen": 0.5, "und": 0.5})
    probe.start()
    for stream in ("gen", "und"):
        out = net[0](torch.ones(1, 4)).sum() if stream == "und" else net(torch.ones(1, 4)).sum()
        out.backward()
        probe.collect(stream)
        probe.rebase()
    summary = probe.summary()
    assert summary["layers"]["2"] == {"cos": None, "norm_ratio": None, "conflict": None}
    assert summary["layers"]["0"]["cos"] is not None and summary["cos"] == summary["layers"]["0"]["cos"]
