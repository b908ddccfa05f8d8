"""A training run's checkpoint as a Hugging Face folder (safetensors, config.json, tokenizer), for
transformers, vLLM, lm-evaluation-harness or a later `model.hf_checkpoint`:

    python scripts/export_hf.py --config configs/tiny.py --workdir /tmp/rpt_tiny --out /tmp/rpt_tiny_hf
    python scripts/export_hf.py --config configs/hf_checkpoint.py:/models/Qwen3-1.7B \
        --workdir /tmp/rpt_qwen3 --step 500 --dtype bfloat16 --out /tmp/rpt_qwen3_500

Takes the latest checkpoint (or --step), reads only its params (not the optimizer state), and
writes them sharded above 2 GiB per file, with the run's own tokenizer (trainer.load_run_tokenizer:
data.tokenizer when set, else model.hf_checkpoint's, else the built-in one kept in the workdir).
generation_config.json and max_position_embeddings come from model.hf_checkpoint when the run
started from one (generation_config's eos_token_id becomes the run tokenizer's end ids where they
differ). --dtype: the weights' dtype on disk (default: the params'). The config must agree with
the run's config.json on the model, tokenizer and template. A non-empty --out is replaced only
with --overwrite, and never when it is or holds the workdir or model.hf_checkpoint, or sits in
the checkpoints or the base model; the new folder is written beside it and renamed into place,
so a failed export loses nothing.
"""
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_OUT = flags.DEFINE_string("out", None, "The HF folder to write.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Weights' dtype on disk (default: model.param_dtype).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out folder.")
flags.mark_flags_as_required(["config", "workdir", "out"])


def check_out(out: str, workdir: str, config, overwrite: bool) -> None:
    """Raise unless writing the HF folder `out` loses nothing that should be kept: the run
    (its workdir, its checkpoints) and the model it started from."""
    real = os.path.realpath(out)
    keep = {"the workdir": workdir, "model.hf_checkpoint": config.model.hf_checkpoint,
            "the checkpoints folder": os.path.join(workdir, "checkpoints")}
    for what, folder in keep.items():
        if not folder:
            continue
        common = os.path.commonpath([real, os.path.realpath(folder)])
        if common == real:
            raise ValueError(f"--out {out} is or holds {what}; write the export elsewhere")
        if common == os.path.realpath(folder) and what != "the workdir":
            raise ValueError(f"--out {out} is inside {what}; write the export elsewhere")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"--out {out} is not empty ({sorted(os.listdir(out))[:5]}): pass "
                         f"--overwrite to replace it")


def export(config, workdir: str, out: str, step: int | None = None, dtype: str | None = None,
           overwrite: bool = False):
    """Write checkpoint `step` (default the latest) of `workdir` to the HF folder `out`.
    Returns (the folder, the step)."""
    import jax

    from rpt_jax import config as config_lib
    from rpt_jax import evaluation, hf, sharding, trainer
    from rpt_jax import model as model_lib
    config_lib.validate(config, jax.device_count(), jax.default_backend())
    check_out(out, workdir, config, overwrite)
    trainer.check_run_config(config, workdir)
    saved = evaluation.checkpoint_steps(workdir)
    if not saved:
        raise FileNotFoundError(f"no checkpoints in {evaluation.checkpoint_dir(workdir)}")
    step = saved[-1] if step is None else step
    mesh = sharding.make_mesh(config)
    cfg = model_lib.ModelConfig.from_config(config.model)
    shardings = sharding.param_shardings(mesh, model_lib.logical_axes(cfg),
                                         model_lib.param_shapes(cfg))
    params = evaluation.load_workdir_params(workdir, step, cfg, shardings)
    tokenizer = trainer.load_run_tokenizer(config, workdir)

    def write(new):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer_files(config, tokenizer, tmp)
            hf.save_params(params, cfg, new, tokenizer_dir=tmp, dtype=dtype)
    return hf.replace_folder(out, write), step  # a non-empty out only with overwrite (check_out)


def tokenizer_files(config, tokenizer, folder: str) -> None:
    """Write what hf.save_params reads from its tokenizer_dir into `folder`: the run's
    `tokenizer`, and model.hf_checkpoint's config.json (max_position_embeddings) and
    generation_config.json, whose eos_token_id becomes the tokenizer's end ids where they differ
    (a data.tokenizer other than the checkpoint's)."""
    tokenizer.save(folder)
    src = config.model.hf_checkpoint
    if not src:
        return
    if os.path.isfile(os.path.join(src, "config.json")):
        shutil.copyfile(os.path.join(src, "config.json"), os.path.join(folder, "config.json"))
    gen_path = os.path.join(src, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            gen = json.load(f)
        eos = gen.get("eos_token_id")
        theirs = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if theirs | {tokenizer.eos_id} != set(tokenizer.end_ids):
            gen["eos_token_id"] = list(tokenizer.end_ids)
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    folder, step = export(_CONFIG.value, _WORKDIR.value, _OUT.value, _STEP.value, _DTYPE.value,
                          _OVERWRITE.value)
    print(f"wrote step {step} of {_WORKDIR.value} to {folder}")


if __name__ == "__main__":
    app.run(main)
