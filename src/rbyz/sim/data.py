"""Datasets for the harness: IDX files (MNIST / Fashion-MNIST), scikit-learn's digits, a synthetic task.

:func:`load` finds Fashion-MNIST (or MNIST) as IDX files, gzipped or not, in the directory it is
given, then in ``$RBYZ_DATA_DIR``, then where the Debian package ``dataset-fashion-mnist`` puts
it (``/usr/share/datasets/fashion-mnist``). With ``name="auto"`` and no files anywhere it falls
back to scikit-learn's 8x8 digits, which ship inside the scikit-learn wheel (no download), and
says in :attr:`Dataset.note` how to get Fashion-MNIST. :func:`synthetic` is a small learnable
task (Gaussian class clusters) for fast tests.

Every dataset comes standardised with its training set's statistics (one scalar mean and standard
deviation for images, per feature for vectors), images as float32 ``[N, H, W, 1]`` and labels as
int32, so the models and the samplers see one format.

Example:
  >>> ds = synthetic(num_classes=3, dim=4, train=60, test=30)
  >>> ds.x_train.shape, ds.x_train.dtype, ds.y_train.dtype, ds.num_classes
  ((60, 4), dtype('float32'), dtype('int32'), 3)
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from pathlib import Path

import numpy as np

DATA_ENV = "RBYZ_DATA_DIR"
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
NAMES = ("auto", "fashion_mnist", "mnist", "digits", "synthetic")
# The four files of the MNIST layout; Fashion-MNIST uses the same names. Each may end in ".gz".
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DIGITS_SOURCE = "sklearn.datasets.load_digits"
DIGITS_TEST = 297          # digits: 1797 examples -> 1500 train / 297 test, fixed and stratified
EXPERIMENTS_HINT = "pip install 'rbyz[experiments]'"
INSTALL_HINT = {
    "fashion_mnist": (
        "Install Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
        f"it goes to {DEBIAN_FASHION_MNIST}), or set {DATA_ENV} (or pass data_dir=) to a directory "
        "holding the four IDX files (torchvision's FashionMNIST/raw layout below it works too)."),
    "mnist": (
        f"Set {DATA_ENV} (or pass data_dir=) to a directory holding the four MNIST IDX files, "
        "e.g. the MNIST/raw folder that torchvision.datasets.MNIST(root, download=True) writes "
        "(its root works too)."),
}

# IDX type codes (the third magic byte) -> big-endian NumPy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
# Sub-directories tried below each base directory (the Debian layout is the base itself;
# torchvision writes <root>/FashionMNIST/raw and <root>/MNIST/raw).
_SUBDIRS = {"fashion_mnist": ("", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
            "mnist": ("", "mnist", "MNIST/raw")}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification dataset, standardised and ready for the harness.

    Attributes:
      name: ``"fashion_mnist"``, ``"mnist"``, ``"digits"`` or ``"synthetic"``.
      source: the directory the IDX files were read from, ``"sklearn.datasets.load_digits"``, or
        a description of the synthetic task.
      x_train: float32 ``[N, ...]`` standardised with the training set's mean and standard
        deviation (images: one scalar each, shape ``[N, H, W, 1]``; vectors: per feature).
      y_train: int32 ``[N]`` labels in ``[0, num_classes)``.
      x_test: float32, standardised with the *training* statistics.
      y_test: int32.
      num_classes: the number of classes.
      note: what a user should know, e.g. that Fashion-MNIST was not found and how to get it.
    """

    name: str
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    note: str = ""


# ------------------------------------------------------------------------------------------------
# IDX files.

