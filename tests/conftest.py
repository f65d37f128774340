"""Test-wide settings: deterministic, small and offline."""

import os

# Never reach the network from a test: everything is shipped or made locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Under pytest-xdist each worker gets one core; two threads per worker would oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
