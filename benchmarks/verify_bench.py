#!/usr/bin/env python
"""Whole-process timing of `registry verify FOLDER` against `sha256sum` of the same files, on the CPU.

Merges once the ~380M-parameter bfloat16 Qwen2 pair that benchmarks/merge_bench.py builds (cached in
~/.cache/registry-bench), adds a card and a smoke report naming its merge identity so that every check
of `registry verify` runs and passes, then times, interleaved and each --runs times, as fresh processes:

  registry verify   registry verify OUT --format json   (every file's sha256 against provenance.json,
                                                          no extra file, card, smoke report)
  sha256sum         sha256sum FILE...                     (the files provenance.json lists)

Both read from a warm page cache (an untimed first round reads everything once). Prints the medians and
their ratio; the target is registry verify <= 1.3x sha256sum.

    .venv/bin/python benchmarks/verify_bench.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def merged(cache: Path) -> Path:
    """The pair merged 0.3/0.7 by `registry merge`, with a card and smoke report of its merge (made once)."""
    from merge_bench import build_pair

    from registry.reports import CheckEntry, Provenance, Smoke, read, write

    a, b = build_pair(cache / "qwen2-380m")
    work = cache / "verify"
    out = work / "out"
    if not (out / "README.md").is_file():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        # Random weights: unrelated as far as plan can tell, which is what the bench wants.
        models = [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}]
        block = {"merge_method": "linear", "models": models, "parameters": {"normalize": True}, "dtype": "bfloat16"}
        (work / "recipe.yaml").write_text(json.dumps({"repo_id": "bench/qwen2-380m-merge", "allow_unrelated": True, "merge": block}))
        env = {**os.environ, "REGISTRY_HOME": str(work / "home")}
        print(f"merging the pair into {out}", file=sys.stderr)
        subprocess.run([str(BIN / "registry"), "merge", str(work / "recipe.yaml"), "-o", str(out), "--device", "cpu", "--format", "json"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        merge_id = read(Provenance, out).merge_identity
        write(Smoke(merge_identity=merge_id, passed=True, device="cpu", checks=[CheckEntry(name="short", status="passed", reason="-")]), out)
        (out / "README.md").write_text(f"---\nregistry:\n  merge_identity: {merge_id}\n---\n\n# bench/qwen2-380m-merge\n")
    return out


def timed(cmd: list[str], ok: tuple[int, ...] = (0,)) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True)
    wall = time.perf_counter() - started
    if done.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout.decode()[-2000:]}{done.stderr.decode()[-2000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each contender (default 5)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "registry-bench",
                        help="where the checkpoint pair and its merge are built once")
    args = parser.parse_args()

    from registry.reports import Provenance, read

    out = merged(args.cache)
    files = [str(out / rel) for rel in read(Provenance, out).files]
    size = sum(os.path.getsize(f) for f in files)
    contenders = {
        "registry verify": [str(BIN / "registry"), "verify", str(out), "--format", "json"],
        "sha256sum": ["sha256sum", *files],
    }
    verdict = json.loads(subprocess.run(contenders["registry verify"], capture_output=True, check=True).stdout)["verdict"]
    results: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(args.runs + 1):
        for name in names if round_ % 2 else names[::-1]:
            wall = timed(contenders[name])
            if round_:
                results[name].append(wall)
            print(f"round {round_}{' (warm-up)' if not round_ else ''}: {name:<16} {wall:6.3f} s", file=sys.stderr)
    base = statistics.median(results["sha256sum"])
    paired = statistics.median(v / s for v, s in zip(results["registry verify"], results["sha256sum"], strict=True))
    print(f"\n{len(files)} files, {size / 1e9:.2f} GB ({out}); registry verify says: {verdict}")
    print(f"{'contender':<16} {'median s':>9} {'x sha256sum':>12}  runs (s)")
    for name in names:
        walls = results[name]
        print(f"{name:<16} {statistics.median(walls):9.3f} {statistics.median(walls) / base:12.2f}  {', '.join(f'{w:.3f}' for w in walls)}")
    print(f"paired ratio (median over rounds of registry verify / sha256sum in the same round): {paired:.2f}; target <= 1.30")
    print(f"machine: {os.cpu_count()} CPUs, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
