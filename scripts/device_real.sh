#!/usr/bin/env bash
# The GPU session behind the committed real-model results (bench/results/real-*): the zoo's real instruct models,
# staged as GGUF chunks (../shared/gpu/chunk.sh), converted with `paradec zoo fetch --gguf`, their drafters trained on
# self-chat data, then `paradec bench` on the chat and code-chat suites. Staging, here: `paradec zoo fetch NAME
# --keep-gguf gguf/` for each model, `scripts/stage_lean.sh on`, `../shared/gpu/chunk.sh gguf/*.gguf`, one `stage`
# call carrying .whl/ alone (a chunk fills what the checkout leaves: with the wheels beside it the call is refused),
# one `stage` call per chunk, `scripts/stage_lean.sh off`, then `start`. An idle machine goes back after 30 s with
# everything on it: issue those calls in one message, start a chain and wait on it in the same command
# (`bash scripts/device_real.sh start-m11; WAIT=500 bash scripts/device_real.sh wait`), and issue the next `wait` at
# once (on 2026-12-03 a chain was lost to a first `wait` that came late; a refused first call left no wheels). Send the
# first call (.whl/ and `start-m11`) alone and the chunks only once it answered: a refused call costs 15 s of device
# time, and 24 calls sent behind a refused first one cost 526 s (2026-12-03). Run
# from the repo root:
#   stage    append the carried chunks (.gpu-chunks/stage.sh), in order, whatever order they came in (a chunk that
#            came early waits in $STAGE/parts); installs the carried .whl/ wheels once: gguf and the serve extra
#            (`pip download -d .whl --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all:
#            gguf fastapi uvicorn`; on 2026-12-04 the machine lacked fastapi and every server bench failed to start)
#   start    start the chain in the background (it waits for the files it needs) and return
#   start-m11  start this session's chain instead (2026-12-03, second session; the 1.5B only): the CUDA-only tests
#            while the 1.5B is staged (start it with the call that carries .whl/), then issue 18's rows (vanilla,
#            pld, suffix at batch 1, 8, 32 and 64 on 72 chat prompts, in one run), pld's batched steps profiled at
#            batch 8, the server under 1, 16 and 32 clients and one at a time, multisample (issue 19), and the
#            runner's rooflines with one step's kernels (issue 17). The chains of earlier sessions are in git
#            (each results folder's NOTES.md names the commit and the part)
#   start-m12  (2026-12-03, third session) what start-m11 measured, again, with the fixes it prompted (the batched
#            references re-timed, warm-up rounds in the load bench, the server warmed up), then the code-chat suite
#            in exact mode for the methods not yet shown exact there, a batch-32 vanilla step's profile, and Qwen's
#            EAGLE-3 head trained and benched alone and at batch 8
#   start-m13  (2026-12-03, fourth session) issue 18's rows and the server under load again, after the fixes to the
#            batched step (no layout copies for chains, step timings shared by an engine's decoders, shadow drafts
#            instead of probes for host drafters), a batch-8 pld step speculating on every step profiled by phase,
#            a batch-32 vanilla step's profile, and multisample
#   start-m14  (2026-12-04) issue 18 after the joining sequences' prompt chunks share one forward (they were fed one
#            sequence at a time): the new CUDA test beside the staging, issue 18's rows at batch 1-64, the server
#            under load in the default and the exact mode, a batch-8 pld and a batch-32 vanilla step profiled, then
#            the CUDA-only tests
#   start-m15  (2026-12-04, second session) what m14 measured, on the code that followed it (a wave of joining
#            prompts shares a forward only when that is cheaper, the warm-up compiles the unbucketed prefill kinds,
#            pld/suffix sequences chosen per speculative step, a new graph bucket met once steps keep asking for it,
#            the server's streaming path made cheap): the prefill CUDA test beside the staging, issue 18's rows at
#            batch 1-64 with 3 repeats (the median), the server under load in the default and the exact mode
#   wait     wait for the chain until WAIT seconds after the call began (default 540, capped at 570), tail its log,
#            and copy what it wrote so far to $OUT, as collect does
#            (a scripts/gpu_next.sh in the tree of a `wait` call replaces the chain once its log shows NEXT_AT,
#            default the multisample bench: the chain is killed and the follow-up runs from a snapshot of that tree;
#            this is how a session measures what it changed while the chain ran. Not committed: one per session)
#   collect  copy what the chain wrote (tar files, logs) to $OUT
#   bench    replace a running chain by its bench part alone (when time runs short; what was trained is kept)
# The chain: the CUDA-only tests beside the conversions; SmolLM2-135M-Instruct's EAGLE then Medusa (the second reuses
# the first's self-chat windows); Qwen2.5-Coder-1.5B-Instruct's EAGLE, then its distilled 0.5B draft and Medusa. Then
# the benches, each alone on the GPU (greedy: both suites, both targets, the 1.5B with the stock and the distilled
# 0.5B draft; then eagle at temperature 1), and `scripts/profile_step.py` on both targets. Settings, in the
# environment:
#   CHAT_PC / CODE_PC         prompts per category of the chat / code-chat suite (default 1 / 2)
#   SMOL_BENCH / QWEN_BENCH   extra `paradec bench` options
#   SMOL_TRAIN / QWEN_TRAIN   extra `paradec train` options for every kind
#   QWEN_METHODS              Qwen's methods before the trained heads (default vanilla,pld,draft)
set -uo pipefail
# The background chain runs from a snapshot of src/: every later device call lays the working tree anew, and a chain
# importing from it mid-copy failed once ("No module named paradec.__main__").
SNAPSHOT=$HOME/paradec/src
export PYTHONUNBUFFERED=1 PYTHONPATH="$HOME/site:$SNAPSHOT"
snapshot() { rm -rf "$HOME/paradec" && mkdir -p "$HOME/paradec" && cp -r src tests scripts pyproject.toml "$HOME/paradec/"; }
STAGE=${STAGE:-$HOME/stage}
LOG=/tmp/paradec-real.log
DONE=/tmp/paradec-real.done
RES=/tmp/paradec-real
export STAGE LOG DONE RES SNAPSHOT
export CHAT_PC=${CHAT_PC:-1} CODE_PC=${CODE_PC:-2}
export SMOL_BENCH=${SMOL_BENCH:-} QWEN_BENCH=${QWEN_BENCH:-} SMOL_TRAIN=${SMOL_TRAIN:-} QWEN_TRAIN=${QWEN_TRAIN:-}
export QWEN_METHODS=${QWEN_METHODS:-vanilla,pld,draft}
export BATCH_METHODS=${BATCH_METHODS:-vanilla,pld,draft}
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
convert() { staged "$1"; pd zoo fetch "$1" --gguf "$STAGE/$1.gguf" --quiet; }
train() {  # $1: model, $2: kind, then `paradec train` options; its log goes to $RES/<model>-<kind>.log
    local model=$1 kind=$2
    shift 2
    echo "TRAIN $model $kind $(date +%T)"
    pd train "$kind" --model "$model" --device cuda --quiet "$@" > "$RES/$model-$kind.log" 2>&1 \
        || echo "train $model $kind exit $?"
    tail -n 2 "$RES/$model-$kind.log"
}
bench() {  # $1: model, $2: suite, $3: name of the results folder, then `paradec bench` options
    local model=$1 suite=$2 name=$3
    shift 3
    echo "BENCH $model $suite $name $(date +%T)"
    pd bench --suite "$suite" --model "$model" --per-category "$(per_category "$suite")" --peers none \
        --out "$RES/$name" --quiet "$@" || echo "bench exit $?"
}

