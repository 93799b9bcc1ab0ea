"""StreamBatchSampler: single-stream micro-batches, each example once, proportions per window,
ranks in agreement, determinism, resume; and reading the stream column of a dataset."""

from __future__ import annotations

import io
import math
import random
from collections import Counter
from fractions import Fraction

import pytest
import torch
from torch.utils.data import DataLoader

from mlfop.data import StreamBatchSampler, stream_column, window_counts


def mixed_streams(n: int, seed: int = 0, weights=(5, 3, 1)) -> list[str]:
    """``n`` examples of three streams in uneven proportions, in random order."""
    rng = random.Random(seed)
    return rng.choices(["t2i", "i2t", "text"], weights=weights, k=n)


def rank_batches(streams, world, **kwargs) -> list[list[tuple[str, list[int]]]]:
    return [StreamBatchSampler(streams, num_replicas=world, rank=r, **kwargs).micro_batches() for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_single_stream_micro_batches_and_each_example_once(world, drop_last):
    streams = mixed_streams(101)
    batches = rank_batches(streams, world, micro_batch_size=4, accumulation_steps=3, drop_last=drop_last)
    counts = Counter(streams)
    seen = Counter()
    for per_rank in batches:
        assert len(per_rank) == len(StreamBatchSampler(streams, 4, num_replicas=world, rank=0, drop_last=drop_last))
        for stream, indices in per_rank:
            assert indices and all(streams[i] == stream for i in indices)
            assert len(indices) == 4 or not drop_last
            seen.update(indices)
    for name, n in counts.items():
        uses = [seen[i] for i in range(len(streams)) if streams[i] == name]
        if drop_last:  # every micro-batch full; the last n mod (B * R) of the epoch left out
            assert max(uses) == 1 and uses.count(0) == n % (4 * world)
        else:  # completed to a multiple of R by fewer than R repeats
            assert min(uses) == 1 and sum(uses) - n == -n % world
    # A stream's short last micro-batch has the same size on every rank.
    for step in zip(*batches):
        assert len({len(indices) for _, indices in step}) == 1


def test_ranks_agree_on_the_streams_over_disjoint_examples():
    streams = mixed_streams(120, seed=3)
    for world in (2, 3):
        batches = rank_batches(streams, world, micro_batch_size=2, accumulation_steps=4, drop_last=True, seed=5)
        sequences = [[stream for stream, _ in per_rank] for per_rank in batches]
        assert all(sequence == sequences[0] for sequence in sequences)
        assert len(set(sequences[0])) == 3  # not trivially one stream
        owned = [{i for _, indices in per_rank for i in indices} for per_rank in batches]
        assert sum(map(len, owned)) == len(set().union(*owned))  # disjoint


def test_proportions_kept_in_every_window():
    rng = random.Random(0)
    for _ in range(3000):
        slots = [rng.randint(0, 40) for _ in range(rng.randint(1, 6))]
        if not any(slots):
            continue
        window = rng.randint(1, 16)
        windows = window_counts(slots, window)
        total = sum(slots)
        assert [sum(c) for c in windows[:-1]] == [window] * (len(windows) - 1) and 0 < sum(windows[-1]) <= window
        assert [sum(column) for column in zip(*windows)] == slots
        for counts in windows:
            for m, count in zip(slots, counts):
                share = Fraction(sum(counts) * m, total)
                assert math.floor(share) <= count <= math.ceil(share), (slots, window, counts)

    # The same on a sampler's output: every step of 5 micro-batches holds each stream's share.
    streams = mixed_streams(400, seed=1)
    sampler = StreamBatchSampler(streams, 4, accumulation_steps=5, drop_last=True)
    sequence = [stream for stream, _ in sampler.micro_batches()]
    totals = Counter(sequence)
    for start in range(0, len(sequence) - 4, 5):
        window = Counter(sequence[start : start + 5])
        for name, m in totals.items():
            share = 5 * m / len(sequence)
            assert math.floor(share) <= window[name] <= math.ceil(share)


def test_deterministic_for_a_seed_and_new_order_per_epoch():
    streams = mixed_streams(60)

    def epoch_lists(seed, epoch):
        sampler = StreamBatchSampler(streams, 3, accumulation_steps=2, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_lists(0, 0) == epoch_lists(0, 0)
    assert epoch_lists(0, 1) != epoch_lists(0, 0)
    assert epoch_lists(1, 0) != epoch_lists(0, 0)
    ordered = StreamBatchSampler(streams, 3, shuffle=False)
    assert list(ordered) == list(ordered)
    for _, indices in ordered.micro_batches():
        assert indices == sorted(indices)


def test_dataloader_batch_sampler_yields_single_stream_batches():
    streams = mixed_streams(40)
    dataset = [{"x": torch.full((2,), float(i)), "stream": s} for i, s in enumerate(streams)]
    sampler = StreamBatchSampler(stream_column(dataset), 4, accumulation_steps=2)
    loader = DataLoader(dataset, batch_sampler=sampler)
    batches = list(loader)
    assert len(batches) == len(loader) == len(sampler)
    assert all(len(set(batch["stream"])) == 1 for batch in batches)
    assert sorted(int(v) for batch in batches for v in batch["x"][:, 0]) == list(range(40))


def test_resume_mid_epoch_gives_the_same_remaining_micro_batches():
    streams = mixed_streams(90, seed=2)
    kwargs = dict(micro_batch_size=3, accumulation_steps=4, num_replicas=2, rank=1, seed=7)
    full = StreamBatchSampler(streams, **kwargs)
    full.set_epoch(2)
    expected = list(full)
    first = StreamBatchSampler(streams, **kwargs)
    first.set_epoch(2)
    iterator = iter(first)
    head = [next(iterator) for _ in range(5)]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["epoch"] == 2 and state["position"] == 5

    resumed = StreamBatchSampler(streams, **kwargs)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the loop's set_epoch of the same epoch keeps the position
    assert head + list(resumed) == expected
    assert list(resumed) == expected  # the next iteration of the epoch starts from its beginning
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(expected)

    with pytest.raises(ValueError, match="micro_batch_size: saved 3, here 4"):
        StreamBatchSampler(streams, **{**kwargs, "micro_batch_size": 4}).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        StreamBatchSampler(streams, **kwargs).load_state_dict({**state, "position": 10**6})


def test_ranks_default_from_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 2)
    sampler = StreamBatchSampler(mixed_streams(30), 2)
    assert (sampler.num_replicas, sampler.rank) == (3, 2)
    assert StreamBatchSampler(mixed_streams(30), 2, num_replicas=1, rank=0).num_replicas == 1


@pytest.mark.parametrize(
    ("streams", "kwargs", "error", "match"),
    [
        ("image", {}, TypeError, "one stream per example"),
        ([], {}, ValueError, "streams is empty"),
        ([["a"], ["b"]], {}, TypeError, "hashable"),
        (["a"] * 4, {"micro_batch_size": 0}, ValueError, "micro_batch_size must be a positive integer"),
        (["a"] * 4, {"accumulation_steps": 1.5}, ValueError, "accumulation_steps"),
        (["a"] * 4, {"num_replicas": 2, "rank": 2}, ValueError, r"rank must be an integer in \[0, num_replicas=2\)"),
        (["a"] * 4, {"shuffle": 1}, TypeError, "shuffle must be True or False"),
        (["a"] * 3 + ["b"], {"micro_batch_size": 4, "drop_last": True}, ValueError, "drop_last=True leaves no"),
    ],
)
def test_bad_arguments_are_refused_at_construction(streams, kwargs, error, match):
    kwargs = {"micro_batch_size": 2, **kwargs}
    with pytest.raises(error, match=match):
        StreamBatchSampler(streams, **kwargs)


def test_stream_column_reads_lists_and_dataset_columns():
    examples = [{"x": 0, "stream": "image"}, {"x": 1, "stream": torch.tensor(1)}]
    assert stream_column(examples) == ["image", 1]

    class ColumnDataset:  # the part of datasets.Dataset that stream_column uses
        column_names = ["input_ids", "modality"]

        def __getitem__(self, key):
            assert key == "modality", "only the stream column is read"
            return ["text", "image"]

    assert stream_column(ColumnDataset(), "modality") == ["text", "image"]
    with pytest.raises(KeyError, match="no 'stream' column"):
        stream_column(ColumnDataset())
    with pytest.raises(KeyError, match="example 1 of the dataset has no 'stream' key"):
        stream_column([{"stream": "a"}, {"x": 1}])
