"""The text vocabulary and the token layouts of the three streams.

Layouts (``T`` image codes, digit word ``dK``):

- generation: ``<bos> draw a dK <boi> [T codes] <eoi>``, loss on the ``T`` codes;
- understanding: ``<bos> <boi> [T image positions] <eoi> what digit is this ? it is dK <eos>``,
  loss on ``dK`` only;
- text (optional third stream): ``<bos> a plus b is c <eos>`` with digit words, loss on every
  token after ``<bos>``.

Emu3 puts the image codes in the same vocabulary after the text words (one softmax); Janus keeps
the text vocabulary alone, fills the understanding image positions with ``<image>`` placeholders
(overwritten by its vision encoder) and feeds generation codes through its own embedding.
"""

from __future__ import annotations

import torch

__all__ = ["WORDS", "DIGITS", "ID", "PROMPT_LENGTH", "QUESTION", "digit_ids", "gen_prompt", "und_ids",
           "und_image_positions", "text_ids", "TEXT_LOSS_TOKENS"]

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<image>", "draw", "a") + DIGITS + (
    "what", "digit", "is", "this", "?", "it", "plus")
ID = {word: i for i, word in enumerate(WORDS)}
QUESTION = ("what", "digit", "is", "this", "?", "it", "is")
PROMPT_LENGTH = 5  # <bos> draw a dK <boi>
TEXT_LOSS_TOKENS = 6  # a plus b is c <eos>
_DIGIT_IDS = torch.tensor([ID[d] for d in DIGITS])
_UND_HEAD = (ID["<bos>"], ID["<boi>"])  # what precedes the image in an understanding sequence


def digit_ids() -> torch.Tensor:
    """Vocabulary ids of the ten digit words, in digit order."""
    return _DIGIT_IDS.clone()


def gen_prompt(labels: torch.Tensor) -> torch.Tensor:
    """``(n, PROMPT_LENGTH)`` generation prompts ``<bos> draw a dK <boi>``."""
    fixed = torch.tensor([ID["<bos>"], ID["draw"], ID["a"], 0, ID["<boi>"]]).repeat(len(labels), 1)
    fixed[:, 3] = _DIGIT_IDS[labels]
    return fixed


def und_ids(image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Understanding sequences around ``image`` ids ``(n, T)`` and the answer's position."""
    n = len(labels)
    head = torch.tensor(_UND_HEAD).repeat(n, 1)
    tail = torch.tensor([ID["<eoi>"], *(ID[w] for w in QUESTION)]).repeat(n, 1)
    ids = torch.cat([head, image, tail, _DIGIT_IDS[labels][:, None], torch.full((n, 1), ID["<eos>"])], 1)
    return ids, ids.shape[1] - 2


def und_image_positions(answer: int) -> slice:
    """The image's positions in understanding sequences whose answer sits at ``answer``."""
    return slice(len(_UND_HEAD), answer - 1 - len(QUESTION))  # <eoi> and the question follow it


def text_ids(pairs: torch.Tensor) -> torch.Tensor:
    """``(n, 7)`` sentences ``<bos> a plus b is c <eos>`` for operand pairs ``(n, 2)``."""
    n = len(pairs)
    columns = [torch.full((n,), ID["<bos>"]), _DIGIT_IDS[pairs[:, 0]], torch.full((n,), ID["plus"]),
               _DIGIT_IDS[pairs[:, 1]], torch.full((n,), ID["is"]), _DIGIT_IDS[pairs.sum(1)],
               torch.full((n,), ID["<eos>"])]
    return torch.stack(columns, 1)
