"""Does the emulated suite catch broken kernels? Builds each mutation of build.MUTATIONS and runs
tests/test_cuda_emulated.py against it (stopping at the first failure); writes a table to
tests/cuda_emulator/mutations.md. A mutation counts as caught when a test fails or the emulator
aborts (a deadlock, an unaligned or out-of-bounds shared access).

    python tests/cuda_emulator/mutations.py            # about 2-3 minutes per mutation on 2 cores
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


def main():
    rows = []
    for name in build.MUTATIONS:
        start = time.time()
        env = dict(os.environ, I2AM_EMULATOR_MUTATION=name)
        out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                              "tests/test_cuda_emulated.py", "-k", "not catches"],
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
        rows.append((name, verdict, time.time() - start))
        print(f"{name}: {verdict} ({time.time() - start:.0f} s)", flush=True)
    lines = ["# Mutations of the CUDA kernels under the emulator", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, `python tests/cuda_emulator/mutations.py`: each row "
             "builds the kernels with one deliberate bug (tests/cuda_emulator/build.py, MUTATIONS) and runs "
             "tests/test_cuda_emulated.py until its first failure.", "",
             "| mutation | result | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {n} | {v} | {s:.0f} |" for n, v, s in rows]
    with open(os.path.join(HERE, "mutations.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(not v.startswith("NOT") for _, v, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
