"""Head layouts: explicit ones validated, detected ones checked on real (tiny, random)
transformers models, including numerically (zeroing one head's slice of two weights that must
carry the same head gives the same output)."""

import copy
import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlfop.functional.heads import split_heads
from mlfop.head_layouts import HeadLayout, detect_head_layouts, resolve_head_layouts

IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # tiny vocabularies need these
TRUNK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, **IDS)
N_HEADS, N_KV = 4, 2


def _names(model):
    return {id(p): n for n, p in model.named_parameters()}


def _by_name(model, layouts):
    names = _names(model)
    return {names[id(p)]: layout for p, layout in layouts.items()}


def _trunk_expectations(model, prefix, n_heads=N_HEADS, n_kv=N_KV, layers=2):
    expected = {}
    for i in range(layers):
        base = f"{prefix}{i}.self_attn."
        expected[base + "q_proj.weight"] = (n_heads, 0)
        expected[base + "k_proj.weight"] = (n_kv, 0)
        expected[base + "v_proj.weight"] = (n_kv, 0)
        expected[base + "o_proj.weight"] = (n_heads, 1)
    return expected


def _detect_silently(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "left at layer level" warning on these models
        return detect_head_layouts(model)


@pytest.fixture(scope="module")
def transformers():
    import transformers  # a test dependency: installed by the `test` extra

    return transformers


@pytest.fixture(scope="module")
def llama(transformers):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=34, **TRUNK)).eval()


@pytest.fixture(scope="module")
def emu3(transformers):
    torch.manual_seed(0)
    config = transformers.Emu3TextConfig(vocab_size=34, attention_dropout=0.0, **TRUNK)
    return transformers.Emu3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def janus(transformers):
    torch.manual_seed(0)
    config = transformers.JanusConfig(
        text_config=transformers.LlamaConfig(vocab_size=26, **TRUNK), image_token_id=6,
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=8,
                           patch_size=2, projection_dim=64, depth=2, num_image_tokens=16, mlp_ratio=2.0),
        vq_config=dict(num_embeddings=8, embed_dim=8, latent_channels=8, base_channels=32,
                       channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=64,
                       image_token_embed_dim=64, num_hidden_layers=2))
    return transformers.JanusForConditionalGeneration(config).eval()


# ---------------------------------------------------------------------------------------------
# Detection on real models


def test_detects_emu3_causal_lm_trunk(emu3):
    got = _by_name(emu3, _detect_silently(emu3))
    assert got == _trunk_expectations(emu3, "model.layers.")


def test_detects_emu3_conditional_generation_trunk(transformers):
    vocabulary = {"<image>": 3, "<|extra_200|>": 4, **{f"<|visual token {i:06d}|>": 10 + i for i in range(8)}}
    config = transformers.Emu3Config(
        text_config=dict(vocab_size=18, attention_dropout=0.0, **TRUNK),
        vq_config=dict(codebook_size=8, embed_dim=4, latent_channels=4, base_channels=32,
                       channel_multiplier=[1, 2], temporal_downsample_factor=1, num_res_blocks=1, attn_resolutions=[1], hidden_size=32,
                       num_attention_heads=2),
        vocabulary_map=vocabulary)
    model = transformers.Emu3ForConditionalGeneration(config)
    got = _by_name(model, _detect_silently(model))
    expected = _trunk_expectations(model, "model.text_model.layers.")
    assert {k: v for k, v in got.items() if k.startswith("model.text_model.")} == expected
    # the VQ-VAE's attention blocks (q/k/v_proj + out_proj, 2 heads) are read from their own attributes
    vq = {k: v for k, v in got.items() if k.startswith("model.vqmodel.")}
    assert vq and all(v == ((2, 1) if ".out_proj." in k else (2, 0)) for k, v in vq.items())


def test_detects_llama_gqa(llama):
    got = _by_name(llama, _detect_silently(llama))
    assert got == _trunk_expectations(llama, "model.layers.")


