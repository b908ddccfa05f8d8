"""Run as two processes by tests/test_multiprocess.py (process id, coordinator port): on meshes
whose devices are not in process order, as on TPU slices, each host reads the batch rows its
devices hold and the assembled global batch equals the one-process batch."""
import sys

import jax

pid, port = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", 2, pid)

import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from rpt_jax import contexts, corpora, sharding  # noqa: E402
from rpt_jax import tokenizer as tok_lib  # noqa: E402
from rpt_jax.config import base_config  # noqa: E402

d = sorted(jax.devices(), key=lambda x: (x.process_index, x.id))  # process 0: d0 d1; 1: d2 d3
MESHES = {
    # batch parts 0 and 2 on process 0, 1 and 3 on process 1
    "interleaved": (np.array([d[0], d[2], d[1], d[3]]).reshape(4, 1, 1), [[0, 1, 4, 5],
                                                                          [2, 3, 6, 7]]),
    # the tensor axis spans the hosts: both hold both batch parts
    "tensor across hosts": (np.array([d[0], d[2], d[1], d[3]]).reshape(2, 1, 2),
                            [list(range(8))] * 2),
}
tok = tok_lib.builtin_tokenizer(512)
docs = [{"text": t} for t in corpora.synthetic_texts(60, seed=3)]
for name, (devices, want) in MESHES.items():
    mesh = Mesh(devices, sharding.AXES)
    rows = sharding.process_rows(mesh, 8)
    assert rows.tolist() == want[pid], (name, rows)
    g = np.arange(8 * 3).reshape(8, 3)
    assert np.array_equal(sharding.to_host(sharding.host_to_global(mesh, g[rows])), g), name
    for m in (1, 2):
        c = base_config("tiny")
        c.data.update(batch_size=8, max_prompt_len=128, target_window=48, template="short",
                      contexts_per_doc=m)
        c.sampling.prompt_buckets = (64, 128)
        whole = next(contexts.ContextIterator(c, "train", tok, 0, 1, documents=docs))
        mine = next(contexts.ContextIterator(c, "train", tok, documents=docs, rows=rows))
        for k, v in contexts.to_global(mine, mesh).items():
            np.testing.assert_array_equal(sharding.to_host(v), whole[k], err_msg=f"{name} {m} {k}")
print("ok", pid, flush=True)
jax.distributed.shutdown()
