"""Mutation check: plant each small bug of `tools/mutants.py` in a temporary copy of the repository, run the tests
named to catch it, and report which bugs the tests caught.

    python3 tools/mutation_check.py                 # every mutant (docs/testing.md gives its time)
    python3 tools/mutation_check.py --only NAME...  # some of them
    python3 tools/mutation_check.py --group dispatch
    python3 tools/mutation_check.py --list

The working tree is never edited: the tracked and untracked-but-not-ignored files are copied to a temporary folder
once, each mutant is applied there (its `old` text must occur exactly once in its file, so a refactor that moves or
changes the code is reported instead of silently testing nothing), its tests run in one pytest process (no xdist;
`-x`), and the file is restored. The named tests first run once unmutated: they must pass, or every mutant would
look caught. Exit status 0 only if every mutant was found and caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from mutants import MUTANTS  # noqa: E402

PYTEST = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", "-p", "no:cacheprovider", "--no-header"]


def _copy_tree(dest: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def _pytest(tree: str, tests, timeout: float):
    """(exit status, seconds, last lines of output) of one pytest process on `tests` in `tree`."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    start = time.perf_counter()
    try:
        proc = subprocess.run(PYTEST + list(tests), cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, out = None, f"timed out after {timeout:.0f} s"
    return rc, time.perf_counter() - start, "\n".join(out.strip().splitlines()[-6:])


def _check_copy_is_imported(tree: str) -> None:
    """deepfense is a namespace package: the copy must come first on sys.path, not an installed tree."""
    out = subprocess.run([sys.executable, "-c", "import deepfense.functional as f; print(f.__file__)"], cwd=tree,
                         check=True, capture_output=True, text=True).stdout.strip()
    if not os.path.realpath(out).startswith(os.path.realpath(tree)):
        sys.exit(f"the mutated copy is not what Python imports (deepfense.functional from {out})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--group", choices=sorted({m.group for m in MUTANTS}), help="run one group only")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the named tests")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run (default 600)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS
              if (not args.only or m.name in args.only) and (not args.group or m.group == args.group)]
    if args.only and len(chosen) != len(set(args.only)):
        return print(f"unknown mutant in {args.only}; see --list") or 2
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.group:9} {m.path}: {m.why}")
        return 0
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deepfense-mutants-") as tree:
        _copy_tree(tree)
        _check_copy_is_imported(tree)
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
            rc, secs, tail = _pytest(tree, tests, args.timeout * 2)
            print(f"baseline: {len(tests)} test selections, exit {rc}, {secs:.0f} s", flush=True)
            if rc != 0:
                print(tail)
                return 2
        for m in chosen:
            path = os.path.join(tree, m.path)
            with open(path, encoding="utf-8") as f:
                original = f.read()
            count = original.count(m.old)
            if count != 1:
                rows.append((m, f"old text found {count} times", 0.0, ""))
            else:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(original.replace(m.old, m.new))
                try:
                    rc, secs, tail = _pytest(tree, m.tests, args.timeout)
                finally:
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(original)
                verdict = {1: "caught", 0: "SURVIVED", None: "TIMEOUT"}.get(rc, f"ERROR (pytest exit {rc})")
                rows.append((m, verdict, secs, tail))
            print(f"{m.name:34} {rows[-1][1]:28} {rows[-1][2]:6.1f} s", flush=True)
    print(f"\n| mutant | group | file | result | seconds |\n|---|---|---|---|---|")
    for m, verdict, secs, _ in rows:
        print(f"| {m.name} | {m.group} | {m.path} | {verdict} | {secs:.1f} |")
    bad = [(m, v, tail) for m, v, _, tail in rows if v != "caught"]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} caught in {time.perf_counter() - started:.0f} s")
    for m, verdict, tail in bad:
        print(f"\n{m.name}: {verdict}\n{tail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