def test_detects_janus_trunk_and_vision_tower(janus):
    got = _by_name(janus, _detect_silently(janus))
    expected = _trunk_expectations(janus, "model.language_model.layers.")
    for i in range(2):
        base = f"model.vision_model.encoder.layers.{i}.self_attn."
        expected.update({base + "q_proj.weight": (2, 0), base + "k_proj.weight": (2, 0),
                         base + "v_proj.weight": (2, 0), base + "projection_layer.weight": (2, 1)})
    assert got == expected  # nothing else: no biases, no MLPs, not the VQ's 1x1-conv attention


def _zero_heads(weight, layout, heads):
    with torch.no_grad():
        split_heads(weight, *layout)[heads].zero_()


@pytest.mark.parametrize("name", ["llama", "emu3"])
def test_gqa_slicing_on_real_module(name, request):
    """Zeroing o_proj columns of the query heads that share kv head j (per the detected layout)
    gives the same logits as zeroing kv head j's rows of v_proj; the other group does not."""
    model = request.getfixturevalue(name)
    attn = model.model.layers[0].self_attn
    layouts = detect_head_layouts(model)
    o_layout, v_layout = layouts[attn.o_proj.weight], layouts[attn.v_proj.weight]
    group = o_layout[0] // v_layout[0]
    ids = torch.tensor([[1, 5, 9, 3, 17, 22, 8, 2], [1, 30, 4, 4, 11, 6, 19, 2]])

    def logits_with(edit):
        variant = copy.deepcopy(model)
        edit(variant.model.layers[0].self_attn)
        with torch.no_grad():
            return variant(input_ids=ids).logits

    with torch.no_grad():
        base = model(input_ids=ids).logits
    for j in range(v_layout[0]):
        by_v = logits_with(lambda a: _zero_heads(a.v_proj.weight, v_layout, j))
        by_o = logits_with(lambda a: _zero_heads(a.o_proj.weight, o_layout, slice(group * j, group * (j + 1))))
        other = (j + 1) % v_layout[0]
        other_group = slice(group * other, group * (other + 1))
        by_other = logits_with(lambda a: _zero_heads(a.o_proj.weight, o_layout, other_group))
        torch.testing.assert_close(by_v, by_o, rtol=0, atol=1e-6)
        assert not torch.allclose(by_v, base, atol=1e-4)
        assert not torch.allclose(by_v, by_other, atol=1e-4)


def test_janus_vision_head_slicing(janus):
    """Head h of v_proj (rows and bias) and of projection_layer (columns) carry the same head."""
    attn = janus.model.vision_model.encoder.layers[0].self_attn
    layouts = detect_head_layouts(janus)
    v_layout, p_layout = layouts[attn.v_proj.weight], layouts[attn.projection_layer.weight]
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def output_with(edit):
        variant = copy.deepcopy(janus.model.vision_model)
        edit(variant.encoder.layers[0].self_attn)
        with torch.no_grad():
            return variant(pixel_values=pixels).last_hidden_state

    def zero_v(a, h):
        _zero_heads(a.v_proj.weight, v_layout, h)
        with torch.no_grad():
            split_heads(a.v_proj.bias, v_layout[0], 0)[h].zero_()

    torch.testing.assert_close(output_with(lambda a: zero_v(a, 1)),
                               output_with(lambda a: _zero_heads(a.projection_layer.weight, p_layout, 1)),
                               rtol=0, atol=1e-6)
    other_head = output_with(lambda a: _zero_heads(a.projection_layer.weight, p_layout, 0))
    assert not torch.allclose(output_with(lambda a: zero_v(a, 1)), other_head, atol=1e-4)


