"""The one validation idiom of the config dataclasses: `__post_init__` calls these checks.

Each failed check raises a one-line `UserError` that names the field (with its section,
e.g. "train.epochs"), the value given and what it must be, which is the fix:
  data.seq_len=0 is invalid: it must be an integer >= 1
  recipe.curriculum='x' is unknown: use one of none, rotational, gradual
Checks that involve several fields say which to change in their own words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from deepexit_jax.errors import UserError


def is_int(x: Any) -> bool:
  """A Python or NumPy integer, not a bool."""
  return isinstance(x, int | np.integer) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
  """A finite Python or NumPy number, not a bool."""
  return (isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)
          and math.isfinite(x))


def require(ok: bool, field: str, value: Any, requirement: str) -> None:
  """Raises "<field>=<value> is invalid: it must <requirement>" unless `ok`; the
  requirement starts with its verb ("be an integer >= 1", "lie in (0, 1)")."""
  if not ok:
    raise UserError(f"{field}={value!r} is invalid: it must {requirement}")


def check_int(field: str, value: Any, low: int, *, none_means: str | None = None) -> None:
  """An integer >= low; with `none_means`, None is allowed too (and means that)."""
  if none_means is not None and value is None:
    return
  require(is_int(value) and value >= low, field, value, f"be an integer >= {low}" + (
      f", or None {none_means}" if none_means is not None else ""))


def check_float(field: str, value: Any, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
  """A finite number in [low, high], each end open if asked."""
  ok = is_number(value) and (value > low if low_open else value >= low) and (
      value < high if high_open else value <= high)
  interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  require(ok, field, value, f"be a finite number in {interval}")


def check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
  """One of `choices`."""
  if value not in choices:
    raise UserError(f"{field}={value!r} is unknown: use one of {', '.join(choices)}")
