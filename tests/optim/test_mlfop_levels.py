"""Head level, noise-aware shrinkage and diagnostics of ML-FOP-SOAP."""

import json

import pytest
import torch

import mlfop
from mlfop.diagnostics import JSONLinesWriter, TensorBoardWriter, flatten
from mlfop.functional.fop import noise_shrinkage, stream_noise
from mlfop.functional.rotation import rotate


def _orthonormal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _train_block(heads=None, levels=("global", "layer", "head"), steps=8, diagnostics="head", param_seed=0, **kwargs):
    torch.manual_seed(param_seed)
    weight = torch.nn.Parameter(torch.randn(8, 6))
    spec = None if heads is None else {weight: heads}
    opt = mlfop.MLFOPSOAP([weight], heads=spec, levels=levels, diagnostics=diagnostics, lr=1e-2, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=gen)
        for stream, target in (("image", torch.ones(32, 8)), ("text", -torch.ones(32, 8))):
            for _ in range(2):
                noisy = target + 0.1 * torch.randn(32, 8, generator=gen)
                noisy[:, :4] = torch.ones(32, 4)  # heads 0-1 (rows 0-3): the streams agree
                ((x @ weight.T - noisy) ** 2).mean().backward()
                opt.fold(stream)
        opt.step()
        opt.zero_grad()
    return weight.detach(), opt


def test_one_head_equals_the_layer_level():
    layer, _ = _train_block()
    one_head, _ = _train_block(heads=(1, 0))
    # Same streams, same projection; eta is summed from tensors on the head path and from the
    # Gram matrices on the layer path, so the two agree to float32 rounding, not bit for bit.
    assert float((one_head - layer).norm() / layer.norm()) < 1e-6


