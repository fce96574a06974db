"""What a run keeps in its workdir besides checkpoints and metrics.

* ``config.json``: the resolved config of the run. A rerun with a different
  config raises :class:`ConfigChangedError` naming the differing keys, unless
  each of them is allowed and safe to change (``SAFE_TO_CHANGE``).
* ``.lock``: ``{"pid", "host"}`` of the process training in it; a second run
  raises :class:`WorkdirLockedError`; a lock whose owner is dead (same host)
  is taken over.
* Results files, written atomically by :func:`write_json`.
"""

import contextlib
import json
import os
import pathlib
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
from absl import logging

CONFIG_NAME = "config.json"
LOCK_NAME = ".lock"
# Keys a rerun may change (with --allow_config_change): they change how long
# the loop runs and what it reports, never what a checkpoint means.
SAFE_TO_CHANGE = ("train.num_steps", "train.log_every",
                  "train.checkpoint_every", "train.max_to_keep", "eval.",
                  "last_stage")


class ConfigChangedError(ValueError):
  """A rerun's config differs from the one saved in its workdir."""


class WorkdirLockedError(RuntimeError):
  """Another live process is training in the workdir."""


def write_json(path: str | os.PathLike[str], value: Any) -> None:
  """Writes ``value`` as JSON atomically: a temporary file, then a rename."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config`` as ``{dotted.key: value}``, values as JSON reads them back."""
  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, (ml_collections.ConfigDict, dict)):
        yield from walk(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}", value
  return json.loads(json.dumps(dict(walk(config, ""))))


def _unsafe(key: str) -> bool:
  return not any(key == s or (s.endswith(".") and key.startswith(s))
                 for s in SAFE_TO_CHANGE)


def save_config(workdir: pathlib.Path,
                config: ml_collections.ConfigDict) -> None:
  """Writes ``workdir/config.json``."""
  write_json(workdir / CONFIG_NAME, flat_config(config))


def check_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                 allow: Sequence[str] = ()) -> bool:
  """Saves ``config`` in a new ``workdir``, or checks it against the saved one.

  Args:
    workdir: the run's directory (exists).
    config: the resolved config.
    allow: dotted keys that may differ from the saved config; each must be
      in ``SAFE_TO_CHANGE``.

  Returns:
    Whether allowed keys changed: the caller saves the config once the run
    has succeeded, so that a failed run leaves the saved one as it was.

  Raises:
    ConfigChangedError: keys differ that ``allow`` does not cover, or
      ``allow`` names a key that is not safe to change.
  """
  unsafe = sorted(k for k in allow if _unsafe(k))
  if unsafe:
    raise ConfigChangedError(
        f"--allow_config_change: {', '.join(unsafe)} cannot change on an"
        f" existing workdir (safe: {', '.join(SAFE_TO_CHANGE)})")
  path = workdir / CONFIG_NAME
  new = flat_config(config)
  if path.exists():
    old = json.loads(path.read_text())
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k, "<absent>") != new.get(k, "<absent>"))
    refused = [k for k in changed if k not in allow]
    if refused:
      diff = ", ".join(f"{k}: {old.get(k, '<absent>')!r} ->"
                       f" {new.get(k, '<absent>')!r}" for k in refused)
      hint = ("; to continue anyway pass --allow_config_change="
              f"{','.join(refused)}" if not any(map(_unsafe, refused))
              else "; use a new --workdir")
      raise ConfigChangedError(
          f"{workdir} holds a run with another config ({diff}){hint}")
    if changed:
      logging.warning("Config keys changed in %s: %s", workdir, changed)
    return bool(changed)
  write_json(path, new)
  return False


def _owner_is_dead(owner: dict[str, Any]) -> bool:
  if owner.get("host") != socket.gethostname():
    return False  # Another host's process cannot be checked from here.
  try:
    os.kill(int(owner["pid"]), 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False  # It exists, under another user.
  return False


def _read_owner(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    owner = json.loads(path.read_text())
    return owner if isinstance(owner, dict) and "pid" in owner else None
  except (OSError, ValueError):
    return None


def _try_create(path: pathlib.Path, me: dict[str, Any]) -> bool:
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(me, f)
  return True


@contextlib.contextmanager
def lock(workdir: pathlib.Path) -> Iterator[None]:
  """Holds ``workdir/.lock`` for the duration of the block.

  Raises:
    WorkdirLockedError: a live process (or one on another host, or an
      unreadable lock) holds it.
  """
  path = workdir / LOCK_NAME
  me = {"pid": os.getpid(), "host": socket.gethostname()}
  if not _try_create(path, me):
    owner = _read_owner(path)
    if owner is None or not _owner_is_dead(owner):
      who = (f"process {owner['pid']} on {owner.get('host')}" if owner
             else "an unreadable lock")
      raise WorkdirLockedError(
          f"{workdir} is in use by {who}; wait for it to finish, or delete"
          f" {path} if that run is gone")
    logging.warning("Taking over %s from dead process %s", path,
                    owner["pid"])
    path.unlink(missing_ok=True)
    if not _try_create(path, me):
      raise WorkdirLockedError(f"{workdir} was just locked by another run")
  try:
    yield
  finally:
    if _read_owner(path) == me:
      path.unlink(missing_ok=True)
