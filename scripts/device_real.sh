#!/usr/bin/env bash
# The GPU session behind the committed real-model results (bench/results/real-*): the zoo's real instruct models,
# staged as GGUF chunks (../shared/gpu/chunk.sh), converted with `paradec zoo fetch --gguf`, their heads trained on
# chat data, then `paradec bench` on the chat and code-chat suites with the HF peers. Run from the repo root there:
#   stage    append the carried chunks (.gpu-chunks/stage.sh); installs the carried .whl/ wheels (gguf) once
#   start    start the chain in the background (it waits for the files it needs) and return
#   wait     wait for the chain until WAIT seconds after the call began (default 540, capped at 570), tail its log
#   collect  copy what the chain wrote (tar files, logs) to $OUT
#   qwen     replace a running chain by its Qwen part alone (when time runs short: e.g. QWEN_TRAIN="--self-distill
#            768 --steps 600" QWEN_METHODS=vanilla,pld,lookahead,draft,medusa,eagle); the Qwen files must be converted
# The chain: smollm2 -> convert, train eagle + medusa (chat data), bench chat + code-chat; then the Qwen pair ->
# convert, train eagle + medusa for the 1.5B, bench chat + code-chat with the 0.5B as draft. Each bench is timed
# alone on the GPU (no training or conversion runs beside it). Settings travel in the environment:
#   CHAT_PC / CODE_PC         prompts per category of the chat / code-chat suite (default 1 / 2)
#   SMOL_BENCH / QWEN_BENCH   extra `paradec bench` options
#   SMOL_PEERS / QWEN_PEERS   HF peers (default hf-vanilla,hf-pld / hf-vanilla,hf-assisted)
#   SMOL_TRAIN / QWEN_TRAIN   extra `paradec train` options for both kinds
#   QWEN_METHODS              Qwen's methods before the trained ones (default vanilla,pld,lookahead,jacobi,layerskip,draft)
set -uo pipefail
# The background chain runs from a snapshot of src/: every later device call lays the working tree anew, and a chain
# importing from it mid-copy failed once ("No module named paradec.__main__").
SNAPSHOT=$HOME/paradec-src
export PYTHONUNBUFFERED=1 PYTHONPATH="$HOME/site:$SNAPSHOT"
snapshot() { rm -rf "$SNAPSHOT" && cp -r src "$SNAPSHOT"; }
STAGE=${STAGE:-$HOME/stage}
LOG=/tmp/paradec-real.log
DONE=/tmp/paradec-real.done
RES=/tmp/paradec-real
export STAGE LOG DONE RES
export CHAT_PC=${CHAT_PC:-1} CODE_PC=${CODE_PC:-2}
export SMOL_PEERS=${SMOL_PEERS:-hf-vanilla,hf-pld} QWEN_PEERS=${QWEN_PEERS:-hf-vanilla,hf-assisted}
export SMOL_BENCH=${SMOL_BENCH:-} QWEN_BENCH=${QWEN_BENCH:-} SMOL_TRAIN=${SMOL_TRAIN:-} QWEN_TRAIN=${QWEN_TRAIN:-}
export QWEN_METHODS=${QWEN_METHODS:-vanilla,pld,lookahead,jacobi,layerskip,draft}
SMOL=smollm2-135m-instruct
Q15=qwen2.5-coder-1.5b-instruct
Q05=qwen2.5-coder-0.5b-instruct
export SMOL Q15 Q05

wait_chain() {  # $1: seconds since the call began, at most (capped at 570)
    local until=$(($1 < 570 ? $1 : 570))
    while [ ! -f $DONE ] && [ "$SECONDS" -lt "$until" ]; do sleep 3; done
    tail -n 30 $LOG
}

# The chain's parts, each run in the background by `bash -c NAME` (logging to $LOG, `set -e` inside).
pd() { python3 -m paradec "$@"; }
with_heads() {  # $1: model name, $2: methods; medusa/eagle only where their training wrote heads
    local methods=$2 kind
    for kind in medusa eagle; do
        [ -f "$HOME/.cache/paradec/models/$1/heads/$kind/config.json" ] && methods="$methods,$kind"
    done
    echo "$methods"
}
per_category() { if [ "$1" = chat ]; then echo "$CHAT_PC"; else echo "$CODE_PC"; fi; }
staged() { while [ ! -f "$STAGE/$1.gguf.ok" ]; do sleep 2; done; }

