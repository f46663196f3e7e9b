#!/usr/bin/env python
"""Whole-process timing of `registry merge --device cuda` against the I/O floor, on a CUDA machine.

Builds once (cached in ~/.cache/registry-bench) the reference pair of benchmarks/reference_scale.py:
the real 1.5B configuration of the reference merge (hidden 1536, 28 layers, 12 heads, 2 KV heads,
intermediate 8960, vocab 151936, untied, bfloat16: 1.78B parameters, 3.55 GB a checkpoint), one random
base plus per-checkpoint noise, then times, interleaved, --runs times each:

  registry   registry merge RECIPE -o OUT --device cuda
  io-floor   read both inputs and write (and fsync) an output of the same size

Target: registry <= 2x the I/O floor. With --compare-cpu it also merges once on the CPU and says
whether the CUDA output is bit-identical to it. Exits with a message, measuring nothing, without CUDA.

    .venv/bin/python benchmarks/merge_gpu.py [--runs 3] [--compare-cpu]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import FLOOR, REGISTRY, run
from reference_scale import build_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each contender (default 3)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "registry-bench")
    parser.add_argument("--compare-cpu", action="store_true", help="also merge on the CPU and compare the outputs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("merge_gpu.py needs a CUDA GPU and torch sees none: the GPU figures were not measured")
    a, b, _ = build_reference(args.cache, device="cuda")
    work = args.cache / "work-gpu"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    merge_block = {"merge_method": "linear", "parameters": {"normalize": True}, "dtype": "bfloat16",
                   "models": [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}]}
    (work / "recipe.yaml").write_text(json.dumps({"repo_id": "bench/qwen2-1.5b-merge", "merge": merge_block}))
    out_bytes = (a / "model.safetensors").stat().st_size
    env = {**os.environ, "REGISTRY_HOME": str(work / "home")}
    env.pop("REGISTRY_MERGE_ENGINE", None)  # the default engine is what is measured

    def registry(out: Path, device: str = "cuda") -> list[str]:
        return [*REGISTRY, "merge", str(work / "recipe.yaml"), "-o", str(out), "--device", device, "--format", "json"]

    contenders = {
        "registry": registry,
        "io-floor": lambda out: [sys.executable, "-c", FLOOR, str(a / "model.safetensors"), str(b / "model.safetensors"), str(out), str(out_bytes)],
    }
    results: dict[str, list[tuple[float, int, float]]] = {n: [] for n in contenders}
    for round_ in range(args.runs + 1):
        for name in (list(contenders) if round_ % 2 == 0 else list(contenders)[::-1]):
            out = work / f"out-{name}"
            wall, rss, cpu = run(contenders[name](out), env)
            if round_ > 0:
                results[name].append((wall, rss, cpu))
            print(f"round {round_}{' (warm-up)' if round_ == 0 else ''}: {name:<9} {wall:6.2f} s  {rss / 1e9:5.2f} GB", file=sys.stderr)
            if name == "registry" and round_ == 0 and args.compare_cpu:
                shutil.move(str(out), work / "first-cuda")
            shutil.rmtree(out, ignore_errors=True)
            Path(out).unlink(missing_ok=True)

    floor = statistics.median(w for w, _, _ in results["io-floor"])
    summary = {}
    print(f"\n{'contender':<10} {'median s':>9} {'x floor':>8} {'peak RSS GB':>12}  runs (s)")
    for name, rows in results.items():
        wall = statistics.median(w for w, _, _ in rows)
        rss = statistics.median(r for _, r, _ in rows)
        summary[name] = {"median_s": wall, "ratio_floor": wall / floor, "median_peak_rss": rss, "runs_s": [w for w, _, _ in rows]}
        print(f"{name:<10} {wall:9.2f} {wall / floor:8.2f} {rss / 1e9:12.2f}  {', '.join(f'{w:.2f}' for w, _, _ in rows)}")
    print(f"target: registry <= 2.00x the I/O floor; GPU: {torch.cuda.get_device_name(0)}")
    if args.compare_cpu:
        wall, _, _ = run(registry(work / "cpu", "cpu"), env)
        same = _digests(work / "first-cuda") == _digests(work / "cpu")
        summary["cpu_merge_s"], summary["cuda_equals_cpu"] = wall, same
        print(f"CPU merge: {wall:.2f} s; CUDA output bit-identical to the CPU output: {same}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


if __name__ == "__main__":
    main()
