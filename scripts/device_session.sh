#!/usr/bin/env bash
# The GPU session that produces the committed benchmark results, as two calls on one warm machine. Issue the second
# as soon as the first returns: an idle machine goes back after 30 s, and everything built on it with it.
#   pipeline  in the background, one chain: build the zoo's bench pair, train its EAGLE and Medusa heads, run
#             `paradec bench --suite code` (BENCH_ARGS adds options, e.g. "--methods vanilla,eagle --peers none"),
#             then a second bench if EXTRA_ARGS is set (e.g. "--methods vanilla,eagle --opt eagle.depth=8
#             --peers none"; its table goes to stdout only). In the foreground: the CUDA-only tests, then wait for
#             the chain until WAIT seconds after the call began (default 480). EAGLE_ONLY=1 skips Medusa's training.
#   collect   wait for the chain (until WAIT, default 540 s), then copy the bench's files and the pair's cards to $OUT
# WAIT counts from the start of the call, tests included, and is capped at 570: a call that reaches the device's
# 600 s limit is killed with its machine, and the background chain and everything built go with it.
#   heads     train the embedded default model's heads (copied back as default_heads.tar)
# Usage (repo root, on the device): bash scripts/device_session.sh pipeline|collect|heads   (results under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src
LOG=/tmp/paradec-pipeline.log
DONE=/tmp/paradec-pipeline.done
RESULTS=/tmp/paradec-bench
export PER_CATEGORY=${PER_CATEGORY:-5} BENCH_ARGS=${BENCH_ARGS:-} EXTRA_ARGS=${EXTRA_ARGS:-} EAGLE_ONLY=${EAGLE_ONLY:-}

wait_chain() {  # $1: seconds since the call began, at most (capped at 570)
    local until=$(($1 < 570 ? $1 : 570))
    while [ ! -f $DONE ] && [ "$SECONDS" -lt "$until" ]; do sleep 5; done
    tail -n 40 $LOG
}

chain() {  # runs in the background, logging to $LOG
    set -e
    T=$(python3 -c 'from paradec.zoo.build import ensure_bench_pair; print(ensure_bench_pair(progress=False)[0])' | tail -n 1)
    echo "TARGET $T"
    python3 -m paradec train eagle --model "$T" --device cuda --quiet --self-distill 1024 > /tmp/eagle.log 2>&1 &
    [ -n "$EAGLE_ONLY" ] || python3 -m paradec train medusa --model "$T" --device cuda --quiet > /tmp/medusa.log 2>&1 &
    wait
    tail -n 3 /tmp/eagle.log
    [ -n "$EAGLE_ONLY" ] || tail -n 3 /tmp/medusa.log
    echo "BENCH $(date +%T)"
    python3 -m paradec bench --suite code --per-category "$PER_CATEGORY" $BENCH_ARGS --out $RESULTS --quiet
    if [ -n "$EXTRA_ARGS" ]; then
        echo "EXTRA $(date +%T): $EXTRA_ARGS"
        python3 -m paradec bench --suite code --per-category "$PER_CATEGORY" $EXTRA_ARGS --out /tmp/paradec-extra --quiet
        cat /tmp/paradec-extra/results.md
    fi
    cp ~/.cache/paradec/zoo/*/target/card.json $RESULTS/bench_target_card.json
    cp ~/.cache/paradec/zoo/*/draft/card.json $RESULTS/bench_draft_card.json
    cp ~/.cache/paradec/zoo/*/target/heads/eagle/card.json $RESULTS/bench_eagle_card.json
    [ -n "$EAGLE_ONLY" ] || cp ~/.cache/paradec/zoo/*/target/heads/medusa/card.json $RESULTS/bench_medusa_card.json
    echo "DONE $(date +%T)"
}

case "$1" in
pipeline)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    export -f chain
    export LOG DONE RESULTS
    # the chain in its own bash, so that its `set -e` ends it alone; its exit status goes to $DONE
    setsid nohup bash -c "bash -c chain; echo \$? > $DONE" > $LOG 2>&1 < /dev/null &
    python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_eagle_cuda.py tests/test_native_runner.py 2>&1 | tail -n 3
    wait_chain "${WAIT:-480}"
    ;;
collect)
    wait_chain "${WAIT:-540}"
    [ -f $DONE ] || { echo "chain not done"; exit 1; }
    [ "$(cat $DONE)" = 0 ] || { echo "chain failed ($(cat $DONE))"; exit 1; }
    cp $RESULTS/* "$OUT"/ && ls "$OUT"
    cat $RESULTS/results.md
    ;;
heads)
    python3 -m paradec train eagle --device cuda --quiet && python3 -m paradec train medusa --device cuda --quiet
    tar cf "$OUT/default_heads.tar" -C src/paradec/assets/default/target heads
    cat src/paradec/assets/default/target/heads/*/card.json | head -c 3000
    ;;
*)
    echo "usage: $0 pipeline|collect|heads" >&2
    exit 2
    ;;
esac
