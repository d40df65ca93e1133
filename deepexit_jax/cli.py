"""Shared plumbing of the absl binaries: user errors as one line, device logging."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import jax
from absl import app, flags, logging

from deepexit_jax.errors import UserError


def run_main(main: Callable[[Sequence[str]], None]) -> None:
  """`app.run(main)`, but a `UserError` prints one line and exits with status 2, and
  `--help` lists the flags the binary's own module defined (absl lists only the main
  module's, and our binaries define theirs in the library module that `main` lives in).
  """
  # absl's --help prints the key flags of the module named sys.argv[0].
  for flag in flags.FLAGS.flags_by_module_dict().get(main.__module__, []):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

  def guarded(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected positional arguments {list(argv[1:])}; use --flags")
    quiet_library_logs()
    try:
      main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(guarded, flags_parser=_parse_flags)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with errors (including ml_collections' --config.x ones) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except (AttributeError, KeyError) as e:  # An override of a field the config does not have.
    print(f"error: a --config.* flag names a field the config does not have ({e}): check "
          "its spelling against the config file", file=sys.stderr)
  sys.exit(2)


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
