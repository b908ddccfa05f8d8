"""scripts/colab_demo.ipynb runs top to bottom as Colab would (its install cell skipped), with a
short run in place of its parameters."""
import ast
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_colab_demo_runs_and_prints_what_it_says(tmp_path, capsys):
    nb = json.loads((ROOT / "scripts" / "colab_demo.ipynb").read_text())
    params = {"REPO": str(ROOT), "WORKDIR": str(tmp_path / "run"), "NUM_STEPS": 3,
              "WARMUP_STEPS": 10}
    namespace, ran = {}, []
    for i, cell in enumerate(nb["cells"]):
        tags = cell["metadata"].get("tags", [])
        if cell["cell_type"] != "code" or "colab" in tags:
            continue
        source = "".join(cell["source"])
        if "parameters" in tags:
            names = {t.id for node in ast.parse(source).body for t in node.targets}
            assert names == set(params), names  # the test sets every parameter, no other name
            source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
        exec(compile(source, f"colab_demo.ipynb cell {i}", "exec"), namespace)
        ran.append(i)
    assert len(ran) == 5
    out = capsys.readouterr().out
    # section 1: the plain-Python and jitted rewards agree, and only whole-token prefixes score
    for name, r in [("one whole token", 1), ("two whole tokens", 1), ("not on a boundary", 0),
                    ("wrong number", 0), ("box before </think>", 0)]:
        assert f"{name:20s} plain {r}  jitted {r}" in out
    assert "PROMPT:\nPredict the next token" in out and "TOKEN BOUNDARIES: [" in out
    assert "done at step 3" in out
    assert "mean reward over 64 samples:" in out and "context 1 sample 3, reward" in out
