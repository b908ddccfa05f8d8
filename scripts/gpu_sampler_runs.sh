#!/usr/bin/env bash
# The sampler's GPU measurements for BENCHMARKS.md, prepared so a session with a GPU runs them
# as they are: `bash scripts/gpu_sampler_runs.sh 8` first (sessions 6-7's unmeasured changes),
# then 9 and 2 to 5 (each part fits in about 8 minutes on one H100/H200 with jax 0.11; no
# ml-collections needed; 1 and 6 ran on an H100 in session 5, BENCHMARKS.md). Logs go to $OUT
# (or /tmp/rpt_gpu_runs), one file per run; a run that fails or times out does not stop the next.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/rpt_gpu_runs}
PY=$(command -v python3 || command -v python)  # the GPU image's python3 holds jax
$PY -c "import jax" || { echo "$PY cannot import jax"; exit 1; }
export PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
$PY -c "import jax; print(jax.__version__, jax.devices())" >> "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

run() {  # name, seconds, script args...
  local name=$1 limit=$2
  shift 2
  echo "== $name: python $*"
  timeout "$limit" "$PY" "$@" > "$out/$name.txt" 2>&1
  echo "   exit $? after $SECONDS s total"
  grep -E "^\| |^FAILED|^#|^best|Error|^(xla|cudnn|attention) |^rpt_jax sampler|^plain|^transformers|^built" \
    "$out/$name.txt" | cut -c1-260 | tail -25
}

qwen="scripts/bench_sampler.py --preset qwen2_5_0_5b --batch 256 --dtype bfloat16"
case "${1:-1}" in
  1)
    # the issue's shape; the first variant (pallas, G=1) is traced: kernels per decode step
    run issue_shape 330 $qwen --prompt-len 128 --new-tokens 256 --num-samples 1,8 \
      --decode-attention pallas,xla --compare-plain --profile /tmp/rpt_trace
    run kernel 90 scripts/bench_decode_attention.py --rows 256 --slots 384,2048,8192 --layers 8
    ;;
  2)
    run long_responses 270 $qwen --prompt-len 128 --new-tokens 2048 --num-samples 1 \
      --cache-blocks 1,4 --decode-attention xla,pallas --repeats 2
    run documents 200 $qwen --prompt-len 1024 --new-tokens 256 --num-samples 8 \
      --contexts-per-doc 8 --decode-attention xla,pallas
    ;;
  3)
    # RPT's uneven lengths: rows stop after ~256 of up to 1024 tokens; pallas skips finished
    # rows, continuous batching (128 lanes for the 256 rows) decodes only running ones
    run uneven_lengths 360 $qwen --prompt-len 128 --new-tokens 1024 --num-samples 8 \
      --mean-len 256 --decode-attention xla,pallas --lanes 0,128 --repeats 2
    # where "auto" should switch to the shared prompt cache once the kernel is in (its
    # threshold, SHARED_MIN_PROMPT, was measured with the einsum attention)
    run layouts 200 $qwen --prompt-len 512 --new-tokens 256 --num-samples 8 \
      --cache-layout per_sample,shared --decode-attention xla,pallas
    ;;
  5)
    # continuous batching with a shared prompt (RPT's long prompts): slots of G = 8 lanes, each
    # reading one copy of its context's prompt, refilled once its 8 samples are done
    run lanes_shared 420 $qwen --prompt-len 1024 --new-tokens 1024 --num-samples 8 \
      --mean-len 256 --cache-layout shared,per_sample --lanes 0,128 --decode-attention pallas \
      --repeats 2
    ;;
  4)
    # the update with each prompt once per context (rl.share_prompt, on by default), through
    # the cudnn attention the GPU presets use (its shared branch has not run on a GPU yet)
    run share_prompt 400 scripts/bench_train_step.py --preset qwen2_5_0_5b --batch 16 \
      --seq-len 2048 --prompt-len 1024 --dtype bfloat16 --remat dots --attention cudnn,xla \
      --share-prompt 0,1 --steps 5
    ;;
  6)
    # the kernel's launch options at the issue's shape, then the sampler with the fastest and
    # the default ones, cuBLAS against XLA's Triton GEMMs (sampling.gemm), side by side
    run kernel_sweep 80 scripts/bench_decode_attention.py --rows 256 --slots 384 --filled 256 \
      --num-samples 1 --sweep
    best=$(grep -m1 "^best per-sample" "$out/kernel_sweep.txt" | awk '{print $NF}')
    run issue_gemm 220 $qwen --prompt-len 128 --new-tokens 256 --num-samples 1,8 \
      --decode-attention pallas,xla --kernel "${best:-default},default" --gemm cublas,xla \
      --profile /tmp/rpt_trace
    run kernel_sweep_shared 90 scripts/bench_decode_attention.py --rows 256 --slots 2048 \
      --num-samples 8 --layers 8 --sweep
    ;;
  7)
    # the decode step's matmuls alone at 256 rows: cuBLAS against XLA's Triton GEMMs, and the
    # down projection split over K by hand (BENCHMARKS.md: 32 us a layer against an 11 us floor)
    run gemms 150 scripts/bench_decode_gemms.py --preset qwen2_5_0_5b --rows 256
    ;;
  8)
    # sessions 6-7, compiled but not yet timed: the pallas step with rope and the cache write in
    # its kernel (217 kernels a step instead of 313) against them apart, and the down GEMM over
    # 4 slices of K (sampling.split_down); the kernel check (the "step fused" row's max diff
    # against "step apart"); the token choice reading the logits once against twice
    run issue_fused 300 $qwen --prompt-len 128 --new-tokens 256 --num-samples 1,8 \
      --decode-attention pallas --fuse-step 1,0 --split-down 1,4 --profile /tmp/rpt_trace
    run step_kernel 60 scripts/bench_decode_attention.py --rows 256 --slots 384 --filled 256 \
      --num-samples 1
    run token_choice 60 scripts/bench_token_choice.py --rows 256 --vocab 151936
    ;;
  9)
    # the fused step with a shared prompt cache (it then also writes q after rope), then the
    # GEMMs of part 7
    run documents_fused 220 $qwen --prompt-len 1024 --new-tokens 256 --num-samples 8 \
      --contexts-per-doc 8 --decode-attention pallas --fuse-step 1,0
    run gemms 150 scripts/bench_decode_gemms.py --preset qwen2_5_0_5b --rows 256
    ;;
esac
