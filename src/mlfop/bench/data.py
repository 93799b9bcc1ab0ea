"""The digits data: a fixed stratified split of ``load_digits``, shift views, and per-step batches.

Batches are a pure function of ``(seed, step, stream, micro-batch)``: every micro-batch draws
its examples from its own generator seeded by those numbers, so a resumed run sees exactly the
batches an uninterrupted run would, with no sampler state to checkpoint, and runs of different
optimizers with the same seed see the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from mlfop.bench.tokenizers import ImageTokenizer

__all__ = ["Split", "Batch", "DigitsData", "load_split", "shift_views", "derived_seed", "TEXT_PAIRS", "TRAIN_SIZE"]

SPLIT_SEED = 0
TEST_FRACTION = 0.2
TRAIN_SIZE = 1437  # training images of the split (a micro-batch draws without replacement from them)
# (dy, dx) of the +-1 pixel shift augmentation; view 0 is the unshifted image.
SHIFTS = ((0, 0),) + tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
# The text-only stream's sentences "<a> plus <b> is <a+b>" cover every pair with a + b <= 9.
TEXT_PAIRS = tuple((a, b) for a in range(10) for b in range(10) if a + b <= 9)


@dataclass(frozen=True)
class Split:
    """Images ``(N, 8, 8)`` with intensities 0..16 and their labels ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Batch:
    """One micro-batch: image codes ``(n, T)``, labels ``(n,)``, pixels ``(n, 8, 8)`` and, for the
    text stream, operand pairs ``(n, 2)`` (empty otherwise)."""

    codes: torch.Tensor
    labels: torch.Tensor
    pixels: torch.Tensor
    pairs: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def load_split() -> tuple[Split, Split]:
    """The fixed stratified 80/20 split (1,437 train / 360 test images)."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    return Split(x_train, y_train), Split(x_test, y_test)


def shift_views(images: np.ndarray) -> np.ndarray:
    """``(len(SHIFTS), N, 8, 8)``: every image moved by each shift, zero-filled at the border."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    return np.stack([padded[:, 1 - dy : 9 - dy, 1 - dx : 9 - dx] for dy, dx in SHIFTS])


class DigitsData:
    """Train views, test set and their tokens (shared by every run of an invocation); draws the
    micro-batches of any run's steps."""

    def __init__(self, train: Split, test: Split, tokenizer: ImageTokenizer, augment: bool) -> None:
        self.tokenizer = tokenizer
        views = shift_views(train.images) if augment else train.images[None]
        self.train_pixels = torch.tensor(views, dtype=torch.float32)
        self.train_codes = torch.tensor(np.stack([tokenizer.encode(v) for v in views]))
        self.train_labels = torch.tensor(train.labels, dtype=torch.long)
        self.test = self._batch(
            torch.tensor(tokenizer.encode(test.images)),
            torch.tensor(test.labels, dtype=torch.long),
            torch.tensor(test.images, dtype=torch.float32),
        )
        self.test_images = test.images
        self.train_images = train.images

    def micro_batch(self, seed: int, step: int, stream: str, index: int, size: int) -> Batch:
        """Micro-batch ``index`` of ``stream`` at ``step`` of a run with ``seed``: ``size`` training
        images drawn without replacement (each in a random shift view when augmenting), or ``size``
        random text sentences; the micro-batches of a step are independent draws."""
        generator = torch.Generator().manual_seed(derived_seed(seed, step, _STREAM_IDS[stream], index))
        if stream == "text":
            chosen = torch.randint(len(TEXT_PAIRS), (size,), generator=generator)
            pairs = torch.tensor(TEXT_PAIRS)[chosen]
            empty = torch.zeros(size, 0, dtype=torch.long)
            return Batch(empty, pairs.sum(1), torch.zeros(size, 8, 8), pairs)
        n_views, n_train = self.train_codes.shape[:2]
        images = torch.randperm(n_train, generator=generator)[:size]
        views = torch.randint(n_views, (size,), generator=generator)
        return self._batch(self.train_codes[views, images], self.train_labels[images], self.train_pixels[views, images])

    @staticmethod
    def _batch(codes: torch.Tensor, labels: torch.Tensor, pixels: torch.Tensor) -> Batch:
        return Batch(codes, labels, pixels, torch.zeros(len(labels), 0, dtype=torch.long))


_STREAM_IDS = {"gen": 1, "und": 2, "text": 3}


def derived_seed(*numbers: int) -> int:
    """A 63-bit seed hashed from small non-negative integers (NumPy's ``SeedSequence``)."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1, dtype=np.uint64)[0]) >> 1