def test_janus_vision_query_head_changes_only_its_own_output_columns(janus):
    """Zeroing head h of q_proj (uniform attention in that head) changes exactly the attention
    output columns that the projection_layer layout assigns to head h."""
    attn = janus.model.vision_model.encoder.layers[0].self_attn
    layouts = detect_head_layouts(janus)
    q_layout, p_layout = layouts[attn.q_proj.weight], layouts[attn.projection_layer.weight]
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def projection_input(head):
        variant = copy.deepcopy(janus.model.vision_model)
        a = variant.encoder.layers[0].self_attn
        if head is not None:
            _zero_heads(a.q_proj.weight, q_layout, head)
            with torch.no_grad():
                split_heads(a.q_proj.bias, q_layout[0], 0)[head].zero_()
        seen = []
        a.projection_layer.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        with torch.no_grad():
            variant(pixel_values=pixels)
        return split_heads(seen[0], p_layout[0], -1, leading=seen[0].dim() - 1)  # (..., heads, d)

    base = projection_input(None)
    for h in range(q_layout[0]):
        changed = (projection_input(h) != base).flatten(0, -3).any(0).any(-1)  # per head
        assert changed.tolist() == [g == h for g in range(p_layout[0])]


def test_fused_qkv_on_real_phi3(transformers):
    """Phi-3's qkv_proj is [Q; K; V] with GQA: one chunk of head_dim rows per head, n + 2 kv chunks."""
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(vocab_size=34, **TRUNK)).eval()
    got = _by_name(model, _detect_silently(model))
    assert got == {f"model.layers.{i}.self_attn.{n}.weight": layout for i in range(2)
                   for n, layout in (("qkv_proj", (N_HEADS + 2 * N_KV, 0)), ("o_proj", (N_HEADS, 1)))}
    attn = model.model.layers[0].self_attn
    qkv_layout = got["model.layers.0.self_attn.qkv_proj.weight"]
    o_layout = got["model.layers.0.self_attn.o_proj.weight"]
    ids = torch.tensor([[1, 5, 9, 3, 17, 22, 8, 2]])
    group = N_HEADS // N_KV

    def logits_with(name, heads):
        variant = copy.deepcopy(model)
        layout = qkv_layout if name == "qkv_proj" else o_layout
        _zero_heads(getattr(variant.model.layers[0].self_attn, name).weight, layout, heads)
        with torch.no_grad():
            return variant(input_ids=ids).logits

    for j in range(N_KV):  # value head j is chunk n_heads + n_kv + j
        torch.testing.assert_close(logits_with("qkv_proj", N_HEADS + N_KV + j),
                                   logits_with("o_proj", slice(group * j, group * (j + 1))), rtol=0, atol=1e-6)
    assert attn.qkv_proj.weight.shape[0] == (N_HEADS + 2 * N_KV) * attn.head_dim


