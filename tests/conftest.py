import os

# Pixels render on the CPU; must be set before dm_control or mujoco is imported.
os.environ.setdefault("MUJOCO_GL", "egl")

import pytest
import torch

# One intra-op thread: tests use tiny tensors, where a second thread only adds contention (small
# ops ran up to 70x slower with 2 threads while another process shared the 2 cores).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
