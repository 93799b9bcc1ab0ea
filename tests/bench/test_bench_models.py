"""The tiny models: sizes, frozen VQ, and the losses checked against hand-written cross-entropies."""

import pytest
import torch
import torch.nn.functional as F

from mlfop.bench import vocab
from mlfop.bench.data import DigitsData, load_split
from mlfop.bench.models import ModelConfig, build_model
from mlfop.bench.objective import stream_nll
from mlfop.bench.tokenizers import Pix8


@pytest.fixture(scope="module")
def batch():
    train, test = load_split()
    return DigitsData(train, test, Pix8(), augment=True).micro_batch(0, 0, "gen", 0, 6)


def _model(name):
    torch.manual_seed(0)
    return build_model(name, ModelConfig(), codes=8, tokens=64)


@pytest.mark.parametrize("name", ["emu3", "janus"])
def test_default_sizes_and_trainable_parameters(name):
    model = _model(name)
    counts = model.parameter_counts()
    assert 250_000 <= counts["trainable"] <= 1_500_000
    if name == "janus":
        assert counts["frozen"] > 0
        trainable = {id(p) for p in model.trainable_parameters()}
        assert not any(id(p) in trainable for p in model.hf.model.vqmodel.parameters())


def test_janus_generation_loss_is_cross_entropy_over_its_generation_head(batch):
    model = _model("janus")
    n, codes = len(batch), batch.codes
    # by hand: embed prompt and codes, run the trunk on the whole sequence, read the generation
    # head's log-probabilities of code t at the position just before it
    prompt = vocab.gen_prompt(batch.labels)
    embeds = torch.cat([model.hf.get_input_embeddings()(prompt),
                        model.hf.model.generation_aligner(model.hf.model.generation_embeddings(codes))], 1)
    hidden = model.hf.model.language_model(inputs_embeds=embeds).last_hidden_state
    log_probs = torch.log_softmax(model.hf.model.generation_head(hidden), -1)
    positions = torch.arange(prompt.shape[1] - 1, prompt.shape[1] - 1 + codes.shape[1])
    expected = -log_probs[torch.arange(n)[:, None], positions[None], codes].sum()
    assert torch.allclose(stream_nll(model, "gen", batch), expected, rtol=1e-5)


def test_emu3_generation_loss_matches_transformers_masked_loss(batch):
    model = _model("emu3")
    ids = torch.cat([vocab.gen_prompt(batch.labels), batch.codes + model.offset], 1)
    labels = torch.where(ids >= model.offset, ids, -100)
    reference = model.hf(input_ids=ids, labels=labels).loss * batch.codes.numel()
    assert torch.allclose(stream_nll(model, "gen", batch), reference, rtol=1e-5)


@pytest.mark.parametrize("name", ["emu3", "janus"])
def test_samples_are_image_codes(name):
    model = _model(name)
    codes = model.sample(torch.arange(10), torch.Generator().manual_seed(0))
    assert codes.shape == (10, 64) and codes.min() >= 0 and codes.max() < 8
    again = model.sample(torch.arange(10), torch.Generator().manual_seed(0))
    assert torch.equal(codes, again)


def test_understanding_loss_is_answer_cross_entropy(batch):
    model = _model("emu3")
    ids, answer = vocab.und_ids(batch.codes + model.offset, batch.labels)
    logits = model.hf(input_ids=ids).logits[:, answer - 1]
    expected = F.cross_entropy(logits, ids[:, answer], reduction="sum")
    assert torch.allclose(stream_nll(model, "und", batch), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["emu3", "janus"])
@torch.no_grad()
def test_und_hidden_states_hold_the_image_embeddings_at_the_image_positions(name, batch):
    model, config = _model(name), ModelConfig()
    inputs = model.und_inputs(batch)
    answer = inputs["input_ids"].shape[1]
    image_ids = inputs["input_ids"][:, vocab.und_image_positions(answer)]
    if name == "janus":  # the vision tower and aligner's features, scattered into the placeholders
        assert torch.equal(image_ids, torch.full((len(batch), 16), vocab.ID["<image>"]))
        tower = model.hf.model
        image = tower.aligner(tower.vision_model(inputs["pixel_values"]).last_hidden_state)
    else:
        assert torch.equal(image_ids, batch.codes + model.offset)
        image = model.hf.get_input_embeddings()(image_ids)
    hidden = model.und_hidden_states(batch)
    assert len(hidden) == 1 + config.layers
    assert all(h.shape == (len(batch), answer, config.hidden) for h in hidden)
    torch.testing.assert_close(hidden[0][:, vocab.und_image_positions(answer)], image)
