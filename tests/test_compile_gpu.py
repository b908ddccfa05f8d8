"""scripts/compile_gpu.py's kernel count per loop iteration, on CPU-compiled programs (the GPU
compile itself needs the CUDA plugin and is run by hand: BENCHMARKS.md)."""
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import compile_gpu  # noqa: E402


def _loops(inner_matmul: bool):
    def inner(i, y):
        y = jnp.sin(y) * 2.0 + i
        return y @ y if inner_matmul else y

    def outer(i, x):
        return jax.lax.fori_loop(0, 3, inner, jnp.cos(x) @ x)

    hlo = jax.jit(lambda x: jax.lax.fori_loop(0, 5, outer, x)).lower(
        jnp.ones((64, 64))).compile().as_text()
    return {trip: sum(kinds.values()) for _, trip, kinds in compile_gpu.loop_kernels(hlo)}


def test_each_loop_counts_its_own_body_once():
    plain, more = _loops(False), _loops(True)
    assert set(plain) == set(more) == {"3", "5"}  # the trip counts XLA knows
    assert min(plain.values()) >= 1
    # a matmul added to the inner loop's body counts there, not in the loop around it
    assert more["3"] > plain["3"]
    assert more["5"] == plain["5"]
