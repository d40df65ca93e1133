"""Shared plumbing of the absl binaries: user errors as one line, device logging, the
--checkpoint / --hf_checkpoint pair."""

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


def checkpoint_dir(checkpoint: str | None, hf_checkpoint: str | None) -> str:
  """The directory a binary loads: --checkpoint (a deepexit-train workdir, a save_model
  directory or a Hugging Face directory) or --hf_checkpoint (which must be a Hugging Face
  directory: config.json + model.safetensors).

  Raises:
    UserError: neither or both flags, or --hf_checkpoint not a Hugging Face directory.
  """
  if checkpoint and hf_checkpoint:
    raise UserError("give --checkpoint or --hf_checkpoint, not both: --hf_checkpoint is "
                    "--checkpoint for a Hugging Face directory")
  if hf_checkpoint:
    from deepexit_jax.pretrained import hf_directory

    if not hf_directory.is_hf_directory(hf_checkpoint):
      raise UserError(f"--hf_checkpoint={hf_checkpoint} is not a Hugging Face checkpoint "
                      "directory (config.json + model.safetensors, no model.json): pass a "
                      "deepexit-train workdir with --checkpoint")
    return hf_checkpoint
  if not checkpoint:
    raise UserError("--checkpoint is required: the --workdir of a deepexit-train run (or "
                    "--hf_checkpoint=DIR, a Hugging Face directory)")
  return checkpoint
