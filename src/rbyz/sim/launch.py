"""Runs across processes: JAX's distributed runtime on one machine or on a cluster.

A run across processes is the same run on a mesh that spans every process's devices
(``parallel.devices = 0``): every process runs :func:`rbyz.sim.train.train` on the same
experiment, holds its own devices' workers, and the collectives go between the processes (gloo
over TCP on CPUs, NCCL on GPUs, ICI on TPUs). :func:`initialize` joins the runtime before any
JAX computation; :func:`launch` starts ``N`` processes on 127.0.0.1 for testing
(``rbyz run exp.toml --processes 2 --cpu-devices 2``) and supervises them.

Faults. A process that dies mid-run must not leave the others hanging:

- the others' next collective with it fails at once (gloo: ``Connection closed by peer``);
  :func:`fail_fast` turns that into an exit with a message saying what to do (an exception
  that is not a collective's ends a process the same way: a process left to exit normally
  would wait in ``jax.distributed.shutdown``'s barrier for the others);
- a process that stops (``SIGSTOP``, a dead machine) stops sending heartbeats: the coordination
  service ends every process after at most ``heartbeat_timeout`` seconds
  (``jax.distributed.initialize``'s ``heartbeat_timeout_seconds``, ``--heartbeat-timeout``);
- a process alive but stuck outside the collectives keeps its heartbeats: the others' next
  collective with it fails after ``collective_timeout`` seconds (XLA's
  ``--xla_cpu_collective_timeout_seconds`` for gloo, 1800 by default, set here;
  ``--collective-timeout``);
- under :func:`launch`, the supervisor kills the other processes as soon as one exits with an
  error, and exits with status 1 naming it (``SIGKILL``: JAX's preemption service ignores
  ``SIGTERM``, and an orbax checkpoint is atomic).

The run then resumes from its last checkpoint when the same command is run again: every process
restores the checkpoint (orbax, a directory shared by the processes), to the numbers of an
uninterrupted run.

Example (a cluster: SLURM, Open MPI, a TPU pod or a GKE job sets the environment that
``jax.distributed.initialize()`` detects; on a GPU node each process takes its local GPUs)::

    srun --nodes 2 --ntasks-per-node 1 rbyz run exp.toml --distributed
    # a TPU pod slice: the same command on every host
    gcloud compute tpus tpu-vm ssh NAME --worker=all --command="rbyz run exp.toml --distributed"
    # or, explicitly, on each host i of N (host0 reachable from all):
    rbyz run exp.toml --coordinator host0:1234 --num-processes N --process-id i

From Python, call :func:`initialize` first, then :func:`rbyz.sim.train.train` on every process,
and :func:`fail_fast` on an exception, as the command line does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

HEARTBEAT_TIMEOUT_S = 60
COLLECTIVE_TIMEOUT_S = 600
INITIALIZATION_TIMEOUT_S = 300
POLL_S = 0.2
# The exit status of a process that stops because another one did (:func:`fail_fast`).
PEER_FAILED = 3
# How long the launcher waits, after a process that stopped for another one, for that one.
CULPRIT_WAIT_S = 3.0


def initialize(*, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int = 0, auto: bool = False,
               heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S,
               collective_timeout: int = COLLECTIVE_TIMEOUT_S) -> None:
    """Configures JAX for this process and joins the distributed runtime; call it before any
    JAX computation.

    Args:
      coordinator: ``host:port`` of process 0's coordination service.
      num_processes: how many processes the run has.
      process_id: this process's index.
      cpu_devices: simulate this many CPU devices in this process (``0``: the platform's
        devices). Selects the CPU platform and gloo collectives between processes.
      auto: let ``jax.distributed.initialize()`` read the cluster's environment (SLURM, Open
        MPI, TPU, GKE) instead of the three arguments above.
      heartbeat_timeout: seconds without a heartbeat after which the runtime ends every
        process of the run (also the time ``jax.distributed.shutdown`` waits for the others).
      collective_timeout: seconds a CPU (gloo) collective waits for the other processes before
        it fails; longer than any step, compilation, evaluation or checkpoint of the run.

    Raises:
      ValueError: neither a coordinator with its counts nor ``auto``, or inconsistent counts.
    """
    flag = "--xla_cpu_collective_timeout_seconds"
    if flag not in os.environ.get("XLA_FLAGS", ""):  # read when the backend starts
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={collective_timeout}"
    import jax

    if cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    try:  # CPU collectives between processes; the GPU and TPU backends bring their own
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a jax whose CPU client picks its collectives itself
        pass
    timeouts = dict(initialization_timeout=INITIALIZATION_TIMEOUT_S,
                    heartbeat_timeout_seconds=heartbeat_timeout,
                    shutdown_timeout_seconds=heartbeat_timeout)
    if auto:
        try:
            jax.distributed.initialize(**timeouts)
        except ValueError as err:
            raise ValueError(f"launch: --distributed found no cluster environment that JAX "
                             f"detects (SLURM, Open MPI, TPU, GKE): {err} On one machine use "
                             f"--processes N; elsewhere pass --coordinator HOST:PORT "
                             f"--num-processes N --process-id I.") from None
        return
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError("launch: a run across processes needs --coordinator HOST:PORT, "
                         "--num-processes N and --process-id I (or --distributed on a cluster "
                         "whose environment JAX detects).")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"launch: needs 0 <= process_id < num_processes; got process_id="
                         f"{process_id}, num_processes={num_processes}.")
    jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)


def fail_fast(err: BaseException) -> None:
    """In a run across processes, ends this process at once after a failed collective (another
    process died), with a message saying how to resume; returns otherwise.

    It exits without ``jax.distributed.shutdown``, whose barrier would wait for the dead
    process until the heartbeat timeout.
    """
    import jax

    if jax.process_count() == 1:
        return
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    sys.stderr.write(
        f"rbyz: error: process {jax.process_index()} of {jax.process_count()}: {first}\n"
        "rbyz: another process of this run stopped (or the network between them failed). "
        "The run resumes from its last checkpoint: run the same command again.\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(PEER_FAILED)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_command(argv: Sequence[str], *, port: int, processes: int, process_id: int,
                  cpu_devices: int, heartbeat_timeout: int, collective_timeout: int) -> list[str]:
    """The command line of process ``process_id`` of a local run (``rbyz run`` + ``argv``)."""
    command = [sys.executable, "-m", "rbyz.sim.cli", "run", *argv,
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
               "--process-id", str(process_id), "--heartbeat-timeout", str(heartbeat_timeout),
               "--collective-timeout", str(collective_timeout)]
    if cpu_devices:
        command += ["--cpu-devices", str(cpu_devices)]
    if process_id:
        command.append("--quiet")
    return command


def launch(argv: Sequence[str], processes: int, *, cpu_devices: int = 0,
           heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S,
           collective_timeout: int = COLLECTIVE_TIMEOUT_S) -> int:
    """Starts ``processes`` processes of ``rbyz run <argv>`` on 127.0.0.1, one coordinator port,
    and waits for them; when one exits with an error, kills the others and returns 1.

    Returns:
      The exit status for the launcher: 0 when every process finished, else 1 (2 when the
      first failure was a configuration error).
    """
    port = free_port()
    procs = [subprocess.Popen(child_command(argv, port=port, processes=processes, process_id=i,
                                            cpu_devices=cpu_devices,
                                            heartbeat_timeout=heartbeat_timeout,
                                            collective_timeout=collective_timeout))
             for i in range(processes)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                index, code = _culprit(procs, failed)
                _stop(procs)
                why = f"signal {-code}" if code < 0 else f"status {code}"
                sys.stderr.write(f"rbyz: error: process {index} of {processes} exited with {why}; "
                                 "stopped the others. The run resumes from its last checkpoint: "
                                 "run the same command again.\n")
                return 2 if code == 2 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        _stop(procs)
        return 130


def _culprit(procs: Sequence[subprocess.Popen], failed: list) -> tuple[int, int]:
    """``(index, status)`` of the process whose failure ended the run: not one that stopped
    because another did (:data:`PEER_FAILED`), if that other one ends within a few seconds."""
    deadline = time.monotonic() + CULPRIT_WAIT_S
    while all(code == PEER_FAILED for _, code in failed) and time.monotonic() < deadline:
        time.sleep(POLL_S / 4)
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    return next(((i, c) for i, c in failed if c != PEER_FAILED), failed[0])


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


__all__ = ("COLLECTIVE_TIMEOUT_S", "HEARTBEAT_TIMEOUT_S", "PEER_FAILED", "child_command", "fail_fast", "free_port", "initialize",
           "launch")
