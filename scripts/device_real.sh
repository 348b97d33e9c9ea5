#!/usr/bin/env bash
# The GPU session behind the committed real-model results (bench/results/real-*): the zoo's real instruct models,
# staged as GGUF chunks (../shared/gpu/chunk.sh), converted with `paradec zoo fetch --gguf`, their drafters trained on
# self-chat data, then `paradec bench` on the chat and code-chat suites. Staging, here: `paradec zoo fetch NAME
# --keep-gguf gguf/` for each model, `scripts/stage_lean.sh on`, `../shared/gpu/chunk.sh gguf/*.gguf`, one `stage`
# call carrying .whl/ alone (a chunk fills what the checkout leaves: with the wheels beside it the call is refused),
# one `stage` call per chunk, `scripts/stage_lean.sh off`, then `start`. An idle machine goes back after 30 s with
# everything on it: issue those calls in one message, start a chain and wait on it in the same command
# (`bash scripts/device_real.sh start-m10; WAIT=500 bash scripts/device_real.sh wait`), and issue the next `wait` at
# once (on 2026-12-03 a chain was lost to a first `wait` that came late; a refused first call left no wheels). Run
# from the repo root:
#   stage    append the carried chunks (.gpu-chunks/stage.sh), in order, whatever order they came in (a chunk that
#            came early waits in $STAGE/parts); installs the carried .whl/ wheels (gguf) once
#   start    start the chain in the background (it waits for the files it needs) and return
#   start-new  start the new methods' chain instead (the Qwen pair only: `suffix` on the agentic and chat suites,
#            `pard` trained from the 0.5B, on code-chat and chat)
#   start-batch  start the batching chain instead (the Qwen pair only: batched bench at 1..64, the server under load
#            from 1, 16 and 32 clients, and the one-at-a-time server at 32; the .whl/ folder must carry fastapi,
#            uvicorn, pydantic and their dependencies for the server: pip download --only-binary=:all:
#            --python-version 3.12 --platform manylinux2014_x86_64 -d .whl fastapi uvicorn pydantic)
#   start-m2 start-batch's chain, then start-new's, in one background chain (the CUDA-only tests beside them)
#   start-exact  start the exact-mode chain instead (issue 17), most wanted first: tests/test_exact_cuda.py, the
#            batched bench at 1, 8, 32 (issue 18), `paradec bench --exact` on both targets and both suites
#            (vanilla, pld, draft for the 1.5B; vanilla, pld, lookahead, eagle, medusa for SmolLM2),
#            scripts/bench_runner.py with and without the exact kernels on the SmolLM2, Qwen-1.5B and 8B shapes,
#            the exact batched bench, suffix on the agentic and chat suites (issue 19), scripts/probe_exact.py
#   start-m3 start issue 19's chain, then start-exact's benches: PARD trained from the 0.5B beside the CUDA tests;
#            suffix on the agentic and chat suites; multisample at n = 8 (suite `samples`, temperature 0.7);
#            pard and draft (the stock 0.5B) on code-chat; start-exact's benches; pard and draft on chat; the probe
#   start-m5 the third 2026-12-02 session (bench/results/m5-h200-2026-12-02): Qwen's EAGLE and PARD trained beside
#            the CUDA tests; suffix on agentic and chat; multisample at n = 8; pard vs draft on code-chat; every
#            method exact on both targets' chat; multisample exact; pard on chat; the batched profile, the runner
#   start-m6 the next session: PARD (parallel layout) and EAGLE trained beside the CUDA tests; suffix with the
#            replayed defaults, first turns and every turn of agentic; pard vs draft on code-chat; Qwen's EAGLE on code-chat and at temperature 1;
#            multisample; the batched profile and bench at 1, 8, 32; the batch policy's depth cuts
#            (scripts/bench_policy.py); the runner; pard vs draft on chat
#   start-m7 the fourth 2026-12-02 session: PARD trained alone; the batched step's host profile at 32; suffix on
#            agentic (first turns and every turn) and chat; pard vs draft on code-chat; multisample; the batched bench
#            at 1, 8, 32; the batch policy's depth cuts; the CUDA-only tests; pard vs draft on chat
#   start-m8 the next session: Qwen's EAGLE trained beside the CUDA-only tests; vanilla alone and vanilla, pld,
#            suffix, draft, eagle at batch 8, 32, 64 on 72 chat prompts (each row's steps by kind), the batched profile
#            (decode steps only), the server under 1, 16, 32 clients and one at a time, the batch policy's choices,
#            multisample, the exact batched bench
#   start-m9 2026-12-03: start-m8 without Qwen's EAGLE training (the issue 18 rows, load, policy, profile,
#            multisample, exact batched bench), after the CUDA-only tests
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
m2_chain() { (tests &) ; batch_part; new_methods_part && echo "DONE $(date +%T)"; }

