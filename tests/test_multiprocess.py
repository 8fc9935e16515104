"""Collective mode across real processes: ``jax.distributed`` on 127.0.0.1, gloo collectives.

Two processes with two CPU devices each form one workers axis of four devices (two workers per
device); every transform of ``multiprocess_worker.py``, in both layouts, must give on every
process exactly what stacked mode gives in this process.
"""

from __future__ import annotations

import importlib.util
import pathlib
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
PROCESSES = 2
TIMEOUT_S = 300


def _worker_module():
    spec = importlib.util.spec_from_file_location("multiprocess_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_processes(out_prefix: str) -> None:
    """Starts every process; if one fails or hangs, the others are killed and the test fails."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i), str(PROCESSES), out_prefix],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(PROCESSES)
    ]
    try:
        for i, proc in enumerate(procs):
            output, _ = proc.communicate(timeout=TIMEOUT_S)
            if proc.returncode != 0:
                pytest.fail(f"process {i} exited with {proc.returncode}:\n{output[-4000:]}")
    except subprocess.TimeoutExpired:
        pytest.fail(f"the processes did not finish within {TIMEOUT_S} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_collective_aggregation_across_processes_equals_stacked(tmp_path):
    worker = _worker_module()
    prefix = str(tmp_path / "aggregates")
    _run_processes(prefix)
    x = jnp.asarray(worker.updates())
    for process in range(PROCESSES):
        got = np.load(f"{prefix}.{process}.npz")
        assert set(got) >= {"median/gather", "median/coordinates", "krum/coordinates"}
        for key in got:
            name = key.split("/")[0]
            tx = worker.transforms_to_check()[name]()
            expected, _ = tx.update(x, tx.init(jnp.zeros(worker.D, jnp.float32)))
            np.testing.assert_allclose(got[key], np.asarray(expected), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{key} on process {process}")
