"""Comparisons for tests of alternative implementations of the same function (float32)."""

import numpy as np

# Relative to the largest magnitude of the expected array: float32 sums of up to
# a few thousand terms in another order differ by a few 1e-7 of their scale.
RTOL = 2e-5


def assert_close(got, want, rtol: float = RTOL, what: str = "") -> None:
  """max |got - want| <= rtol * max |want| (arrays of the same shape), else an AssertionError naming `what`."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{what}: shapes {got.shape} and {want.shape}"
  err = np.max(np.abs(got - want), initial=0.0) / max(np.max(np.abs(want), initial=0.0), 1e-30)
  assert err < rtol, f"{what}: relative error {err:.2e}"


def custom_calls(hlo: str, target_prefix: str) -> list[str]:
  """The lines of HLO text that call a custom-call target whose name starts with `target_prefix`."""
  return [line for line in hlo.splitlines() if f'custom_call_target="{target_prefix}' in line]
