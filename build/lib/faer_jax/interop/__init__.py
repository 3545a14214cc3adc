"""Weight exchange with the PyTorch original.

  variables = load_torch_checkpoint('faer_rafdb.pth', create_model('base', 7))
  state_dict = to_torch_state_dict(variables)   # numpy arrays, original key names

torch is imported lazily (only to read pickled checkpoints), so `import
faer_jax.interop` works without it. The PyTorch reference model lives in
`faer_jax.interop.torch_reference` and does need torch.
"""

from faer_jax.interop.convert import (LoadReport, init_variables, load_state_dict, load_torch_checkpoint,
                                      to_torch_state_dict)
from faer_jax.interop.torch_io import CheckpointError, read_state_dict

__all__ = ["CheckpointError", "LoadReport", "init_variables", "load_state_dict", "load_torch_checkpoint",
           "read_state_dict", "to_torch_state_dict"]
