"""A run directory that never loses work: its config, results, checkpoints and done marker.

Layout of a run directory::

    config.toml     the resolved experiment (written first; a different one here is an error)
    results.csv     one row per evaluation so far (rewritten atomically after each)
    diagnostics.csv one row per step so far, with ``diagnostics.enabled`` (likewise)
    checkpoints/    orbax-checkpoint steps: the training state and the rows up to that step
    summary.json    the final row, written last: the run is finished

Checkpoints are written with orbax-checkpoint (the JAX ecosystem's checkpointer: arrays in
tensorstore, metadata in JSON, a step directory finalised by a rename), so a ``SIGKILL`` at any
moment leaves either the previous checkpoint or the new one. Nothing read back is unpickled or
evaluated: the state is restored into the structure of a freshly initialised one, the rows are
JSON, the config TOML.

In a run across processes (``jax.distributed``) every process opens the same directory (a
shared file system) and takes part in the checkpoints (orbax writes each array's parts from the
process that holds them); only the first process writes the config, the results and the summary.

Example:
  >>> import tempfile
  >>> from rbyz.sim import config
  >>> store = Store(tempfile.mkdtemp(), config.Experiment())
  >>> store.finished(), (store.directory / "config.toml").exists()
  (False, True)
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import jax

from rbyz.sim import config as config_lib
from rbyz.sim import io, report

CONFIG = "config.toml"
RESULTS = "results.csv"
DIAGNOSTICS = "diagnostics.csv"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        path = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], path + ".")
        elif a.get(key) != b.get(key):
            out.append(f"{path}: {a.get(key)!r} there, {b.get(key)!r} here")
    return out


class Store:
    """The run directory of one experiment (created, or checked to hold the same experiment).

    Raises:
      ValueError: the directory holds another experiment's config (naming the fields that
        differ), or results without a config.
    """

    def __init__(self, directory: str | Path, exp: config_lib.Experiment):
        self.directory = Path(directory)
        self.exp = exp
        self.primary = jax.process_index() == 0
        wanted = config_lib.to_dict(exp)
        path = self.directory / CONFIG
        if path.exists():
            try:
                found = config_lib.to_dict(config_lib.from_dict(tomllib.loads(path.read_text())))
            except (tomllib.TOMLDecodeError, ValueError) as err:
                raise ValueError(f"{self.directory}: holds a config.toml that is not an rbyz "
                                 f"experiment ({err}); choose another output directory.") from None
            diff = _differences(found, wanted)
            if diff:
                raise ValueError(
                    f"{self.directory} holds another experiment's results ("
                    + "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
                    + "). Choose another output directory, or delete this one to start over.")
        elif (self.directory / RESULTS).exists() or (self.directory / CHECKPOINTS).exists():
            raise ValueError(f"{self.directory} holds results but no {CONFIG}: it is not a run "
                             f"directory of rbyz; choose another output directory.")
        elif self.primary:
            io.write_toml(path, wanted)
        self._manager = None

    def _checkpoints(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            logging.getLogger("absl").setLevel(logging.WARNING)
            self._manager = ocp.CheckpointManager(
                (self.directory / CHECKPOINTS).absolute(),
                options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                                     enable_async_checkpointing=False))
        return self._manager

    def finished(self) -> bool:
        """Whether the run ran to its last step (its summary is written)."""
        return (self.directory / SUMMARY).exists()

    def restore(self, template):
        """``(state, rows, diagnostic rows)`` of the last checkpoint, restored into
        ``template``'s structure, or ``None`` when there is none."""
        import orbax.checkpoint as ocp

        if not (self.directory / CHECKPOINTS).exists():
            return None
        manager = self._checkpoints()
        step = manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), rows=ocp.args.JsonRestore()))
        rows = list(restored.rows["rows"])
        return restored.state, rows, list(restored.rows.get("diagnostics", []))

    def save(self, state, rows: list[dict], *, checkpoint: bool, final: bool,
             diagnostics: list[dict] = ()) -> None:
        """Writes the rows (and the per-step diagnostic rows) so far; checkpoints the state with
        them when asked (always on the last step); writes the summary last when ``final``."""
        if self.primary:
            report.write_results(self.directory / RESULTS, rows)
        if diagnostics and self.primary:
            report.write_results(self.directory / DIAGNOSTICS, diagnostics)
        if checkpoint or final:
            import orbax.checkpoint as ocp

            manager = self._checkpoints()
            saved = {"rows": rows, "diagnostics": list(diagnostics)}
            manager.save(int(state.step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), rows=ocp.args.JsonSave(saved)),
                force=True)
            manager.wait_until_finished()
        if final and self.primary:
            io.write_json(self.directory / SUMMARY, rows[-1])

    def rows(self) -> list[dict]:
        """The rows of a finished run."""
        return report.read_results(self.directory / RESULTS)


__all__ = ("CHECKPOINTS", "CONFIG", "DIAGNOSTICS", "RESULTS", "SUMMARY", "Store")
