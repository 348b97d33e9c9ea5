#!/usr/bin/env bash
# Issue 20's GPU session on the 2-GPU machine (`nvidia-h200-x2`): tensor parallelism against one GPU, in one chain.
# Staging as for scripts/device_real.sh (only Qwen2.5-Coder-1.5B-Instruct's GGUF is needed: the largest zoo model we
# stage, and the tokenizer of the random 8B checkpoint), then, from the repo root:
#   bash scripts/device_real.sh stage   (one call per chunk, the first carrying .whl/ alone)
#   bash scripts/device_tp.sh start     the chain, in the background
#   WAIT=540 bash scripts/device_real.sh wait   (its results come back as results.tar, with chain.log)
# The chain: convert the 1.5B; write a random-weight 8B-shape checkpoint with its tokenizer
# (scripts/make_random_checkpoint.py); for each model `paradec bench` with and without --tensor-parallel 2 (vanilla,
# pld, lookahead, suffix, greedy, exactness against that run's vanilla; the 1.5B also at batch 8, the policy agreed
# from rank 0), then the server on one and on two ranks under load, one request at a time and batching.
set -uo pipefail
SNAPSHOT=$HOME/paradec/src
export PYTHONUNBUFFERED=1 PYTHONPATH="$HOME/site:$SNAPSHOT"
STAGE=${STAGE:-$HOME/stage} LOG=/tmp/paradec-real.log DONE=/tmp/paradec-real.done RES=/tmp/paradec-real
Q15=qwen2.5-coder-1.5b-instruct
export STAGE LOG DONE RES Q15 SNAPSHOT

tp_chain() {
    set -e
    mkdir -p $RES
    local pd="python3 -m paradec" q15=$HOME/.cache/paradec/models/$Q15 big=/tmp/random-8b methods=vanilla,pld,lookahead,suffix
    while [ ! -f "$STAGE/$Q15.gguf.ok" ]; do sleep 2; done
    $pd zoo fetch $Q15 --gguf "$STAGE/$Q15.gguf" --quiet
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $RES/gpus.txt
    python3 "$SNAPSHOT/../scripts/make_random_checkpoint.py" --shape 8b --tokenizer $q15 --out $big --device cuda
    for model in $big $Q15; do
        name=$(basename $model)
        for world in 1 2; do
            echo "BENCH $name tp$world $(date +%T)"
            sizes=1
            [ "$model" = "$Q15" ] && sizes=1,8
            $pd bench --model $model --runner native --suite chat --per-category 1 --max-new-tokens 128 \
                --methods $methods --peers none --tensor-parallel $world --batch-sizes $sizes \
                --out $RES/$name-tp$world --quiet || echo "bench exit $?"
        done
    done
    echo "LOAD $(date +%T)"
    for world in 1 2; do  # the server the load bench starts takes --tensor-parallel; one at a time, then batching
        for batch in 1 8; do
            $pd bench --model $Q15 --suite chat --per-category 2 --methods vanilla,pld --concurrency 1,8 \
                --server-batch $batch --tensor-parallel $world --out $RES/q15-load-tp$world-b$batch --quiet \
                || echo "load exit $?"
        done
    done
    echo "DONE $(date +%T)"
}

case "${1:-}" in
start)
    rm -rf "$HOME/paradec" && mkdir -p "$HOME/paradec" && cp -r src tests scripts pyproject.toml "$HOME/paradec/"
    export -f tp_chain
    rm -f $DONE
    setsid nohup bash -c "bash -c tp_chain; echo \$? > $DONE" > $LOG 2>&1 < /dev/null &
    sleep 10
    tail -n 5 $LOG
    ;;
*)
    echo "usage: $0 start (then scripts/device_real.sh wait|collect)" >&2
    exit 2
    ;;
esac
