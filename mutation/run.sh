#!/usr/bin/env bash
# Mutation testing of one core module with mutmut, resumable, outside CI's budget.
#
#   mutation/run.sh codec        (make mutate MODULE=codec; modules: see MODULES below)
#   MUTATE_FRESH=1 mutation/run.sh codec     (start over: the figure to report)
#   MUTATE_SINCE=HEAD~3 mutation/run.sh updatelog   (only functions changed since a commit)
#
# mutmut plants one bug at a time (an operator swapped, a constant changed, a condition
# negated, an argument dropped...) and runs the tests that reach the mutated function
# against it: a mutant no test catches "survives". It forks each test run from a process
# that has already imported the suite, so a mutant costs the tests that reach it, not a
# fresh interpreter (codec's 740 mutants: about 10 minutes on 2 cores).
#
# The mutants live in a copy of the committed tree (mutation/.work/MODULE, packages moved
# under src/ where mutmut looks for them), never in the checkout. A run stopped at any
# point goes on where it stopped. After a new commit the copy is refreshed and mutmut's
# verdicts kept where they still hold: mutants of functions whose source changed are run
# again (mutmut compares each function's hash), new tests are traced, and the earlier
# survivors that a listed test reaches are run again by name, so that a test written
# against a survivor is tried at once. A verdict of "killed" is not revisited when a test
# changes, and a changed test list starts over: report the score of a MUTATE_FRESH=1 run.
# At the end: the score, with the survivors reviewed as equivalent in
# mutation/equivalent.txt left out, and the survivors' diffs in
# mutation/.work/MODULE-survivors.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODULE=${1:?usage: mutation/run.sh MODULE (codec, kernels, lookup, tables, auth, interceptor, sharding, inference, connections, metrics_endpoint, server, updatelog, snapshots, filesystem, store, config, sharded, shards, keys)}
CHILDREN=${MUTATE_CHILDREN:-$(nproc)}
# module -> file (under src/) | the tests that may catch its mutants (mutmut runs, per
# mutant, only those of them that reach the mutated function). Kept to the module's own
# tests and the fastest server-level ones: a survivor runs every listed test that reaches
# it, and with the slow server tests (faults, connections, reload) a module took hours.
declare -A MODULES=(
    [codec]="embedding_client/codec.py|test_codec test_codec_checks test_fuzz"
    [kernels]="embedding_server/core/kernels.py|test_kernel_units test_kernels test_pooling test_quantized"
    [lookup]="embedding_server/core/lookup.py|test_lookup_core test_limits test_service test_pooling test_keyed"
    [tables]="embedding_server/core/tables.py|test_table_core test_tables test_updates test_limits test_memory"
    [auth]="embedding_server/transport/auth.py|test_auth test_security test_attacks"
    [interceptor]="embedding_server/transport/interceptor.py|test_security test_hostile_input test_limits test_stream test_handler_threads test_faults test_connections test_attacks"
    [sharding]="embedding_server/core/sharding.py|test_sharding test_lookup_core"
    [inference]="embedding_server/transport/inference.py|test_inference test_attacks"
    [connections]="embedding_server/transport/connections.py|test_connections test_faults"
    [metrics_endpoint]="embedding_server/transport/metrics_endpoint.py|test_attacks test_observability"
    [server]="embedding_server/process/server.py|test_faults test_stream test_rolling"
    # The update log's tests start a redis-server; those that spawn server processes run
    # the checkout's code, not the mutant: the in-process ones are what kill mutants here.
    [updatelog]="embedding_server/core/updatelog.py|test_updatelog"
    [snapshots]="embedding_server/core/snapshots.py|test_snapshots test_updatelog"
    # Chosen by coverage (2026-12-08: `coverage run` of the suite with a context per test,
    # each file kept that executes a line of the module no file before it did; in-process
    # lines only, the only ones a mutant can change).
    [filesystem]="embedding_server/core/filesystem.py|test_files test_attacks"
    [store]="embedding_server/core/store.py|test_updates test_updatelog test_cache test_quantized test_memory test_reload test_service test_keyed"
    [config]="embedding_server/config.py|test_config test_sharding test_security test_cache"
    [sharded]="embedding_client/sharded.py|test_sharding test_updatelog"
    [shards]="embedding_client/shards.py|test_sharding"
    # Keyed tables (issue 31): their own tests reach every function of the index.
    [keys]="embedding_server/core/keys.py|test_keyed"
)
entry=${MODULES[$MODULE]:-}
[ -n "$entry" ] || { echo "unknown module $MODULE; known: ${!MODULES[*]}" >&2; exit 2; }
file=${entry%%|*}
tests=""
for t in ${entry#*|}; do tests="$tests\"tests/$t.py\", "; done
work=$ROOT/mutation/.work/$MODULE
head=$(git rev-parse HEAD)
made=$(cat "$work/.commit" 2>/dev/null || true)
extract() {  # the committed tree (the checkout is never mutated), mutmut's results kept
    find "$work" -mindepth 1 -maxdepth 1 ! -name mutants ! -name .rerun -exec rm -rf {} +
    mkdir -p "$work/src"
    git archive HEAD | tar -x -C "$work"
    mv "$work/client/embedding_client" "$work/server/embedding_server" "$work/src/"
    # newer than mutmut's copies, whatever the commit's date: the mutants are made again
    find "$work/src" -type f -exec touch {} +
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
}
if [ -n "${MUTATE_FRESH:-}" ] || [ ! -d "$work/mutants" ]; then
    rm -rf "$work" && mkdir -p "$work"
    extract
elif [ "$made" != "$head" ]; then
    echo "mutation/.work/$MODULE was made from ${made:0:7}: refreshed to ${head:0:7}," \
        "changed functions and earlier survivors are run again"
    # mutmut copies a file into mutants/ only where none is: drop every copy (its
    # verdicts, *.meta, and its trace of the tests, mutmut-stats.json, stay)
    find "$work/mutants" -type f ! -name '*.meta' ! -name mutmut-stats.json -delete
    extract
    touch "$work/.rerun"
fi
# A part of the module only (a whole one can take hours here): MUTATE_ONLY, mutmut name
# patterns (`embedding_server.core.updatelog.xǁUpdateLogǁ_trim__mutmut_*`), or
# MUTATE_SINCE=COMMIT, the functions changed since that commit (mutation/changed.py).
only=()
if [ -n "${MUTATE_SINCE:-}" ]; then
    mapfile -t only < <(cd "$ROOT" && .venv/bin/python mutation/changed.py "src/$file" "$MUTATE_SINCE")
    [ "${#only[@]}" -gt 0 ] || { echo "no function of $file changed since $MUTATE_SINCE"; exit 0; }
elif [ -n "${MUTATE_ONLY:-}" ]; then
    read -r -a only <<<"$MUTATE_ONLY"
fi
export MUTATE_PATTERNS="${only[*]}"  # the score counts these only
echo "mutating src/$file (children: $CHILDREN), tests:${entry#*|}${only:+, functions: ${#only[@]}}"
cd "$work"
# mutmut redraws one progress line; where a run is: tail -c 200 run.log | tr '\r' '\n'
"$ROOT/.venv/bin/mutmut" run --max-children "$CHILDREN" "${only[@]}" > run.log 2>&1 \
    || { tail -n 30 run.log >&2; echo "mutmut failed: $work/run.log" >&2; exit 1; }
if [ -e .rerun ]; then  # (removed once done: a stopped rerun is taken up next time)
    mapfile -t again < <("$ROOT/.venv/bin/python" "$ROOT/mutation/score.py" --rerun \
        "$ROOT/mutation/equivalent.txt")
    if [ "${#again[@]}" -gt 0 ]; then
        echo "running ${#again[@]} earlier survivors again against the tests now listed"
        "$ROOT/.venv/bin/mutmut" run --max-children "$CHILDREN" "${again[@]}" > rerun.log 2>&1 \
            || { tail -n 30 rerun.log >&2; echo "mutmut failed: $work/rerun.log" >&2; exit 1; }
    fi
    rm .rerun
fi
"$ROOT/.venv/bin/python" "$ROOT/mutation/score.py" "$MODULE" "$ROOT/mutation/equivalent.txt" \
    "$ROOT/mutation/.work/$MODULE-survivors.txt"
