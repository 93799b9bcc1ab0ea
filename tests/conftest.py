"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The tensors in the tests are tiny: one thread, so that OpenMP spin-waits on a shared
    2-core CPU do not stretch the run (measured about 10x under load). Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
