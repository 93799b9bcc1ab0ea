"""Held-out metrics, their reference lines, targets and run flags.

- ``gen_nll``: teacher-forced NLL per image code on the test images (nats), printed beside the
  *independent sampler* line: a class-conditional, per-position categorical fitted on the
  training codes, which models no dependency between codes; a model must beat it to have learnt
  any image structure;
- ``und_acc`` / ``und_nll``: accuracy (argmax over the ten digit words) and answer NLL (full
  vocabulary) on the test images;
- ``text_nll``: NLL per token of the 55 text-stream sentences (when that stream is on);
- ``fd``: Frechet distance in raw pixel space (64-d) between class-conditional samples (equal
  count per digit, temperature 1, fixed sampling seed) and the test images, beside its noise
  floor: the distance of as many *real* training images to the test images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import linalg

from mlfop.bench import vocab
from mlfop.bench.config import METRICS
from mlfop.bench.data import TEXT_PAIRS, Batch, DigitsData
from mlfop.bench.models import TinyModel
from mlfop.bench.objective import digit_logits, stream_nll, tokens_per_sequence

__all__ = ["references", "independent_sampler_nll", "frechet_distance", "evaluate", "time_to_targets",
           "run_flags", "lowest", "divergence", "peak_loss_ratio", "longest_run_above", "STALL_MARGIN",
           "STALL_ACCURACY", "SMOOTHING"]

STALL_MARGIN = 0.05  # nats: a task whose final held-out NLL is not this far below its prior may be stalled
STALL_ACCURACY = 0.2  # understanding must also be at most this accurate (chance is 0.1) to be stalled
# nats: how far below its prior a task's best held-out NLL, and below that best its training loss,
# must go for a run to count as learned-then-overfit rather than stalled. Ten stall margins: the
# overfitting seen (batch 64, no augmentation) is 1.5 nats on each; a task just starting to learn
# at the end of its budget (0.09 and 0.08 nats: Janus, batch 1024, AdamW 0.01) is a stall.
OVERFIT_MARGIN = 0.5
SMOOTHING = 0.5  # add-alpha smoothing of the independent sampler's counts


def independent_sampler_nll(train_codes: np.ndarray, train_labels: np.ndarray, test_codes: np.ndarray,
                            test_labels: np.ndarray, codes: int) -> float:
    """Held-out NLL per code of the class-conditional independent per-position sampler."""
    counts = np.full((10, train_codes.shape[1], codes), SMOOTHING)
    np.add.at(counts, (train_labels[:, None], np.arange(train_codes.shape[1])[None], train_codes), 1.0)
    log_probs = np.log(counts / counts.sum(-1, keepdims=True))
    positions = np.arange(test_codes.shape[1])[None]
    return float(-log_probs[test_labels[:, None], positions, test_codes].mean())


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of ``x`` and ``y``.

    ``tr sqrt(C_x C_y)`` is the sum of the square roots of the eigenvalues of ``C_x C_y`` (real and
    non-negative for covariance matrices), which stays exact when pixels that never vary make
    both covariances singular."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root_trace = np.sqrt(np.clip(linalg.eigvals(cov_x @ cov_y).real, 0.0, None)).sum()
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2.0 * root_trace)


def references(data: DigitsData, samples: int) -> dict[str, float]:
    """The reference lines: independent sampler, priors (for stall flags) and the FD noise floor."""
    train_codes, train_labels = data.train_codes[0].numpy(), data.train_labels.numpy()
    test_codes, test_labels = data.test.codes.numpy(), data.test.labels.numpy()
    codes = data.tokenizer.codes
    unigram = np.bincount(train_codes.ravel(), minlength=codes) + SMOOTHING
    classes = np.bincount(train_labels, minlength=10) / len(train_labels)
    refs = {
        "independent_sampler_nll": independent_sampler_nll(train_codes, train_labels, test_codes, test_labels, codes),
        "gen_prior_nll": float(-np.log(unigram / unigram.sum())[test_codes].mean()),
        "und_prior_nll": float(-np.log(classes)[test_labels].mean()),
        "ln_codes": math.log(codes),
    }
    if samples:
        real = data.train_images[:samples].reshape(samples, 64)
        refs["fd_noise_floor"] = frechet_distance(real, data.test_images.reshape(-1, 64))
    return refs


@torch.no_grad()
def evaluate(model: TinyModel, data: DigitsData, streams: tuple[str, ...], samples: int, sample_seed: int
             ) -> tuple[dict[str, float], np.ndarray | None]:
    """Every held-out metric of ``model`` and, when ``samples``, the sampled images ``(n, 8, 8)``."""
    was_training = model.training
    model.eval()
    test = data.test
    tokens = test.codes.shape[1]
    result = {"gen_nll": float(stream_nll(model, "gen", test)) / (len(test) * tokens)}
    logits = model.und_logits(test)
    answers = vocab.digit_ids()[test.labels]
    result["und_nll"] = float(torch.nn.functional.cross_entropy(logits, answers))
    result["und_acc"] = float((digit_logits(logits).argmax(1) == test.labels).float().mean())
    if "text" in streams:
        pairs = torch.tensor(TEXT_PAIRS)
        text = Batch(test.codes[:0], pairs.sum(1), test.pixels[:0], pairs)
        result["text_nll"] = float(stream_nll(model, "text", text)) / (len(pairs) * tokens_per_sequence("text", 0))
    images = None
    if samples:
        labels = torch.arange(10).repeat_interleave(samples // 10)
        codes = model.sample(labels, torch.Generator().manual_seed(sample_seed))
        images = data.tokenizer.decode(codes.numpy())
        result["fd"] = frechet_distance(images.reshape(len(images), 64), data.test_images.reshape(-1, 64))
    model.train(was_training)
    return result, images


def time_to_targets(evals: list[dict], targets: dict[str, float], batch: int) -> dict[str, float | None]:
    """First eval at which each target, and all together, were met: its step, training samples
    (``step * batch``), and training seconds (wall clock and CPU time of the process)."""
    def met(record: dict, name: str) -> bool:
        value = record.get(name)
        if value is None or not math.isfinite(value):
            return False
        return value >= targets[name] if METRICS[name] else value <= targets[name]

    result: dict[str, float | None] = {}
    for label, names in [(name, [name]) for name in targets] + [("all", list(targets))]:
        hit = next((r for r in evals if names and all(met(r, n) for n in names)), None)
        result[f"steps_to_{label}"] = None if hit is None else hit["step"]
        result[f"samples_to_{label}"] = None if hit is None else hit["step"] * batch
        result[f"seconds_to_{label}"] = None if hit is None else hit["train_seconds"]
        result[f"cpu_seconds_to_{label}"] = None if hit is None else hit.get("train_cpu_seconds")
    return result


def run_flags(evals: list[dict], refs: dict[str, float], stopped: str | None,
              train_losses: dict[str, float] | None = None) -> dict[str, bool | str | None]:
    """``divergence``: why the run diverged, if it did: ``stopped`` (``"nonfinite"`` or
    ``"exploded"``, from the loop) or ``"heldout_grew"`` (a held-out loss ended above its start);
    ``diverged``: whether it did; ``stalled_gen``: the final generation NLL not
    :data:`STALL_MARGIN` below the unigram prior; ``stalled_und``: the same for the answer NLL
    and the class prior, with an accuracy of at most :data:`STALL_ACCURACY` (an accurate but
    over-confident model is not stuck at its prior). Missing (non-finite) values count as stalled.

    ``overfit_gen`` / ``overfit_und`` replace a stall of a run that did not diverge when the task
    was learned and then lost to overfitting: its best held-out NLL went :data:`OVERFIT_MARGIN`
    below the prior, and the final training loss (``train_losses["loss_gen"]`` /
    ``["loss_und"]``) lies :data:`OVERFIT_MARGIN` below that best, i.e. the model fits its training
    sequences better than it ever fitted held-out ones."""
    first, last = evals[0], {k: _finite_or_none(v) for k, v in evals[-1].items()}
    grew = any(last.get(k) is None or last[k] > first[k] for k in ("gen_nll", "und_nll"))
    divergence = stopped or ("heldout_grew" if grew else None)

    def below_prior(key: str, prior: str) -> bool:
        return last.get(key) is not None and last[key] < refs[prior] - STALL_MARGIN

    def overfit(key: str, prior: str, loss: str) -> bool:
        best, train = lowest(evals, key), _finite_or_none((train_losses or {}).get(loss))
        return (divergence is None and best is not None and best < refs[prior] - OVERFIT_MARGIN
                and train is not None and train < best - OVERFIT_MARGIN)

    stalled = {"gen": not below_prior("gen_nll", "gen_prior_nll"),
               "und": not below_prior("und_nll", "und_prior_nll") and not (last.get("und_acc") or 0) > STALL_ACCURACY}
    overfits = {task: stalled[task] and overfit(f"{task}_nll", f"{task}_prior_nll", f"loss_{task}")
                for task in stalled}
    return {"diverged": divergence is not None, "divergence": divergence,
            **{f"stalled_{task}": stalled[task] and not overfits[task] for task in stalled},
            **{f"overfit_{task}": overfits[task] for task in stalled}}


def divergence(losses: dict[str, float], first: dict[str, float], factor: float, patience: int = 1,
               streak: int = 0) -> tuple[str | None, int]:
    """Why a run stops after this step's ``losses``, and the streak of consecutive steps, this
    one included, on which a stream's loss stood above ``factor`` times its ``first`` (``streak``:
    the streak before this step; no step is above the line when ``factor`` is 0). The reason is
    ``"nonfinite"`` on a non-finite loss, ``"exploded"`` once the streak reaches ``patience``
    (1: the first step above the line, so a one-step spike counts too), otherwise None."""
    if not all(math.isfinite(v) for v in losses.values()):
        return "nonfinite", streak
    above = bool(factor) and any(losses[k] > factor * first[k] for k in losses)
    streak = streak + 1 if above else 0
    return ("exploded" if streak >= patience else None), streak


def peak_loss_ratio(trains: list[dict]) -> float | None:
    """:math:`\\max_{t,k} L_k(t) / L_k(1)` over a run's training records: its worst loss spike
    against each stream's first loss, the quantity the loop's ``diverge_factor`` stops on (a run
    stopped as exploded has a peak above the factor; one that held shows how close it came).
    None without finite training losses."""
    first = trains[0] if trains else {}
    ratios = [v / first[k] for r in trains for k in first if k.startswith("loss_") and first[k] > 0
              if (v := _finite_or_none(r.get(k))) is not None]
    return max(ratios, default=None)


def longest_run_above(trains: list[dict], factor: float) -> int:
    """The most consecutive training records on which a stream's loss stood above ``factor`` times
    its first: what ``diverge_patience`` counts (a run whose longest run is below the patience
    would not have been stopped at that line)."""
    first = {k: v for k, v in (trains[0] if trains else {}).items()
             if k.startswith("loss_") and _finite_or_none(v) is not None}
    streak = longest = 0
    for record in trains:
        losses = {k: v for k in first if (v := _finite_or_none(record.get(k))) is not None}
        _, streak = divergence(losses, first, factor, streak=streak)
        longest = max(longest, streak)
    return longest


def lowest(evals: list[dict], key: str) -> float | None:
    """The lowest finite value of ``key`` over the evaluations (the best held-out NLL), if any."""
    return min((v for r in evals if (v := _finite_or_none(r.get(key))) is not None), default=None)


def _finite_or_none(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value
