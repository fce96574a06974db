r"""The experiment binary.

  python -m experiments.main --config=experiments/configs/<name>.py[:args] \
      --workdir=DIR [--mode=train|eval] [--config.<key>=<value> ...] \
      [--allow_config_change=train.num_steps,...] [--verbose]

Flags only: the library does the work (``experiments.train``).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli, distributed, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config(arg)).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval"],
    "train: train (resuming from the latest checkpoint) and evaluate; "
    "eval: restore the latest checkpoint and evaluate.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
    "allow_config_change", [],
    "Config keys a rerun may change on an existing workdir; only those that "
    "never change what a checkpoint means (train.num_steps, train.log_every, "
    "train.checkpoint_every, train.max_to_keep, eval.*, last_stage).")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show the traceback of expected errors too.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process runs (docs/distributed.md); unset: JAX_* variables, a cluster
# launcher's, or a single process.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's jax.distributed coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of jax.distributed processes.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  cli.quiet_library_info_logs()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)
  with cli.one_line_errors(verbose=_VERBOSE.value):
    if _MODE.value == "train":
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                               allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    else:
      train.evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
