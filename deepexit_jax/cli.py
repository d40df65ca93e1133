"""Shared plumbing of the absl binaries: user errors as one line, device logging."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import jax
from absl import app, logging

from deepexit_jax.errors import UserError


def run_main(main: Callable[[Sequence[str]], None]) -> None:
  """`app.run(main)`, but a `UserError` prints one line and exits with status 2."""

  def guarded(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected positional arguments {list(argv[1:])}; use --flags")
    quiet_library_logs()
    try:
      main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(guarded)


class _OwnRecordsOnly:
  """absl-handler filter: INFO records of libraries (orbax, tfds) are noise to our users."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "deepexit_jax" in record.pathname or (
        "/site-packages/" not in record.pathname)


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_OwnRecordsOnly())


def log_devices() -> None:
  devices = jax.devices()
  logging.info("JAX %s on %d %s device(s): %s", jax.__version__, len(devices),
               devices[0].platform, ", ".join(str(d) for d in devices[:8]))
