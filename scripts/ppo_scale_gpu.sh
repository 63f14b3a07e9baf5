#!/usr/bin/env bash
# experiments/toy_ppo_scale.py on one GPU, one stage per process with its own time limit, so that a
# slow stage still leaves the others (and its own held-out evaluations every 10 iterations).
#   WORKDIR=runs/quickstart OUT_DIR=/tmp/out STAGE_LIMIT=105 bash scripts/ppo_scale_gpu.sh [STAGE...]
# WORKDIR must hold the world and the exports of sft, rm_helpful and rm_safety. The on-policy
# stages (ppo_op_*) first collect feedback on SFT samples and train the two reward models on it.
set -u
WORKDIR=${WORKDIR:-runs/quickstart}; OUT_DIR=${OUT_DIR:-$WORKDIR}; LIMIT=${STAGE_LIMIT:-105}
export PYTHONUNBUFFERED=1
BASE="'world','sft','rm_helpful','rm_safety'"
OP="'feedback','rm_helpful_on_policy','rm_safety_on_policy'"
STAGES=${*:-ppo_gold_512 ppo_rm_512_b0p3 grpo_gold_128x8 ppo_rm_512_b0p1 on_policy_rms ppo_op_512_b0p3 ppo_op_512_b0p1}
for S in $STAGES; do
  case $S in
    on_policy_rms) list="$BASE,$OP" ;;
    ppo_op_*) list="$BASE,$OP,'$S'" ;;
    *) list="$BASE,'$S'" ;;
  esac
  start=$(date +%s)
  timeout "$LIMIT" python3 -m rlhf_jax.run --config=experiments/toy_ppo_scale.py --workdir="$WORKDIR" \
    --config.stages="($list)" 2>&1 | grep -v "Warning\|^W1\|libtpu" | tr '\r' '\n' \
    | grep -v "it/s\|step/s" | tail -4
  echo "$S: $(( $(date +%s) - start )) s"
  tar czf "$OUT_DIR/metrics.tgz" "$WORKDIR"/*/metrics.jsonl "$WORKDIR"/*/stage.json "$WORKDIR"/*/eval.json 2>/dev/null
done