def read_idx(path) -> np.ndarray:
    """Reads one IDX file (the MNIST format), gzipped or not.

    The format: a 4-byte magic ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32
    dimensions, then exactly ``prod(dims)`` big-endian values of the type (``0x08`` uint8,
    ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64).
    Compression is detected from the gzip magic bytes, not from the file name.

    Args:
      path: the file.

    Returns:
      The array, shape ``dims``, in native byte order (uint8 for images and labels).

    Raises:
      ValueError: naming the file, for a corrupt or truncated gzip stream, a bad magic number,
        a header cut short, or a payload shorter or longer than the dimensions say.
      FileNotFoundError: the file does not exist.

    Example:
      >>> import tempfile, pathlib
      >>> p = pathlib.Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
      >>> _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 1, 9]))
      >>> read_idx(p)
      array([7, 1, 9], dtype=uint8)

    References:
      LeCun, Cortes, Burges, `The MNIST database of handwritten digits` (the file format),
      http://yann.lecun.com/exdb/mnist/.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"read_idx: {path} is a corrupt or truncated gzip file ({err}). "
                             "Download or install it again.") from None
    if len(raw) < 4:
        raise ValueError(f"read_idx: {path} is too short for an IDX header ({len(raw)} bytes; "
                         "an IDX file starts with 4 magic bytes). Download or install it again.")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim < 1:
        raise ValueError(
            f"read_idx: {path} is not an IDX file: magic bytes {raw[:4].hex(' ')}, expected "
            f"00 00 <type> <ndim> with type in {{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} "
            "and ndim >= 1.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"read_idx: {path} is truncated: its header needs {header} bytes for "
                         f"{ndim} dimensions; the file has {len(raw)}.")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
    payload = len(raw) - header
    if payload != expected:
        what = "truncated" if payload < expected else "longer than its header says"
        raise ValueError(f"read_idx: {path} is {what}: dimensions {dims} of {dtype.name} need "
                         f"{expected} payload bytes; the file has {payload}.")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _candidates(name: str, data_dir) -> list[tuple[Path, str]]:
    """The directories to search, in order, each with where it came from."""
    bases: list[tuple[Path, str]] = []
    if data_dir is not None:
        bases.append((Path(data_dir), "data_dir"))
    if os.environ.get(DATA_ENV):
        bases.append((Path(os.environ[DATA_ENV]), f"${DATA_ENV}"))
    if name == "fashion_mnist":
        bases.append((Path(DEBIAN_FASHION_MNIST), "the Debian package dataset-fashion-mnist"))
    out = []
    for base, origin in bases:
        for sub in _SUBDIRS[name]:
            directory = base / sub if sub else base
            if (directory, origin) not in out:
                out.append((directory, origin))
    return out


def _locate(name: str, data_dir) -> tuple[dict[str, Path] | None, list[str]]:
    """The four files of the first directory holding all of them, and what each directory lacked."""
    looked = []
    for directory, origin in _candidates(name, data_dir):
        if not directory.is_dir():
            looked.append(f"{directory} ({origin}: no such directory)")
            continue
        found = {f: _find_file(directory, f) for f in FILES}
        missing = [f for f, p in found.items() if p is None]
        if not missing:
            return found, looked
        looked.append(f"{directory} ({origin}: missing {', '.join(missing)})")
    return None, looked


def _not_found(name: str, looked: list[str]) -> str:
    where = "; ".join(looked) if looked else "no directory (none given and none configured)"
    return (f"load({name!r}): the IDX files {', '.join(FILES)} (each optionally with .gz) were "
            f"not found. Looked in: {where}. {INSTALL_HINT[name]}")


def _check_labels(labels: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"load: {path} should hold a 1-D integer label array; got shape "
                         f"{labels.shape} and dtype {labels.dtype}.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"load: {path} has labels outside [0, {num_classes}): min "
                         f"{labels.min()}, max {labels.max()}. The file is corrupt or not "
                         "from this dataset.")
    return labels.astype(np.int32)


def _read_split(images_path: Path, labels_path: Path, num_classes: int):
    images = read_idx(images_path)
    labels = _check_labels(read_idx(labels_path), labels_path, num_classes)
    if images.ndim != 3:
        raise ValueError(f"load: {images_path} should hold images [N, H, W]; got shape "
                         f"{images.shape}.")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"load: {images_path} has {images.shape[0]} images but {labels_path} "
                         f"has {labels.shape[0]} labels; the files do not belong together.")
    return images[..., None], labels


def _load_idx(name: str, files: dict[str, Path]):
    train = _read_split(files[FILES[0]], files[FILES[1]], 10)
    test = _read_split(files[FILES[2]], files[FILES[3]], 10)
    if train[0].shape[1:] != test[0].shape[1:]:
        raise ValueError(f"load({name!r}): training images are {train[0].shape[1:-1]} but test "
                         f"images are {test[0].shape[1:-1]} ({files[FILES[0]]}, "
                         f"{files[FILES[2]]}).")
    return train, test


# ------------------------------------------------------------------------------------------------
# Standardisation and the embedded datasets.

def _standardise(x_train: np.ndarray, x_test: np.ndarray, *, per_feature: bool):
    """Both sets shifted and scaled by the training set's mean and standard deviation (float64)."""
    if x_train.dtype == np.uint8 and not per_feature:
        # Exact statistics from the 256-bin histogram, and a lookup table for the mapping: no
        # float64 copy of 60 000 images.
        counts = np.bincount(x_train.reshape(-1), minlength=256).astype(np.float64)
        values = np.arange(256, dtype=np.float64)
        mean = counts @ values / counts.sum()
        std = np.sqrt(counts @ (values - mean) ** 2 / counts.sum())
        table = ((values - mean) / (std if std > 0 else 1.0)).astype(np.float32)
        return table[x_train], table[x_test]
    axis = 0 if per_feature else None
    mean = x_train.astype(np.float64).mean(axis=axis)
    std = x_train.astype(np.float64).std(axis=axis)
    std = np.where(std > 0, std, 1.0)      # a constant feature stays 0, not NaN
    return (((x_train - mean) / std).astype(np.float32),
            ((x_test - mean) / std).astype(np.float32))


