"""Sizes, imported by faer_model.py the way scripts in the original's repository import their siblings."""

TEST = {'depths': (1, 1, 2, 1), 'dims': (16, 32, 48, 64)}
