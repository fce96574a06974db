"""Test-wide setup: 8 simulated CPU devices, set before jax is imported."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402 - after the environment above.


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory):
  """A small generated CIFAR-10 stand-in in the prepared layout.

  Tests that need CIFAR-10 use it, so they run without the download; to run
  them on the real data, point their config at a directory written by
  ``python -m experiments.data_prepare cifar10 --source=... --out=DIR``.
  """
  from experiments import data_prepare
  return data_prepare.write_synthetic_cifar10(
      tmp_path_factory.mktemp("cifar10"))
