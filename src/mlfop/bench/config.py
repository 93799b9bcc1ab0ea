"""The run configuration: one typed dataclass, its validation and its TOML/YAML loading.

Every check raises :class:`BenchError` with a one-line message that names the accepted values;
the CLI turns it into exit code 2 before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI
    import tomli as tomllib

from mlfop.bench.data import TRAIN_SIZE
from mlfop.bench.models import MODELS, ModelConfig
from mlfop.bench.tokenizers import TOKENIZERS

__all__ = ["BenchError", "RunConfig", "SAVED_DEFAULTS", "OPTIMIZERS", "DEFAULT_LRS", "METRICS", "STREAMS", "LEVELS",
           "STREAM_WEIGHTS", "LOSS_WEIGHTINGS", "MUON_ADJUST_LR", "MUON_BASED", "OPTIMIZER_OPTIONS", "read_table",
           "saved_config", "coerce_config", "config_from", "load_config_file"]

OPTIMIZERS = ("adamw", "soap", "mlfop", "upgrad", "muon", "famo", "fop-muon")
MUON_BASED = ("muon", "fop-muon")  # torch.optim.Muon on the hidden matrices, AdamW at its own rate on the rest
# Starting points from the feasibility probe (batch 1024): AdamW 3e-3, SOAP 1e-2; Muon's 0.02 is
# the usual rate of its "original" learning-rate adjustment.
DEFAULT_LRS = {"adamw": 3e-3, "soap": 1e-2, "mlfop": 1e-2, "upgrad": 3e-3, "muon": 2e-2, "famo": 3e-3,
               "fop-muon": 2e-2}
# Held-out metrics a target may name, with True where larger is better.
METRICS = {"gen_nll": False, "und_nll": False, "und_acc": True, "fd": False, "text_nll": False}
STREAMS = ("gen", "und", "text")
LEVELS = ("global", "layer", "head")
STREAM_WEIGHTS = ("tokens", "fixed", "balanced")
LOSS_WEIGHTINGS = ("task", "token")
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn
STATE_DTYPES = ("float32", "bfloat16")  # SOAP's and ML-FOP-SOAP's moments (state_dtype)
_ADAM_TYPE = ("adamw", "soap", "mlfop", "upgrad", *MUON_BASED, "famo")  # Muon's: its AdamW part
_SINGLE_OPTIMIZER = tuple(name for name in OPTIMIZERS if name not in MUON_BASED)  # one optimizer on every parameter
# The config keys that only some optimizers read (everything else shapes every run alike).
OPTIMIZER_OPTIONS = {
    "betas": _ADAM_TYPE, "weight_decay": _ADAM_TYPE,
    **dict.fromkeys(("levels", "stream_weights", "fold_tokens", "stream_statistics", "noise_shrinkage", "beta_max",
                     "eta_range"), ("mlfop",)),
    "state_dtype": ("soap", "mlfop"),
    "outer_lr": _SINGLE_OPTIMIZER,
    **dict.fromkeys(("muon_adjust_lr", "muon_weight_decay", "muon_ns_steps"), MUON_BASED),
    **dict.fromkeys(("famo_lr", "famo_weight_decay"), ("famo",)),
}


class BenchError(ValueError):
    """Bad input: reported as one line, exit code 2, nothing written."""


@dataclass
class RunConfig:
    """Everything one ``mlfop-bench run`` does. Each field is also a ``--config`` key.

    The step objective is ``sum_k c_k L_k`` over the streams ``k`` (``L_k`` the stream's mean NLL
    per loss token in the step) with ``c_k`` its share of micro-batches (``loss_weighting =
    "task"``) or of loss tokens (``"token"``: the plain mean over every supervised token).
    """

    model: str = "emu3"
    tokenizer: str = "km64"
    optimizers: tuple[str, ...] = ("adamw", "muon", "soap", "mlfop")
    lrs: dict[str, tuple[float, ...]] = field(default_factory=dict)  # per optimizer; default DEFAULT_LRS
    batch: int = 1024  # sequences per optimizer step, all streams together
    micro_batch: int = 64  # sequences per forward/backward; each holds one stream
    steps: int = 60
    train_samples: int = 0  # budget in training sequences (a multiple of batch); sets steps when > 0
    seeds: tuple[int, ...] = (0,)
    # reached by AdamW at its default LR within the default 60 steps (measured), so ratios exist
    targets: dict[str, float] = field(default_factory=lambda: {"gen_nll": 3.05, "und_acc": 0.45})
    threads: int = 1
    output: str = ""  # default: runs/<date>-<time>-<model>-<tokenizer>
    eval_every: int = 5
    samples: int = 360  # class-conditional samples for the Frechet distance (0: skip it)
    text_stream: bool = False  # add the text-only third stream (K = 3)
    mix: tuple[int, ...] = (1, 1, 1)  # micro-batch ratio gen : und : text
    loss_weighting: str = "task"
    augment: bool = False  # +-1 pixel shifts of the training images (9 views)
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1  # cosine decays to this fraction of the peak LR
    clip: float = 1.0  # gradient-norm clip (0: none)
    diverge_factor: float = 2.0  # stop a run whose stream train loss exceeds this times its first (0: never)
    diverge_patience: int = 1  # ... for this many consecutive steps (1: a one-step spike stops it)
    probe_every: int = 0  # steps between per-layer heterogeneity probes (0: none)
    betas: tuple[float, float] = (0.95, 0.95)
    weight_decay: float = 0.01
    levels: tuple[str, ...] = LEVELS  # ML-FOP-SOAP levels (ablation)
    stream_weights: str = "tokens"  # ML-FOP-SOAP stream weights
    fold_tokens: bool = False  # ML-FOP-SOAP: fold with loss-token counts even under "task" weighting
    stream_statistics: bool = True  # ML-FOP-SOAP: Kronecker factors from the streams (False: shared)
    noise_shrinkage: bool = True  # ML-FOP-SOAP: shrink corrections by their sampling noise
    beta_max: float = 1.0  # ML-FOP-SOAP: bound on the correction coefficients
    eta_range: tuple[float, float] = (1.0 / 3.0, 1.0)  # ML-FOP-SOAP: bounds of the step scale eta*
    state_dtype: str = "float32"  # SOAP and ML-FOP-SOAP: dtype of the moments
    # Muon's split for the others: the rate of the parameters outside the hidden matrices
    # (embeddings, output heads, 1-D and convolution parameters; 0: the contender's own rate)
    outer_lr: float = 0.0
    muon_adamw_lrs: tuple[float, ...] = (3e-3,)  # rates of Muon's AdamW part (a sweep axis)
    muon_adjust_lr: str = "original"
    muon_weight_decay: float = 0.1  # torch.optim.Muon's default
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    famo_lr: float = 0.025  # FAMO's logit learning rate (torchjd's default, the paper's)
    famo_weight_decay: float = 1e-3  # FAMO's logit weight decay (torchjd's default)
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    mlp: int = 256
    attention_dropout: float = 0.0

    # ------------------------------------------------------------------------ derived
    @property
    def streams(self) -> tuple[str, ...]:
        return STREAMS if self.text_stream else STREAMS[:2]

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(self.hidden, self.layers, self.heads, self.mlp, self.attention_dropout)

    def learning_rates(self, optimizer: str) -> tuple[float, ...]:
        return tuple(self.lrs.get(optimizer, (DEFAULT_LRS[optimizer],)))

    def micro_batches(self) -> dict[str, int]:
        """Micro-batches per stream in one step, by the ``mix`` ratio (largest remainder, >= 1 each)."""
        total = self.batch // self.micro_batch
        ratios = self.mix[: len(self.streams)]
        exact = [total * r / sum(ratios) for r in ratios]
        counts = [max(1, math.floor(e)) for e in exact]
        by_remainder = sorted(range(len(counts)), key=lambda k: counts[k] - exact[k])
        for k in by_remainder[: total - sum(counts)]:
            counts[k] += 1
        return dict(zip(self.streams, counts))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --------------------------------------------------------------------- validation
    def validate(self) -> RunConfig:
        """Check every field and set ``steps`` from ``train_samples`` when that is given; returns
        ``self`` or raises :class:`BenchError`."""
        _one_of("model", self.model, MODELS)
        _one_of("tokenizer", self.tokenizer, TOKENIZERS)
        if not self.optimizers:
            raise BenchError(f"optimizers: give at least one of {', '.join(OPTIMIZERS)}")
        for name in self.optimizers:
            _one_of("optimizer", name, OPTIMIZERS)
        if len(set(self.optimizers)) != len(self.optimizers):
            raise BenchError(f"optimizers: each name at most once, got {', '.join(self.optimizers)}")
        for name, values in [*self.lrs.items(), ("muon_adamw_lrs", self.muon_adamw_lrs)]:
            if name != "muon_adamw_lrs":
                _one_of("optimizer in lrs", name, OPTIMIZERS)
            if not values or any(not (_is_number(v) and 0 < v < math.inf) for v in values):
                raise BenchError(f"lrs for {name}: positive finite numbers, got {values!r}")
        for name in ("batch", "micro_batch", "steps", "eval_every", "threads", "hidden", "layers", "heads", "mlp",
                     "muon_ns_steps"):
            _positive(name, getattr(self, name))
        for name in ("train_samples", "probe_every"):
            _positive(name, getattr(self, name), allow_zero=True)
        if self.train_samples % self.batch:
            low = self.train_samples - self.train_samples % self.batch
            raise BenchError(f"train_samples {self.train_samples} is not a multiple of batch {self.batch}; accepted: "
                             f"a multiple of batch (e.g. {max(low, self.batch)} or {low + self.batch})")
        if self.train_samples:
            self.steps = self.train_samples // self.batch
        if self.micro_batch > TRAIN_SIZE:
            raise BenchError(f"micro_batch {self.micro_batch} exceeds the {TRAIN_SIZE} training images; accepted: "
                             f"at most {TRAIN_SIZE} (raise --batch, not --micro-batch)")
        if self.batch % self.micro_batch:
            raise BenchError(f"micro_batch {self.micro_batch} does not divide batch {self.batch}; "
                             f"accepted: a divisor of {self.batch} (e.g. {_divisors(self.batch)})")
        if self.batch // self.micro_batch < len(self.streams):
            raise BenchError(f"batch/micro_batch = {self.batch // self.micro_batch} micro-batches, but each of the "
                             f"{len(self.streams)} streams needs its own: accepted batch >= "
                             f"{len(self.streams)} * micro_batch")
        if self.hidden % self.heads:
            raise BenchError(f"heads {self.heads} must divide hidden {self.hidden}")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise BenchError(f"seeds: one or more integers >= 0, got {self.seeds!r}")
        for name, value in self.targets.items():
            _one_of("target metric", name, tuple(METRICS))
            if not _is_number(value) or not math.isfinite(value):
                raise BenchError(f"target {name}: a finite number, got {value!r}")
        if self.samples != 0 and self.samples < 100:
            raise BenchError(f"samples: 0 (no Frechet distance) or >= 100, got {self.samples}")
        if len(self.mix) != 3 or any(not isinstance(m, int) or m < 1 for m in self.mix):
            raise BenchError(f"mix: three integers >= 1 (gen, und, text), got {self.mix!r}")
        _one_of("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        _one_of("stream_weights", self.stream_weights, STREAM_WEIGHTS)
        _one_of("state_dtype", self.state_dtype, STATE_DTYPES)
        _one_of("muon_adjust_lr", self.muon_adjust_lr, MUON_ADJUST_LR)
        for level in self.levels:
            _one_of("level", level, LEVELS)
        for name, value, high in (("warmup_fraction", self.warmup_fraction, 1.0),
                                  ("min_lr_fraction", self.min_lr_fraction, 1.0),
                                  ("attention_dropout", self.attention_dropout, 1.0),
                                  ("weight_decay", self.weight_decay, math.inf),
                                  ("muon_weight_decay", self.muon_weight_decay, math.inf),
                                  ("famo_lr", self.famo_lr, math.inf),
                                  ("famo_weight_decay", self.famo_weight_decay, math.inf),
                                  ("outer_lr", self.outer_lr, math.inf),
                                  ("clip", self.clip, math.inf)):
            if not _is_number(value) or not 0.0 <= value <= high or not math.isfinite(value):
                raise BenchError(f"{name}: a finite number in [0, {high:g}], got {value!r}")
        if not _is_number(self.beta_max) or not 0.0 <= self.beta_max < math.inf:
            raise BenchError(f"beta_max: a finite number >= 0, got {self.beta_max!r}")
        if len(self.eta_range) != 2 or any(not (_is_number(e) and 0 < e < math.inf) for e in self.eta_range) or (
                self.eta_range[0] > self.eta_range[1]):
            raise BenchError(f"eta_range: two positive finite numbers, low <= high, got {self.eta_range!r}")
        if len(self.betas) != 2 or any(not (_is_number(b) and 0 <= b < 1) for b in self.betas):
            raise BenchError(f"betas: two numbers in [0, 1), got {self.betas!r}")
        if not _is_number(self.diverge_factor) or not (self.diverge_factor == 0 or 1 < self.diverge_factor < math.inf):
            raise BenchError(f"diverge_factor: 0 (never stop) or a finite number above 1, got {self.diverge_factor!r}")
        if isinstance(self.diverge_patience, bool) or not isinstance(self.diverge_patience, int) or (
                self.diverge_patience < 1):
            raise BenchError(f"diverge_patience: a whole number of steps >= 1, got {self.diverge_patience!r}")
        self._check_stream_weights()
        return self

    def _check_stream_weights(self) -> None:
        """Refuse stream weights that would change nothing: without the global level (the weights
        belong to it), and ``fixed`` where the natural weights are already equal (task weighting,
        folds without token counts, equal micro-batch counts per stream)."""
        if "mlfop" not in self.optimizers or self.stream_weights == "tokens":
            return
        if "global" not in self.levels:
            raise BenchError(f"stream_weights {self.stream_weights!r} without the global level changes nothing (the "
                             f"weights belong to it); accepted: levels with global, or stream_weights tokens")
        counts = set(self.micro_batches().values())
        if self.stream_weights == "fixed" and self.loss_weighting == "task" and not self.fold_tokens and len(counts) == 1:
            raise BenchError("stream_weights 'fixed' equals 'tokens' here (task weighting, the same micro-batch count "
                             "for every stream); accepted: loss_weighting token, fold_tokens, or an uneven mix")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _one_of(what: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise BenchError(f"unknown {what} {value!r}; accepted: {', '.join(accepted)}")


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise BenchError(f"{name} must be {'an integer >= 0' if allow_zero else 'a positive integer'}, got {value!r}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _coerce(name: str, value: Any, default: Any) -> Any:
    """A config-file value in the field's type (lists become tuples, lr values become tuples)."""
    if name == "lrs":
        if not isinstance(value, dict):
            raise BenchError(f"lrs: a table {{optimizer = [lr, ...]}}, got {value!r}")
        return {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in value.items()}
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise BenchError(f"{name}: a list, got {value!r}")
        return tuple(value)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise BenchError(f"{name}: true or false, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# Every default as a run folder's config.json holds it (lists for tuples): what a folder written
# before a key existed ran with.
SAVED_DEFAULTS: dict[str, Any] = json.loads(json.dumps(RunConfig().to_dict()))


def saved_config(saved: dict[str, Any], **overrides: Any) -> RunConfig:
    """The validated RunConfig of a run folder's ``config.json`` (``saved``, its JSON lists
    back to tuples), with ``overrides`` applied first."""
    values = {k: _from_json(v) for k, v in saved.items()}
    return RunConfig(**{**values, **overrides}).validate()


def _from_json(value: Any) -> Any:
    """JSON lists back to tuples (and inside the lrs table)."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value


def read_table(path: str, what: str = "config file") -> dict[str, Any]:
    """The top-level table of a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file."""
    file = Path(path)
    if not file.is_file():
        raise BenchError(f"{what} {path!r} not found")
    if file.suffix not in (".toml", ".yaml", ".yml"):
        raise BenchError(f"{what} {path!r}: accepted formats: .toml, .yaml, .yml")
    try:
        if file.suffix == ".toml":
            with file.open("rb") as handle:
                values = tomllib.load(handle)
        else:
            import yaml

            values = yaml.safe_load(file.read_text()) or {}
    except Exception as error:  # a parse error of either format, reported as one line
        raise BenchError(f"{what} {path!r} is not valid: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise BenchError(f"{what} {path!r}: expected a table of keys")
    return values


def coerce_config(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` (RunConfig keys, as a TOML or YAML table holds them) in the fields' types;
    ``where`` names their source in the error of an unknown key."""
    defaults = RunConfig()
    accepted = [f.name for f in dataclasses.fields(RunConfig)]
    unknown = [key for key in values if key not in accepted]
    if unknown:
        raise BenchError(f"unknown config key {unknown[0]!r} in {where}; accepted: {', '.join(accepted)}")
    return {key: _coerce(key, value, getattr(defaults, key)) for key, value in values.items()}


def config_from(values: dict[str, Any]) -> RunConfig:
    """The (unvalidated) RunConfig of the given keys, e.g. a config file's merged with flags:
    ``steps`` and ``train_samples`` (which sets the steps) exclude each other."""
    if values.get("train_samples") and "steps" in values:
        raise BenchError("give either steps or train_samples (which sets the steps), not both")
    return RunConfig(**values)


def load_config_file(path: str) -> dict[str, Any]:
    """The keys of a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file, checked against the fields."""
    return coerce_config(read_table(path), path)
