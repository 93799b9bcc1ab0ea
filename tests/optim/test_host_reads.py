"""A regular step reads a constant number of values back to the host, whatever the model size.

On a GPU every read is a device synchronisation. Counted: ``aten._local_scalar_dense``
(``item()``, ``float()``, ``bool()`` of a tensor), ops whose output shape depends on the data
(``nonzero``, ``masked_select``), ``torch.linalg.eigh`` (which synchronises on CUDA) and
``Tensor.tolist()`` (which bypasses the dispatcher, so it is counted by wrapping it).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mlfop

_SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
            "aten._linalg_eigh.default"}


class HostReads(TorchDispatchMode):
    """Counts the host reads of the ops run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in _SYNCING:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        reads, tolist = self.reads, self._tolist

        def counted(tensor):
            reads.append("tolist")
            return tolist(tensor)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.o_proj = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.o_proj(torch.tanh(self.q_proj(x))))


def _model(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[_Attention() for _ in range(layers)])


def _heads(model):
    """q projections split by output rows, o projections by input columns, four heads each."""
    return {p: (4, 0 if "q_proj" in n else 1) for n, p in model.named_parameters()
            if n.endswith(("q_proj.weight", "o_proj.weight"))}


def _reads_of_a_regular_step(kind: str, layers: int, shard=None, **options) -> tuple[list[str], list[str]]:
    """The reads of the folds and of the step at call 5 (no refresh: f = 10); ``shard(model)``
    applies FSDP2 first (tests/distributed/test_fsdp.py)."""
    model = _model(layers)
    if shard is not None:
        shard(model)
    if kind == "soap":
        opt = mlfop.SOAP(model.parameters())
    else:
        opt = mlfop.MLFOPSOAP(model.parameters(), heads=_heads(model), **options)
    fold_reads = []
    for _ in range(5):
        for i in range(4):
            model(torch.randn(8, 16)).pow(2).mean().mul(1 + i).backward()
            if kind != "soap":
                with HostReads() as counter:
                    opt.fold(("image", "text")[i % 2], tokens=8)
                fold_reads += counter.reads
        with HostReads() as counter:
            opt.step()
        opt.zero_grad()
    return fold_reads, counter.reads


@pytest.mark.parametrize("layers", [1, 6])
def test_soap_reads_one_value_per_step(layers):
    _, reads = _reads_of_a_regular_step("soap", layers)
    assert reads == ["aten._local_scalar_dense.default"]  # whether the gradients are finite


@pytest.mark.parametrize("layers", [1, 6])
@pytest.mark.parametrize("diagnostics", ["off", "global", "head"])
def test_mlfopsoap_reads_two_values_per_step_and_none_per_fold(layers, diagnostics):
    fold_reads, reads = _reads_of_a_regular_step("mlfop", layers, diagnostics=diagnostics)
    assert fold_reads == []  # tokens given as Python numbers
    # whether the gradients are finite; the rescale flag with every block's reach, in one transfer
    assert reads == ["aten._local_scalar_dense.default", "tolist"]
