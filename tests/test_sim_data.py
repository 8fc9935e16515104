"""rbyz.sim.data: IDX files the tests write themselves, the search path, digits, synthetic."""

import gzip
import sys

import numpy as np
import pytest

from rbyz.sim import data

CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
         np.float64: 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding, written plainly from the format's description."""
    arr = np.asarray(arr)
    head = bytes([0, 0, CODES[arr.dtype.type], arr.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + dims + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr, *, gz=False):
    raw = idx_bytes(arr)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_dataset(directory, *, train=40, test=20, shape=(6, 5), seed=0, gz=(True, False, True,
                                                                          False)):
    """Four IDX files of a tiny 10-class image dataset; returns the raw arrays."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = (rng.integers(0, 256, (train,) + shape, dtype=np.uint8),
              (np.arange(train) % 10).astype(np.uint8),
              rng.integers(0, 256, (test,) + shape, dtype=np.uint8),
              (np.arange(test) % 10).astype(np.uint8))
    for name, arr, z in zip(data.FILES, arrays, gz):
        write_idx(directory / (name + ".gz" if z else name), arr, gz=z)
    return arrays


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the machine's own data: the Debian path and the variable point elsewhere."""
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
    monkeypatch.delenv(data.DATA_ENV, raising=False)


# ------------------------------------------------------------------------------------------------
# read_idx

@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, gz):
    arr = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    if dtype is np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    out = data.read_idx(write_idx(tmp_path / "x", arr, gz=gz))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_read_idx_detects_gzip_by_magic_not_name(tmp_path):
    arr = np.arange(5, dtype=np.uint8)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "a.gz", arr)), arr)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "b", arr, gz=True)), arr)


def test_read_idx_empty_dimension(tmp_path):
    out = data.read_idx(write_idx(tmp_path / "e", np.zeros((0, 3), np.uint8)))
    assert out.shape == (0, 3)


@pytest.mark.parametrize("raw, words", [
    (b"", "too short"),
    (bytes([0, 0, 8]), "too short"),
    (bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]), "not an IDX file"),
    (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]), "not an IDX file"),
    (bytes([0, 0, 8, 0]), "not an IDX file"),
    (b"P5\n28 28\n255\n" + bytes(10), "not an IDX file"),
    (bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0]), "header needs 16 bytes"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3]), "truncated"),
    (bytes([0, 0, 0x0C, 1, 0, 0, 0, 1, 0, 0, 0]), "truncated"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2, 3]), "longer than its header says"),
])
def test_read_idx_bad_files_name_the_file(tmp_path, raw, words):
    for gz in (False, True):
        path = tmp_path / f"bad-{gz}"
        path.write_bytes(gzip.compress(raw) if gz else raw)
        with pytest.raises(ValueError, match=words) as err:
            data.read_idx(path)
        assert str(path) in str(err.value)


def test_read_idx_truncated_and_corrupt_gzip(tmp_path):
    packed = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated gzip") as err:
        data.read_idx(cut)
    assert str(cut) in str(err.value)
    flipped = bytearray(packed)
    flipped[-6] ^= 0xFF                      # inside the CRC / size trailer
    bad = tmp_path / "crc.gz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        data.read_idx(bad)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.read_idx(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------
# load from IDX files

def standardised(x_train, x_test):
    mean, std = x_train.astype(np.float64).mean(), x_train.astype(np.float64).std()
    return (x_train - mean) / std, (x_test - mean) / std


