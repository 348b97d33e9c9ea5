#!/usr/bin/env bash
# Staging real-model files for the GPU machine in fewer, larger chunks: every device command carries the checkout,
# and the committed weights (src/paradec/assets, ~31 MiB) leave ~25 MiB per command for chunks; without them, ~57.
#   scripts/stage_lean.sh on     move the assets out of the tree and the index (the checkout then sends ~4 MiB)
#   ../shared/gpu/chunk.sh FILE...  then one device command per chunk (`scripts/device_real.sh stage`)
#   scripts/stage_lean.sh off    put them back (before the command that starts the chain: it needs them)
# Nothing is committed either way; `off` restores the index from HEAD.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
ASIDE=${ASIDE:-/tmp/paradec-assets-aside}
case "${1:-}" in
on)
    [ -e "$ASIDE" ] && { echo "$ASIDE exists: run '$0 off' first" >&2; exit 1; }
    mv src/paradec/assets "$ASIDE"
    git rm -r -q --cached src/paradec/assets
    echo "assets moved to $ASIDE; the checkout now sends $(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1) KiB"
    ;;
off)
    [ -d "$ASIDE" ] || { echo "nothing aside at $ASIDE" >&2; exit 1; }
    mv "$ASIDE" src/paradec/assets
    git reset -q src/paradec/assets
    git status --short src/paradec/assets | head -3
    echo "assets back"
    ;;
*)
    echo "usage: $0 on|off" >&2
    exit 2
    ;;
esac
