"""Does the emulated suite catch broken kernels? Builds each mutation of build.MUTATIONS and runs
tests/test_cuda_emulated.py against it (stopping at the first failure); writes a table to
tests/cuda_emulator/mutations.md. A mutation counts as caught when a test fails or the emulator
aborts (a deadlock, an unaligned or out-of-bounds shared access).

    python tests/cuda_emulator/mutations.py            # about 2-3 minutes per mutation on 2 cores
    python tests/cuda_emulator/mutations.py NAME ... [--tests EXPR]
                                                       # only these mutations (their rows of the
                                                       # table are replaced), and only the tests
                                                       # that pytest -k EXPR selects
"""

import os
import subprocess
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import build  # noqa: E402


def previous_rows(path):
    """(name, verdict, seconds) rows of an existing table, by name."""
    rows = {}
    if os.path.isfile(path):
        for line in open(path):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 3 and cells[0] in build.MUTATIONS:
                rows[cells[0]] = (cells[0], cells[1], float(cells[2]))
    return rows


def main():
    args = sys.argv[1:]
    selection = "not catches"
    if "--tests" in args:
        at = args.index("--tests")
        selection = f"({args[at + 1]}) and not catches"
        del args[at:at + 2]
    names = args or list(build.MUTATIONS)
    unknown = [n for n in names if n not in build.MUTATIONS]
    if unknown:
        sys.exit(f"unknown mutations: {unknown}; known: {list(build.MUTATIONS)}")
    table = os.path.join(HERE, "mutations.md")
    kept = previous_rows(table) if args else {}
    rows = []
    for name in names:
        start = time.time()
        env = dict(os.environ, I2AM_EMULATOR_MUTATION=name)
        out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                              "tests/test_cuda_emulated.py", "-k", selection],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        text = out.stdout + out.stderr
        failed = next((line.split(" ", 1)[1].split(" - ")[0] for line in text.splitlines() if line.startswith("FAILED ")), None)
        if out.returncode == 0:
            verdict = "NOT caught"
        elif failed:
            verdict = f"caught by {failed.replace('tests/test_cuda_emulated.py::', '')}"
        elif "cuda emulator:" in text:
            verdict = "caught: emulator abort: " + next(l for l in text.splitlines() if "cuda emulator:" in l).strip()
        else:
            verdict = f"pytest exited {out.returncode}: " + (text.strip().splitlines() or [""])[-1]
        if selection != "not catches":
            verdict += f" (tests: -k {selection!r})"
        rows.append((name, verdict, time.time() - start))
        print(f"{name}: {verdict} ({time.time() - start:.0f} s)", flush=True)
    done = {r[0] for r in rows}
    rows = [kept[n] if n in kept and n not in done else next(r for r in rows if r[0] == n)
            for n in build.MUTATIONS if n in kept or n in done]
    lines = ["# Mutations of the CUDA kernels under the emulator", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, `python tests/cuda_emulator/mutations.py "
             f"{' '.join(sys.argv[1:])}`".replace(" `", "`") + ": each row builds the kernels with one deliberate bug "
             "(tests/cuda_emulator/build.py, MUTATIONS) and runs tests/test_cuda_emulated.py until its first failure "
             "(rows of earlier runs are kept when only some mutations are rerun).", "",
             "| mutation | result | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {n} | {v} | {s:.0f} |" for n, v, s in rows]
    with open(table, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(not v.startswith("NOT") for _, v, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