def _stratified_split(labels: np.ndarray, test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices: every class split in proportion (within one example), fixed by seed.

    The indices are shuffled, sorted by label (stable, so each class stays shuffled), and every
    ``len / test``-th position goes to the test set.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    pos = np.arange(len(labels))
    is_test = (pos + 1) * test // len(labels) > pos * test // len(labels)
    return np.sort(order[~is_test]), np.sort(order[is_test])


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "rbyz.sim.data: the embedded dataset (scikit-learn's digits) needs scikit-learn; "
            f"install it with {EXPERIMENTS_HINT}, or install Fashion-MNIST "
            "(sudo apt-get install dataset-fashion-mnist).") from err
    bunch = load_digits()
    images = bunch.images.astype(np.float64)[..., None]          # [1797, 8, 8, 1], values 0..16
    labels = bunch.target.astype(np.int32)
    train, test = _stratified_split(labels, DIGITS_TEST, seed=0)
    return (images[train], labels[train]), (images[test], labels[test])


def synthetic(*, num_classes: int = 10, dim: int = 32, train: int = 2000, test: int = 500,
              seed: int = 0, separation: float = 5.0) -> Dataset:
    """A small learnable task: Gaussian class clusters, for fast tests.

    Class ``c`` has a mean ``mu_c ~ N(0, separation^2 / dim * I)`` (so two means lie about
    ``separation * sqrt(2)`` apart), and its examples are ``x = mu_c + N(0, I)``, labels uniform.
    With the default separation two classes overlap by about ``Phi(-3.5)``, so the Bayes error
    is well below 1%, and a logistic regression or a small MLP passes 90% test accuracy within
    about 100 SGD steps of batch 16-32; a smaller separation makes the task harder. Inputs are
    standardised per feature with the training set's statistics.

    Args:
      num_classes: classes (>= 2).
      dim: input dimension (>= 1).
      train: training examples (>= 1).
      test: test examples (>= 1).
      seed: everything is a function of it (``np.random.default_rng(seed)``).
      separation: the clusters' spread relative to the unit noise (> 0); smaller is harder.

    Returns:
      A :class:`Dataset` named ``"synthetic"`` with x float32 ``[N, dim]``.

    Example:
      >>> a, b = synthetic(seed=3), synthetic(seed=3)
      >>> bool((a.x_train == b.x_train).all()), a.x_test.shape
      (True, (500, 32))
    """
    for field, value, low in (("num_classes", num_classes, 2), ("dim", dim, 1),
                              ("train", train, 1), ("test", test, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"synthetic: {field} must be an int >= {low}; got {value!r}.")
    if not np.isfinite(separation) or separation <= 0:
        raise ValueError(f"synthetic: separation must be a finite number > 0; got {separation!r}.")
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim)) * (separation / np.sqrt(dim))

    def draw(m):
        y = rng.integers(0, num_classes, size=m).astype(np.int32)
        return means[y] + rng.normal(size=(m, dim)), y

    (x_tr, y_tr), (x_te, y_te) = draw(train), draw(test)
    x_tr, x_te = _standardise(x_tr, x_te, per_feature=True)
    source = (f"synthetic(num_classes={num_classes}, dim={dim}, train={train}, test={test}, "
              f"seed={seed}, separation={separation:g})")
    return _frozen(Dataset("synthetic", source, x_tr, y_tr, x_te, y_te, num_classes))


def _frozen(ds: Dataset) -> Dataset:
    # Datasets are cached and shared between runs: make accidental in-place edits an error.
    for arr in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        arr.flags.writeable = False
    return ds


def _subset_test(x: np.ndarray, y: np.ndarray, test_size: int | None):
    """A fixed stratified subset of the test set (file order kept), whatever order the file has:
    every class keeps its share within one example, so a small evaluation set stays balanced."""
    if test_size is None or test_size >= len(y):
        return x, y
    keep = _stratified_split(y, test_size, seed=0)[1]
    return x[keep], y[keep]