new_methods_part() {  # suffix on the agentic suite, and PARD (adapted 0.5B) against the 0.5B draft, on the Qwen pair
    set -e
    mkdir -p $RES
    local small large pard=$HOME/.cache/paradec/models/$Q15/heads/pard
    convert $Q05 & small=$!
    convert $Q15 & large=$!
    wait $small
    wait $large
    [ -f $pard/config.json ] || train $Q15 pard $QWEN_TRAIN
    CODE_PC=8 bench $Q15 agentic q15-agentic --draft $Q05 --methods vanilla,pld,suffix $QWEN_BENCH
    bench $Q15 chat q15-chat-suffix --draft $Q05 --methods vanilla,pld,suffix $QWEN_BENCH
    for suite in code-chat chat; do
        bench $Q15 $suite q15-$suite-pard --draft $pard --methods vanilla,pard $QWEN_BENCH
    done
    tar cf $RES/pard.tar --exclude='*.safetensors' -C "$HOME/.cache/paradec/models/$Q15/heads" pard || true
}

batch_part() {  # batched decoding and the batched server on the Qwen pair (needs only the Qwen files)
    set -e
    mkdir -p $RES
    local small large
    convert $Q05 & small=$!
    convert $Q15 & large=$!
    wait $small
    wait $large
    echo "BATCH TESTS $(date +%T)"
    (cd "$SNAPSHOT/.." && python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_batch.py tests/test_batch_runner.py \
        > $RES/batch-tests.log 2>&1) || echo "batch tests exit $?"
    tail -n 1 $RES/batch-tests.log
    CHAT_PC=2 bench $Q15 chat q15-batch-small --draft $Q05 --methods "$BATCH_METHODS" --batch-sizes 1,4,8 $QWEN_BENCH
    CHAT_PC=8 bench $Q15 chat q15-batch-large --draft $Q05 --methods vanilla,pld,draft --batch-sizes 16,32,64 \
        --warmup 0 $QWEN_BENCH
    echo "LOAD $(date +%T)"
    pd bench --suite chat --per-category 4 --model $Q15 --draft $Q05 --methods vanilla,pld --concurrency 1,16,32 \
        --out $RES/q15-load --quiet || echo "load exit $?"
    pd bench --suite chat --per-category 4 --model $Q15 --draft $Q05 --methods vanilla --concurrency 32 \
        --server-batch 1 --out $RES/q15-load-serial --quiet || echo "load exit $?"
}

exact_part() {  # issue 17's exactness and cost, issue 18's batched graphs, issue 19's suffix: the most wanted first
    set -e
    mkdir -p $RES
    prepare_exact
    exact_tests
    wait
    exact_benches
    CODE_PC=2 bench $Q15 agentic q15-agentic $DRAFT --methods vanilla,pld,suffix $QWEN_BENCH
    bench $Q15 chat q15-chat-suffix --methods vanilla,suffix $QWEN_BENCH
    exact_probe
}

prepare_exact() {  # the three models converted (the 1.5B in the background: `wait` for it); DRAFT, METHODS set
    DRAFT="--draft $Q05" METHODS=vanilla,pld,draft SMOL_METHODS=vanilla,pld,lookahead,eagle,medusa
    if [ -f "$STAGE/$Q05.gguf.ok" ]; then convert $Q05; else DRAFT="" METHODS=vanilla,pld; echo "no $Q05: no draft"; fi
    convert $Q15 &
    convert $SMOL
}

exact_tests() {
    echo "CUDA TESTS $(date +%T)"
    (cd "$SNAPSHOT/.." && python3 -m pytest -q -o addopts="" -p no:cacheprovider -p no:logging --durations=15 \
        tests/test_exact_cuda.py tests/test_eagle_cuda.py \
        > $RES/exact-tests.log 2>&1) || echo "exact tests exit $?"
    tail -n 3 $RES/exact-tests.log
}

