"""Tests of experiments/data_prepare.py on a miniature CIFAR-10 archive."""

import hashlib
import io
import os
import pathlib
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from experiments import data, data_prepare

ROOT = pathlib.Path(__file__).resolve().parents[2]
_SIZES = (10, 4)  # 2 images per training batch


def _batch(images, labels, name):
  rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  return pickle.dumps({b"batch_label": name.encode(), b"data": rows,
                       b"labels": [int(l) for l in labels]})


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  """``(path, images, labels)`` of a cifar-10-python.tar.gz in miniature."""
  rng = np.random.default_rng(0)
  n = sum(_SIZES)
  images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, n)
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  path = tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    for i, name in enumerate(names):
      sl = slice(2 * i, 2 * i + 2) if i < 5 else slice(_SIZES[0], n)
      payload = _batch(images[sl], labels[sl], name)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return path, images, labels


def _md5(path):
  return hashlib.md5(path.read_bytes()).hexdigest()


def test_archive_converts_losslessly(archive, tmp_path):
  path, images, labels = archive
  data_prepare.prepare_cifar10(path, tmp_path, md5=_md5(path), sizes=_SIZES)
  ds = data.load_dataset("cifar10", str(tmp_path))
  np.testing.assert_array_equal(ds.train_x, images[:10] / np.float32(255))
  np.testing.assert_array_equal(ds.test_y, labels[10:])
  assert not list(tmp_path.glob(".*tmp*"))


def test_extracted_directory_converts_too(archive, tmp_path):
  path, images, _ = archive
  with tarfile.open(path) as tar:
    tar.extractall(tmp_path / "src", filter="data")
  data_prepare.prepare_cifar10(tmp_path / "src", tmp_path / "out",
                               sizes=_SIZES)
  ds = data.load_dataset("cifar10", str(tmp_path / "out"))
  np.testing.assert_array_equal(ds.test_x, images[10:] / np.float32(255))


def test_wrong_checksum_and_size_are_refused(archive, tmp_path):
  path, _, _ = archive
  with pytest.raises(ValueError, match="MD5 .* is not the published"):
    data_prepare.prepare_cifar10(path, tmp_path)
  with pytest.raises(ValueError, match="train split has 10 images, expected"
                     " 50000"):
    data_prepare.prepare_cifar10(path, tmp_path, md5=None)
  assert not (tmp_path / "train.npz").exists()


def test_synthetic_stand_in_loads_like_cifar10(tmp_path):
  data_prepare.write_synthetic_cifar10(tmp_path, num_train=20, num_test=10)
  ds = data.load_dataset("cifar10", str(tmp_path))
  assert ds.train_x.shape == (20, 32, 32, 3) and ds.test_x.shape[0] == 10
  assert set(ds.train_y.tolist()) == set(range(10))


def test_command_line_errors_are_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.data_prepare", "cifar10",
       f"--source={tmp_path / 'missing.tar.gz'}", f"--out={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      f"error: --source {tmp_path / 'missing.tar.gz'} does not exist;"
      f" download cifar-10-python.tar.gz from {data_prepare.CIFAR10_URL}"]