def train_subset(ds: Dataset, size: int, seed: int) -> Dataset:
    """``ds`` with a fixed stratified subset of ``size`` training examples (file order kept):
    every class keeps its share within one example, drawn with ``seed``. The test set and the
    standardisation (the whole training set's statistics) are unchanged.

    Args:
      ds: a dataset.
      size: training examples to keep, ``1 <= size <= len(ds.y_train)`` (all: ``ds`` itself).
      seed: the NumPy seed of the draw.

    Example:
      >>> ds = train_subset(synthetic(), 100, seed=0)
      >>> ds.x_train.shape[0], np.bincount(ds.y_train).tolist()
      (100, [9, 10, 10, 10, 9, 11, 10, 10, 10, 11])
    """
    count = len(ds.y_train)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= count:
        raise ValueError(f"train_subset: size must be an int in [1, {count}] (the {ds.name} "
                         f"training set has {count} examples); got {size!r}.")
    if size == count:
        return ds
    keep = _stratified_split(ds.y_train, int(size), seed)[1]
    return _frozen(dataclasses.replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep]))


# ------------------------------------------------------------------------------------------------
# The entry point.

def load(name: str = "auto", *, data_dir: str | os.PathLike | None = None,
         test_size: int | None = None) -> Dataset:
    """Loads a dataset by name, searching for IDX files and falling back to digits for ``"auto"``.

    Search order for the IDX files: ``data_dir``, then ``$RBYZ_DATA_DIR``, then (Fashion-MNIST
    only) ``/usr/share/datasets/fashion-mnist``. Below each of these the directory itself is
    tried first, then the sub-directories ``fashion-mnist`` / ``fashion_mnist`` /
    ``FashionMNIST/raw`` (``mnist`` / ``MNIST/raw`` for MNIST, torchvision's layout). The first
    directory that holds all four files (each plain or ``.gz``) is used. Files that are found but
    corrupt raise; they are never skipped silently.

    Args:
      name: ``"auto"`` (Fashion-MNIST when found, else scikit-learn's digits with a note),
        ``"fashion_mnist"``, ``"mnist"``, ``"digits"`` or ``"synthetic"`` (:func:`synthetic`
        with its defaults).
      data_dir: a directory to search first.
      test_size: keep a fixed stratified subset of this many test examples (``None``: all; a larger
        number than the test set has keeps all). The training set is never cut.

    Returns:
      A :class:`Dataset`: images float32 ``[N, H, W, 1]`` standardised with the training set's
      scalar mean and standard deviation, labels int32.

    Raises:
      FileNotFoundError: ``"fashion_mnist"`` or ``"mnist"`` was asked for and no directory holds
        the four files; the message lists the files, every directory looked in and how to install.
      ValueError: an unknown name, a bad ``test_size``, or files that are corrupt, truncated,
        disagree in their counts or hold labels outside ``[0, 10)``.
      ImportError: the digits fallback is needed and scikit-learn is missing.

    Example:
      >>> ds = load("digits")
      >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
      ((1500, 8, 8, 1), (297, 8, 8, 1), 10)
      >>> round(float(ds.x_train.mean()), 4), round(float(ds.x_train.std()), 4)
      (0.0, 1.0)
    """
    if name not in NAMES:
        raise ValueError(f"load: unknown dataset {name!r}; choose one of {', '.join(NAMES)}.")
    if test_size is not None and (not isinstance(test_size, (int, np.integer))
                                  or isinstance(test_size, bool) or test_size < 1):
        raise ValueError(f"load: test_size must be an int >= 1 or None (the whole test set); "
                         f"got {test_size!r}.")
    if name == "synthetic":
        ds = synthetic()
        x_te, y_te = _subset_test(ds.x_test, ds.y_test, test_size)
        return _frozen(dataclasses.replace(ds, x_test=np.array(x_te), y_test=np.array(y_te)))

    note = ""
    if name == "digits":
        (x_tr, y_tr), (x_te, y_te) = _digits()
        source = DIGITS_SOURCE
    else:
        idx_name = "fashion_mnist" if name == "auto" else name
        files, looked = _locate(idx_name, data_dir)
        if files is None and name != "auto":
            raise FileNotFoundError(_not_found(name, looked))
        if files is None:
            (x_tr, y_tr), (x_te, y_te) = _digits()
            name, source = "digits", DIGITS_SOURCE
            where = "; ".join(looked)
            note = (f"Fashion-MNIST not found (looked in: {where}); using scikit-learn's 8x8 "
                    f"digits instead. {INSTALL_HINT['fashion_mnist']}")
        else:
            (x_tr, y_tr), (x_te, y_te) = _load_idx(idx_name, files)
            name, source = idx_name, str(files[FILES[0]].parent)
    x_te, y_te = _subset_test(x_te, y_te, test_size)
    x_tr, x_te = _standardise(x_tr, x_te, per_feature=False)
    return _frozen(Dataset(name, source, np.ascontiguousarray(x_tr), y_tr.astype(np.int32),
                           np.ascontiguousarray(x_te), y_te.astype(np.int32), 10, note))
