#!/usr/bin/env bash
# The GPU session that produces the committed benchmark results, in three calls on one warm machine:
#   a) in the background: build the zoo's bench pair, then train its EAGLE and Medusa heads;
#      in the foreground: train the embedded default model's heads (copied back as default_heads.tar)
#   b) wait for (a)'s background pipeline
#   c) paradec bench --suite code with every method and the Hugging Face peers
# Usage (repo root, on the device): bash scripts/device_session.sh a|b|c   (results under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src
LOG=/tmp/paradec-pipeline.log
DONE=/tmp/paradec-pipeline.done
case "$1" in
a)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    setsid nohup bash -c "
        set -e
        T=\$(python3 -c 'from paradec.zoo.build import ensure_bench_pair; print(ensure_bench_pair(progress=False)[0])' | tail -n 1)
        echo TARGET \$T
        python3 -m paradec train eagle --model \$T --device cuda --quiet --self-distill 1024 > /tmp/eagle.log 2>&1 &
        python3 -m paradec train medusa --model \$T --device cuda --quiet > /tmp/medusa.log 2>&1 &
        wait
        tail -n 5 /tmp/eagle.log /tmp/medusa.log
        touch $DONE
    " > $LOG 2>&1 < /dev/null &
    python3 -m paradec train eagle --device cuda --quiet && python3 -m paradec train medusa --device cuda --quiet
    tar cf "$OUT/default_heads.tar" -C src/paradec/assets/default/target heads
    cat src/paradec/assets/default/target/heads/*/card.json | head -c 3000
    echo; echo "--- pipeline so far"; tail -n 20 $LOG
    ;;
b)
    for _ in $(seq 1 110); do [ -f $DONE ] && break; sleep 5; done
    tail -n 30 $LOG
    ls ~/.cache/paradec/zoo/*/target/heads/*/card.json && cat ~/.cache/paradec/zoo/*/target/card.json | head -c 2500
    ;;
c)
    [ -f $DONE ] || { echo "pipeline not done"; tail -n 30 $LOG; }
    python3 -m paradec bench --suite code --per-category 6 --out "$OUT" 2>&1 | tail -n 60
    cp ~/.cache/paradec/zoo/*/target/card.json "$OUT/bench_target_card.json"
    cp ~/.cache/paradec/zoo/*/draft/card.json "$OUT/bench_draft_card.json"
    cp ~/.cache/paradec/zoo/*/target/heads/eagle/card.json "$OUT/bench_eagle_card.json" 2>/dev/null
    cp ~/.cache/paradec/zoo/*/target/heads/medusa/card.json "$OUT/bench_medusa_card.json" 2>/dev/null
    ;;
esac
