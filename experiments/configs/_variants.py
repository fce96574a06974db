"""The variant argument of ``get_config(arg)``, parsed once for every config."""

from collections.abc import Sequence


def parse_variants(arg: str | None, valid: Sequence[str],
                   config_name: str) -> list[str]:
  """The variants of ``--config=<file>.py:<arg>``, checked against ``valid``.

  Args:
    arg: a comma-separated list of variants (``'smoke,unrolled'``); None or
      ``''`` for the default config. Empty items are skipped.
    valid: the config's variants (its ``VARIANTS``).
    config_name: the config's name, for the error message.

  Returns:
    The variants in the order given.

  Raises:
    ValueError: a variant is not one of ``valid``; the message names the
      unknown ones and lists the valid ones.
  """
  variants = [v for v in (arg or "").split(",") if v]
  unknown = sorted(set(variants) - set(valid))
  if unknown:
    raise ValueError(f"Unknown {config_name} variant(s) {unknown}; valid:"
                     f" {tuple(valid)}")
  return variants
