"""The image tokenizers round-trip within their documented error."""

import numpy as np
import pytest

from mlfop.bench.data import load_split
from mlfop.bench.tokenizers import KM64_MAX_TEST_MSE, PIX8_MAX_ABS_ERROR, KMeans64, Pix8, load_tokenizer


@pytest.fixture(scope="module")
def split():
    return load_split()


def test_split_is_fixed_and_stratified(split):
    train, test = split
    assert (len(train.labels), len(test.labels)) == (1437, 360)
    assert np.bincount(test.labels).min() >= 35  # every digit present in proportion
    assert np.array_equal(load_split()[1].labels, test.labels)


def test_pix8_round_trip(split):
    images = split[1].images
    tokenizer = Pix8()
    codes = tokenizer.encode(images)
    assert codes.shape == (len(images), 64) and codes.min() >= 0 and codes.max() < 8
    assert np.abs(tokenizer.decode(codes) - images).max() <= PIX8_MAX_ABS_ERROR
    assert np.array_equal(tokenizer.encode(tokenizer.decode(codes)), codes)


def test_km64_round_trip_deterministic_and_saved(split, tmp_path):
    train, test = split
    tokenizer = KMeans64.fit(train.images)
    codes = tokenizer.encode(test.images)
    assert codes.shape == (len(test.images), 16) and codes.max() < 64
    assert ((tokenizer.decode(codes) - test.images) ** 2).mean() <= KM64_MAX_TEST_MSE
    assert np.array_equal(tokenizer.encode(tokenizer.decode(codes)), codes)
    tokenizer.save(tmp_path / "tok.npz")
    assert np.array_equal(load_tokenizer(tmp_path / "tok.npz").encode(test.images), codes)
    assert np.array_equal(KMeans64.fit(train.images).centroids, tokenizer.centroids)