smol_part() {  # SmolLM2-135M-Instruct, the default model
    set -e
    mkdir -p $RES
    staged $SMOL
    echo "CONVERT $SMOL $(date +%T)"
    pd zoo fetch $SMOL --gguf "$STAGE/$SMOL.gguf" --quiet
    echo "TRAIN $SMOL $(date +%T)"
    pd train eagle --model $SMOL --data chat --device cuda --quiet --intermediate-size 768 $SMOL_TRAIN \
        > $RES/smol-eagle.log 2>&1 &
    pd train medusa --model $SMOL --data chat --device cuda --quiet $SMOL_TRAIN > $RES/smol-medusa.log 2>&1 &
    wait
    tail -n 2 $RES/smol-eagle.log $RES/smol-medusa.log
    tar cf $RES/smol-heads.tar -C "$HOME/.cache/paradec/models/$SMOL" heads || true
    for suite in chat code-chat; do
        echo "BENCH $SMOL $suite $(date +%T)"
        pd bench --suite $suite --model $SMOL --methods "$(with_heads $SMOL vanilla,pld,lookahead,jacobi,layerskip)" \
            --per-category "$(per_category $suite)" --peers $SMOL_PEERS $SMOL_BENCH --out $RES/smol-$suite --quiet \
            || echo "bench exit $?"
    done
}

qwen_part() {  # Qwen2.5-Coder-1.5B-Instruct with the 0.5B as draft
    set -e
    mkdir -p $RES
    staged $Q05
    staged $Q15
    echo "CONVERT qwen $(date +%T)"
    pd zoo fetch $Q05 --gguf "$STAGE/$Q05.gguf" --quiet &
    pd zoo fetch $Q15 --gguf "$STAGE/$Q15.gguf" --quiet &
    wait
    echo "TRAIN $Q15 $(date +%T) $QWEN_TRAIN"
    pd train eagle --model $Q15 --data chat --device cuda --quiet $QWEN_TRAIN > $RES/q15-eagle.log 2>&1 &
    pd train medusa --model $Q15 --data chat --device cuda --quiet $QWEN_TRAIN > $RES/q15-medusa.log 2>&1 &
    wait
    tail -n 2 $RES/q15-eagle.log $RES/q15-medusa.log
    for suite in chat code-chat; do
        echo "BENCH $Q15 $suite $(date +%T)"
        pd bench --suite $suite --model $Q15 --draft $Q05 --methods "$(with_heads $Q15 "$QWEN_METHODS")" \
            --per-category "$(per_category $suite)" --peers $QWEN_PEERS $QWEN_BENCH --out $RES/q15-$suite --quiet \
            || echo "bench exit $?"
    done
}

chain() { smol_part && qwen_part && echo "DONE $(date +%T)"; }

launch() {  # $1: the function to run in the background; its exit status goes to $DONE
    export -f pd with_heads per_category staged smol_part qwen_part chain
    snapshot
    rm -f $DONE
    # its own bash, so that `set -e` ends the part alone
    setsid nohup bash -c "bash -c $1; echo \$? > $DONE" > $LOG 2>&1 < /dev/null &
}

case "${1:-}" in
stage)
    if [ -d .whl ] && [ ! -d "$HOME/site/gguf" ]; then
        pip install -q --no-index --no-deps --target "$HOME/site" .whl/*.whl 2>&1 | tail -n 2
    fi
    bash .gpu-chunks/stage.sh
    ;;
start)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    launch chain
    sleep 20
    tail -n 5 $LOG
    ;;
wait)
    wait_chain "${WAIT:-540}"
    ;;
collect)
    wait_chain "${WAIT:-60}"
    cp $LOG "$OUT/chain.log"
    tar cf "$OUT/results.tar" -C $RES --exclude='*.tar' . 2>/dev/null
    cp $RES/*.tar "$OUT"/ 2>/dev/null
    ls -la "$OUT"
    ;;
qwen)
    pkill -f "bash -c chain"; pkill -f "paradec train"; sleep 2
    launch qwen_part
    sleep 5
    tail -n 3 $LOG
    ;;
*)
    echo "usage: $0 stage|start|wait|collect|qwen" >&2
    exit 2
    ;;
esac
