"""The experiment platform, its tasks and benchmarks.

The platform, used by every task: the binary (``main``, ``cli``), the
train/eval loop (``train``, ``task``), the registry of optimizers, solvers
and tasks (``registry``), data (``data``, ``data_prepare``), checkpointing,
metrics, evaluation, workdir safety (``workdir``, ``config_checks``) and
multi-process runs (``distributed``). ``configs/`` holds one
``get_config(arg)`` per run, ``tasks/`` the experiment families (they import
the platform, never the reverse) and ``benchmarks/`` the timing scripts.
"""
