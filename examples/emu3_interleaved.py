"""Emu3-style interleaved sequences: one sequence carries text and image tokens, and the loss on
both is split into an image stream and a text stream with ``mlfop.fold_losses``.

Each sequence is ``BOS caption BOI image-codes EOI answer`` in one vocabulary (text tokens,
then image codes, then three special tokens), as Emu3 tokenises an image between text. The
image codes follow from the caption, and the answer repeats it, so both parts are learnable.
Every micro-batch mixes the two modalities inside each sequence, so there is no single-stream
micro-batch to fold; instead the per-token loss is split by the modality of each target token,
and ``fold_losses`` runs one backward per stream after the one forward.

Run: ``python examples/emu3_interleaved.py`` (needs ``transformers``), about ten seconds on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import mlfop

TEXT, CODES = 40, 16  # text tokens 0..39, image codes 40..55
BOS, BOI, EOI = TEXT + CODES, TEXT + CODES + 1, TEXT + CODES + 2
VOCAB = TEXT + CODES + 3
CAPTION, IMAGE = 4, 8  # tokens per caption (and answer) and per image


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def interleaved_batch(size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` sequences ``BOS caption BOI codes EOI answer`` of 2 * CAPTION + IMAGE + 3 tokens."""
    caption = torch.randint(0, TEXT, (size, CAPTION), generator=generator)
    codes = TEXT + (caption[:, :1] + torch.arange(IMAGE)) % CODES  # the image "drawn" from the caption
    column = torch.zeros((size, 1), dtype=torch.long)
    return torch.cat([column + BOS, caption, column + BOI, codes, column + EOI, caption], dim=1)


def is_image_token(tokens: torch.Tensor) -> torch.Tensor:
    """Image codes and the end-of-image token belong to the image stream; all else is text."""
    return ((tokens >= TEXT) & (tokens < TEXT + CODES)) | (tokens == EOI)


def stream_losses(model: torch.nn.Module, ids: torch.Tensor, step_tokens: int) -> tuple[dict, dict]:
    """One forward; the per-token loss split by the target token's modality.

    Each part is a token sum over the step's ``step_tokens`` loss tokens, so the parts add up
    to the step's mean next-token loss, and ``tokens`` are the parts' token counts.
    """
    logits = model(input_ids=ids).logits[:, :-1]
    targets = ids[:, 1:]
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    image = is_image_token(targets).reshape(-1)
    losses = {"image": per_token[image].sum() / step_tokens, "text": per_token[~image].sum() / step_tokens}
    tokens = {"image": int(image.sum()), "text": int((~image).sum())}
    return losses, tokens


def main(steps: int = 12, accumulation: int = 4, micro_batch: int = 8) -> None:
    torch.set_num_threads(1)  # tiny tensors: more threads only spin-wait on a small CPU
    model = build_model()
    opt = mlfop.MLFOPSOAP(model.parameters(), streams=("image", "text"), lr=3e-3, heads=model)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        micro_batches = [interleaved_batch(micro_batch, generator) for _ in range(accumulation)]
        step_tokens = sum(ids[:, 1:].numel() for ids in micro_batches)
        loss_sums, token_counts = {"image": 0.0, "text": 0.0}, {"image": 0, "text": 0}
        for ids in micro_batches:
            losses, tokens = stream_losses(model, ids, step_tokens)
            opt.fold_losses(losses, tokens)  # one backward and one fold per stream
            for name in losses:
                loss_sums[name] += losses[name].item() * step_tokens
                token_counts[name] += tokens[name]
        opt.step()
        opt.zero_grad()
        weights = opt.diagnostics().get("weights", {})
        mean = {name: loss_sums[name] / token_counts[name] for name in loss_sums}
        print(f"step {step + 1}: token loss image {mean['image']:.3f}, text {mean['text']:.3f}; "
              f"weights {', '.join(f'{k} {w:.2f}' for k, w in weights.items())}")
    print("trained", steps, "steps on interleaved image+text sequences")


if __name__ == "__main__":
    main()
