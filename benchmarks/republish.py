"""Re-publishing an unchanged recipe, whole process: `registry publish` with nothing to do.

    python benchmarks/republish.py [--runs 11]

Publishes recipes/examples/toy_cos_fmt.yaml once into a scratch registry home, then times repeated
publishes of the same recipe (pin the sources, ask the local target, stop) against `python -c pass`,
interleaved. Target: median <= 3 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "recipes/examples/toy_cos_fmt.yaml"
TARGET_S = 3.0


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    args = parser.parse_args()
    registry = os.path.join(os.path.dirname(sys.executable), "registry")
    with tempfile.TemporaryDirectory() as tmp:
        # A copy of the recipes and fixtures, so the lock file the first publish writes stays out of the repo.
        work = Path(tmp) / "repo"
        for part in ("recipes", "tests/fixtures/toy"):
            shutil.copytree(ROOT / part, work / part, ignore=shutil.ignore_patterns("*.lock.json"))
        env = {**os.environ, "REGISTRY_HOME": str(Path(tmp) / "home")}
        first = timed([registry, "publish", RECIPE], env, work)
        times: dict[str, list[float]] = {"registry publish (unchanged)": [], "python -c pass": []}
        for _ in range(args.runs):
            times["registry publish (unchanged)"].append(timed([registry, "publish", RECIPE], env, work))
            times["python -c pass"].append(timed([sys.executable, "-c", "pass"], env, work))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"first publish (merge, smoke, card, local): {first:.2f}s")
    print(f"{'command':<30} {'median':>8} {'min':>8} {'max':>8}   ({args.runs} runs, {os.cpu_count()} cores)")
    for name, ts in times.items():
        print(f"{name:<30} {medians[name]:>7.3f}s {min(ts):>7.3f}s {max(ts):>7.3f}s")
    ours = medians["registry publish (unchanged)"]
    print(f"target median <= {TARGET_S}s: {'met' if ours <= TARGET_S else 'MISSED'}")
    return 0 if ours <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
