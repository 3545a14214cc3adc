"""custom_partitioning for the CPU kernels: every call runs on each device's own slice of the batch."""

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P


def batch_parallel(fn, rule: str, num_static: int = 0, batch_sum: bool = False):
  """`fn` under custom_partitioning: each device runs it on its slice of the batch axis `n`.

  `rule` names every array operand's and result's axes (Shardy's einsum-like
  notation); the batch axis is the leading `n` wherever it appears, every other
  axis is replicated. The last `num_static` arguments of `fn` are static.
  With `batch_sum`, `fn`'s results are sums over the batch (no `n` among
  their axes): each device sums its own examples and the partial results are
  added across the devices that hold the batch (psum), leaving them replicated.
  """
  operands, results = (side.split(",") for side in rule.split("->"))
  batched = lambda axes: [a.split()[:1] == ["n"] for a in axes]
  operand_batched, result_batched = batched(operands), batched(results)
  # Every factor but the batch, in order of first appearance (Shardy wants them sorted so).
  factors = [f for f in dict.fromkeys(f for axes in operands + results for f in axes.split()) if f != "n"]
  static = tuple(range(len(operands), len(operands) + num_static))
  wrapped = custom_partitioning(fn, static_argnums=static)

  def shardings(mesh, arg_shapes):
    spec = tuple(getattr(arg_shapes[0].sharding, "spec", ()))
    batch = spec[0] if spec else None
    make = lambda is_batched, rank: NamedSharding(mesh, P(batch if is_batched else None, *[None] * (rank - 1)))
    args = tuple(make(b, len(a.shape)) for b, a in zip(operand_batched, arg_shapes))
    outs = tuple(make(b, len(axes.split())) for b, axes in zip(result_batched, results))
    return (outs if len(outs) > 1 else outs[0]), args

  # Both callbacks get the static arguments first, then (mesh, arg_shapes, result_shape).
  def infer(*args):
    mesh, arg_shapes, _ = args[-3:]
    return shardings(mesh, arg_shapes)[0]

  def partition(*args):
    statics, (mesh, arg_shapes, _) = args[:-3], args[-3:]
    outs, arg_shardings = shardings(mesh, arg_shapes)
    spec = tuple(getattr(arg_shapes[0].sharding, "spec", ()))
    batch_axes = spec[0] if spec else None

    def lower(*arrays):
      result = fn(*arrays, *statics)
      if batch_sum and batch_axes is not None:
        result = jax.lax.psum(result, batch_axes)
      return result

    return mesh, lower, outs, arg_shardings

  wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                        reduction_factors=("n",) if batch_sum else (),
                        need_replication_factors=tuple(factors))
  return wrapped
