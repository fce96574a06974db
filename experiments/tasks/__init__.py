"""The experiment families, one module (or a few) per task.

Each builds its :class:`~experiments.task.Task` (or
:class:`~experiments.task.Pipeline`) from a config with
``task_from_config(config, key)`` and takes optimizers and solvers from
:mod:`experiments.registry`, which names them by their config's ``task``:

* :mod:`.hyper_cleaning`: data hyper-cleaning (per-example weights).
* :mod:`.lv_hba_toy`: LV-HBA's coupled-equality toy problem (R7).
* :mod:`.svm` (with :mod:`.svm_problem`, :mod:`.svm_solvers`): LV-HBA's SVM
  hyper-parameter optimisation and hyper-cleaning.
* :mod:`.pruning` (on :mod:`.image_classification`): CIFAR pruning
  pipelines, BiP, OMP and IMP.
* :mod:`.biformer_classification` (on :mod:`.image_classification`):
  BiFormer image classification.
* :mod:`.moe_lm` (on :mod:`.text_corpus`): byte-level MoE language models.
* :mod:`.nas_search` (with :mod:`.nas_retrain` and :mod:`.nas_few_shot`):
  DARTS / PC-DARTS / GM-NAS architecture search, then retraining of the
  derived (or a random) genotype.
"""
