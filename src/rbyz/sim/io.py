"""Files that are never half-written: atomic writes, JSON and TOML as data.

Every output of the harness (results, configs, summaries, reports, plots) goes through
:func:`atomic_write_bytes`: the bytes go to a temporary file in the target's own directory, are
flushed and ``fsync``-ed, and the temporary file is renamed over the target with
``os.replace`` (atomic on POSIX and Windows when both are on one file system, which the shared
directory guarantees). A reader, or a run killed with ``SIGKILL`` at any moment, sees either the
old file or the new one, never a mix; on an error the temporary file is removed.

What is read back is parsed as data: JSON with :mod:`json`, TOML with :mod:`tomllib` (nothing is
unpickled or evaluated). :func:`write_toml` uses ``tomli_w`` (the writer companion of ``tomli``,
from which the standard library's ``tomllib`` came), after checking that the mapping holds only
what TOML can say.

Example:
  >>> import tempfile, tomllib
  >>> from pathlib import Path
  >>> path = Path(tempfile.mkdtemp()) / "run" / "config.toml"
  >>> write_toml(path, {"name": "demo", "train": {"lr": 0.1, "steps": 300}})
  >>> tomllib.loads(path.read_text())
  {'name': 'demo', 'train': {'lr': 0.1, 'steps': 300}}
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

EXPERIMENTS_HINT = "pip install 'rbyz[experiments]'"


def _file_mode(path: Path) -> int:
    """The mode the new file should have: the replaced file's, else the default for new files.

    ``mkstemp`` creates files readable by their owner only; results and plots are meant to be
    shared like any file the user writes, so the umask decides as it does for ``open``.
    """
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (parent directories are created).

    The bytes go to a temporary file beside ``path`` (same directory, so the rename cannot cross
    file systems), which is flushed, ``fsync``-ed and renamed over ``path`` with ``os.replace``;
    the directory is then ``fsync``-ed so that the rename itself survives a power cut. On any
    error (or an interrupt) the temporary file is removed and the old ``path``, if any, is left
    as it was.

    Args:
      path: the file to write.
      data: its new contents.

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> path = Path(tempfile.mkdtemp()) / "a" / "b.bin"
      >>> atomic_write_bytes(path, b"\\x89PNG")
      >>> path.read_bytes(), sorted(p.name for p in path.parent.iterdir())
      (b'\\x89PNG', ['b.bin'])
    """
    path = Path(path)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes: data must be bytes; got {type(data).__name__} "
                        f"(use atomic_write_text for str).")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        # BaseException: a KeyboardInterrupt mid-write must not leave the temporary file behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (POSIX); a no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`); newlines are
    written as given (no translation).

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> path = Path(tempfile.mkdtemp()) / "note.txt"
      >>> atomic_write_text(path, "old"); atomic_write_text(path, "new")
      >>> path.read_text()
      'new'
    """
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text: text must be str; got {type(text).__name__}.")
    atomic_write_bytes(path, text.encode(encoding))


def _json_default(value: Any):
    # NumPy scalars and arrays (an accuracy computed with NumPy) are plain numbers in JSON.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"write_json: {type(value).__name__} {value!r} is not JSON data "
                    f"(use numbers, strings, booleans, None, lists and dicts).")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically.

    NaN and infinities are written as Python's :mod:`json` writes them (``NaN``, ``Infinity``),
    which :func:`read_json` reads back: a diverged run's last row must still be recorded.
    NumPy scalars and arrays are written as numbers and lists.

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> path = Path(tempfile.mkdtemp()) / "summary.json"
      >>> write_json(path, {"step": 300, "test_accuracy": 0.875, "train_loss": float("nan")})
      >>> read_json(path)
      {'step': 300, 'test_accuracy': 0.875, 'train_loss': nan}
    """
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document at ``path`` (``ValueError`` naming the file when it is not JSON).

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> path = Path(tempfile.mkdtemp()) / "bad.json"
      >>> atomic_write_text(path, "{oops")
      >>> read_json(path)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: .../bad.json is not valid JSON: Expecting property name ... line 1 column 2 ...
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from None


def _toml_data(value: Any, where: str) -> Any:
    """``value`` as plain TOML data (NumPy scalars become Python numbers), or ``ValueError``
    naming the key that TOML cannot hold."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"write_toml: key {key!r} at {where or 'the top level'} is not "
                                 f"a string; TOML keys are strings.")
            out[key] = _toml_data(item, f"{where}.{key}" if where else key)
        return out
    if isinstance(value, (list, tuple)):
        return [_toml_data(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (bool, int, float, str)):
        return value
    if value is None:
        raise ValueError(f"write_toml: {where} is None, and TOML has no null; leave the key out "
                         f"or give it a value.")
    raise ValueError(f"write_toml: {where} is {type(value).__name__} {value!r}; TOML holds "
                     f"strings, numbers, booleans, lists and tables.")


def write_toml(path: str | os.PathLike, mapping: Mapping[str, Any]) -> None:
    """Writes ``mapping`` (nested dicts of strings, ints, floats, booleans and lists of those)
    as TOML, atomically.

    It reads back exactly with :func:`tomllib.loads`: floats are written in their shortest
    round-trip form (``repr``), so ``0.1`` stays ``0.1`` and ``1e-300`` stays ``1e-300``; ``nan``
    and ``inf`` are TOML's own. Nested dicts become ``[section.sub]`` tables, empty ones
    included (an empty ``hparams`` table reads back as ``{}``).

    Args:
      path: the file to write.
      mapping: the document.

    Raises:
      ValueError: a value TOML cannot hold (``None``, an object), naming its key.
      ImportError: ``tomli_w`` is not installed (``pip install 'rbyz[experiments]'``).

    Example:
      >>> import tempfile, tomllib
      >>> from pathlib import Path
      >>> path = Path(tempfile.mkdtemp()) / "config.toml"
      >>> doc = {"seed": 0, "defence": {"rule": "krum", "pre": ["nnm"], "hparams": {}}}
      >>> write_toml(path, doc)
      >>> tomllib.loads(path.read_text()) == doc
      True
      >>> write_toml(path, {"attack": {"z": None}})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: write_toml: attack.z is None, and TOML has no null; ...
    """
    if not isinstance(mapping, Mapping):
        raise ValueError(f"write_toml: a TOML document is a table (a dict); got "
                         f"{type(mapping).__name__}.")
    data = _toml_data(mapping, "")
    try:
        import tomli_w
    except ImportError as err:
        raise ImportError(f"rbyz.sim.io.write_toml needs tomli_w: {EXPERIMENTS_HINT}") from err
    atomic_write_text(path, tomli_w.dumps(data))


__all__ = ("atomic_write_bytes", "atomic_write_text", "read_json", "write_json", "write_toml")

