"""Shared pytest setup: the project's modules live flat in the repository root, and no test may
reach the network (an accidental download must fail loudly, not hang).

One CPU thread per test process and per subprocess it starts (OMP_NUM_THREADS, inherited): the tiny models
gain little from a second thread (9.4 vs 11.2 ms per forward, 2 cores, idle) and lose 5x when another process
is busy on the same cores (54 vs 11 ms; 20 forwards of 8 rows of the tiny transformer, with and without a
busy-loop process beside it, 2026-12-05), so the suite's time would otherwise depend on its neighbours."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
