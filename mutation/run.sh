#!/usr/bin/env bash
# Mutation testing of one core module with cosmic-ray, resumable, outside CI's budget.
#
#   mutation/run.sh codec        (make mutate MODULE=codec; modules: see MODULES below)
#
# cosmic-ray plants one bug at a time (an operator swapped, a constant changed, a
# condition negated...) and runs the module's tests against it: a mutant the tests do
# not catch "survives". The mutants are planted in a copy of the committed tree
# (mutation/.work/MODULE, the copy's own sources first on PYTHONPATH), never in the
# checkout. The session (mutation/sessions/MODULE.sqlite) keeps every result, so a run
# stopped at any point goes on where it stopped; delete it to start over after a change.
# At the end: the survivors' diffs (mutation/sessions/MODULE-survivors.txt) and the score.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODULE=${1:?usage: mutation/run.sh MODULE (codec, kernels, lookup, tables, auth, interceptor, sharding)}
declare -A MODULES=(
    [codec]="client/embedding_client/codec.py|tests/test_codec.py tests/test_fuzz.py"
    [kernels]="server/embedding_server/core/kernels.py|tests/test_kernels.py tests/test_pooling.py tests/test_quantized.py"
    [lookup]="server/embedding_server/core/lookup.py|tests/test_limits.py tests/test_service.py tests/test_pooling.py"
    [tables]="server/embedding_server/core/tables.py|tests/test_tables.py tests/test_reload.py tests/test_updates.py"
    [auth]="server/embedding_server/transport/auth.py|tests/test_security.py"
    [interceptor]="server/embedding_server/transport/interceptor.py|tests/test_security.py tests/test_faults.py tests/test_hostile_input.py"
    [sharding]="server/embedding_server/core/sharding.py|tests/test_sharding.py"
)
entry=${MODULES[$MODULE]:-}
[ -n "$entry" ] || { echo "unknown module $MODULE; known: ${!MODULES[*]}" >&2; exit 2; }
path=${entry%%|*}
tests=${entry#*|}
work=$ROOT/mutation/.work/$MODULE
sessions=$ROOT/mutation/sessions
session=$sessions/$MODULE.sqlite
mkdir -p "$sessions"
if [ ! -f "$session" ] || [ ! -d "$work" ]; then
    rm -rf "$work" "$session" && mkdir -p "$work"
    git archive HEAD | tar -x -C "$work"   # the committed tree: the checkout is never mutated
    cat > "$work/cosmic-ray.toml" <<TOML
[cosmic-ray]
module-path = "$path"
timeout = 300.0
excluded-modules = []
test-command = "env PYTHONPATH=$work/client:$work/server $ROOT/.venv/bin/python -m pytest -x -q -p no:cacheprovider $tests"

[cosmic-ray.distributor]
name = "local"
TOML
    cp "$work/$path" "$work/pristine.py"
    (cd "$work" && "$ROOT/.venv/bin/cosmic-ray" init cosmic-ray.toml "$session")
    # The unmutated copy must pass its tests, or every mutant would look killed.
    (cd "$work" && "$ROOT/.venv/bin/cosmic-ray" baseline cosmic-ray.toml) \
        || { echo "the tests fail on the unmutated copy: fix them first" >&2; rm -f "$session"; exit 1; }
fi
# A run stopped in the middle of a mutant leaves it planted: start from the original.
cp "$work/pristine.py" "$work/$path"
echo "mutating $path against: $tests (session $session)"
(cd "$work" && "$ROOT/.venv/bin/cosmic-ray" exec cosmic-ray.toml "$session")
"$ROOT/.venv/bin/cr-report" --show-pending "$session" | tail -n 4
"$ROOT/.venv/bin/cr-report" --surviving-only --show-diff "$session" > "$sessions/$MODULE-survivors.txt" || true
echo "survivors' diffs: $sessions/$MODULE-survivors.txt"
