#!/usr/bin/env bash
# The benchmark suite on one GPU, as recorded in docs/benchmarks.md ("On a GPU"). Each step has its
# own time limit so that one failure does not lose the others. Records are appended to $OUT_DIR/bench.jsonl.
#   OUT_DIR=/tmp/gpu bash scripts/bench_gpu.sh
set -u
OUT_DIR=${OUT_DIR:-runs/bench_gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
B="python3 -m rlhf_jax.bench --out=$OUT_DIR/bench.jsonl"
nvidia-smi -L
python3 -c "import jax, flax, optax, chex; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
# 1. Llama-3.2-1B shape, bf16 compute, fp32 master weights, full train step (fwd + bwd + AdamW).
timeout 200 $B --model=llama3_1b --dtype=bfloat16 --matmul_n=8192 --only=matmul_peak,sft_step \
  --sft_batch=8 --sft_seq_len=1024 || echo "sft_step 1B failed: $?"
timeout 150 $B --model=llama3_1b --dtype=bfloat16 --only=sft_step --sft_batch=16 --sft_seq_len=1024 \
  --remat=dots_no_batch || echo "sft_step 1B remat failed: $?"
# 2. Batch-1 decode of the same shape in bf16 against the weight-streaming limit.
timeout 150 $B --model=llama3_1b --dtype=bfloat16 --param_dtype=bfloat16 --only=hbm_bandwidth,decode \
  --new_tokens=256 || echo "decode 1B failed: $?"
# 3. The CPU suite's model (L6 d512), fp32: generation and a PPO iteration.
timeout 150 $B --only=matmul_peak,generate,ppo_iteration --matmul_n=8192 || echo "bench model failed: $?"
