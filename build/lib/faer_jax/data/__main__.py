"""`python -m faer_jax.data COMMAND ...`: dataset commands.

    python -m faer_jax.data check --dataset rafdb --root /data/RAF-DB
    python -m faer_jax.data synth --layout rafdb --out /tmp/synth-rafdb

`COMMAND --help` describes each command's flags.
"""

import argparse
import importlib
import sys

# Imported only when chosen, so that each command loads only what it needs.
_COMMANDS = {
    "check": ("faer_jax.data.check", "what a dataset on disk holds; optionally decode every image"),
    "synth": ("faer_jax.data.synth", "write a synthetic face set in the owners' layout"),
}


def main(argv: list[str]) -> int:
  """Dispatches to the command's own `main(argv)`; returns the exit code."""
  parser = argparse.ArgumentParser(
      prog="python -m faer_jax.data",
      description="\n".join(f"  {name:8s}{help_}" for name, (_, help_) in _COMMANDS.items()),
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("command", choices=_COMMANDS)
  parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's flags")
  args = parser.parse_args(argv[:1])
  module_name = _COMMANDS[args.command][0]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    print(f"error: the {args.command!r} command ({module_name}) is not in this checkout", file=sys.stderr)
    return 2
  return module.main(argv[1:])


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
