"""scripts/compile_aot.py's kernel count per loop iteration, on CPU-compiled programs, and its
targets and meshes (the GPU and TPU compiles themselves need the CUDA plugin or libtpu and are
run by hand: BENCHMARKS.md)."""
import os
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import compile_aot  # noqa: E402


def _loops(inner_matmul: bool):
    def inner(i, y):
        y = jnp.sin(y) * 2.0 + i
        return y @ y if inner_matmul else y

    def outer(i, x):
        return jax.lax.fori_loop(0, 3, inner, jnp.cos(x) @ x)

    hlo = jax.jit(lambda x: jax.lax.fori_loop(0, 5, outer, x)).lower(
        jnp.ones((64, 64))).compile().as_text()
    return {trip: sum(kinds.values()) for _, trip, kinds in compile_aot.loop_kernels(hlo)}


def test_each_loop_counts_its_own_body_once():
    plain, more = _loops(False), _loops(True)
    assert set(plain) == set(more) == {"3", "5"}  # the trip counts XLA knows
    assert min(plain.values()) >= 1
    # a matmul added to the inner loop's body counts there, not in the loop around it
    assert more["3"] > plain["3"]
    assert more["5"] == plain["5"]


GPU_LOOP = """\
%body (p: (s32[], bf16[8,64])) -> (s32[], bf16[8,64]) {
  %p = (s32[], bf16[8,64]{1,0}) parameter(0)
  %x = bf16[8,64]{1,0} get-tuple-element(%p), index=1
  %gemm_fusion_dot.15 = f32[4,8,64]{2,1,0} fusion(%x), kind=kCustom, calls=%g, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %loop_pad_fusion.23 = bf16[8,16]{1,0} fusion(%gemm_fusion_dot.15), kind=kLoop, calls=%f
  %pallas_call.72 = (f32[8,16]{1,0}) custom-call(%loop_pad_fusion.23), custom_call_target="__gpu$xla.gpu.triton"
  %bitcast.1 = bf16[8,64]{1,0} bitcast(%x)
  ROOT %t = (s32[], bf16[8,64]{1,0}) tuple(%i, %bitcast.1)
}

ENTRY %main (a: bf16[8,64]) -> bf16[8,64] {
  %w = (s32[], bf16[8,64]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
}
"""


def test_gpu_kernel_kinds():
    """The fusion kinds and custom-call targets of a GPU module (text as XLA:GPU prints it):
    one GEMM, one loop fusion, one Triton call; bitcasts, tuples and parameters launch nothing."""
    [(body, trip, kinds)] = compile_aot.loop_kernels(GPU_LOOP)
    assert (body, trip) == ("body", "7")
    assert kinds == {"__triton_nested_gemm_fusion": 1, "kLoop": 1, "__gpu$xla.gpu.triton": 1}


def test_targets_meshes_and_device_memory():
    """Unknown targets stop with a message naming the choices; a TPU topology without libtpu
    (as on CI) names the install; --mesh lays out devices as a config's mesh section does."""
    import importlib.util
    import pytest
    with pytest.raises(SystemExit, match="'h300': neither a GPU description .*h100_sxm"):
        compile_aot.target_devices("h300")
    if importlib.util.find_spec("libtpu") is None:
        with pytest.raises(SystemExit, match=r"install libtpu: pip install 'jax\[tpu\]=="):
            compile_aot.target_devices("v5e:2x2")
    mesh = compile_aot.target_mesh(jax.devices(), "2,-1,2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        compile_aot.target_mesh(jax.devices(), "3,-1,1")
    kinds = {"TPU v5 lite": 16, "TPU v5": 95, "NVIDIA H100 80GB HBM3": 80, "cpu": None}
    for kind, gib in kinds.items():
        assert compile_aot.device_gib(SimpleNamespace(device_kind=kind)) == gib
