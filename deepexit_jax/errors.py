"""User-facing errors: bad input that a binary reports as one line, not a traceback."""


class UserError(ValueError):
  """Bad input from the user (data, flags, config, checkpoint).

  The message must name what is wrong and how to fix it, in one line.
  Binaries (see `cli.run_main`) print it to stderr and exit with status 2.
  """
