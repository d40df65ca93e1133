"""`python -m deepexit_jax.decoding`: the `deepexit-generate` binary."""

from deepexit_jax.decoding.cli import run

run()
