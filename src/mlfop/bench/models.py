"""Tiny Emu3 and Janus built from ``transformers`` classes, behind one small interface.

Both expose, for a :class:`~mlfop.bench.data.Batch`:

- :meth:`TinyModel.gen_logits`: teacher-forced logits over the model's image-code softmax and
  the targets (Emu3: the one shared vocabulary; Janus: its generation head's ``K`` codes);
- :meth:`TinyModel.und_logits`: full-vocabulary logits at the understanding answer position
  (:meth:`TinyModel.und_hidden_states`: the sequences' hidden states after the embedding and each
  trunk layer);
- :meth:`TinyModel.text_logits`: next-token logits of the text-only sentences;
- :meth:`TinyModel.sample`: class-conditional image codes, sampled with a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Emu3ForCausalLM, Emu3TextConfig, JanusConfig, JanusForConditionalGeneration, LlamaConfig

from mlfop.bench import vocab
from mlfop.bench.data import Batch

__all__ = ["MODELS", "ModelConfig", "TinyModel", "TinyEmu3", "TinyJanus", "build_model"]

MODELS = ("emu3", "janus")
_SPECIAL_IDS = dict(pad_token_id=vocab.ID["<pad>"], bos_token_id=vocab.ID["<bos>"], eos_token_id=vocab.ID["<eos>"])


@dataclass(frozen=True)
class ModelConfig:
    """Trunk size shared by both models (Janus' vision tower is half as wide, 2 layers)."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    mlp: int = 256
    attention_dropout: float = 0.0

    def trunk(self) -> dict:
        """Keyword arguments of the Llama-style trunk config."""
        return dict(hidden_size=self.hidden, intermediate_size=self.mlp, num_hidden_layers=self.layers,
                    num_attention_heads=self.heads, num_key_value_heads=self.heads,
                    attention_dropout=self.attention_dropout, max_position_embeddings=128, **_SPECIAL_IDS)


class TinyModel(nn.Module):
    """Common interface; subclasses wrap one ``transformers`` model as ``self.hf``."""

    hf: nn.Module

    def __init__(self, codes: int, tokens: int) -> None:
        super().__init__()
        self.codes, self.tokens = codes, tokens

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer gets (Janus' frozen VQ model is left out)."""
        return [p for p in self.parameters() if p.requires_grad]

    def output_heads(self) -> list[nn.Linear]:
        """The layers that produce logits."""
        raise NotImplementedError

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The trainable weights of the linear layers inside the network (Muon's share): neither
        an output head nor an embedding table (nor tied to one)."""
        outer = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        outer |= {id(head.weight) for head in self.output_heads()}
        return [m.weight for m in self.modules()
                if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m.weight) not in outer]

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and frozen parameter counts."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return {"trainable": trainable, "frozen": sum(p.numel() for p in self.parameters()) - trainable}

    def gen_logits(self, batch: Batch) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def und_inputs(self, batch: Batch) -> dict[str, Tensor]:
        """Keyword inputs of ``self.hf`` for the understanding sequences up to the answer."""
        raise NotImplementedError

    def und_logits(self, batch: Batch) -> Tensor:
        return self.hf(**self.und_inputs(batch)).logits[:, -1]

    def und_hidden_states(self, batch: Batch) -> tuple[Tensor, ...]:
        """``(n, answer, hidden)`` states of the understanding sequences up to the answer: the
        trunk's input embeddings (at the image positions Emu3's code embeddings, Janus' aligned
        vision features), then the output of each trunk layer."""
        return self.hf(**self.und_inputs(batch), output_hidden_states=True).hidden_states

    def text_logits(self, ids: Tensor) -> Tensor:
        """Logits predicting tokens ``1..L-1`` of text-only sentences ``ids``."""
        return self.hf(input_ids=ids).logits[:, :-1]

    def _trunk(self, embeds: Tensor, cache):
        raise NotImplementedError

    def _code_embeddings(self, codes: Tensor) -> Tensor:
        raise NotImplementedError

    def _code_logits(self, hidden: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, labels: Tensor, generator: torch.Generator, temperature: float = 1.0) -> Tensor:
        """``(n, T)`` image codes for the prompts "draw a <label>", restricted to image codes."""
        embeds = self.hf.get_input_embeddings()(vocab.gen_prompt(labels))
        cache, codes = None, []
        for _ in range(self.tokens):
            hidden, cache = self._trunk(embeds, cache)
            probs = F.softmax(self._code_logits(hidden[:, -1]) / temperature, dim=-1)
            codes.append(torch.multinomial(probs, 1, generator=generator))
            embeds = self._code_embeddings(codes[-1])
        return torch.cat(codes, 1)


class TinyEmu3(TinyModel):
    """``Emu3ForCausalLM``: text words and image codes share one vocabulary, one embedding table and
    one softmax; code ``c`` is vocabulary id ``len(vocab.WORDS) + c``; every parameter is shared."""

    def __init__(self, config: ModelConfig, codes: int, tokens: int) -> None:
        super().__init__(codes, tokens)
        self.offset = len(vocab.WORDS)
        self.hf = Emu3ForCausalLM(Emu3TextConfig(vocab_size=self.offset + codes, **config.trunk()))

    def output_heads(self) -> list[nn.Linear]:
        return [self.hf.lm_head]

    def gen_logits(self, batch: Batch) -> tuple[Tensor, Tensor]:
        targets = batch.codes + self.offset
        ids = torch.cat([vocab.gen_prompt(batch.labels), targets], 1)
        start = vocab.PROMPT_LENGTH - 1
        return self.hf(input_ids=ids).logits[:, start : start + self.tokens], targets

    def und_inputs(self, batch: Batch) -> dict[str, Tensor]:
        ids, answer = vocab.und_ids(batch.codes + self.offset, batch.labels)
        return {"input_ids": ids[:, :answer]}

    def _trunk(self, embeds: Tensor, cache):
        out = self.hf.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        return out.last_hidden_state, out.past_key_values

    def _code_embeddings(self, codes: Tensor) -> Tensor:
        return self.hf.get_input_embeddings()(codes + self.offset)

    def _code_logits(self, hidden: Tensor) -> Tensor:
        return self.hf.lm_head(hidden)[..., self.offset : self.offset + self.codes]


class TinyJanus(TinyModel):
    """``JanusForConditionalGeneration``: understanding through the SigLIP-like vision encoder (pixels,
    patch 2 -> 16 image positions), generation through the generation embedding, aligner and head;
    the Llama trunk and text embeddings are shared. The VQ model is frozen and never trained."""

    def __init__(self, config: ModelConfig, codes: int, tokens: int) -> None:
        super().__init__(codes, tokens)
        width = config.hidden
        self.hf = JanusForConditionalGeneration(JanusConfig(
            text_config=LlamaConfig(vocab_size=len(vocab.WORDS), **config.trunk()),
            image_token_id=vocab.ID["<image>"],
            vision_config=dict(hidden_size=width // 2, num_hidden_layers=2, num_attention_heads=2, image_size=8,
                               patch_size=2, projection_dim=width, depth=2, num_image_tokens=16, mlp_ratio=2.0,
                               attention_dropout=config.attention_dropout),
            vq_config=dict(num_embeddings=codes, embed_dim=8, latent_channels=8, base_channels=32,
                           channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=width,
                           image_token_embed_dim=width, num_hidden_layers=2),
        ))
        self.hf.model.vqmodel.requires_grad_(False)

    def output_heads(self) -> list[nn.Linear]:
        return [self.hf.lm_head, self.hf.model.generation_head.vision_head]

    def gen_logits(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The generation loss recipe: prompt embeddings, then the codes through the generation
        embedding and aligner, the trunk, and the generation head at the positions that predict them
        (the ``<boi>`` position predicts code 0)."""
        embeds = torch.cat([self.hf.get_input_embeddings()(vocab.gen_prompt(batch.labels)),
                            self.hf.prepare_embeddings_for_image_generation(batch.codes)], 1)
        hidden = self.hf.model.language_model(inputs_embeds=embeds).last_hidden_state
        start = vocab.PROMPT_LENGTH - 1
        return self.hf.model.generation_head(hidden[:, start : start + self.tokens]), batch.codes

    def und_inputs(self, batch: Batch) -> dict[str, Tensor]:
        placeholders = torch.full((len(batch), 16), vocab.ID["<image>"])
        ids, answer = vocab.und_ids(placeholders, batch.labels)
        return {"input_ids": ids[:, :answer], "pixel_values": (batch.pixels / 8.0 - 1.0)[:, None].expand(-1, 3, -1, -1)}

    def _trunk(self, embeds: Tensor, cache):
        out = self.hf.model.language_model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        return out.last_hidden_state, out.past_key_values

    def _code_embeddings(self, codes: Tensor) -> Tensor:
        return self.hf.prepare_embeddings_for_image_generation(codes)

    def _code_logits(self, hidden: Tensor) -> Tensor:
        return self.hf.model.generation_head(hidden)


def build_model(name: str, config: ModelConfig, codes: int, tokens: int) -> TinyModel:
    """A freshly initialised tiny model (seed torch's RNG first for a reproducible init)."""
    classes = {"emu3": TinyEmu3, "janus": TinyJanus}
    if name not in classes:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODELS)}")
    return classes[name](config, codes, tokens)
