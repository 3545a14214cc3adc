import sys

from faer_jax.interop.cli import main

sys.exit(main())