def test_load_from_data_dir(tmp_path):
    tr_x, tr_y, te_x, te_y = make_dataset(tmp_path / "d")
    ds = data.load("fashion_mnist", data_dir=tmp_path / "d")
    assert (ds.name, ds.source, ds.num_classes, ds.note) == ("fashion_mnist", str(tmp_path / "d"),
                                                             10, "")
    assert ds.x_train.shape == (40, 6, 5, 1) and ds.x_test.shape == (20, 6, 5, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    ref_tr, ref_te = standardised(tr_x, te_x)
    np.testing.assert_allclose(ds.x_train[..., 0], ref_tr, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ds.x_test[..., 0], ref_te, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ds.y_train, tr_y)
    np.testing.assert_array_equal(ds.y_test, te_y)
    assert abs(float(ds.x_train.astype(np.float64).mean())) < 1e-6
    assert abs(float(ds.x_train.astype(np.float64).std()) - 1) < 1e-6
    assert not ds.x_train.flags.writeable and not ds.y_test.flags.writeable


def test_load_auto_and_mnist_from_data_dir(tmp_path):
    make_dataset(tmp_path / "d", gz=(False,) * 4)
    assert data.load("auto", data_dir=str(tmp_path / "d")).name == "fashion_mnist"
    ds = data.load("mnist", data_dir=tmp_path / "d")
    assert ds.name == "mnist" and ds.x_train.shape == (40, 6, 5, 1)


def test_search_order(tmp_path, monkeypatch):
    make_dataset(tmp_path / "given", train=30)
    make_dataset(tmp_path / "env", train=20)
    make_dataset(tmp_path / "debian", train=10)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert len(data.load("auto", data_dir=tmp_path / "given").y_train) == 30
    assert len(data.load("auto").y_train) == 20
    assert len(data.load("auto", data_dir=tmp_path / "empty").y_train) == 20
    monkeypatch.delenv(data.DATA_ENV)
    ds = data.load("fashion_mnist")
    assert len(ds.y_train) == 10 and ds.source == str(tmp_path / "debian")
    with pytest.raises(FileNotFoundError):      # MNIST is never looked for in the Debian path
        data.load("mnist")


def test_torchvision_layout(tmp_path):
    make_dataset(tmp_path / "root" / "FashionMNIST" / "raw")
    make_dataset(tmp_path / "root" / "MNIST" / "raw", train=30)
    assert len(data.load("fashion_mnist", data_dir=tmp_path / "root").y_train) == 40
    assert len(data.load("mnist", data_dir=tmp_path / "root").y_train) == 30


def test_missing_files_message(tmp_path, monkeypatch):
    partial = tmp_path / "partial"
    make_dataset(partial)
    (partial / (data.FILES[2] + ".gz")).unlink()
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "envdir"))
    with pytest.raises(FileNotFoundError) as err:
        data.load("fashion_mnist", data_dir=partial)
    msg = str(err.value)
    for name in data.FILES:
        assert name in msg
    for directory in (partial, tmp_path / "envdir", tmp_path / "no-debian"):
        assert str(directory) in msg
    assert f"missing {data.FILES[2]}" in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg and data.DATA_ENV in msg
    with pytest.raises(FileNotFoundError) as err:
        data.load("mnist")
    assert data.DATA_ENV in str(err.value) and "no-debian" not in str(err.value)


def test_auto_falls_back_to_digits_with_a_note(tmp_path):
    ds = data.load("auto", data_dir=tmp_path / "nothing")
    assert ds.name == "digits" and ds.source == data.DIGITS_SOURCE
    assert "sudo apt-get install dataset-fashion-mnist" in ds.note
    assert data.DATA_ENV in ds.note and str(tmp_path / "nothing") in ds.note


@pytest.mark.parametrize("change, words", [
    ("labels", r"labels outside \[0, 10\)"),
    ("count", "40 images but .* 39 labels"),
    ("ndim", r"images \[N, H, W\]"),
    ("float_labels", "1-D integer label array"),
    ("truncated", "truncated"),
])
def test_bad_dataset_files(tmp_path, change, words):
    d = tmp_path / "d"
    tr_x, tr_y, _, _ = make_dataset(d, gz=(False,) * 4)
    if change == "labels":
        write_idx(d / data.FILES[1], np.where(tr_y == 3, 10, tr_y).astype(np.uint8))
    elif change == "count":
        write_idx(d / data.FILES[1], tr_y[:-1])
    elif change == "float_labels":
        write_idx(d / data.FILES[1], tr_y.astype(np.float32))
    elif change == "ndim":
        write_idx(d / data.FILES[0], tr_x.reshape(40, -1))
    else:
        raw = (d / data.FILES[0]).read_bytes()
        (d / data.FILES[0]).write_bytes(raw[:-7])
    for name in ("fashion_mnist", "auto"):      # found but broken: never a silent fallback
        with pytest.raises(ValueError, match=words):
            data.load(name, data_dir=d)


