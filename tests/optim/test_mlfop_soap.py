"""ML-FOP-SOAP's invariants: reduction to SOAP, symmetry, weights, the fold contract, bad input."""

import copy
import io
import warnings

import pytest
import torch

import mlfop

STEPS = 32  # > 3 refreshes at the default precondition_frequency of 10


def _model(seed=0):
    """Square weights, so that every Kronecker factor is full rank from the first step.

    With a rank-deficient factor SOAP's first basis inside the null space is arbitrary and
    rounding alone moves it (soap-reference.md §0.8); rounding-level comparisons need this.
    """
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _micro_batches(step, count=4, seed=1):
    """Deterministic micro-batches whose targets depend on the stream (so streams disagree)."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    batches = []
    for i in range(count):
        stream = ("image", "text", "audio")[i % 3] if count % 3 == 0 else ("image", "text")[i % 2]
        tokens = 16 + (5 * i + step) % 7
        x = torch.randn(tokens, 8, generator=gen)
        shift = {"image": 1.0, "text": -1.0, "audio": 0.5}[stream]
        y = torch.randn(tokens, 8, generator=gen) * 0.1 + shift * x.flip(1)
        batches.append((stream, x, y))
    return batches


def _loss(model, x, y, normalisation, total_tokens, count):
    err = (model(x) - y).pow(2).sum(dim=1)
    if normalisation == "sum":
        return err.sum()
    if normalisation == "micro_mean":
        return err.mean() / count
    return err.sum() / total_tokens  # global token mean


def _train(opt_factory, fold=None, steps=STEPS, normalisation="micro_mean", count=4, order=None, rename=None, model=None):
    model = model if model is not None else _model()
    opt = opt_factory(model.parameters())
    for step in range(steps):
        batches = _micro_batches(step, count)
        if order is not None:
            batches = [batches[i] for i in order]
        total = sum(x.shape[0] for _, x, _ in batches)
        for stream, x, y in batches:
            _loss(model, x, y, normalisation, total, count).backward()
            if fold == "stream":
                opt.fold(rename.get(stream, stream) if rename else stream, tokens=x.shape[0])
            elif fold == "stream_no_tokens":
                opt.fold(rename.get(stream, stream) if rename else stream)
            elif fold == "one":
                opt.fold("image")
            elif fold == "untagged":
                opt.fold()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("normalisation", ["sum", "micro_mean", "token_mean"])
def test_no_fold_or_one_stream_is_soap_bit_for_bit(normalisation):
    soap, _ = _train(lambda p: mlfop.SOAP(p), normalisation=normalisation)
    unfolded, _ = _train(lambda p: mlfop.MLFOPSOAP(p), normalisation=normalisation)
    one_stream, _ = _train(lambda p: mlfop.MLFOPSOAP(p), fold="one", normalisation=normalisation)
    assert torch.equal(_flat(soap), _flat(unfolded))
    assert torch.equal(_flat(soap), _flat(one_stream))


def test_two_streams_with_equal_gradients_are_soap():
    def duplicated(opt_factory, fold):
        model = _model()
        opt = opt_factory(model.parameters())
        gen = torch.Generator().manual_seed(0)
        for _ in range(STEPS):
            for x, y in [(torch.randn(64, 8, generator=gen), torch.randn(64, 8, generator=gen)) for _ in range(2)]:
                for stream in ("image", "text"):  # the same micro-batch in both streams
                    (model(x) - y).pow(2).mean().backward()
                    if fold:
                        opt.fold(stream)
            opt.step()
            opt.zero_grad()
        return _flat(model)

    soap = duplicated(lambda p: mlfop.SOAP(p), False)
    fop = duplicated(lambda p: mlfop.MLFOPSOAP(p), True)
    start = _flat(_model())
    gap = float((fop - soap).norm() / (soap - start).norm())
    print(f"identical streams against SOAP after {STEPS} steps: {gap:.3g} of the displacement")
    assert gap < 1e-4


def test_streams_change_the_step_when_they_disagree():
    soap, _ = _train(lambda p: mlfop.SOAP(p))
    fop, _ = _train(lambda p: mlfop.MLFOPSOAP(p), fold="stream")
    assert float((_flat(fop) - _flat(soap)).norm() / _flat(soap).norm()) > 1e-3


def _relative(a, b):
    start = _flat(_model())
    return float((_flat(a) - _flat(b)).norm() / (_flat(b) - start).norm())


@pytest.mark.parametrize("count", [4, 6])  # two streams; three streams (image, text, audio)
def test_renaming_reordering_streams_and_fold_order_change_only_rounding(count):
    names = ("image", "text", "audio")[: 2 if count == 4 else 3]
    reference, _ = _train(lambda p: mlfop.MLFOPSOAP(p, streams=names), fold="stream", count=count, steps=24)
    reordered, _ = _train(lambda p: mlfop.MLFOPSOAP(p, streams=names[::-1]), fold="stream", count=count, steps=24)
    rename = {"image": "x", "text": "y", "audio": "z"}
    renamed, _ = _train(
        lambda p: mlfop.MLFOPSOAP(p, streams=tuple(rename[n] for n in names)), fold="stream", count=count, steps=24, rename=rename
    )
    backwards, _ = _train(
        lambda p: mlfop.MLFOPSOAP(p, streams=names), fold="stream", count=count, steps=24, order=list(range(count))[::-1]
    )
    gaps = [_relative(other, reference) for other in (reordered, renamed, backwards)]
    soap, _ = _train(lambda p: mlfop.SOAP(p), count=count, steps=24)
    print(f"K={len(names)}: reordered/renamed/reversed folds {gaps}, vs SOAP {_relative(reference, soap):.3g}")
    # Sums over streams never follow their names or order: K = 2 adds two terms (symmetric), K = 3
    # sums in an order set by the streams' sizes (measured: 0 and 1.3e-6; 3.5e-4 when the
    # statistics were summed in name order).
    assert max(gaps[:2]) < (1e-6 if len(names) == 2 else 1e-5) and gaps[2] < 1e-5
    assert _relative(reference, soap) > 1e-2  # the symmetry above is not the trivial one


def test_natural_weights_make_the_shared_component_the_accumulated_gradient():
    model = _model()
    opt = mlfop.MLFOPSOAP(model.parameters())
    batches = _micro_batches(0, 4)
    total = sum(x.shape[0] for _, x, _ in batches)
    for stream, x, y in batches:
        _loss(model, x, y, "token_mean", total, 4).backward()
        opt.fold(stream, tokens=x.shape[0])
    grads, weights = opt.current_stream_gradients(), opt.current_stream_weights()
    assert weights == pytest.approx({"image": 16 / total * 0 + weights["image"], "text": 1 - weights["image"]})
    for i, p in enumerate(model.parameters()):
        shared = sum(weights[name] * grads[name][i] for name in grads)
        # Exact in exact arithmetic; the fold keeps p.grad's total as differences, so rounding.
        torch.testing.assert_close(shared, p.grad, rtol=1e-6, atol=1e-7)


def test_token_sum_over_global_count_gives_each_streams_own_token_mean():
    model = _model()
    opt = mlfop.MLFOPSOAP(model.parameters(), stream_weights={"image": 0.5, "text": 0.5})
    batches = _micro_batches(3, 4)
    total = sum(x.shape[0] for _, x, _ in batches)
    for stream, x, y in batches:
        _loss(model, x, y, "token_mean", total, 4).backward()
        opt.fold(stream, tokens=x.shape[0])
    folded = opt.current_stream_gradients()
    for name in ("image", "text"):
        alone = copy.deepcopy(model)
        alone.zero_grad()
        mine = [(x, y) for stream, x, y in batches if stream == name]
        tokens = sum(x.shape[0] for x, _ in mine)
        for x, y in mine:
            ((alone(x) - y).pow(2).sum(dim=1).sum() / tokens).backward()
        for got, p in zip(folded[name], alone.parameters()):
            torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)
    assert opt.current_stream_weights() == {"image": 0.5, "text": 0.5}


def test_weight_modes():
    model = _model()
    for mode, expected in (("fixed", {"image": 0.5, "text": 0.5}), ({"image": 3.0, "text": 1.0}, {"image": 0.75, "text": 0.25})):
        opt = mlfop.MLFOPSOAP(model.parameters(), stream_weights=mode)
        for stream, tokens in (("image", 1), ("text", 3)):
            (model(torch.ones(2, 8)).sum()).backward()
            opt.fold(stream, tokens=tokens)
        assert opt.current_stream_weights() == pytest.approx(expected)
        opt.zero_grad()
    # Without the global level the weights are the natural (token) shares.
    opt = mlfop.MLFOPSOAP(model.parameters(), stream_weights="fixed", levels=("layer",))
    for stream, tokens in (("image", 1), ("text", 3)):
        model(torch.ones(2, 8)).sum().backward()
        opt.fold(stream, tokens=tokens)
    assert opt.current_stream_weights() == pytest.approx({"image": 0.25, "text": 0.75})


def test_balanced_weights_favour_the_stream_with_smaller_gradients():
    model = _model()
    opt = mlfop.MLFOPSOAP(model.parameters(), stream_weights="balanced", balance_alpha=1.0)
    for step in range(4):
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(step))
        (100 * model(x).pow(2).mean()).backward()
        opt.fold("image")
        model(x).sin().mean().backward()
        opt.fold("text")
        weights = opt.current_stream_weights()
        opt.step()
        opt.zero_grad()
    assert weights["text"] > 0.9 and set(opt.stream_norm_ema) == {"image", "text"}


def test_untagged_folds_alternate_and_three_streams_and_missing_streams_work():
    soap, _ = _train(lambda p: mlfop.SOAP(p), steps=12)
    untagged, opt = _train(lambda p: mlfop.MLFOPSOAP(p, streams=None), fold="untagged", steps=12)
    assert opt.streams == ("even", "odd")
    assert torch.isfinite(_flat(untagged)).all() and not torch.equal(_flat(untagged), _flat(soap))
    # three streams, one of which is missing from every other step
    model = _model()
    opt = mlfop.MLFOPSOAP(model.parameters(), streams=("image", "text", "text_only"))
    for step in range(12):
        for stream, x, y in _micro_batches(step, 6):
            if stream == "audio" and step % 2:
                continue
            (model(x) - y).pow(2).mean().backward()
            opt.fold({"audio": "text_only"}.get(stream, stream))
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(_flat(model)).all()


@pytest.mark.parametrize("levels", [(), ("global",), ("layer",), ("global", "layer"), ("global", "layer", "head")])
def test_each_level_subset_runs_and_the_levels_matter(levels):
    model, _ = _train(lambda p: mlfop.MLFOPSOAP(p, levels=levels, stream_weights="fixed"), fold="stream", steps=12)
    full, _ = _train(lambda p: mlfop.MLFOPSOAP(p, stream_weights="fixed"), fold="stream", steps=12)
    assert torch.isfinite(_flat(model)).all()
    if "layer" not in levels or "global" not in levels:
        assert not torch.equal(_flat(model), _flat(full))


def test_clip_grad_norm_after_the_last_backward_scales_every_stream_alike():
    clipped_model, scaled_model = _model(), _model()
    clipped = mlfop.MLFOPSOAP(clipped_model.parameters())
    scaled = mlfop.MLFOPSOAP(scaled_model.parameters())
    fired = 0
    for step in range(12):
        batches = _micro_batches(step)
        for stream, x, y in batches:
            (clipped_model(x) - y).pow(2).mean().backward()
            clipped.fold(stream)
        norm = float(torch.nn.utils.clip_grad_norm_(clipped_model.parameters(), max_norm=0.5))
        factor = min(1.0, 0.5 / (norm + 1e-6))
        fired += factor < 1.0
        for stream, x, y in batches:  # the same loop with every micro-batch pre-scaled
            (factor * (scaled_model(x) - y).pow(2).mean()).backward()
            scaled.fold(stream)
        clipped.step(), scaled.step()
        clipped.zero_grad(), scaled.zero_grad()
    assert fired >= 6
    assert _relative(clipped_model, scaled_model) < 1e-4


def test_a_change_of_p_grad_that_is_not_a_global_scale_is_refused_and_nothing_changes():
    model, opt = _train(lambda p: mlfop.MLFOPSOAP(p), fold="stream", steps=3)
    for stream, x, y in _micro_batches(9):
        (model(x) - y).pow(2).mean().backward()
        opt.fold(stream)
    model[0].weight.grad.mul_(0.5)  # per-parameter, not global
    params, state = copy.deepcopy(list(model.parameters())), copy.deepcopy(opt.state)
    with pytest.raises(ValueError, match="p.grad no longer matches the folded streams"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for p, entry in opt.state.items():
        saved = next(v for k, v in state.items() if torch.equal(k, p))
        assert all(torch.equal(entry[key], saved[key]) for key in entry)


def test_grad_scaler_skips_an_inf_step_untouched_and_unscales_a_finite_one():
    scaled_model, plain_model = _model(), _model()
    scaled_opt = mlfop.MLFOPSOAP(scaled_model.parameters())
    plain_opt = mlfop.MLFOPSOAP(plain_model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(6):
        batches = _micro_batches(step)
        for i, (stream, x, y) in enumerate(batches):
            loss = (scaled_model(x) - y).pow(2).mean()
            if step == 3 and i == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaled_opt.fold(stream)
        if step == 3:
            before = _flat(scaled_model), copy.deepcopy(list(scaled_opt.state.values()))
        scaler.step(scaled_opt)
        scaler.update()
        scaled_opt.zero_grad()
        if step == 3:
            assert torch.equal(before[0], _flat(scaled_model))
            after = list(scaled_opt.state.values())
            assert all(torch.equal(a[k], b[k]) for a, b in zip(after, before[1]) for k in a)
            continue  # the plain run skips this step too
        for stream, x, y in batches:
            (plain_model(x) - y).pow(2).mean().backward()
            plain_opt.fold(stream)
        plain_opt.step()
        plain_opt.zero_grad()
    assert _relative(scaled_model, plain_model) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"streams": ("image", "image")}, "distinct"),
        ({"streams": ("image",)}, "at least 2"),
        ({"streams": "image"}, "sequence of names"),
        ({"stream_weights": "loud"}, "stream_weights must be one of"),
        ({"stream_weights": {"image": 1.0}}, r"missing \['text'\]"),
        ({"stream_weights": {"image": 1.0, "text": -1.0}}, "finite number >= 0"),
        ({"stream_weights": {"image": 1.0, "text": 1.0, "video": 1.0}}, r"unknown \['video'\]"),
        ({"levels": ("global", "token")}, "subset of"),
        ({"beta_max": -1.0}, "beta_max"),
        ({"eta_range": (0.0, 1.0)}, r"eta_range\[0\]"),
        ({"balance_alpha": 2.0}, "balance_alpha"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        mlfop.MLFOPSOAP(_model().parameters(), **kwargs)


def test_bad_folds_are_refused_with_a_clear_message():
    model = _model()
    opt = mlfop.MLFOPSOAP(model.parameters())
    with pytest.raises(ValueError, match="found no gradient"):
        opt.fold("image")
    model(torch.ones(1, 8)).sum().backward()
    with pytest.raises(ValueError, match="unknown stream 'video'"):
        opt.fold("video")
    for bad in (0, -3, float("nan"), "12"):
        with pytest.raises(ValueError, match="tokens must be a positive number"):
            opt.fold("image", tokens=bad)
    with pytest.raises(ValueError, match="stream name"):
        opt.fold()
    opt.fold("image", tokens=4)
    with pytest.raises(ValueError, match="every fold of a step or for none"):
        opt.fold("text")


def _checkpoint_round_trip(via, model, opt, make, tmp_path):
    """Save ``model`` and ``opt``, and load them into fresh ones from ``make()``: with
    ``torch.save``, DCP's state-dict helpers, or DCP's own ``dcp.save``/``dcp.load``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict, set_optimizer_state_dict, set_state_dict

    fresh_model, fresh_opt = make()
    if via == "dcp.save":
        folder = tmp_path / f"checkpoint-{len(list(tmp_path.iterdir()))}"
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
        model_state, optim_state = get_state_dict(fresh_model, fresh_opt)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=folder)
        set_state_dict(fresh_model, fresh_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        return fresh_model, fresh_opt
    buffer = io.BytesIO()
    optimizer_state = opt.state_dict() if via == "torch.save" else get_optimizer_state_dict(model, opt)
    torch.save({"model": model.state_dict(), "opt": optimizer_state}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_model.load_state_dict(saved["model"])
    if via == "torch.save":
        fresh_opt.load_state_dict(saved["opt"])
    else:
        set_optimizer_state_dict(fresh_model, fresh_opt, saved["opt"])
    return fresh_model, fresh_opt


@pytest.mark.parametrize("via", ["torch.save", "dcp", "dcp.save"])
def test_state_dict_mid_accumulation_is_refused_and_between_steps_resumes_bit_for_bit(via, tmp_path):
    """Balanced weights depend on the stream-norm EMA (global state): DCP must keep it too, also
    through ``dcp.load``, which fills only the keys a fresh optimizer's state dict has."""

    def make():
        model = _model(seed=5)
        return model, mlfop.MLFOPSOAP(model.parameters(), stream_weights="balanced")

    def run(split_at=None, steps=24):
        model = _model()
        opt = mlfop.MLFOPSOAP(model.parameters(), stream_weights="balanced")
        for step in range(steps):
            if step == split_at:
                norms = dict(opt.stream_norm_ema)
                model, opt = _checkpoint_round_trip(via, model, opt, make, tmp_path)
                assert opt.stream_norm_ema == norms != {}
            for i, (stream, x, y) in enumerate(_micro_batches(step)):
                (model(x) - y).pow(2).mean().backward()
                opt.fold(stream)
                if step == 2 and i == 1:
                    with pytest.raises(RuntimeError, match="between fold\\(\\) and step\\(\\)"):
                        opt.state_dict()
            opt.step()
            opt.zero_grad()
        return model

    reference = run()
    for split in (5, 10, 11):
        assert torch.equal(_flat(run(split)), _flat(reference))


def test_memory_of_the_folds_is_at_most_k_gradients():
    model = _model()
    opt = mlfop.MLFOPSOAP(model.parameters(), streams=("image", "text", "audio"))
    for stream, x, y in _micro_batches(0, 6):
        (model(x) - y).pow(2).mean().backward()
        opt.fold(stream)
    param_bytes = sum(p.nbytes for p in model.parameters())
    assert 0 < opt.fold_buffer_bytes() <= 3 * param_bytes
    opt.step()
    assert opt.fold_buffer_bytes() == 0
    soap = mlfop.SOAP(_model().parameters())
    soap_model = soap.param_groups[0]["params"]
    for p, q in zip(soap_model, model.parameters()):
        p.grad = q.grad.clone()
    soap.step()
    state_bytes = lambda o: sum(t.nbytes for s in o.state.values() for t in s.values())  # noqa: E731
    assert state_bytes(opt) == state_bytes(soap)


def test_zero_gradient_lr0_step_after_folds_has_no_nan():
    model = _model()
    opt = mlfop.MLFOPSOAP(model.parameters(), lr=0.0)
    before = _flat(model)
    for _ in range(3):
        for stream in ("image", "text"):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)  # a fresh tensor for each micro-batch, as in a hand loop
            opt.fold(stream)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        opt.zero_grad()
    assert torch.equal(before, _flat(model))
    assert all(torch.isfinite(t).all() for s in opt.state.values() for t in s.values())


def test_shared_statistics_give_soaps_factors_with_natural_weights():
    """stream_statistics=False: the factors are those of the accumulated gradient (SOAP's).

    Two calls: the first only initialises, so both runs see the same gradients twice.
    """
    _, soap = _train(lambda p: mlfop.SOAP(p), steps=2)
    _, fop = _train(lambda p: mlfop.MLFOPSOAP(p, stream_statistics=False), fold="stream", steps=2)
    _, streams = _train(lambda p: mlfop.MLFOPSOAP(p), fold="stream", steps=2)
    for (p, a), b, c in zip(soap.state.items(), fop.state.values(), streams.state.values()):
        if p.dim() == 2:
            torch.testing.assert_close(b["factor_0"], a["factor_0"], rtol=1e-5, atol=1e-7)
            assert not torch.allclose(c["factor_0"], a["factor_0"], rtol=1e-3)


def _own_module_against_soap(own_term, count=4, **options):
    """A trunk that every stream reaches, plus a module ``own`` with its own loss term
    ``own_term(module, batches, stream, x, y)`` (``None`` for the streams that do not reach it).
    The same terms train a copy of ``own`` with SOAP; returns the distance between the two
    after STEPS steps over the copy's displacement."""
    torch.manual_seed(0)
    trunk, own = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    alone = copy.deepcopy(own)
    fop = mlfop.MLFOPSOAP([*trunk.parameters(), *own.parameters()], lr=1e-2, **options)
    soap = mlfop.SOAP(alone.parameters(), lr=1e-2)
    start = _flat(own)
    for step in range(STEPS):
        batches = _micro_batches(step, count)
        for stream, x, y in batches:
            loss = (trunk(x) - y).pow(2).mean()
            term = own_term(own, batches, stream, x, y)
            if term is not None:
                loss = loss + term
                own_term(alone, batches, stream, x, y).backward()
            loss.backward()
            fop.fold(stream)
        for opt in (fop, soap):
            opt.step()
            opt.zero_grad()
    reference = _flat(alone) - start
    return float(((_flat(own) - start) - reference).norm() / reference.norm())


def test_a_module_that_one_stream_reaches_takes_soaps_step():
    """Janus-style: a shared trunk and a module only the image stream reaches (its own loss term).

    The streams' statistics there would count the absent text stream as disagreement
    (V = w_image g^2 instead of the accumulated gradient's square) and shrink its step by
    sqrt(w_image); the module must move as SOAP moves it on its own gradient.
    """
    def image_only(module, batches, stream, x, y):
        return (module(x) - y.flip(1)).pow(2).mean() if stream == "image" else None

    assert _own_module_against_soap(image_only) < 1e-4


def test_a_module_that_two_of_three_agreeing_streams_reach_takes_soaps_step():
    """K = 3: ``own`` is reached by the image and text streams with the same gradient (a loss
    term on the step's first micro-batch, whatever the stream) and not by audio. Unscaled, the
    statistics would read audio's zeros as disagreement and shrink its step by
    sqrt(w_image + w_text); scaled by W it is SOAP's."""
    def first_batch_unless_audio(module, batches, stream, x, y):
        _, z, t = batches[0]
        return (module(z) - t).pow(2).mean() if stream != "audio" else None

    assert _own_module_against_soap(first_batch_unless_audio, count=6, streams=("image", "text", "audio")) < 1e-4
