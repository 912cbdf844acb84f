#!/usr/bin/env bash
# Mutation testing of one core module with mutmut, resumable, outside CI's budget.
#
#   mutation/run.sh codec        (make mutate MODULE=codec; modules: see MODULES below)
#
# mutmut plants one bug at a time (an operator swapped, a constant changed, a condition
# negated, an argument dropped...) and runs the tests that reach the mutated function
# against it: a mutant no test catches "survives". It forks each test run from a process
# that has already imported the suite, so a mutant costs the tests that reach it, not a
# fresh interpreter (codec's 740 mutants: about 10 minutes on 2 cores).
#
# The mutants live in a copy of the committed tree (mutation/.work/MODULE, packages moved
# under src/ where mutmut looks for them), never in the checkout. A run stopped at any
# point goes on where it stopped; a new commit starts the module over (the copy records
# the commit it was made from). At the end: the score, with the survivors reviewed as
# equivalent in mutation/equivalent.txt left out, and the survivors' diffs in
# mutation/.work/MODULE-survivors.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODULE=${1:?usage: mutation/run.sh MODULE (codec, kernels, lookup, tables, auth, interceptor, sharding)}
CHILDREN=${MUTATE_CHILDREN:-$(nproc)}
# module -> file (under src/) | the tests that may catch its mutants (mutmut runs, per
# mutant, only those of them that reach the mutated function). Kept to the module's own
# tests and the fastest server-level ones: a survivor runs every listed test that reaches
# it, and with the slow server tests (faults, connections, reload) a module took hours.
declare -A MODULES=(
    [codec]="embedding_client/codec.py|test_codec test_codec_checks test_fuzz"
    [kernels]="embedding_server/core/kernels.py|test_kernel_units test_kernels test_pooling test_quantized"
    [lookup]="embedding_server/core/lookup.py|test_lookup_core test_limits test_service test_pooling"
    [tables]="embedding_server/core/tables.py|test_table_core test_tables test_updates test_limits test_memory"
    [auth]="embedding_server/transport/auth.py|test_auth test_security"
    [interceptor]="embedding_server/transport/interceptor.py|test_security test_hostile_input test_limits"
    [sharding]="embedding_server/core/sharding.py|test_sharding"
)
entry=${MODULES[$MODULE]:-}
[ -n "$entry" ] || { echo "unknown module $MODULE; known: ${!MODULES[*]}" >&2; exit 2; }
file=${entry%%|*}
tests=""
for t in ${entry#*|}; do tests="$tests\"tests/$t.py\", "; done
work=$ROOT/mutation/.work/$MODULE
head=$(git rev-parse HEAD)
if [ "$(cat "$work/.commit" 2>/dev/null)" != "$head" ]; then
    [ -d "$work" ] && echo "mutation/.work/$MODULE was made from another commit: starting over"
    rm -rf "$work" && mkdir -p "$work/src"
    git archive HEAD | tar -x -C "$work"   # the committed tree: the checkout is never mutated
    mv "$work/client/embedding_client" "$work/server/embedding_server" "$work/src/"
    cat >> "$work/pyproject.toml" <<TOML

[tool.mutmut]
source_paths = ["src"]
only_mutate = ["src/$file"]
pytest_add_cli_args_test_selection = [$tests]
pytest_add_cli_args = ["-p", "no:cacheprovider"]
# grpc and torch are not fork-safe once used: fork every test run from a clean server.
process_isolation = "forkserver"
also_copy = ["protos", "deploy", "docker", "docs", "README.md"]
TOML
    echo "$head" > "$work/.commit"
fi
echo "mutating src/$file (children: $CHILDREN), tests:${entry#*|}"
cd "$work"
# mutmut redraws one progress line; where a run is: tail -c 200 run.log | tr '\r' '\n'
"$ROOT/.venv/bin/mutmut" run --max-children "$CHILDREN" > run.log 2>&1 \
    || { tail -n 30 run.log >&2; echo "mutmut failed: $work/run.log" >&2; exit 1; }
"$ROOT/.venv/bin/python" "$ROOT/mutation/score.py" "$MODULE" "$ROOT/mutation/equivalent.txt" \
    "$ROOT/mutation/.work/$MODULE-survivors.txt"
