"""Suite-wide settings.

Under pytest-xdist every worker is a process of its own. torch's default of one thread per core
would put cores × workers threads on the machine, and OpenMP's spinning threads then slow every
worker down many times over (a fine-tune step measured 20× slower with two 2-thread torch
processes on 2 cores). One thread per worker — and per subprocess a test starts, which inherits
``OMP_NUM_THREADS`` — keeps the suite's parallelism at the process level, where xdist puts it.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def warm_runner():
    """An interpreter that has imported the runner and forks real runner processes on request
    (``tests/warm.py``), shared by this test process's tests that start runners: one import of torch,
    diffusers and accelerate (~6 s of CPU) instead of one per runner started."""
    from .warm import WarmPython

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with WarmPython("fcr_eval.run.runner,fcr_train.api", env=env) as warm:
        yield warm