def test_each_heads_beta_equals_fop_on_its_masked_slice():
    """Direct computation: FOP of the streams masked to the head, with the step's bases and h."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 6))
    opt = mlfop.MLFOPSOAP([weight], heads={weight: (4, 0)}, diagnostics="head", noise_shrinkage=False)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        for stream in ("image", "text"):
            weight.grad = (weight.grad if weight.grad is not None else 0) + torch.randn(8, 6, generator=gen)
            opt.fold(stream)
        if step == 2:
            grads = opt.current_stream_gradients()
            state = {k: v.clone() for k, v in opt.state[weight].items()}
        opt.step()
        opt.zero_grad()
    streams = torch.stack([grads["image"][0], grads["text"][0]]).double()
    bases = [state["basis_0"].double(), state["basis_1"].double()]
    rotated = rotate(streams, bases)
    v = state["exp_avg_sq"].double().lerp(0.5 * rotated.square().sum(0), 1 - 0.95)
    h = v.sqrt() + 1e-8
    heads = opt.diagnostics()["blocks"]["group0.param0"]["heads"]
    for head in range(4):
        masked = torch.zeros_like(streams)
        masked[:, 2 * head : 2 * head + 2] = streams[:, 2 * head : 2 * head + 2]
        r = rotate(masked, bases)
        avg, diff = 0.5 * (r[0] + r[1]), r[0] - r[1]
        s = (diff * avg * h).sum() / (avg * avg * h).sum()
        perp = diff - s * avg
        beta = float(((avg * perp / h).sum() / (perp * perp / h).sum()).clamp(-1, 1))
        assert heads[str(head)]["beta_raw"]["image"] == pytest.approx(beta, rel=1e-4, abs=1e-6)


def test_heads_get_independent_betas_where_streams_disagree():
    _, opt = _train_block(heads=(4, 0))
    heads = opt.diagnostics()["blocks"]["group0.param0"]["heads"]
    agree = [abs(heads[str(h)]["beta_raw"]["image"]) for h in (0, 1)]
    disagree = [abs(heads[str(h)]["beta_raw"]["image"]) for h in (2, 3)]
    assert max(agree) < 1e-3 < min(disagree)
    per_layer, _ = _train_block(heads=(4, 0), levels=("global", "layer"))
    per_head, _ = _train_block(heads=(4, 0))
    assert not torch.allclose(per_layer, per_head)


@pytest.mark.parametrize(
    "levels", [(), ("head",), ("layer",), ("global",), ("layer", "head"), ("global", "head"), ("global", "layer", "head")]
)
def test_every_level_subset_runs_with_heads(levels):
    weight, opt = _train_block(heads=(2, 1), levels=levels, steps=4)
    assert torch.isfinite(weight).all()


def _noise_run(noise, signal, micro_batches=8, steps=3):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 6))
    opt = mlfop.MLFOPSOAP([weight], diagnostics="block", lr=1e-3)
    gen = torch.Generator().manual_seed(3)
    mean = torch.randn(6, 6, generator=gen)
    for _ in range(steps):
        for i in range(2 * micro_batches):
            stream = ("image", "text")[i % 2]
            offset = signal if stream == "image" else -signal
            weight.grad = (weight.grad if weight.grad is not None else 0) + (
                mean + offset + noise * torch.randn(6, 6, generator=gen)
            )
            opt.fold(stream)
        opt.step()
        opt.zero_grad()
    return opt.diagnostics()["blocks"]["group0.param0"]


def test_shrinkage_fades_pure_noise_and_keeps_a_noise_free_difference():
    noise_only = _noise_run(noise=1.0, signal=torch.zeros(6, 6))
    assert noise_only["noise_fraction"] > 0.6
    assert abs(noise_only["beta"]["image"]) <= 0.4 * abs(noise_only["beta_raw"]["image"]) + 1e-12
    signal = torch.randn(6, 6, generator=torch.Generator().manual_seed(4))
    clean = _noise_run(noise=0.0, signal=signal)
    assert clean["noise_fraction"] < 1e-6
    assert clean["beta"]["image"] == pytest.approx(clean["beta_raw"]["image"], rel=1e-6)
    assert abs(clean["beta_raw"]["image"]) > 0


def test_noise_estimate_matches_the_sample_variance():
    gen = torch.Generator().manual_seed(5)
    micro = torch.randn(2, 40, 10, generator=gen, dtype=torch.float64)  # (K, n, size)
    sums = micro.sum(1)
    micro_sq = micro.square().sum((1, 2)).view(2, 1)
    sums_sq = sums.square().sum(1).view(2, 1)
    n = torch.tensor([40, 40])
    sigma = stream_noise(micro_sq, sums_sq, n, n, torch.tensor([0.5, 0.5]), 1.0)
    # g_k = S_k / a_k = 2 S_k; Var(g_k) = 4 * n * Var(m), Var(m) the unbiased per-coordinate sum.
    expected = 4 * 40 * micro.var(dim=1, unbiased=True).sum(1)
    torch.testing.assert_close(sigma.view(2), expected)
    rho, fraction = noise_shrinkage(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), torch.tensor([0.5, 0.5]))
    assert (rho, fraction) == (1.0, 0.0)


def test_diagnostics_equal_direct_computations():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    opt = mlfop.MLFOPSOAP(model.named_parameters(), diagnostics="block", noise_shrinkage=False)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        for i in range(4):
            x = torch.randn(16, 8, generator=gen)
            sign = 1.0 if i % 2 == 0 else -1.0
            (model(x) - sign * x).pow(2).mean().backward()
            opt.fold(("image", "text")[i % 2])
        grads = opt.current_stream_gradients()
        opt.step()
        opt.zero_grad()
    stats = opt.diagnostics()
    names = [n for n, _ in model.named_parameters()]
    assert set(stats["blocks"]) == set(names)
    for i, name in enumerate(names):
        a, b = grads["image"][i].flatten(), grads["text"][i].flatten()
        assert stats["blocks"][name]["cos"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-5)
        assert stats["blocks"][name]["norm_ratio"] == pytest.approx(float(a.norm() / b.norm()), rel=1e-5)
    whole = {k: torch.cat([g.flatten() for g in grads[k]]) for k in grads}
    assert stats["norms"] == pytest.approx({k: float(g.norm()) for k, g in whole.items()}, rel=1e-5)
    cos = float(whole["image"] @ whole["text"] / (whole["image"].norm() * whole["text"].norm()))
    assert stats["cos"] == pytest.approx(cos, abs=1e-5) and -1.0 <= stats["cos_h"] <= 1.0
    assert stats["weights"] == pytest.approx({"image": 0.5, "text": 0.5})
    conflicting = sum(stats["blocks"][n]["cos"] < 0 for n in names) / len(names)
    assert stats["conflict_fraction"] == pytest.approx(conflicting)
    global_only = mlfop.MLFOPSOAP(model.parameters(), diagnostics="global")
    off = mlfop.MLFOPSOAP(model.parameters(), diagnostics="off")
    for o in (global_only, off):
        for _ in range(2):  # the first call only initialises
            model(torch.ones(2, 8)).sum().backward()
            o.fold("image")
            model(-torch.ones(2, 8)).sum().backward()
            o.fold("text")
            o.step()
            o.zero_grad()
    assert set(global_only.diagnostics()) == {"streams", "weights", "norms_hinv", "norms", "cos", "cos_h",
                                              "conflict_fraction", "global"}
    assert off.diagnostics() == {}
    model(torch.ones(2, 8)).sum().backward()
    global_only.step()  # a step without folds is plain SOAP: no heterogeneity to report
    assert global_only.diagnostics() == {}


def test_sinks_write_files_that_read_back(tmp_path):
    _, opt = _train_block(heads=(2, 0), steps=3)
    stats = opt.diagnostics()
    with JSONLinesWriter(tmp_path / "diag.jsonl") as sink:
        sink.write(3, stats)
        sink.write(4, stats)
    lines = [json.loads(line) for line in (tmp_path / "diag.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 4] and lines[0]["weights"] == stats["weights"]
    with TensorBoardWriter(tmp_path / "tb") as sink:
        sink.write(3, stats)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    flat = flatten(stats)
    assert tags == set(flat)
    assert "mlfop/blocks/group0.param0/heads/1/beta_raw/image" in tags
    value = events.Scalars("mlfop/conflict_fraction")[0]
    assert value.step == 3 and value.value == pytest.approx(flat["mlfop/conflict_fraction"])


@pytest.mark.parametrize(
    ("heads", "error", "match"),
    [
        ({"w": (2, 0)}, TypeError, "tensor"),
        ("strict", TypeError, "strict=True"),
        (lambda w: {w: (5, 0)}, ValueError, "does not divide"),
        (lambda w: {w: (2, 3)}, ValueError, "axis"),
        (lambda w: {torch.nn.Parameter(torch.ones(8, 6)): (2, 0)}, ValueError, "not"),
    ],
)
def test_bad_head_layouts_are_refused_at_construction(heads, error, match):
    weight = torch.nn.Parameter(torch.ones(8, 6))
    spec = heads(weight) if callable(heads) else heads
    with pytest.raises(error, match=match):
        mlfop.MLFOPSOAP([weight], heads=spec)


def test_heads_detected_from_a_transformers_model_drive_the_head_level():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    opt = mlfop.MLFOPSOAP(model.named_parameters(), heads=model, diagnostics="head")
    assert len(opt.head_layouts) == 4
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for stream in ("image", "text", "image", "text"):
            ids = torch.randint(32, (2, 8), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.fold(stream)
        opt.step()
        opt.zero_grad()
    blocks = opt.diagnostics()["blocks"]
    assert set(blocks["model.layers.0.self_attn.k_proj.weight"]["heads"]) == {"0", "1"}
    assert set(blocks["model.layers.0.self_attn.o_proj.weight"]["heads"]) == {"0", "1", "2", "3"}
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("levels,heads", [(("global", "layer", "head"), (4, 0)), (("global", "layer"), None)])
@pytest.mark.parametrize("seed", range(4))
def test_no_coordinate_of_the_first_update_exceeds_the_learning_rate(levels, heads, seed):
    """V takes g_comb^2 where the correction leaves the streams' envelope sum_k w_k r_k^2.

    Per-head coefficients put energy in eigen-coordinates where every stream is small (the
    head masks do not follow the eigenbasis). Without the envelope, five of these eight cases
    move further than the learning rate (up to 1.26x; four with the head level)."""
    torch.manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(8, 6))
    lr = 1e-2
    opt = mlfop.MLFOPSOAP([weight], heads=None if heads is None else {weight: heads}, levels=levels, lr=lr,
                          weight_decay=0.0, precondition_frequency=100, noise_shrinkage=False)
    gen = torch.Generator().manual_seed(seed + 10)

    def step():
        for stream in ("image", "text"):
            weight.grad = (weight.grad if weight.grad is not None else 0) + torch.randn(8, 6, generator=gen)
            opt.fold(stream)
        opt.step()
        opt.zero_grad()

    step()  # the first call sets the bases
    before = weight.detach().clone()
    bases = [opt.state[weight][f"basis_{i}"].clone() for i in range(2)]
    step()  # the first update
    moved = rotate((weight.detach() - before)[None], bases)[0]
    assert float(moved.abs().max()) <= lr * (1 + 1e-5)
