"""`python -m faer_jax.benchmark ...`; see faer_jax.benchmark for the commands."""

import sys

from faer_jax.benchmark import main

if __name__ == "__main__":
  sys.exit(main())
