"""Cold start of `registry validate recipes/`, whole process, against `python -c pass`.

    python benchmarks/validate_cold.py [--runs 21]

Runs are interleaved so both commands see the same machine state. Target: the median is at most
15x the median of `python -c pass` (the interpreter's own start-up, measured in the same run).
The reference recipe's eval: section needs the lm-eval plugin: it is installed (without its
dependencies, which validating never imports) into a scratch folder on PYTHONPATH, as a user's venv has it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 15.0


# As on a user's machine, Python caches compiled modules: a PYTHONDONTWRITEBYTECODE inherited from a CI or
# sandbox environment would make every run recompile registry's own modules from source.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    site = tempfile.mkdtemp(prefix="lm-eval-plugin-")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", site, str(ROOT / "plugins" / "registry-lm-eval")], check=True)
    ENV["PYTHONPATH"] = os.pathsep.join([site, *filter(None, [os.environ.get("PYTHONPATH")])])
    registry = [os.path.join(os.path.dirname(sys.executable), "registry"), "validate", "recipes/"]
    baseline = [sys.executable, "-c", "pass"]
    timed(registry)  # warm the page cache and write the bytecode cache, as a developer's second run would
    times: dict[str, list[float]] = {"registry validate recipes/": [], "python -c pass": []}
    for _ in range(args.runs):
        times["registry validate recipes/"].append(timed(registry))
        times["python -c pass"].append(timed(baseline))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{'command':<28} {'median':>8} {'min':>8} {'max':>8}   ({args.runs} runs, {os.cpu_count()} cores)")
    for name, ts in times.items():
        print(f"{name:<28} {medians[name]:>7.3f}s {min(ts):>7.3f}s {max(ts):>7.3f}s")
    ours, base = medians["registry validate recipes/"], medians["python -c pass"]
    ratio = ours / base
    print(f"ratio {ratio:.1f}x python start-up (target <= {TARGET_RATIO:g}x: {'met' if ratio <= TARGET_RATIO else 'MISSED'}); "
          f"registry's own cost {ours - base:.3f}s")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
