"""Small file helpers every writer shares: a writable directory, atomic JSON."""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from deepexit_jax.errors import UserError


def ensure_writable(directory: str) -> None:
  """Creates `directory` or raises a one-line UserError saying why it cannot."""
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".write_test.{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(
        f"cannot write to directory {directory} ({e.strerror}): choose a writable --workdir/--out"
    ) from None


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temporary file + rename), so a kill never leaves half a file.

  On several hosts only process 0 writes (orbax coordinates the checkpoints).
  """
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)
