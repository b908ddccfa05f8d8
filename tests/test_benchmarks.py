"""The benchmark scripts that GPU sessions run as prepared (scripts/gpu_sampler_runs.sh) work
end to end at tiny shapes on CPU, so a device minute is not lost to a script error."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import bench_decode_attention  # noqa: E402
import bench_decode_gemms  # noqa: E402
import bench_sampler  # noqa: E402
import bench_token_choice  # noqa: E402

from rpt_jax import decode_attention  # noqa: E402


def _column(row: str, i: int) -> str:
    return row.strip("|").split("|")[i].strip()


def test_decode_attention_bench_kernel_equals_einsums_over_partly_filled_caches():
    rows = bench_decode_attention.main(
        ["--rows", "8", "--slots", "64", "--filled", "48", "--num-samples", "1,4", "--layers",
         "2", "--repeats", "1", "--dtype", "float32"])
    # per-sample (G = 1) also times a step's whole attention, fused and apart
    assert [_column(r, 0) for r in rows] == ["xla", "pallas", "step fused", "step apart",
                                             "xla", "pallas"]
    assert all(float(_column(r, 7)) < 1e-5 for r in rows)  # largest |pallas - einsums|


def test_sampler_bench_launch_options_and_gemm_variants():
    rows = bench_sampler.main(
        ["--preset", "tiny", "--batch", "8", "--prompt-len", "8", "--new-tokens", "4",
         "--dtype", "float32", "--decode-attention", "pallas,xla", "--kernel",
         "32:2:2:1", "--fuse-step", "1,0", "--gemm", "xla", "--split-down", "1,4",
         "--repeats", "1"])
    names = [_column(r, 0) for r in rows]
    assert len(names) == 6 and "pallas attention 32:2:2:1, xla gemms)" in names[0]
    assert "pallas attention 32:2:2:1, xla gemms, down in 4 K slices)" in names[1]
    assert "pallas attention 32:2:2:1, rope and cache write apart, xla gemms, down in 4" in names[3]
    assert all(float(_column(r, 9).replace(",", "")) > 0 for r in rows)  # new tokens / s
    assert decode_attention.BLOCK_K == 64 and decode_attention.SPLITS == 0  # restored
    assert decode_attention.FUSE_STEP


def test_decode_gemms_bench_split_k_equals_the_plain_product():
    rows = bench_decode_gemms.main(["--preset", "tiny", "--rows", "8", "--layers", "2",
                                    "--repeats", "1", "--dtype", "float32"])
    names = [_column(r, 0) for r in rows]
    assert len(names) == 2 * (4 + 3) and "down split 8, xla" in names
    assert all(float(_column(r, 5)) < 1e-4 for r in rows)  # largest |variant - plain|


def test_token_choice_bench_one_pass_equals_two():
    rows = bench_token_choice.main(["--rows", "4", "--vocab", "96", "--steps", "2",
                                    "--repeats", "1"])
    assert [_column(r, 0) for r in rows] == ["stats, one pass", "stats, two passes",
                                             "choose_tokens"]
    assert float(_column(rows[0], 4)) < 1e-5  # chunk masses of one pass vs two