def test_test_size_is_a_fixed_stratified_subset(tmp_path):
    make_dataset(tmp_path / "d", test=50)
    full = data.load("fashion_mnist", data_dir=tmp_path / "d")
    part = data.load("fashion_mnist", data_dir=tmp_path / "d", test_size=20)
    again = data.load("fashion_mnist", data_dir=tmp_path / "d", test_size=20)
    assert part.x_test.shape == (20, 6, 5, 1) and part.x_train.shape == full.x_train.shape
    np.testing.assert_array_equal(part.x_test, again.x_test)
    assert np.bincount(part.y_test, minlength=10).tolist() == [2] * 10
    # The subset is made of whole test examples, standardised with the training statistics.
    rows = {r.tobytes() for r in full.x_test}
    assert all(r.tobytes() in rows for r in part.x_test)
    assert len(data.load("fashion_mnist", data_dir=tmp_path / "d", test_size=500).y_test) == 50


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_test_size(bad):
    with pytest.raises(ValueError, match="test_size"):
        data.load("digits", test_size=bad)


def test_unknown_name():
    with pytest.raises(ValueError, match="fashion_mnist, mnist, digits, synthetic"):
        data.load("cifar10")


# ------------------------------------------------------------------------------------------------
# digits and synthetic

def test_digits_split():
    ds = data.load("digits")
    assert ds.x_train.shape == (1500, 8, 8, 1) and ds.x_test.shape == (297, 8, 8, 1)
    assert ds.num_classes == 10 and ds.note == ""
    from sklearn.datasets import load_digits
    full = load_digits().target
    # Stratified: each class's test share within one example of its proportional share.
    share = np.bincount(full) * 297 / len(full)
    assert np.all(np.abs(np.bincount(ds.y_test, minlength=10) - share) <= 1)
    np.testing.assert_array_equal(np.bincount(ds.y_train) + np.bincount(ds.y_test),
                                  np.bincount(full))
    train, test = data._stratified_split(full, 297, seed=0)
    assert len(np.union1d(train, test)) == len(full) and len(np.intersect1d(train, test)) == 0
    images = load_digits().images.astype(np.float64)
    ref_tr, ref_te = standardised(images[train], images[test])
    np.testing.assert_allclose(ds.x_train[..., 0], ref_tr, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ds.x_test[..., 0], ref_te, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(data.load("digits").x_test, ds.x_test)
    assert len(data.load("digits", test_size=100).y_test) == 100


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'rbyz\[experiments\]'"):
        data.load("digits")


def test_synthetic_deterministic_and_standardised():
    a, b, c = data.synthetic(seed=1), data.synthetic(seed=1), data.synthetic(seed=2)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape == (2000, 32) and a.x_test.shape == (500, 32)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    np.testing.assert_allclose(a.x_train.astype(np.float64).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(a.x_train.astype(np.float64).std(0), 1, atol=1e-5)
    assert set(np.unique(a.y_train)) == set(range(10))
    assert data.load("synthetic", test_size=100).x_test.shape == (100, 32)


def test_synthetic_is_learnable_by_sgd():
    """Logistic regression, plain float64 NumPy SGD, 200 steps of batch 32: high accuracy."""
    ds = data.synthetic(seed=0)
    x, y = ds.x_train.astype(np.float64), ds.y_train
    w, b = np.zeros((x.shape[1], ds.num_classes)), np.zeros(ds.num_classes)
    rng = np.random.default_rng(0)
    for _ in range(200):
        i = rng.integers(0, len(y), 32)
        logits = x[i] @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(32), y[i]] -= 1
        w -= 0.5 * x[i].T @ p / 32
        b -= 0.5 * p.mean(0)
    accuracy = np.mean(np.argmax(ds.x_test @ w + b, axis=1) == ds.y_test)
    assert accuracy > 0.9


@pytest.mark.parametrize("kw, words", [
    ({"num_classes": 1}, "num_classes"), ({"dim": 0}, "dim"), ({"train": 0}, "train"),
    ({"test": 2.0}, "test"), ({"separation": 0.0}, "separation"),
    ({"separation": float("nan")}, "separation"),
])
def test_synthetic_bad_settings(kw, words):
    with pytest.raises(ValueError, match=f"synthetic: {words}"):
        data.synthetic(**kw)
