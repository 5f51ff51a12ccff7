import pytest
import torch


@pytest.fixture(autouse=True)
def float64_default():
    """The per-sample battery runs in float64, where exactness can be checked at 1e-10."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
