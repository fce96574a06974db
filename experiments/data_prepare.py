r"""Writes CIFAR-10 in the layout ``experiments.data`` reads fastest.

  python -m experiments.data_prepare cifar10 \
      --source=cifar-10-python.tar.gz --out=data/cifar10

``--source`` is the official "CIFAR-10 python version" archive from
https://www.cs.toronto.edu/~kriz/cifar.html (``cifar-10-python.tar.gz``,
MD5 ``c58f30108f718f92721af3b95e74349a``, checked) or its extracted
``cifar-10-batches-py`` directory. The output is ``train.npz`` (50,000
images) and ``test.npz`` (10,000), each with ``images`` (uint8
``[n, 32, 32, 3]``, lossless) and ``labels`` (uint8 ``[n]``); ``data/cifar10``
is where the CIFAR-10 configs look by default.

  python -m experiments.data_prepare cifar10 --synthetic --out=DIR

writes a small generated stand-in in the same layout (random images whose
colour depends on the class) for tests and smoke runs without the download.
"""

import contextlib
import hashlib
import os
import pathlib
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
from absl import app, flags

from experiments import data

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_SIZES = (50_000, 10_000)
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _md5(path: pathlib.Path) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


@contextlib.contextmanager
def _batch_opener(source: pathlib.Path) -> Iterator:
  """Yields ``open(name) -> binary file`` over an archive or a directory."""
  if source.is_dir():
    root = source / "cifar-10-batches-py"
    root = root if root.is_dir() else source

    def open_dir(name: str) -> BinaryIO:
      path = root / name
      if not path.is_file():
        raise FileNotFoundError(f"{source}: no {name} (expected the"
                                " extracted cifar-10-batches-py directory)")
      return open(path, "rb")

    yield open_dir
    return
  with tarfile.open(source, "r:gz") as tar:
    members = {pathlib.PurePosixPath(m.name).name: m for m in tar.getmembers()
               if m.isfile()}

    def open_tar(name: str) -> BinaryIO:
      if name not in members:
        raise FileNotFoundError(f"{source}: the archive has no {name}")
      return tar.extractfile(members[name])

    yield open_tar


def _read_split(opener, names) -> tuple[np.ndarray, np.ndarray]:
  xs, ys = [], []
  for name in names:
    with opener(name) as f:
      x, y = data.read_pickle_batch(f, name)
    xs.append(x)
    ys.append(y)
  return np.concatenate(xs), np.concatenate(ys)


def write_split(path: pathlib.Path, images: np.ndarray,
                labels: np.ndarray) -> None:
  """Writes one split atomically (a temporary file, then a rename).

  Args:
    path: the ``.npz`` file.
    images: uint8 ``[n, 32, 32, 3]``.
    labels: ints in ``[0, 10)``, ``[n]``.
  """
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    np.savez(f, images=np.asarray(images, np.uint8),
             labels=np.asarray(labels, np.uint8))
  os.replace(tmp, path)


def prepare_cifar10(source: str | os.PathLike[str], out: str | os.PathLike[str],
                    *, md5: str | None = CIFAR10_MD5,
                    sizes: tuple[int, int] = CIFAR10_SIZES) -> None:
  """Converts the official CIFAR-10 python batches into ``out``.

  Args:
    source: ``cifar-10-python.tar.gz`` or its extracted directory.
    out: the output directory (created).
    md5: the archive's expected MD5 (not checked for a directory, or if None).
    sizes: the expected ``(train, test)`` numbers of images.

  Raises:
    FileNotFoundError: ``source`` or one of its batches is missing.
    ValueError: a wrong checksum, size, label or batch format.
  """
  source, out = pathlib.Path(source), pathlib.Path(out)
  if not source.exists():
    raise FileNotFoundError(f"--source {source} does not exist; download"
                            f" cifar-10-python.tar.gz from {CIFAR10_URL}")
  if source.is_file() and md5 is not None and _md5(source) != md5:
    raise ValueError(f"{source}: MD5 {_md5(source)} is not the published"
                     f" {md5} of cifar-10-python.tar.gz ({CIFAR10_URL})")
  with _batch_opener(source) as opener:
    splits = {"train": _read_split(opener, _TRAIN_BATCHES),
              "test": _read_split(opener, ("test_batch",))}
  for (name, (_, labels)), size in zip(splits.items(), sizes):
    if len(labels) != size:
      raise ValueError(f"{source}: the {name} split has {len(labels)} images,"
                       f" expected {size}")
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
      raise ValueError(f"{source}: {name} labels outside [0, 10)")
  out.mkdir(parents=True, exist_ok=True)
  for name, (images, labels) in splits.items():
    write_split(out / f"{name}.npz", images, labels)


def write_synthetic_cifar10(out: str | os.PathLike[str], *,
                            num_train: int = 512, num_test: int = 256,
                            seed: int = 0) -> pathlib.Path:
  """Writes :func:`experiments.data.synthetic_cifar10`'s generated
  stand-in for CIFAR-10 in the prepared layout.

  Args:
    out: the output directory (created).
    num_train: training images (classes cycle, so every class appears).
    num_test: test images.
    seed: the numpy seed.

  Returns:
    ``out`` as a path.
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  splits = data.synthetic_cifar10(num_train, num_test, seed)
  for name, (images, labels) in splits.items():
    write_split(out / f"{name}.npz", images, labels)
  return out


_SOURCE = flags.DEFINE_string(
    "source", None, "cifar-10-python.tar.gz or its extracted directory.")
_OUT = flags.DEFINE_string("out", data.CIFAR10_DEFAULT_DIR,
                           "Output directory.")
_SYNTHETIC = flags.DEFINE_bool(
    "synthetic", False, "Write a small generated stand-in instead.")


def main(argv):
  if argv[1:] != ["cifar10"]:
    raise app.UsageError("usage: python -m experiments.data_prepare cifar10"
                         " --source=ARCHIVE_OR_DIR --out=DIR")
  try:
    if _SYNTHETIC.value:
      write_synthetic_cifar10(_OUT.value)
    elif _SOURCE.value is None:
      raise ValueError(f"--source is required: cifar-10-python.tar.gz from"
                       f" {CIFAR10_URL} or its extracted directory")
    else:
      prepare_cifar10(_SOURCE.value, _OUT.value)
  except (OSError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {_OUT.value}/train.npz and {_OUT.value}/test.npz")


if __name__ == "__main__":
  app.run(main)
