import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def backend():
    from i2vedit_core.tiny import tiny_backend
    return tiny_backend(seed=0)


@pytest.fixture(scope="session")
def clip():
    from i2vedit_core.tiny import synthetic_clip
    return synthetic_clip(num_frames=6, height=64, width=64, seed=0)