def test_gpt2_conv1d_fused_qkv(transformers):
    """GPT-2's Conv1D weights are (in, out): c_attn is split by columns, c_proj by rows."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=34, n_embd=64, n_layer=1, n_head=4, n_positions=16, bos_token_id=1, eos_token_id=2)).eval()
    got = _by_name(model, _detect_silently(model))
    assert got == {"transformer.h.0.attn.c_attn.weight": (12, 1), "transformer.h.0.attn.c_proj.weight": (4, 0)}
    ids = torch.tensor([[1, 5, 9, 3, 17, 22, 8, 2]])

    def logits_with(edit):
        variant = copy.deepcopy(model)
        edit(variant.transformer.h[0].attn)
        with torch.no_grad():
            return variant(input_ids=ids).logits

    def zero_v(a, h):  # value head h: chunk 8 + h of the 12 column chunks, bias included
        _zero_heads(a.c_attn.weight, (12, 1), 8 + h)
        with torch.no_grad():
            split_heads(a.c_attn.bias, 12, 0)[8 + h].zero_()

    torch.testing.assert_close(logits_with(lambda a: zero_v(a, 2)),
                               logits_with(lambda a: _zero_heads(a.c_proj.weight, (4, 0), 2)), rtol=0, atol=1e-6)


class FusedGQAAttention(nn.Module):
    """A small fused-qkv attention with grouped-query heads, laid out [Q; K; V]."""

    def __init__(self, hidden=32, num_heads=4, num_key_value_heads=2, head_dim=8):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = num_heads, num_key_value_heads, head_dim
        self.qkv_proj = nn.Linear(hidden, (num_heads + 2 * num_key_value_heads) * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim,
             self.num_key_value_heads * self.head_dim], dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (z.view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2) for z in (k, v))
        group = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))


def test_fused_qkv_custom_module():
    torch.manual_seed(0)
    model = Block(FusedGQAAttention())
    got = _by_name(model, _detect_silently(model))
    assert got == {"attn.qkv_proj.weight": (8, 0), "attn.o_proj.weight": (4, 1)}
    x = torch.randn(2, 5, 32)
    for j in range(2):
        a, b = copy.deepcopy(model.attn), copy.deepcopy(model.attn)
        _zero_heads(a.qkv_proj.weight, got["attn.qkv_proj.weight"], 4 + 2 + j)
        _zero_heads(b.o_proj.weight, got["attn.o_proj.weight"], slice(2 * j, 2 * j + 2))
        with torch.no_grad():
            torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-6)


def test_torch_multihead_attention():
    model = nn.Sequential(nn.MultiheadAttention(32, 4), nn.MultiheadAttention(32, 2, kdim=16, vdim=24))
    got = _by_name(model, _detect_silently(model))
    assert got == {"0.in_proj_weight": (12, 0), "0.out_proj.weight": (4, 1), "1.q_proj_weight": (2, 0),
                   "1.k_proj_weight": (2, 0), "1.v_proj_weight": (2, 0), "1.out_proj.weight": (2, 1)}


# ---------------------------------------------------------------------------------------------
# What detection cannot read


class Opaque(nn.Module):
    """Attention-looking, but no head count anywhere."""

    def __init__(self, **attributes):
        super().__init__()
        self.__dict__.update(attributes)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(32, 32) for _ in range(4))


def test_unreadable_attention_warns_or_raises_with_strict():
    model = nn.Sequential(Opaque(), nn.Linear(32, 32))
    with pytest.warns(UserWarning, match="layer level") as record:
        assert detect_head_layouts(model) == {}
    assert len(record) == 1
    message = str(record[0].message)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"0.{n}.weight" in message
    assert "0.q_proj.bias" not in message and "1.weight" not in message
    with pytest.raises(ValueError, match=r"0\.q_proj\.weight.*no head count"):
        detect_head_layouts(model, strict=True)


def test_declared_heads_that_do_not_fit_are_reported():
    with pytest.warns(UserWarning, match=r"declares 5 heads, which do not divide axis 0 \(size 32\)"):
        assert detect_head_layouts(Opaque(num_heads=5)) == {}
    odd = Opaque(num_heads=4, num_key_value_heads=4)
    odd.k_proj, odd.v_proj = nn.Linear(32, 16), nn.Linear(32, 16)  # 2 heads of 8, not the declared 4
    with pytest.warns(UserWarning, match="holds 2 heads of 8, but the module declares 4") as record:
        got = _by_name(odd, detect_head_layouts(odd))
    assert got == {"q_proj.weight": (4, 0), "o_proj.weight": (4, 1)}
    assert "k_proj.weight" in str(record[0].message)


def test_resolve_warns_only_about_parameters_in_the_optimizer():
    model = nn.Sequential(Opaque(), FusedGQAAttention())
    trainable = list(model[1].parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = resolve_head_layouts(model, trainable)
    assert got == {model[1].qkv_proj.weight: (8, 0), model[1].o_proj.weight: (4, 1)}
    with pytest.raises(ValueError, match=r"0\.o_proj\.weight"):
        resolve_head_layouts(model, model.parameters(), strict=True)


# ---------------------------------------------------------------------------------------------
# Resolution of the heads= argument


def test_resolve_forms(llama):
    w, u, bias = torch.zeros(12, 8, requires_grad=True), torch.zeros(6, 4, 2), torch.zeros(12)
    assert resolve_head_layouts(None, [w]) == {}
    got = resolve_head_layouts({u: HeadLayout(3, -3), w: (4, 1)}, [w, bias, u])
    assert list(got.items()) == [(w, (4, 1)), (u, (3, 0))]  # the order of params, plain ints
    assert resolve_head_layouts({w: [2, 0]}, [{"params": [bias]}, {"params": [w]}]) == {w: (2, 0)}
    # a model: only the optimizer's parameters, with plain values
    attn = llama.model.layers[1].self_attn
    params = [attn.k_proj.weight, attn.o_proj.weight, llama.model.norm.weight]
    assert resolve_head_layouts(llama, params) == {attn.k_proj.weight: (2, 0), attn.o_proj.weight: (4, 1)}


def test_head_layout_is_a_validated_frozen_value():
    layout = HeadLayout(4, 1)
    assert layout.for_shape((8, 12)) == (4, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.num_heads = 2
    with pytest.raises(TypeError, match="num_heads must be an int"):
        HeadLayout(4.0, 0)
    with pytest.raises(TypeError, match="axis must be an int"):
        HeadLayout(4, True)
    with pytest.raises(ValueError, match=">= 1"):
        HeadLayout(0, 0)


@pytest.mark.parametrize(
    "layout,error,match",
    [
        ((5, 0), ValueError, r"num_heads=5 does not divide axis 0 \(size 12\) of a parameter of shape \(12, 8\)"),
        ((3, 1), ValueError, r"num_heads=3 does not divide axis 1 \(size 8\) of a parameter of shape \(12, 8\)"),
        ((2, 2), ValueError, r"axis 2 is out of range for a parameter of shape \(12, 8\)"),
        ((2, -3), ValueError, r"axis -3 is out of range"),
        ((2.0, 0), TypeError, r"num_heads must be an int, got float"),
        ((2, "0"), TypeError, r"axis must be an int, got str"),
        ((False, 0), TypeError, r"num_heads must be an int, got bool"),
        ((0, 0), ValueError, r"num_heads must be >= 1"),
        ((2, 0, 1), TypeError, r"must be \(num_heads, axis\) or a HeadLayout"),
        (4, TypeError, r"must be \(num_heads, axis\) or a HeadLayout"),
    ],
)
def test_bad_explicit_layouts(layout, error, match):
    w = torch.zeros(12, 8)
    with pytest.raises(error, match=match):
        resolve_head_layouts({w: layout}, [w])


def test_bad_heads_arguments():
    w, bias, stranger = torch.zeros(12, 8), torch.zeros(12), torch.zeros(12, 8)
    with pytest.raises(ValueError, match=r"shape \(12, 8\) that is not among the optimizer's parameters"):
        resolve_head_layouts({stranger: (2, 0)}, [w])
    with pytest.raises(ValueError, match=r"shape \(12,\) has 1 dimension.*global level"):
        resolve_head_layouts({bias: (2, 0)}, [w, bias])
    with pytest.raises(TypeError, match="keys must be parameter tensors"):
        resolve_head_layouts({"q_proj.weight": (2, 0)}, [w])
    with pytest.raises(TypeError, match="strict=True"):
        resolve_head_layouts("strict", [w])
    for bad in ([(w, (2, 0))], 3, torch.zeros(2)):
        with pytest.raises(TypeError, match="nn.Module to detect head layouts from, or a mapping"):
            resolve_head_layouts(bad, [w])
    with pytest.raises(TypeError, match="strict must be a bool"):
        resolve_head_layouts(None, [w], strict="yes")
    with pytest.raises(TypeError, match="needs an nn.Module"):
        detect_head_layouts({w: (2, 0)})


def test_importing_does_not_import_transformers():
    code = ("import sys, mlfop.head_layouts, mlfop.functional.heads, torch.nn as nn\n"
            "mlfop.head_layouts.detect_head_layouts(nn.MultiheadAttention(8, 2))\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
