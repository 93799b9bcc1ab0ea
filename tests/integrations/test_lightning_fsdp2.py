"""Lightning with FSDP2 (``ModelParallelStrategy``, 2 gloo ranks on CPU) and the MLFOPFolding
callback, against one process on the same global batch (tests/distributed/test_fsdp.py's
reference: the ranks' joint micro-batches folded in one process).

The module applies ``fully_shard`` in ``configure_model`` and builds ``MLFOPSOAP`` over the
sharded parameters in ``configure_optimizers``; Lightning divides each micro-batch's loss by
``accumulate_grad_batches`` and FSDP2 averages over the ranks, as the reference's loss does.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from rank_spawn import run_ranks, scenario_results

from mlfop.integrations.lightning import MLFOPFolding

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from test_ddp_folding import _model, _params, _relative  # noqa: E402
from test_fsdp import MICRO_PER_RANK, STEPS, STREAM_ORDER, _micro_batches, _optimizer, _single_process  # noqa: E402

WORLD = 2
_FLOORS = 10.0


class ShardedModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _model()

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return (self.net(batch["x"]) - batch["y"]).pow(2).mean(dim=1).mean()

    def configure_optimizers(self):
        return _optimizer("mlfop", self.net)


def _fit(rank: int) -> dict:
    batches = [{"x": x, "y": y, "stream": STREAM_ORDER[j]}
               for step in range(STEPS) for j, (x, y) in enumerate(_micro_batches(step, False)[rank])]
    module = ShardedModule()
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        max_steps=STEPS, accumulate_grad_batches=MICRO_PER_RANK, callbacks=[MLFOPFolding()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    optimizer = trainer.optimizers[0]
    return {"params": [p.full_tensor().detach().clone() for p in module.net.parameters()],
            "sharded": all(type(p).__name__ == "DTensor" for p in module.net.parameters()),
            "steps": max(float(optimizer.state[p]["step"]) for p in optimizer.state if optimizer.state[p])}


SCENARIOS = {"fit": _fit}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(__name__, list(SCENARIOS), tmp_path_factory.mktemp("lightning-fsdp2"), world=WORLD)


def test_lightning_fsdp2_matches_single_process(ranks):
    rank0, rank1 = scenario_results(ranks, "fit")
    assert rank0["sharded"] and rank0["steps"] == STEPS - 1  # (the first call sets up the bases)
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)
    start = _params(_model())
    reference = _single_process("mlfop", False)
    floor = _relative(_single_process("mlfop", False, reverse_rows=True), reference, start)
    distance = _relative(rank0["params"], reference, start)
    print(f"lightning fsdp2: rounding floor {floor:.2e}, lightning-vs-single {distance:.2e} (of the displacement)")
    assert distance <= max(_FLOORS * floor, 1e-6)
