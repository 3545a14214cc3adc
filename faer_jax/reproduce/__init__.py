"""The paper's experiments as one command: `python -m faer_jax.reproduce EXPERIMENT --workdir DIR`.

`experiments` names the runs each table and figure needs and the paper's
figures; `runs` builds each run's config and reads its results; `report`
writes the tables and figures. Training goes through `faer_jax.train`.
"""