tests() {  # the CUDA-only tests (skipped on CPU); beside the conversions, before anything is timed
    set +e
    echo "TESTS $(date +%T)"
    # -o addopts=: the project's pytest options name pytest-timeout, which the GPU machine lacks
    (cd "$SNAPSHOT/.." && python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_eagle_cuda.py \
        tests/test_draft_chain.py > $RES/cuda-tests.log 2>&1)
    echo "TESTS exit $? $(date +%T): $(tail -n 1 $RES/cuda-tests.log)"
}

train_part() {  # both targets' drafters on self-chat data; the second kind of a target reuses the first's windows
    set -e
    mkdir -p $RES
    convert $SMOL
    # the packaged head must fit the repo's weight budget: the full vocabulary (the target's LM head), MLP 768
    (train $SMOL eagle --intermediate-size 768 --draft-vocab 0 $SMOL_TRAIN; train $SMOL medusa $SMOL_TRAIN) &
    local small large
    convert $Q05 & small=$!
    convert $Q15 & large=$!
    wait $small
    wait $large
    train $Q15 eagle $QWEN_TRAIN
    # the distillation holds the 0.5B, its optimizer state and the windows' features: beside two other trainings it
    # ran out of the H200's memory (2026-12-01), so it trains alone, first
    train $Q15 draft $QWEN_TRAIN
    train $Q15 medusa $QWEN_TRAIN &
    train $Q15 pard $QWEN_TRAIN &
    wait
    tar cf $RES/smol-heads.tar --exclude=data-cache -C "$HOME/.cache/paradec/models" $SMOL/heads || true
    tar cf $RES/q15-cards.tar --exclude=data-cache --exclude='*.safetensors' -C "$HOME/.cache/paradec/models" \
        $Q15/heads || true
}

