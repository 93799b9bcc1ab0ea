"""Image tokenizers for 8x8 digits: ``pix8`` (per-pixel, exact, no fitting) and ``km64`` (2x2 k-means).

Pixels are the ``load_digits`` intensities 0..16. Documented round-trip errors (checked by the
tests): ``pix8`` decodes every pixel to the centre of its level's bin, so
``|decode(encode(x)) - x| <= 17/16`` per pixel; ``km64`` replaces each 2x2 patch by its nearest
centroid, measured at a mean squared error of about 1.4 per pixel on the held-out split (bounded
by :data:`KM64_MAX_TEST_MSE` in the tests). Both map codes back to themselves:
``encode(decode(c)) == c``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

__all__ = ["TOKENIZERS", "ImageTokenizer", "Pix8", "KMeans64", "make_tokenizer", "load_tokenizer",
           "PIX8_MAX_ABS_ERROR", "KM64_MAX_TEST_MSE"]

TOKENIZERS = ("km64", "pix8")
PIXEL_MAX = 16.0
PIX8_MAX_ABS_ERROR = 17.0 / 16.0
KM64_MAX_TEST_MSE = 2.0


class ImageTokenizer:
    """Maps ``(N, 8, 8)`` pixel arrays to ``(N, tokens)`` integer codes in ``[0, codes)`` and back."""

    name: str
    codes: int
    tokens: int
    grid: int  # codes form a ``grid x grid`` raster

    def encode(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decode(self, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """Write what is needed to rebuild this tokenizer exactly (``.npz``)."""
        raise NotImplementedError


class Pix8(ImageTokenizer):
    """Per-pixel quantisation to 8 levels, ``floor(x * 8 / 17)``: 64 tokens, 8 codes."""

    name = "pix8"
    codes = 8
    tokens = 64
    grid = 8

    def encode(self, images: np.ndarray) -> np.ndarray:
        levels = np.floor(np.asarray(images, dtype=np.float64) * self.codes / (PIXEL_MAX + 1))
        return np.clip(levels, 0, self.codes - 1).astype(np.int64).reshape(len(images), self.tokens)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        centres = (np.asarray(codes, dtype=np.float64) + 0.5) * (PIXEL_MAX + 1) / self.codes
        return centres.reshape(len(codes), 8, 8)

    def save(self, path: Path) -> None:
        np.savez(path, name=self.name)


class KMeans64(ImageTokenizer):
    """2x2-patch k-means with 64 centroids: 16 tokens (a 4x4 raster), fitted on training images only."""

    name = "km64"
    codes = 64
    tokens = 16
    grid = 4

    def __init__(self, centroids: np.ndarray) -> None:
        self.centroids = np.asarray(centroids, dtype=np.float64).reshape(self.codes, 4)

    @classmethod
    def fit(cls, train_images: np.ndarray) -> KMeans64:
        """Deterministic fit on the training images' patches: fixed ``random_state``, ``n_init=4``,
        and one OpenMP thread (scikit-learn's parallel k-means sums in a thread-dependent order,
        which changes the centroids; one thread is also the fastest on a shared 2-core machine)."""
        patches = _patches(train_images).reshape(-1, 4)
        with threadpool_limits(1):
            kmeans = KMeans(n_clusters=cls.codes, n_init=4, random_state=0).fit(patches)
        return cls(kmeans.cluster_centers_)

    def encode(self, images: np.ndarray) -> np.ndarray:
        patches = _patches(images)  # (N, 16, 4)
        distances = ((patches[:, :, None, :] - self.centroids[None, None]) ** 2).sum(-1)
        return distances.argmin(-1).astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        patches = self.centroids[np.asarray(codes)].reshape(len(codes), 4, 4, 2, 2)
        return patches.transpose(0, 1, 3, 2, 4).reshape(len(codes), 8, 8)

    def save(self, path: Path) -> None:
        np.savez(path, name=self.name, centroids=self.centroids)


def _patches(images: np.ndarray) -> np.ndarray:
    """``(N, 8, 8)`` -> ``(N, 16, 4)``: 2x2 patches in raster order."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), 4, 2, 4, 2)
    return x.transpose(0, 1, 3, 2, 4).reshape(len(images), 16, 4)


def make_tokenizer(name: str, train_images: np.ndarray) -> ImageTokenizer:
    """The tokenizer ``name`` (one of :data:`TOKENIZERS`), fitted on ``train_images`` if it needs it."""
    if name == "pix8":
        return Pix8()
    if name == "km64":
        return KMeans64.fit(train_images)
    raise ValueError(f"unknown tokenizer {name!r}; accepted: {', '.join(TOKENIZERS)}")


def load_tokenizer(path: Path) -> ImageTokenizer:
    """Rebuild a tokenizer written by :meth:`ImageTokenizer.save`."""
    with np.load(path) as saved:
        name = str(saved["name"])
        return KMeans64(saved["centroids"]) if name == "km64" else Pix8()
