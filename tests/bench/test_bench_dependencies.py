"""The ``test`` extra brings every package the benchmark needs (so no bench test is left out)."""

from importlib.util import find_spec

BENCH_MODULES = ("transformers", "sklearn", "torchjd", "quadprog", "qpsolvers", "matplotlib", "tensorboard", "tqdm", "yaml")


def test_bench_extra_installed():
    missing = [name for name in BENCH_MODULES if find_spec(name) is None]
    assert not missing, f"{', '.join(missing)} missing: pip install -e '.[test]'"
