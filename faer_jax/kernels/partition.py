"""How the CPU kernels compose with sharding and vmap: every call works on its slice of the batch.

`batch_parallel(fn, rule)` wraps a kernel call `fn` so that
* under jit with sharded inputs, each device runs it on its own examples
  (custom_partitioning), instead of XLA gathering the operands onto every
  device;
* under jax.vmap, the mapped axis is folded into the batch axis and the
  kernel runs once on the larger batch (custom_vmap); where that is not the
  same function (a batched parameter, a result summed over the batch) it runs
  once per mapped element instead (lax.map). custom_partitioning alone has no
  batching rule.

JAX's persistent compilation cache: custom_partitioning writes the address of
its Python callbacks into the program, so a program that calls a kernel on
several devices would get a new cache key in every process (jax-ml/jax#21159).
JAX can leave that address out of the key
(`jax_remove_custom_partitioning_ptr_from_cache_key`), which is safe only if
the program itself says what the callbacks will build. So every call here
passes one more operand, a constant of eight int32 words: a hash of
this file, the kernel function's name and source, the rule and the static
arguments (the MLP's drop-path `keep`, the fused LayerNorm's `eps`), which
otherwise live only in the callbacks. The kernels never read it. The
command-line tools set the option (faer_jax.compile_cache.enable).
"""

import hashlib
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

_THIS_FILE = hashlib.sha256(pathlib.Path(__file__).read_bytes()).digest()
# The identity operand's factor in the sharding rules (replicated, never split).
_IDENTITY_FACTOR = "faer_identity"


def _describe(fn, rule: str, batch_sum: bool) -> bytes:
  """What the partition callback of `fn` builds, but for the static arguments: a digest."""
  try:
    source = inspect.getsource(fn)
  except (OSError, TypeError):  # no source at hand: the name still tells the kernels apart
    source = ""
  digest = hashlib.sha256(_THIS_FILE)
  for part in (fn.__module__, fn.__qualname__, source, rule, repr(batch_sum)):
    digest.update(part.encode() + b"\0")
  return digest.digest()


def _identity(description: bytes, statics: tuple) -> np.ndarray:
  """The identity operand: eight int32 words from the callback's description and the static arguments."""
  return np.frombuffer(hashlib.sha256(description + repr(statics).encode()).digest(), np.int32)


def batch_parallel(fn, rule: str, num_static: int = 0, batch_sum: bool = False):
  """`fn` under custom_partitioning: each device runs it on its slice of the batch axis `n`.

  `rule` names every array operand's and result's axes (Shardy's einsum-like
  notation); the batch axis is the leading `n` wherever it appears, every other
  axis is replicated. The last `num_static` arguments of `fn` are static.
  With `batch_sum`, `fn`'s results without `n` among their axes are sums over
  the batch: each device sums its own examples and the partial results are
  added across the devices that hold the batch (psum), leaving them replicated.
  """
  operands, results = (side.split(",") for side in rule.split("->"))
  num_arrays = len(operands)
  operands = operands + [_IDENTITY_FACTOR]  # the identity operand, last of the arrays
  batched = lambda axes: [a.split()[:1] == ["n"] for a in axes]
  operand_batched, result_batched = batched(operands), batched(results)
  # Every factor but the batch, in order of first appearance (Shardy wants them sorted so).
  factors = [f for f in dict.fromkeys(f for axes in operands + results for f in axes.split()) if f != "n"]
  static = tuple(range(len(operands), len(operands) + num_static))

  description = _describe(fn, rule, batch_sum)
  array_batched = operand_batched[:num_arrays]

  def without_identity(*args):
    return fn(*args[:num_arrays], *args[num_arrays + 1:])

  wrapped = custom_partitioning(without_identity, static_argnums=static)

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
      result = fn(*arrays[:num_arrays], *statics)
      if batch_sum and batch_axes is not None:
        flat = result if isinstance(result, (tuple, list)) else (result,)
        flat = [r if b else jax.lax.psum(r, batch_axes) for r, b in zip(flat, result_batched)]
        result = type(result)(flat) if isinstance(result, (tuple, list)) else flat[0]
      return result

    return mesh, lower, outs, arg_shardings

  # Shardy declares a factor a reduction only if no result keeps it; where some
  # results keep the batch (an input gradient beside summed weight gradients)
  # the partition callback above still places every operand and result.
  wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                        sharding_rule=", ".join(operands) + " -> " + ", ".join(results),
                        reduction_factors=("n",) if batch_sum and not any(result_batched) else (),
                        need_replication_factors=tuple(factors))

  def call(*args):
    arrays, statics = args[:num_arrays], args[num_arrays:]
    tag = _identity(description, statics)
    op = jax.custom_batching.custom_vmap(lambda *arrays: wrapped(*arrays, tag, *statics))

    @op.def_vmap
    def _vmap(axis_size, in_batched, *arrays):  # batched arrays carry the mapped axis first
      out_tree = jax.tree.structure(jax.eval_shape(lambda: op(*[a[0] if b else a for a, b in
                                                                zip(arrays, in_batched)])))
      params_batched = any(b and not nb for b, nb in zip(in_batched, array_batched))
      if not params_batched and not batch_sum:
        # Fold (mapped, n) into one batch axis: the same sums per example.
        folded = []
        for a, b, nb in zip(arrays, in_batched, array_batched):
          if nb:
            a = a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
            a = a.reshape((-1,) + a.shape[2:])
          folded.append(a)
        out = op(*folded)
        out = jax.tree.map(lambda r: r.reshape((axis_size, -1) + r.shape[1:]), out)
      else:
        def one(sliced):
          it = iter(sliced)
          return op(*[next(it) if b else a for a, b in zip(arrays, in_batched)])
        out = jax.lax.map(one, [a for a, b in zip(arrays, in_batched) if b])
      return out, jax.tree.unflatten(out_tree, [True] * out_tree.num_leaves)

    return op(*arrays)

  return call
