import pickle

import numpy as np
import pytest
import torch

# Two cores are shared by everything on the CI machine; one intra-op thread per test
# process keeps small-model tests fast and their timings stable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cifar100_standin():
    """Writes a stand-in for torchvision's ``cifar-100-python/`` under a root (same files
    and keys, a few random images of the first classes); returns the arrays it wrote."""

    def write(root, per_class=3, classes=5):
        rng = np.random.default_rng(2)
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        names = [f"class_{i}" for i in range(100)]
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": names, "coarse_label_names": names[:20]}, f)
        arrays = {}
        for split in ("train", "test"):
            labels = [c for c in range(classes) for _ in range(per_class)]
            pixels = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
            entry = {"data": pixels, "fine_labels": labels, "coarse_labels": [0] * len(labels)}
            with open(folder / split, "wb") as f:
                pickle.dump(entry, f)
            arrays[split] = (pixels.reshape(-1, 3, 32, 32), np.asarray(labels))
        return arrays

    return write
