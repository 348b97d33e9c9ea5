#!/usr/bin/env bash
# The GPU session that produces the committed benchmark results, as calls on one warm machine (issue each call as
# soon as the previous one returns: an idle machine goes back after 30 s):
#   pipeline  in the background: build the zoo's bench pair, then train its EAGLE and Medusa heads; in the
#             foreground: the CUDA-only tests, then wait for the pipeline (up to ~9 minutes)
#   bench     wait for the pipeline if needed, then `paradec bench --suite code` with every method and the HF peers
#             (BENCH_ARGS adds options, e.g. "--methods vanilla,eagle --peers none"; EAGLE_ONLY=1 skips Medusa's training;
#             EXTRA_ARGS runs a second bench after it, e.g. "--methods vanilla,eagle --opt eagle.depth=8 --peers none",
#             whose table goes to stdout)
#   heads     train the embedded default model's heads (copied back as default_heads.tar)
# Usage (repo root, on the device): bash scripts/device_session.sh pipeline|bench|heads   (results under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src
LOG=/tmp/paradec-pipeline.log
DONE=/tmp/paradec-pipeline.done
PER_CATEGORY=${PER_CATEGORY:-5}

wait_pipeline() {  # $1: seconds at most
    local waited=0
    while [ ! -f $DONE ] && [ "$waited" -lt "$1" ]; do sleep 5; waited=$((waited + 5)); done
    tail -n 12 $LOG
}

case "$1" in
pipeline)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    setsid nohup bash -c "
        set -e
        T=\$(python3 -c 'from paradec.zoo.build import ensure_bench_pair; print(ensure_bench_pair(progress=False)[0])' | tail -n 1)
        echo TARGET \$T
        python3 -m paradec train eagle --model \$T --device cuda --quiet --self-distill 1024 > /tmp/eagle.log 2>&1 &
        [ -n \"\${EAGLE_ONLY:-}\" ] || python3 -m paradec train medusa --model \$T --device cuda --quiet > /tmp/medusa.log 2>&1 &
        wait
        touch $DONE
        tail -n 5 /tmp/eagle.log /tmp/medusa.log 2>/dev/null || true  # no medusa.log with EAGLE_ONLY
    " > $LOG 2>&1 < /dev/null &
    python3 -m pytest -q -p no:cacheprovider tests/test_eagle_cuda.py tests/test_native_runner.py 2>&1 | tail -n 5
    wait_pipeline "${WAIT:-480}"
    ;;
bench)
    wait_pipeline 300
    [ -f $DONE ] || { echo "pipeline not done"; exit 1; }
    python3 -m paradec bench --suite code --per-category "$PER_CATEGORY" ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tail -n 70
    if [ -n "${EXTRA_ARGS:-}" ]; then  # a second run on the same pair (e.g. another option); its table on stdout only
        python3 -m paradec bench --suite code --per-category "$PER_CATEGORY" $EXTRA_ARGS --out /tmp/extra --quiet
        cat /tmp/extra/results.md
    fi
    for f in ~/.cache/paradec/zoo/*/target/card.json; do cp "$f" "$OUT/bench_target_card.json"; done
    for f in ~/.cache/paradec/zoo/*/draft/card.json; do cp "$f" "$OUT/bench_draft_card.json"; done
    for kind in eagle medusa; do
        for f in ~/.cache/paradec/zoo/*/target/heads/$kind/card.json; do cp "$f" "$OUT/bench_${kind}_card.json"; done
    done
    ;;
heads)
    python3 -m paradec train eagle --device cuda --quiet && python3 -m paradec train medusa --device cuda --quiet
    tar cf "$OUT/default_heads.tar" -C src/paradec/assets/default/target heads
    cat src/paradec/assets/default/target/heads/*/card.json | head -c 3000
    ;;
*)
    echo "usage: $0 pipeline|bench|heads" >&2
    exit 2
    ;;
esac
