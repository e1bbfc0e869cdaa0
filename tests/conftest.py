import pytest
import torch

# Two cores are shared by everything on the CI machine; one intra-op thread per test
# process keeps small-model tests fast and their timings stable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
