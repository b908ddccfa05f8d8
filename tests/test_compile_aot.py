"""scripts/compile_aot.py's kernel count per loop iteration, on CPU-compiled programs, and its
targets and meshes (the GPU and TPU compiles themselves need the CUDA plugin or libtpu and are
run by hand: BENCHMARKS.md)."""
import importlib.util
import os
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

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


def test_script_compiles_every_variant_and_reports_failures(monkeypatch, capsys):
    """The whole script on 4 CPU devices standing in for a target: the update for 1 and 2
    micro-batches, and 3, which does not split 8 rows: reported as FAILED, the rest still run;
    then the sampler's decode loop."""
    monkeypatch.setattr(compile_aot, "target_devices", lambda target, n=1: jax.devices()[:4])
    common = ["--preset", "tiny", "--dtype", "float32", "--mesh", "2,2,1", "--prompt-len", "8"]
    assert compile_aot.main(["update", *common, "--batch", "8", "--seq-len", "16", "--group",
                             "2", "--micro-batches", "1,3,2", "--share-prompt", "1"]) == 1
    assert compile_aot.main(["sampler", *common, "--batch", "8", "--new-tokens", "4",
                             "--num-samples", "2", "--decode-attention", "xla"]) == 0
    out = capsys.readouterr().out
    assert "mesh (data, fsdp, tensor) = (2, 2, 1)" in out
    blocks = out.split("\n## ")[1:]
    assert [b.splitlines()[0] for b in blocks] == [
        "update attention=xla remat=dots share_prompt=1 micro_batches=1",
        "update attention=xla remat=dots share_prompt=1 micro_batches=3",
        "update attention=xla remat=dots share_prompt=1 micro_batches=2",
        "sampler G=2 attention=xla cache_layout=auto cache_blocks=1 lanes=0 gemm=auto "
        "split_down=1"]
    assert "FAILED" in blocks[1] and "rl.micro_batches=3" in blocks[1]
    assert all("peak memory" in b for b in blocks[:1] + blocks[2:])
    assert "kernels per iteration" in blocks[3]  # the decode loop
    # the sampler's own pre-compile estimate, per device, next to XLA's
    tiny = compile_aot.model.ModelConfig(**compile_aot.MODEL_SHAPES["tiny"], dtype="float32",
                                          param_dtype="float32")
    cfg = compile_aot.sampling.SamplingConfig(num_samples=2, temperature=0.8, max_new_tokens=4)
    ours = compile_aot.sampling.peak_bytes(compile_aot.sampling.memory_bytes(tiny, cfg, 4, 8, 2,
                                                                             data=2))
    assert f"pre-compile estimate {ours / 4 / 2**20:.1f} MiB" in blocks[3]


def test_config_mode_runs_the_trainers_checks_for_a_config(monkeypatch, capsys):
    """`compile_aot.py config`: a config file with overrides, on 8 CPU devices standing in for
    a target's chips. With chips of 2 GiB both programs fit; with chips of 2 MiB the update's
    error names rl.micro_batches' next valid value and the sampler's formula refuses first."""
    monkeypatch.setattr(compile_aot, "target_devices", lambda target, n=1: jax.devices()[:8])
    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    argv = ["config", "--config", tiny, "--set", "mesh.fsdp=2", "--set", "rl.micro_batches=2",
            "--set", "sampling.prompt_buckets=(32, 64)"]
    monkeypatch.setattr(compile_aot, "device_gib", lambda device: 2)
    assert compile_aot.main(argv) == 0
    out = capsys.readouterr().out
    assert "mesh (data, fsdp, tensor) = (4, 2, 1)" in out
    assert "## update, prompt bucket 64, rl.micro_batches=2\nfits: " in out and " of 2 GiB" in out
    assert "## sampler, prompt bucket 64" in out and "pre-compile estimate" in out
    monkeypatch.setattr(compile_aot, "device_gib", lambda device: 2 / 1024)
    assert compile_aot.main(argv) == 1  # the exit status: scripts can tell
    out = capsys.readouterr().out
    assert "DOES NOT FIT: the update of 64 rows x 88 tokens in rl.micro_batches=2 slices" in out
    assert "next valid: 4" in out
    assert "## sampler, prompt bucket 64\nDOES NOT FIT by the pre-compile formula" in out
    with pytest.raises(SystemExit, match="the config has no key 'rl.micro_batch'"):
        compile_aot.main(argv + ["--set", "rl.micro_batch=4"])  # a typo is not a new key


def test_load_config_passes_what_follows_the_file_to_get_config(tmp_path):
    """`--config file.py:arg` calls get_config(arg), as train.py's config_flags does."""
    path = tmp_path / "seeded.py"
    path.write_text("from rpt_jax.config import base_config\n\n\n"
                    "def get_config(seed='0'):\n    c = base_config()\n    c.seed = int(seed)\n"
                    "    return c\n")
    assert compile_aot.load_config(f"{path}:7", []).seed == 7
    assert compile_aot.load_config(str(path), ["seed=3"]).seed == 3
