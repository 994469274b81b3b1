"""Test session set-up: one intra-op thread per pytest-xdist worker (``-n 2`` on 2 cores would otherwise
oversubscribe the CPU with OpenMP threads and run many times slower)."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