bench_part() {  # every bench alone on the GPU, in the order the results matter
    set -e
    local suite smol_methods qwen_methods distilled=$HOME/.cache/paradec/models/$Q15/heads/draft
    local pard=$HOME/.cache/paradec/models/$Q15/heads/pard
    smol_methods=$(with_heads $SMOL vanilla,pld)
    qwen_methods=$(with_heads $Q15 "$QWEN_METHODS")
    for suite in chat code-chat; do
        bench $Q15 $suite q15-$suite --draft $Q05 --methods "$qwen_methods" $QWEN_BENCH
    done
    for suite in chat code-chat; do
        bench $SMOL $suite smol-$suite --methods "$smol_methods" $SMOL_BENCH
    done
    for suite in chat code-chat; do
        [ -f $distilled/config.json ] && bench $Q15 $suite q15-$suite-distilled --draft $distilled \
            --methods vanilla,draft $QWEN_BENCH
    done
    for suite in chat code-chat; do
        bench $Q15 $suite q15-$suite-sample --mode sample --temperature 1 --draft $Q05 --methods vanilla,eagle \
            $QWEN_BENCH
        bench $SMOL $suite smol-$suite-sample --mode sample --temperature 1 --methods vanilla,eagle $SMOL_BENCH
    done
    CODE_PC=2 bench $Q15 agentic q15-agentic --draft $Q05 --methods vanilla,pld,suffix $QWEN_BENCH
    [ -f $pard/config.json ] && bench $Q15 code-chat q15-code-chat-pard --draft $pard --methods vanilla,pard \
        $QWEN_BENCH
    echo "PROFILE $(date +%T)"
    python3 "$SNAPSHOT/../scripts/profile_step.py" --model $Q15 --draft $Q05 --out $RES/profile-q15 --config vanilla \
        --config eagle --config draft:k=5 --config draft:k=5,one_graph=false > $RES/profile-q15.log 2>&1 || true
    python3 "$SNAPSHOT/../scripts/profile_step.py" --model $SMOL --out $RES/profile-smol --config vanilla --config eagle \
        --config eagle:depth=4,nodes=24 --config eagle:depth=5,nodes=32,topk=6 > $RES/profile-smol.log 2>&1 || true
    echo "BENCHES DONE $(date +%T)"
}
chain() { (tests &) ; train_part && bench_part && echo "DONE $(date +%T)"; }
# the pieces of the session chains
exact_tests() {  # the CUDA-only tests but the slowest three (~5 min of graph captures: EXACT_TESTS=all runs them)
    local skip=(-k "not every_method_equals and not (batched_graphs_equal and qwen2)")
    [ "${EXACT_TESTS:-}" = all ] && skip=()
    echo "CUDA TESTS $(date +%T)"
    (cd "$SNAPSHOT/.." && python3 -m pytest -q -o addopts="" -p no:cacheprovider -p no:logging --durations=10 \
        tests/test_exact_cuda.py tests/test_eagle_cuda.py tests/test_draft_chain.py "${skip[@]}" \
        > $RES/exact-tests.log 2>&1) || echo "exact tests exit $?"
    tail -n 3 $RES/exact-tests.log
}
samples_bench() {  # $1: name suffix, then options: multisample at n = 8 against n = 8 vanilla
    local name=$1
    shift
    bench $Q15 samples q15-samples$name --per-category 2 --samples 8 --methods vanilla,multisample "$@" $QWEN_BENCH
}
load_benches() {  # $1: prompts per category; the server under 1, 16 and 32 clients, then one at a time at 32
    echo "LOAD $(date +%T)"
    pd bench --suite chat --per-category "$1" --model $Q15 --methods vanilla,pld --concurrency 1,16,32 \
        --out $RES/q15-load --quiet || echo "load exit $?"
    pd bench --suite chat --per-category "$1" --model $Q15 --methods vanilla --concurrency 32 --server-batch 1 \
        --out $RES/q15-load-serial --quiet || echo "load exit $?"
}
batch_profile() {  # $1: batch size, $2: method, $3: --exact on|off|both, $4: --speculate (default auto)
    echo "PROFILE BATCH $* $(date +%T)"
    local name=profile-batch-$2-$1${4:+-$4}
    python3 "$SNAPSHOT/../scripts/profile_batch.py" --model $Q15 --batch "$1" --method "$2" --exact "$3" \
        --speculate "${4:-auto}" --out $RES/$name > $RES/$name.log 2>&1 || echo "profile exit $?"
}
runner_profile() {  # issue 17: the rooflines of the fastest and the exact paths, and one decode step's kernels
    echo "RUNNER $(date +%T)"
    (cd "$SNAPSHOT/.." && python3 scripts/bench_runner.py --shapes smol,q15,8b --hf "" --profile \
        --native graphs+compile,graphs+compile+exact --out $RES/runner > $RES/runner.log 2>&1) \
        || echo "runner exit $?"
}

