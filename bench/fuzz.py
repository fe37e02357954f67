"""Fuzz every command with broken and hostile inputs, for longer than the test suite does.

    python bench/fuzz.py --cases 3000 --seed 1            # random mutations of the tiny GPT-2
    python bench/fuzz.py --cases 3000 --seed 1 --fixed    # plus every fixed case x every command
    python bench/fuzz.py --repro 'proto-dims#123' --command widen   # rerun one case, with a traceback

The cases and the contract are those of tests/test_fuzz.py: a bad input gets one "error:" line, exit
code 2, no traceback and no file written; an input of unclear validity may be accepted (exit 0, or 1
where the command has "not preserved"), and then what it wrote must be a valid model. Each case runs
one command (they take turns) in a worker process, so a crash or a hang in native code is recorded
as a failure of that case instead of ending the run.

The commands are test_fuzz.COMMANDS: inspect, validate, widen, deepen, subclone and train (one
step on a small byte corpus, through the torch bridge).

Prints one row per kind of input: cases tried, accepted, not preserved (exit 1), rejected cleanly
(exit 2), internal errors (exit 3, or an "internal error" line), timeouts and other failures; the same
per command, with its seconds; the acceptance rate of the valid-by-construction cases (float mantissa
or sign flips, renamed values: every one must be accepted); then every exit 1 with its case, and every
failure with the command line that reproduces it.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
from multiprocessing.connection import wait
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CASE_LIMIT = 120  # seconds before a worker is killed as hung (the worker's own alarm fires at 60)
# what a case can come to (test_fuzz.Outcome.status); the last three are failures
STATUSES = ("accepted", "not preserved", "rejected", "internal error", "timeout", "failure")


def kind_of(name: str) -> str:
    """'bitflip@123.4' -> 'bitflip', 'proto-dims#99' -> 'proto-dims', 'insert16@5' -> 'insert'."""
    kind = name.split("@")[0].split("#")[0]
    return kind.rstrip("0123456789") or kind


def all_cases(n: int, seed: int, fixed: bool, valid: int = 0):
    """Random cases first (n of them), then `valid` valid-by-construction cases, then the fixed ones."""
    import test_fuzz as F
    commands = list(F.COMMANDS)
    jobs = [(c, commands[i % len(commands)]) for i, c in enumerate(F.random_cases(n, seed))]
    jobs += [(c, commands[i % len(commands)]) for i, c in enumerate(F.valid_cases(valid, seed))]
    if fixed:
        jobs += [(c, cmd) for c in F.fixed_cases() for cmd in commands]
    return jobs


def worker(conn, n: int, seed: int, fixed: bool, valid: int) -> None:
    """Runs the cases whose indices arrive on `conn`; answers (index, status, detail, seconds)."""
    os.environ.pop("ONNXGROW_DEBUG", None)
    import test_fuzz as F
    jobs = all_cases(n, seed, fixed, valid)
    root = Path(tempfile.mkdtemp(prefix="onnxgrow-fuzz-"))
    while True:
        i = conn.recv()
        if i is None:
            return
        case, command = jobs[i]
        start = time.perf_counter()
        try:
            outcome = F.run_case(case, command, root / "case")
        except Exception as e:  # the case could not even be built: a bug in the generator
            outcome = F.Outcome("failure", f"generator: {type(e).__name__}: {e}")
        conn.send((i, outcome.status, outcome.detail, time.perf_counter() - start))


class Pool:
    """Worker processes that are replaced when one crashes or hangs."""

    def __init__(self, size: int, args):
        self.ctx = mp.get_context("spawn")  # no ORT or onnx state shared with the parent
        self.args = args
        self.workers = [self.start() for _ in range(size)]

    def start(self):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker, args=(child, *self.args), daemon=True)
        proc.start()
        return {"proc": proc, "conn": parent, "job": None, "since": 0.0}

    def run(self, indices, on_result) -> None:
        todo = collections.deque(indices)
        while todo or any(w["job"] is not None for w in self.workers):
            for k, w in enumerate(self.workers):
                if w["job"] is None and todo:
                    w["job"], w["since"] = todo.popleft(), time.monotonic()
                    w["conn"].send(w["job"])
            ready = wait([w["conn"] for w in self.workers if w["job"] is not None], timeout=1.0)
            for k, w in enumerate(self.workers):
                if w["job"] is None:
                    continue
                if w["conn"] in ready:
                    try:
                        on_result(*w["conn"].recv())
                        w["job"] = None
                        continue
                    except EOFError:
                        pass  # the worker died while answering: handled below
                died = not w["proc"].is_alive()
                hung = time.monotonic() - w["since"] > CASE_LIMIT
                if died or hung:
                    detail = f"crashed (exit code {w['proc'].exitcode})" if died else f"hung > {CASE_LIMIT} s"
                    on_result(w["job"], "failure" if died else "timeout", detail, time.monotonic() - w["since"])
                    w["proc"].kill()
                    self.workers[k] = self.start()

    def close(self) -> None:
        for w in self.workers:
            try:
                w["conn"].send(None)
            except (BrokenPipeError, OSError):
                pass
            w["proc"].join(timeout=5)
            if w["proc"].is_alive():
                w["proc"].kill()


def repro(name: str, command: str, seed: int, n: int, valid: int) -> None:
    """Rerun one case in this process with ONNXGROW_DEBUG=1, so an unforeseen error shows its traceback."""
    import test_fuzz as F
    from onnxgrow.cli import app
    matches = [c for c, _ in all_cases(n, seed, fixed=True, valid=valid) if c.name == name]
    if not matches:
        sys.exit(f"no case named {name!r} among the first {n} of seed {seed} or the fixed cases")
    folder = Path(tempfile.mkdtemp(prefix="onnxgrow-repro-")) / "model"
    folder.mkdir()
    path = matches[0].make(folder)
    args = F.COMMANDS[command](str(path))
    print("input:", path)
    print("command: onnxgrow", " ".join(args))
    os.environ["ONNXGROW_DEBUG"] = "1"
    app(args, standalone_mode=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=2000, help="random cases")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fixed", action="store_true", help="also run every fixed case with every command")
    p.add_argument("--valid", type=int, default=200, help="valid-by-construction cases, all to be accepted")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--repro", help="rerun the case with this name (see the failure list)")
    p.add_argument("--command", default="inspect", help="with --repro: the command to run")
    args = p.parse_args()
    import test_fuzz as F
    if args.repro:
        return repro(args.repro, args.command, args.seed, args.cases, args.valid)

    jobs = all_cases(args.cases, args.seed, args.fixed, args.valid)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_command: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures = []
    seconds = collections.Counter()
    start = time.perf_counter()

    not_preserved = []

    def on_result(i, status, detail, took):
        case, command = jobs[i]
        if i < args.cases:
            kind = kind_of(case.name)
        elif i < args.cases + args.valid:
            kind = "valid: " + kind_of(case.name)
        else:
            kind = "fixed: " + ("external data" if case.name.startswith("ext-") else
                                "tiny GPT-2 edits" if case.name.startswith("gpt2-") else "files and small graphs")
        counts[kind][status] += 1
        counts[kind]["tried"] += 1
        by_command[command][status] += 1
        by_command[command]["tried"] += 1
        seconds[command] += took
        if status in F.FAILURES:
            failures.append((case.name, command, status, detail))
        if status == "not preserved":
            not_preserved.append((case.name, command, detail))
        done = sum(c["tried"] for c in counts.values())
        if done % 100 == 0:
            print(f"  {done}/{len(jobs)} cases, {len(failures)} failures, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)

    pool = Pool(args.workers, (args.cases, args.seed, args.fixed, args.valid))
    try:
        pool.run(range(len(jobs)), on_result)
    finally:
        pool.close()
    wall = time.perf_counter() - start
    report(args, len(jobs), wall, counts, by_command, seconds, not_preserved, failures)
    sys.exit(1 if failures else 0)


def table(title: str, rows: dict[str, collections.Counter], extra=None) -> collections.Counter:
    """One markdown row per key: tried and every status; returns the column totals."""
    head = f"| {title} | tried | " + " | ".join(STATUSES) + " |" + (" seconds |" if extra else "")
    print(head)
    print("|---|---:|" + "---:|" * len(STATUSES) + ("---:|" if extra else ""))
    total = collections.Counter()
    for key in sorted(rows):
        c = rows[key]
        total.update(c)
        cells = " | ".join(str(c[s]) for s in STATUSES)
        print(f"| {key} | {c['tried']} | {cells} |" + (f" {extra[key]:.0f} |" if extra else ""))
    return total


def report(args, n_jobs, wall, counts, by_command, seconds, not_preserved, failures) -> None:
    print(f"\nonnxgrow fuzz: {n_jobs} cases (seed {args.seed}, {args.workers} workers), {wall:.0f} s\n")
    total = table("input", counts)
    print(f"| **all** | **{total['tried']}** | " + " | ".join(f"**{total[s]}**" for s in STATUSES) + " |\n")
    table("command", by_command, seconds)
    valid = collections.Counter()
    for kind, c in counts.items():
        if kind.startswith("valid: "):
            valid.update(c)
    if valid["tried"]:
        print(f"\nvalid by construction: {valid['accepted']}/{valid['tried']} accepted "
              f"({100 * valid['accepted'] / valid['tried']:.1f}%; must be 100%)")
    if not_preserved:  # allowed only for inputs of unclear validity, so each one is shown
        print(f"\n{len(not_preserved)} not preserved (exit 1):")
        for name, command, detail in not_preserved:
            print(f"- {name} / {command}: {detail}")
    if failures:
        print(f"\n{len(failures)} failures:")
        for name, command, status, detail in failures:
            print(f"- {name} / {command}: {status}: {detail}")
            print(f"    python bench/fuzz.py --seed {args.seed} --cases {args.cases} --valid {args.valid} "
                  f"--repro '{name}' --command {command}")


if __name__ == "__main__":
    main()
