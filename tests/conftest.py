"""Test-session settings.

``make test`` runs the suite on two pytest-xdist workers (one per core of the 2-core CI machine);
each worker then computes with one thread, and so do the processes it starts, so that the two
never compete for the same core.
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