q15_batch_rows() {  # the 1.5B converted beside the CUDA-only tests, then issue 18's rows on 72 chat prompts
    mkdir -p $RES
    convert $Q15 &  # waits for the staged file
    exact_tests  # while the 1.5B is staged and converted
    wait
    CHAT_PC=6 bench $Q15 chat q15-batch --methods vanilla,pld,suffix --batch-sizes 1,8,32,64 $QWEN_BENCH
}

m11_part() {  # 2026-12-03, second session: see the usage above
    set -e
    q15_batch_rows
    batch_profile 8 pld off
    load_benches 2
    samples_bench "" --mode sample --temperature 0.7
    runner_profile
    echo "M11 DONE $(date +%T)"
}

m12_part() {  # 2026-12-03, third session: see the usage above
    set -e
    q15_batch_rows
    load_benches 2
    samples_bench "" --mode sample --temperature 0.7
    bench $Q15 code-chat q15-code-chat-exact --exact --methods vanilla,pld,lookahead,jacobi,layerskip,suffix \
        $QWEN_BENCH
    batch_profile 32 vanilla off
    train $Q15 eagle $QWEN_TRAIN
    local methods
    methods=$(with_heads $Q15 vanilla,pld)
    bench $Q15 chat q15-chat-eagle --methods "$methods" --batch-sizes 1,8 $QWEN_BENCH
    echo "M12 DONE $(date +%T)"
}

m13_part() {  # 2026-12-03, fourth session: see the usage above
    set -e
    q15_batch_rows
    load_benches 2
    batch_profile 8 pld off always
    batch_profile 32 vanilla off
    samples_bench "" --mode sample --temperature 0.7
    echo "M13 DONE $(date +%T)"
}

m13b_part() {  # the same session's second machine (the first was taken back mid-chain): batch 8-64 rows, the load
    set -e
    mkdir -p $RES
    convert $Q15
    CHAT_PC=6 bench $Q15 chat q15-batch --methods vanilla,pld,suffix --batch-sizes 8,32,64 $QWEN_BENCH
    load_benches 2
    echo "M13B DONE $(date +%T)"
}

prefill_tests() {  # the 1.5B converted beside the CUDA test of prompts prefilled together
    mkdir -p $RES
    convert $Q15 &  # waits for the staged file
    echo "PREFILL TESTS $(date +%T)"
    (cd "$SNAPSHOT/.." && python3 -m pytest -q -o addopts="" -p no:cacheprovider -p no:logging \
        tests/test_exact_cuda.py -k "prefilled_together" > $RES/prefill-tests.log 2>&1) || echo "prefill tests exit $?"
    tail -n 2 $RES/prefill-tests.log
    wait
}
load_exact() {
    echo "LOAD EXACT $(date +%T)"
    pd bench --suite chat --per-category 2 --model $Q15 --methods vanilla,pld --concurrency 1,16,32 --exact \
        --out $RES/q15-load-exact --quiet || echo "load exit $?"
}

m14_part() {  # 2026-12-04: see the usage above
    set -e
    prefill_tests
    CHAT_PC=6 bench $Q15 chat q15-batch --methods vanilla,pld,suffix --batch-sizes 1,8,32,64 $QWEN_BENCH
    load_benches 2
    load_exact
    batch_profile 8 pld off always
    batch_profile 32 vanilla off
    exact_tests
    echo "M14 DONE $(date +%T)"
}

