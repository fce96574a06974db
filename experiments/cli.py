"""Flag parsing, errors and logs of the experiment binary.

``ml_collections.config_flags`` reports an unknown override such as
``--config.solver.lr_tpyo=1`` as a bare ``AttributeError`` traceback, and a
bad variant as a traceback inside the flag error; this parser turns them into
one line that names the problem. ``one_line_errors`` does the same for the
expected errors of a run (paths, config values, shapes, a locked workdir).
"""

import contextlib
import logging
import pathlib
import sys
from collections.abc import Iterator, Sequence

import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from experiments import workdir

# What a user's input can cause; anything else is a bug and keeps its
# traceback.
USER_ERRORS = (OSError, ValueError, ImportError, FloatingPointError,
               workdir.WorkdirLockedError)


def unknown_config_key(config: ml_collections.ConfigDict,
                       dotted_key: str) -> str | None:
  """Returns an error message if ``dotted_key`` is not a key of ``config``."""
  node, walked = config, []
  for part in dotted_key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(walked) or "the config"
      valid = (", ".join(sorted(node.keys()))
               if isinstance(node, ml_collections.ConfigDict) else "none")
      return (f"unknown config key {dotted_key!r}: {where} has no field "
              f"{part!r} (valid: {valid})")
    node = node[part]
    walked.append(part)
  return None


def _config_overrides(argv: Sequence[str], flag_name: str) -> list[str]:
  prefix = f"--{flag_name}."
  return [a.removeprefix(prefix).split("=", 1)[0]
          for a in argv if a.startswith(prefix)]


def _load_config(flag_name: str, argv: Sequence[str]):
  """Loads the config of ``--<flag_name>=path[:arg]``, without overrides."""
  values = flags.FlagValues()
  spec = [argv[0], *(a for a in argv if a.startswith(f"--{flag_name}="))]
  config_flags.DEFINE_config_file(flag_name, flag_values=values, sys_argv=spec)
  values(spec)
  return values[flag_name].value


def parse_flags(argv: Sequence[str], flag_name: str = "config") -> list[str]:
  """``app.run`` flags parser that explains unknown config keys.

  Args:
    argv: the command line.
    flag_name: the name of the config-file flag.

  Returns:
    The remaining (non-flag) arguments, as ``absl.flags`` returns them.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"FATAL Flags parsing error: {_last_line(str(e))}"
             " (--helpshort lists the flags)")
  except (AttributeError, KeyError) as e:
    message = None
    try:
      config = _load_config(flag_name, argv)
      for key in _config_overrides(argv, flag_name):
        message = message or unknown_config_key(config, key)
    except Exception:  # noqa: BLE001 - fall back to the original error.
      pass
    sys.exit(f"FATAL Flags parsing error: {message or e}")


def _last_line(message: str) -> str:
  """The exception line of a message that embeds a traceback."""
  lines = [line for line in message.strip().splitlines() if line.strip()]
  if not any(line.startswith("Traceback") for line in lines):
    return " ".join(line.strip() for line in lines)
  return lines[-1].strip()


@contextlib.contextmanager
def one_line_errors(verbose: bool = False) -> Iterator[None]:
  """Turns ``USER_ERRORS`` into one ``error: ...`` line and exit status 1.

  Args:
    verbose: re-raise them instead, with their traceback.
  """
  try:
    yield
  except USER_ERRORS as e:
    if verbose:
      raise
    sys.exit(f"error: {_last_line(str(e)) or type(e).__name__}"
             " (--verbose shows the traceback)")


# The packages whose INFO logs the binary shows.
OWN_PACKAGES = ("bilevel", "experiments", "graphs", "kernels", "models")


class _OwnInfoOnly(logging.Filter):
  """Passes warnings and errors, and info records from our own packages.

  A record counts as ours by the file that logged it: under one of
  ``OWN_PACKAGES`` of the repository root, so that a virtual environment
  inside the repository (``.venv/``) does not count.
  """

  def __init__(self, root: pathlib.Path):
    super().__init__()
    self._roots = tuple(f"{root / name}/" for name in OWN_PACKAGES)

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.WARNING
            or record.pathname.startswith(self._roots))


def quiet_library_info_logs() -> None:
  """Hides other libraries' INFO logs (orbax logs every save step by step)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  absl_logging.get_absl_handler().addFilter(_OwnInfoOnly(root))
