"""The mutation score of one module from mutmut's results, the reviewed equivalents left out.

    python mutation/score.py MODULE EQUIVALENT_FILE SURVIVORS_OUT   (cwd: the module's copy)
    python mutation/score.py --rerun EQUIVALENT_FILE   (the survivors a new test may catch)

Killed and timed-out mutants count as caught (a timeout is a mutant that made the tests
hang, which they noticed); survivors and mutants no selected test reaches count as not
caught. A survivor listed in EQUIVALENT_FILE (`mutant-name  reason`, one per line) is
left out of the score: it changes nothing a caller can observe, and the reason says why.
One whose reason starts with `[cuda]` changes only what happens on a CUDA device (a
tensor made on the CPU instead): tests/test_cuda.py catches those where a GPU is, so they
are left out of this machine's score and counted apart. Survivors' diffs go to
SURVIVORS_OUT.

`--rerun` prints the names of the survivors (and mutants no test reached before), not
listed as equivalent, whose function some selected test now reaches: mutmut keeps a
verdict until the mutated function changes, so after a new test these are run again by
name (mutation/run.sh does).
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
from collections import Counter
from pathlib import Path

from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

CAUGHT = {"killed", "timeout", "caught by type check", "segfault"}
MISSED = {"survived", "no tests"}


def read_equivalents(path: Path) -> dict[str, str]:
    """Mutant name -> why it is equivalent."""
    equivalents = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            equivalents[name] = reason.strip()
    return equivalents


def read_statuses() -> tuple[dict[str, str], dict[str, Path]]:
    """Every mutant's status and the source file it is in, from mutmut's results; only
    those matching $MUTATE_PATTERNS where it is set (a run of some functions only)."""
    statuses: dict[str, str] = {}
    sources: dict[str, Path] = {}
    patterns = os.environ.get("MUTATE_PATTERNS", "").split()
    for meta in sorted(Path("mutants/src").rglob("*.py.meta")):
        source = Path(str(meta.relative_to("mutants"))[: -len(".meta")])
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if patterns and not any(fnmatch.fnmatch(name, p) for p in patterns):
                continue
            statuses[name] = status_by_exit_code[code]
            sources[name] = source
    return statuses, sources


def rerun(equivalent_file: str) -> int:
    statuses, _ = read_statuses()
    equivalents = read_equivalents(Path(equivalent_file))
    stats = json.loads(Path("mutants/mutmut-stats.json").read_text())
    reached = stats["tests_by_mangled_function_name"]
    for name, status in sorted(statuses.items()):
        function = name.partition("__mutmut_")[0]
        if status in MISSED and name not in equivalents and reached.get(function):
            print(name)
    return 0


def main(module: str, equivalent_file: str, survivors_out: str) -> int:
    statuses, sources = read_statuses()
    equivalents = read_equivalents(Path(equivalent_file))
    missed = sorted(n for n, s in statuses.items() if s in MISSED and n not in equivalents)
    stale = sorted(
        n for n in equivalents if n in statuses and statuses[n] not in MISSED
    )  # listed as equivalent, yet a test now catches it: the list is out of date
    counts = Counter(statuses.values())
    left_out = [n for n in statuses if n in equivalents and statuses[n] in MISSED]
    cuda = sum(1 for n in left_out if equivalents[n].startswith("[cuda]"))
    equivalent = len(left_out) - cuda
    caught = sum(counts[s] for s in CAUGHT)
    scored = caught + len(missed)
    print(f"{module}: {len(statuses)} mutants: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if scored:
        print(
            f"{module}: {caught} of {scored} non-equivalent mutants caught "
            f"({100 * caught / scored:.1f}%); {equivalent} reviewed as equivalent, {cuda} "
            "that only a CUDA device shows left out"
        )
    unfinished = [n for n, s in statuses.items() if s not in CAUGHT | MISSED]
    if unfinished:
        kinds = Counter(statuses[n] for n in unfinished)
        print(f"{module}: {len(unfinished)} not finished ({dict(kinds)})")
    for name in stale:
        print(f"{module}: {name} is listed as equivalent but is now caught: remove it")
    with open(survivors_out, "w") as out:
        for name in missed:
            diff = get_diff_for_mutant(name, path=sources[name])
            out.write(f"# {name}: {statuses[name]}\n{diff}\n\n")
    print(f"{module}: {len(missed)} survivors' diffs in {survivors_out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--rerun":
        sys.exit(rerun(*sys.argv[2:]))
    sys.exit(main(*sys.argv[1:]))