m15_part() {  # 2026-12-04, second session: see the usage above
    set -e
    prefill_tests
    CHAT_PC=6 bench $Q15 chat q15-batch --methods vanilla,pld,suffix --batch-sizes 1,8,32,64 --repeats 3 $QWEN_BENCH
    load_benches 2
    load_exact
    echo "M15 DONE $(date +%T)"
}

launch() {  # $1: the function to run in the background; its exit status goes to $DONE
    export -f pd with_heads per_category staged convert train bench tests train_part bench_part chain \
        exact_tests samples_bench load_benches batch_profile runner_profile q15_batch_rows m11_part m12_part \
        m13_part m13b_part m14_part prefill_tests load_exact m15_part
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
    # chunks may come out of order (a refused call, resent later): each one waits in $STAGE/parts until the ones
    # before it are appended; stage.sh appends, in order, every chunk in .gpu-chunks
    mkdir -p "$STAGE/parts" .gpu-chunks
    for c in .gpu-chunks/*.[0-9][0-9][0-9]; do
        [ -f "$c" ] && [ ! -f "$STAGE/$(basename "$c").done" ] && cp "$c" "$STAGE/parts/"
    done
    cp .gpu-chunks/*.manifest "$STAGE/parts/" 2>/dev/null
    for c in "$STAGE"/parts/*; do
        [ -f "$c" ] && [ ! -e ".gpu-chunks/$(basename "$c")" ] && ln -s "$c" .gpu-chunks/
    done
    bash .gpu-chunks/stage.sh
    for c in "$STAGE"/parts/*.[0-9][0-9][0-9]; do [ -f "$STAGE/$(basename "$c").done" ] && rm -f "$c"; done
    ;;
start|start-m11|start-m12|start-m13|start-m13b|start-m14|start-m15)
    declare -A PART=([start]=chain [start-m11]=m11_part [start-m12]=m12_part [start-m13]=m13_part [start-m13b]=m13b_part
        [start-m14]=m14_part [start-m15]=m15_part)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    launch "${PART[$1]}"
    sleep 20
    tail -n 5 $LOG
    ;;
wait|collect)  # both copy what the chain has written so far to $OUT: a machine that goes back loses nothing collected
    # a follow-up (scripts/gpu_next.sh in the tree of this call) replaces the chain once it reached NEXT_AT; a
    # later call hands the running follow-up this tree's profiler script
    [ -f "$HOME/next.started" ] && [ -d "$HOME/paradec-next/scripts" ] && cp scripts/profile_batch.py "$HOME/paradec-next/scripts/"
    if [ -f scripts/gpu_next.sh ] && [ ! -f "$HOME/next.started" ]; then
        until grep -q "${NEXT_AT:-BENCH qwen2.5-coder-1.5b-instruct samples}" $LOG 2>/dev/null || [ -f $DONE ] \
            || [ "$SECONDS" -gt "${WAIT:-540}" ]; do sleep 2; done
        if grep -q "${NEXT_AT:-BENCH qwen2.5-coder-1.5b-instruct samples}" $LOG || [ -f $DONE ]; then
            touch "$HOME/next.started"
            pkill -f "bash -c m[0-9]*_part"; pkill -f "python3 -m paradec"; sleep 2
            rm -f $DONE
            rm -rf "$HOME/paradec-next" && mkdir -p "$HOME/paradec-next" && cp -r src scripts "$HOME/paradec-next/"
            echo "NEXT $(date +%T)" >> $LOG
            (cd "$HOME/paradec-next" && setsid nohup bash scripts/gpu_next.sh >> $LOG 2>&1 < /dev/null; echo $? > $DONE) &
        fi
    fi
    if [ "$1" = wait ]; then wait_chain "${WAIT:-540}"; else wait_chain "${WAIT:-60}"; fi
    cp $LOG "$OUT/chain.log"
    tar cf "$OUT/results.tar" -C $RES --exclude='*.tar' . 2>/dev/null
    cp $RES/*.tar "$OUT"/ 2>/dev/null
    ls -la "$OUT"
    ;;
bench)
    pkill -f "bash -c chain"; pkill -f "paradec train"; sleep 2
    launch bench_part
    sleep 5
    tail -n 3 $LOG
    ;;
*)
    echo "usage: $0 stage|start|start-m11|start-m12|start-m13|start-m13b|start-m14|start-m15|wait|collect|bench" >&2
    exit 2
    ;;
esac