exact_benches() {  # after prepare_exact
    CHAT_PC=2 bench $Q15 chat q15-batch $DRAFT --methods vanilla,pld --batch-sizes 1,8,32 $QWEN_BENCH
    bench $SMOL chat smol-chat--exact --methods $SMOL_METHODS --exact $SMOL_BENCH
    bench $Q15 chat q15-chat--exact $DRAFT --methods $METHODS --exact $QWEN_BENCH
    echo "RUNNER $(date +%T)"
    (cd "$SNAPSHOT/.." && python3 scripts/bench_runner.py --shapes smol,q15,8b --hf "" \
        --native graphs+compile,graphs+compile+exact,graphs+exact,graphs+exact-unfused --out $RES/runner > $RES/runner.log 2>&1) \
        || echo "runner exit $?"
    tail -n 12 $RES/runner.log
    bench $SMOL code-chat smol-code-chat--exact --methods $SMOL_METHODS --exact $SMOL_BENCH
    bench $Q15 code-chat q15-code-chat--exact $DRAFT --methods $METHODS --exact $QWEN_BENCH
    CHAT_PC=2 bench $Q15 chat q15-batch-exact $DRAFT --methods vanilla,pld --batch-sizes 8,32 --exact $QWEN_BENCH
}

exact_probe() {
    (cd "$SNAPSHOT/.." && python3 scripts/probe_exact.py --out $RES/probe > $RES/probe.log 2>&1) || echo "probe exit $?"
}

m3_part() {  # issue 19's three methods first (PARD trained beside the CUDA tests), then exact_part's benches
    set -e
    mkdir -p $RES
    local pard=$HOME/.cache/paradec/models/$Q15/heads/pard
    prepare_exact
    wait
    (train $Q15 pard $QWEN_TRAIN; tar cf $RES/pard.tar --exclude='*.safetensors' -C "$(dirname $pard)" pard || true) &
    exact_tests
    wait
    CODE_PC=2 bench $Q15 agentic q15-agentic $DRAFT --methods vanilla,pld,suffix $QWEN_BENCH
    bench $Q15 chat q15-chat-suffix --methods vanilla,pld,suffix $QWEN_BENCH
    bench $Q15 samples q15-samples --per-category 2 --samples 8 --mode sample --temperature 0.7 \
        --methods vanilla,multisample $QWEN_BENCH
    if [ -f $pard/config.json ]; then
        bench $Q15 code-chat q15-code-chat-pard --draft $pard --methods vanilla,pard $QWEN_BENCH
        bench $Q15 code-chat q15-code-chat-draft $DRAFT --methods vanilla,draft $QWEN_BENCH
    fi
    exact_benches
    if [ -f $pard/config.json ]; then
        bench $Q15 chat q15-chat-pard --draft $pard --methods vanilla,pard $QWEN_BENCH
        bench $Q15 chat q15-chat-draft $DRAFT --methods vanilla,draft $QWEN_BENCH
    fi
    exact_probe
}

# the pieces of the chains below
train_q15_beside_tests() {  # $@: the kinds to train for the 1.5B, all at once, beside the CUDA tests
    local kind
    for kind in "$@"; do train $Q15 $kind $QWEN_TRAIN & done
    exact_tests
    wait
    tar cf $RES/q15-cards.tar --exclude=data-cache --exclude='*.safetensors' -C "$HOME/.cache/paradec/models" \
        $Q15/heads || true
}
suffix_benches() {  # suffix against pld: the agentic suite (its target) and chat (never below 0.95x)
    CODE_PC=2 bench $Q15 agentic q15-agentic $DRAFT --methods vanilla,pld,suffix $QWEN_BENCH
    bench $Q15 chat q15-chat-suffix --methods vanilla,pld,suffix $QWEN_BENCH
}
pard_benches() {  # $1: suite; pard (the trained one) and draft (the stock 0.5B), each against vanilla
    local pard=$HOME/.cache/paradec/models/$Q15/heads/pard
    [ -f $pard/config.json ] || return 0
    bench $Q15 $1 q15-$1-pard --draft $pard --methods vanilla,pard $QWEN_BENCH
    bench $Q15 $1 q15-$1-draft $DRAFT --methods vanilla,draft $QWEN_BENCH
}
samples_bench() {  # $1: name suffix, then options: multisample at n = 8 against n = 8 vanilla
    local name=$1
    shift
    bench $Q15 samples q15-samples$name --per-category 2 --samples 8 --methods vanilla,multisample "$@" $QWEN_BENCH
}
agentic_turns() {  # every turn: the later turns rewrite the code or data after the method's own answer (suffix's)
    CODE_PC=2 bench $Q15 agentic q15-agentic-turns --turns all --methods vanilla,pld,suffix $QWEN_BENCH
}
policy_bench() {  # the policy's choices (never, always, auto without and with depth cuts) inside batches of 8 and 32
    echo "POLICY $(date +%T)"
    python3 "$SNAPSHOT/../scripts/bench_policy.py" --model $Q15 --batch 8 --batch 32 --method pld --method suffix \
        > $RES/policy.log 2>&1 || echo "policy exit $?"
}
load_benches() {  # $1: prompts per category; the server under 1, 16 and 32 clients, then one at a time at 32
    echo "LOAD $(date +%T)"
    pd bench --suite chat --per-category "$1" --model $Q15 --methods vanilla,pld --concurrency 1,16,32 \
        --out $RES/q15-load --quiet || echo "load exit $?"
    pd bench --suite chat --per-category "$1" --model $Q15 --methods vanilla --concurrency 32 --server-batch 1 \
        --out $RES/q15-load-serial --quiet || echo "load exit $?"
}
batch_profile() {
    echo "PROFILE BATCH $(date +%T)"
    python3 "$SNAPSHOT/../scripts/profile_batch.py" --model $Q15 --batch 32 --exact both --out $RES/profile-batch \
        > $RES/profile-batch.log 2>&1 || echo "profile exit $?"
}
runner_wide() {  # the 128-row programs above M = 64 (matmul.WIDE_ROWS) against the fastest paths
    echo "RUNNER $(date +%T)"
    (cd "$SNAPSHOT/.." && python3 scripts/bench_runner.py --shapes smol,q15,8b --hf "" \
        --native graphs+compile,graphs+compile+exact,graphs+compile+exact-wide --out $RES/runner > $RES/runner.log 2>&1) \
        || echo "runner exit $?"
}

