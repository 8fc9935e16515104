"""The harness across real processes (``jax.distributed`` on 127.0.0.1, gloo): the same numbers
as one process, a killed process ends the others in bounded time, and the run resumes.

Each process runs ``rbyz run`` with 2 simulated CPU devices; 2 processes make one mesh of 4
devices, 2 workers per device.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from rbyz.sim import checkpoint, config, launch, report, train

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")]

HEARTBEAT_S = 10
# A killed process ends the others at their next collective (at once), or, when they are
# waiting elsewhere, after the runtime's heartbeat timeout; plus start-up slack on 2 cores.
BOUND_S = HEARTBEAT_S + 30
EXPERIMENT = """
name = "across-processes"
[data]
dataset = "synthetic"
batch_size = 8
partition = "dirichlet"
alpha = 0.5
[model]
name = "mlp"
hidden = 16
[workers]
n = 8
f = 2
momentum = 0.9
[attack]
name = "alie"
[defence]
rule = "centered_clipping"
[train]
steps = {steps}
eval_every = 10
lr = 0.05
"""


def _config(tmp_path: Path, steps: int) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT.format(steps=steps))
    return path


def _rbyz(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rbyz.sim.cli", "run", *args, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            **kwargs)


def _losses(directory: Path) -> list[float]:
    return [r["train_loss"] for r in report.read_results(directory / checkpoint.RESULTS)]


def _one_process(cfg: Path) -> list[float]:
    """The reference: the same experiment in this process, spread over 4 devices."""
    exp = config.override(config.load(cfg), ["parallel.devices=4"])
    return [r["train_loss"] for r in train.train(exp).rows]


def test_two_processes_give_the_numbers_of_one(tmp_path):
    cfg = _config(tmp_path, steps=30)
    proc = _rbyz(str(cfg), "--out", str(tmp_path / "run"), "--processes", "2",
                 "--cpu-devices", "2")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "test accuracy" in output
    np.testing.assert_allclose(_losses(tmp_path / "run"), _one_process(cfg), rtol=1e-5)


def _cluster(cfg: Path, out: Path) -> list[subprocess.Popen]:
    """Two processes joined by hand, as on a cluster (no launcher to stop them)."""
    port = launch.free_port()
    return [_rbyz(str(cfg), "--out", str(out), "--cpu-devices", "2", "--coordinator",
                  f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                  "--heartbeat-timeout", str(HEARTBEAT_S)) for i in range(2)]


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen) -> None:
    """Until the run's first checkpoint is written (mid-run), ``proc`` still running."""
    deadline = time.monotonic() + 240
    while not list((out / checkpoint.CHECKPOINTS).glob("[0-9]*")):
        assert time.monotonic() < deadline, "no checkpoint was written"
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)


def _signal_and_wait(pid: int, sig: int, survivor: subprocess.Popen) -> tuple[str, float]:
    """Sends ``sig`` to ``pid``; ``survivor``'s output and the seconds it took to end."""
    os.kill(pid, sig)
    sent = time.monotonic()
    output, _ = survivor.communicate(timeout=BOUND_S)
    return output, time.monotonic() - sent


def _kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_killed_process_ends_the_others_and_the_run_resumes(tmp_path):
    cfg = _config(tmp_path, steps=200)
    out = tmp_path / "run"
    procs = _cluster(cfg, out)
    try:
        _wait_for_checkpoint(out, procs[0])
        output, took = _signal_and_wait(procs[1].pid, signal.SIGKILL, procs[0])
    finally:
        _kill_all(procs)
    assert procs[0].returncode != 0, "the surviving process finished without its peer"
    assert took < BOUND_S
    assert "another process of this run stopped" in output, output[-3000:]
    assert not (out / checkpoint.SUMMARY).exists()

    resumed = _rbyz(str(cfg), "--out", str(out), "--processes", "2", "--cpu-devices", "2")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    np.testing.assert_allclose(_losses(out), _one_process(cfg), rtol=1e-5)


def test_a_stopped_process_ends_the_others_within_the_heartbeat_timeout(tmp_path):
    """SIGSTOP: no failed connection, no exit; only the missing heartbeats tell."""
    cfg = _config(tmp_path, steps=200)
    out = tmp_path / "run"
    procs = _cluster(cfg, out)
    try:
        _wait_for_checkpoint(out, procs[0])
        output, took = _signal_and_wait(procs[1].pid, signal.SIGSTOP, procs[0])
    finally:
        _kill_all(procs)
    assert procs[0].returncode != 0 and took < BOUND_S
    assert "heartbeat" in output or "another process of this run stopped" in output, \
        output[-3000:]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_the_launcher_stops_the_others_when_one_dies(tmp_path):
    cfg = _config(tmp_path, steps=200)
    out = tmp_path / "run"
    proc = _rbyz(str(cfg), "--out", str(out), "--processes", "2", "--cpu-devices", "2")
    try:
        _wait_for_checkpoint(out, proc)
        children = _children(proc.pid)
        assert len(children) == 2
        second = next(c for c in children
                      if b"--process-id\x001" in Path(f"/proc/{c}/cmdline").read_bytes())
        output, took = _signal_and_wait(second, signal.SIGKILL, proc)
    finally:
        _kill_all([proc])
    assert proc.returncode == 1
    assert took < BOUND_S
    assert "process 1 of 2 exited with signal 9; stopped the others" in output, output[-3000:]
    assert not any(_alive(c) for c in children)


def test_a_bad_setting_fails_before_any_process_starts(tmp_path):
    proc = _rbyz(str(_config(tmp_path, steps=30)), "--out", str(tmp_path / "run"),
                 "--processes", "2", "--cpu-devices", "2", "--set", "workers.f=7")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "centered_clipping" in output and "f=7" in output, output[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--distributed"], "--distributed found no cluster environment"),
    (["--coordinator", "127.0.0.1:1"], "needs --coordinator HOST:PORT, --num-processes N"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "needs 0 <= process_id < num_processes"),
])
def test_joining_a_run_without_its_settings_is_a_clear_error(tmp_path, flags, message):
    proc = _rbyz(str(_config(tmp_path, steps=10)), "--out", str(tmp_path / "run"), *flags)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and message in output, output[-2000:]
