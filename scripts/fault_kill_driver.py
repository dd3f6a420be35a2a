"""SIGKILL the driver of a Ray-launched stage one and watch what survives it.

    python scripts/fault_kill_driver.py [--steps 120] [--kill-at 30]

Runs `transferline pretrain configs/demo.yaml` (the private Ray, 2 workers, one loader worker
each) under a fresh run name, SIGKILLs the driver once stage one passes `--kill-at`, prints how
long each of its processes outlived it, then runs the same command again and prints the step
it resumed from. Needs the embedded data (`make data`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.procfs import alive, descendants  # noqa: E402


def _step(attempts: Path) -> int:
    try:
        return int(json.loads(attempts.read_text())["high_water_step"])
    except (OSError, ValueError, KeyError):
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--kill-at", type=int, default=30)
    parser.add_argument("--wait", type=float, default=150.0, help="seconds to watch for survivors")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="tl-kill-driver-")) / "run"
    cmd = [sys.executable, "-m", "pipeline", "pretrain", "configs/demo.yaml", f"output_dir={out}", "name=killdriver",
           "tracking.mode=disabled", f"pretrain.steps={args.steps}", "pretrain.checkpoint_every=20"]
    t0 = time.monotonic()
    with open(out.parent / "driver.log", "w") as log:
        driver = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    while _step(out / "pretrain" / "attempts.json") < args.kill_at:
        if driver.poll() is not None:
            print((out.parent / "driver.log").read_text()[-3000:])
            return 1
        time.sleep(0.1)
    pids = descendants(driver.pid)
    names = {}
    for pid in pids:
        try:
            names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            pass
    print(f"SIGKILL driver {driver.pid} at step >= {args.kill_at} ({time.monotonic() - t0:.0f} s in); "
          f"{len(pids)} processes below it")
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    killed, gone = time.monotonic(), {}
    while len(gone) < len(pids) and time.monotonic() - killed < args.wait:
        for pid in pids:
            if pid not in gone and not alive(pid):
                gone[pid] = time.monotonic() - killed
        time.sleep(0.1)
    late = sorted(((t, names.get(p, "?")) for p, t in gone.items() if t > 10), reverse=True)
    print(f"gone within 10 s: {sum(t <= 10 for t in gone.values())} of {len(pids)}; later: "
          + (", ".join(f"{Path(n).name} after {t:.0f} s" for t, n in late) or "none"))
    survivors = [p for p in pids if p not in gone]
    for pid in survivors:
        print(f"still alive after {args.wait:.0f} s: {pid} {names.get(pid)} (killed now)")
        os.kill(pid, signal.SIGKILL)
    t1 = time.monotonic()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    result = json.loads((out / "pretrain" / "result.json").read_text()) if again.returncode == 0 else {}
    print(f"the same command again: exit {again.returncode} in {time.monotonic() - t1:.0f} s, "
          f"resumed from step {result.get('resumed_from_step')}, attempts {result.get('attempts')}")
    shutil.rmtree(out.parent, ignore_errors=True)
    return 0 if again.returncode == 0 and not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