m5_part() {  # 2026-12-02, third session: issue 19's first valid numbers, Qwen's EAGLE (16), every method exact (17)
    set -e
    mkdir -p $RES
    local every=vanilla,pld,lookahead,jacobi,layerskip,suffix
    prepare_exact
    wait
    train_q15_beside_tests eagle pard  # no Medusa for Qwen (it lost on SmolLM2)
    suffix_benches
    samples_bench "" --mode sample --temperature 0.7
    pard_benches code-chat
    bench $Q15 chat q15-chat--exact-every $DRAFT --methods "$(with_heads $Q15 $every,draft)" --exact $QWEN_BENCH
    bench $SMOL chat smol-chat--exact-every --methods "$every,eagle,medusa" --exact $SMOL_BENCH
    samples_bench --exact --exact
    pard_benches chat
    batch_profile
    runner_wide
    echo "M5 DONE $(date +%T)"
}

m6_part() {  # the next session: what the third 2026-12-02 session changed on the CPU, then what it did not reach
    set -e
    mkdir -p $RES
    prepare_exact
    wait
    train_q15_beside_tests pard eagle  # PARD's parallel layout and lr first; EAGLE again for code-chat
    suffix_benches  # the replayed defaults (min_match=1, match_factor=4), timed
    agentic_turns
    pard_benches code-chat
    bench $Q15 code-chat q15-code-chat-eagle --methods "$(with_heads $Q15 vanilla,pld)" $QWEN_BENCH
    bench $Q15 chat q15-chat-eagle-sample --mode sample --temperature 1 --methods "$(with_heads $Q15 vanilla)" \
        $QWEN_BENCH
    samples_bench "" --mode sample --temperature 0.7
    batch_profile
    CHAT_PC=2 bench $Q15 chat q15-batch $DRAFT --methods vanilla,pld --batch-sizes 1,8,32 $QWEN_BENCH
    policy_bench
    runner_wide
    pard_benches chat
    echo "M6 DONE $(date +%T)"
}

m7_part() {  # 2026-12-02, fourth session: the batched step's host profile first, then the last session's CPU changes
    set -e
    mkdir -p $RES
    prepare_exact
    wait
    train $Q15 pard $QWEN_TRAIN  # alone: the parallel layout, its agreement check and lr 5e-5, timed
    tar cf $RES/q15-cards.tar --exclude=data-cache --exclude='*.safetensors' -C "$HOME/.cache/paradec/models" \
        $Q15/heads || true
    batch_profile
    suffix_benches  # the replayed defaults (min_match=1, match_factor=4), timed
    agentic_turns
    pard_benches code-chat
    samples_bench "" --mode sample --temperature 0.7
    CHAT_PC=2 bench $Q15 chat q15-batch $DRAFT --methods vanilla,pld --batch-sizes 1,8,32 $QWEN_BENCH
    policy_bench
    exact_tests
    pard_benches chat
    echo "M7 DONE $(date +%T)"
}

