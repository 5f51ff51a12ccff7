import pytest
import torch

# The tests use tiny tensors: one intra-op thread avoids contention when the 2 cores are shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_default_dtype():
    old = torch.get_default_dtype()
    yield
    torch.set_default_dtype(old)