m8_part() {  # the next session: issue 18 with overlapped steps (the step counts of every batched row, the policy's
    # plain probes), the server under load, then what the fourth 2026-12-02 session did not reach
    set -e
    mkdir -p $RES
    prepare_exact
    wait
    train_q15_beside_tests eagle  # Qwen's EAGLE-3 head for the batched EAGLE step, beside the CUDA-only tests
    CHAT_PC=6 bench $Q15 chat q15-batch-1 --methods vanilla $QWEN_BENCH  # batch 1 on the batched rows' 72 prompts
    # two warm-up passes: a policy that decides from timings meets other graph buckets in each pass
    CHAT_PC=6 bench $Q15 chat q15-batch $DRAFT --methods "$(with_heads $Q15 vanilla,pld,suffix,draft)" \
        --batch-sizes 8,32,64 --warmup 2 $QWEN_BENCH
    batch_profile
    load_benches 4
    policy_bench
    samples_bench "" --mode sample --temperature 0.7
    CHAT_PC=2 bench $Q15 chat q15-batch-exact --methods vanilla,pld --batch-sizes 8,32 --exact $QWEN_BENCH
    echo "M8 DONE $(date +%T)"
}

m9_part() {  # 2026-12-03: issue 18's targets first (batch 1 and 8/32/64 on 72 chat prompts, the server under load and
    # one at a time), with the coarser flat buckets and the policy's probe backoff; the CUDA-only tests (the batched
    # EAGLE bank among them) beside nothing; no head is trained (the machine is fresh: eagle is not in the rows)
    set -e
    mkdir -p $RES
    DRAFT="--draft $Q05"
    convert $Q05 &
    convert $Q15
    wait
    exact_tests
    CHAT_PC=6 bench $Q15 chat q15-batch-1 --methods vanilla $QWEN_BENCH  # batch 1 on the batched rows' 72 prompts
    CHAT_PC=6 bench $Q15 chat q15-batch $DRAFT --methods vanilla,pld,suffix,draft --batch-sizes 8,32,64 $QWEN_BENCH
    load_benches 4
    policy_bench
    batch_profile
    samples_bench "" --mode sample --temperature 0.7
    CHAT_PC=2 bench $Q15 chat q15-batch-exact --methods vanilla,pld --batch-sizes 8,32 --exact $QWEN_BENCH
    echo "M9 DONE $(date +%T)"
}

m10_part() {  # 2026-12-03, what ~10 minutes allow (the m9 chain's machine went back before it was collected): issue
    # 18's rows (batch 1 and 8/32/64 on 72 chat prompts), the server under load and one at a time, then the CUDA tests
    set -e
    mkdir -p $RES
    convert $Q15
    CHAT_PC=6 bench $Q15 chat q15-batch-1 --methods vanilla $QWEN_BENCH
    CHAT_PC=6 bench $Q15 chat q15-batch --methods vanilla,pld,suffix --batch-sizes 8,32,64 $QWEN_BENCH
    load_benches 2
    exact_tests
    echo "M10 DONE $(date +%T)"
}

launch() {  # $1: the function to run in the background; its exit status goes to $DONE
    export -f pd with_heads per_category staged convert train bench tests train_part bench_part chain batch_part \
        new_methods_part m2_chain exact_part prepare_exact exact_tests exact_benches exact_probe m3_part m5_part m6_part m7_part m8_part m9_part m10_part \
        train_q15_beside_tests suffix_benches pard_benches samples_bench batch_profile runner_wide agentic_turns \
        policy_bench load_benches
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
start|start-new|start-batch|start-m2|start-exact|start-m3|start-m5|start-m6|start-m7|start-m8|start-m9|start-m10)
    declare -A PART=([start]=chain [start-new]=new_methods_part [start-batch]=batch_part [start-m2]=m2_chain
        [start-exact]=exact_part [start-m3]=m3_part [start-m5]=m5_part
        [start-m6]=m6_part [start-m7]=m7_part [start-m8]=m8_part [start-m9]=m9_part [start-m10]=m10_part)
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
            pkill -f "bash -c m[0-9]_part"; pkill -f "python3 -m paradec"; sleep 2
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
    echo "usage: $0 stage|start|start-new|start-batch|start-m2|start-exact|start-m3|start-m5|start-m6|start-m7|start-m8|wait|collect|bench" >&2
    exit 2
    ;;
esac
