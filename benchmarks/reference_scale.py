#!/usr/bin/env python
"""The reference publish at its real size on the CPU: `registry publish recipes/cos_fmt.yaml --target local`.

Builds once, outside the repo (~/.cache/registry-bench), a synthetic pair with the real configuration of
the reference merge's lineage (DeepSeek-R1-Distill-Qwen-1.5B: hidden 1536, 28 layers, 12 heads, 2 KV
heads, intermediate 8960, vocabulary 151936, untied head, bfloat16; 1.78B parameters, 3.55 GB each): one
shared random base plus N(0, 0.001) per checkpoint, laid out where the recipe's ${CHECKPOINTS} paths
point. The tokenizer is the toy's (tests/fixtures/toy, no download) with its vocabulary padded to the
model's 151936 ids by letter-only placeholder tokens, never produced by encoding: a random model's
argmax is almost always an id past the toy's 410, which would otherwise decode to nothing, failing the
short check for the tokenizer's sake, not the merge's.

Then, in one run:
  publish    the real `registry publish` as one whole process (REGISTRY_HOME in a fresh folder,
             CHECKPOINTS at the pair, the recipe copied byte for byte beside it so its lock file is
             written there). Stages are cut at the publish's own progress lines on stderr (pinned,
             merged, smoke parts, smoke verdict, publishing), each timestamped as it arrives; peak RSS
             and bytes written per stage come from sampling /proc of the process tree (RSS every
             0.2 s, write_bytes of /proc/PID/io), the whole run's peak RSS from its ru_maxrss.
  merge      `registry merge` against `mergekit-yaml` on the same pair, whole processes, interleaved,
             --merge-runs times each after the publish warmed the page cache (the baseline of the
             merge stage; target <= 0.8x), and whether their merged tensors are identical.

Targets on 2 cores: the whole publish <= 15 min with default settings, peak RSS <= 10 GB, merge
<= 0.8x mergekit-yaml; the printed smoke estimate within +-30% of the smoke's actual time. Random weights
retrieve no pass key, the parents no more than the merge: parity then judges a merge against parents
that also fail, and the run is judged on time, memory and verdicts, not retrieval.

--smoke-override bounds the smoke for a run on a registry without a smoke time budget: a YAML mapping
merged into the recipe's smoke block (the recipe copy is then rewritten, and the figures say so).
Writes the figures to --json (default ./reference-scale.json) and prints a table.

    .venv/bin/python benchmarks/reference_scale.py                      # full size (needs ~14 GB of disk)
    .venv/bin/python benchmarks/reference_scale.py --layers 2 --merge-runs 1   # quick reduced run
    .venv/bin/python benchmarks/reference_scale.py --smoke-override '{long: {cpu_max_tokens: 1024, depths: [0.5]}}'
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from merge_bench import BIN, CONFIG_1_5B, LAUNCH, REGISTRY, _same_tensors, build_pair, run  # noqa: E402

RECIPE = ROOT / "recipes" / "cos_fmt.yaml"
TOY = ROOT / "tests" / "fixtures" / "toy" / "base"
NOISE = 0.001  # per-checkpoint noise against the base's 0.02: relative distance about 0.05, as fine-tunes are
TARGETS = {"publish_s": 15 * 60, "peak_rss_bytes": 10 * 10**9, "merge_ratio": 0.8, "estimate_error": 0.30}
GB = 10**9

# Where a stage ends: the publish's own progress lines (registry/pipeline.py notes), in order.
STAGE_ENDS = [
    ("plan", re.compile(r"^pinned \d+ sources")),
    ("merge", re.compile(r"^(merged into|reused the merge in) ")),
    ("smoke", re.compile(r"^smoke test (passed|FAILED)")),
    ("card", re.compile(r"^publishing to ")),
]
# Where a part of the smoke starts (registry/smoke.py notes); lines that match none stay in the current part.
SMOKE_PARTS = [
    (re.compile(r"^smoke: about "), "estimate"),
    (re.compile(r"^loading the model on "), "load merged, calibrate"),
    (re.compile(r"^short generation"), "merged: short, long, NLL"),
    (re.compile(r"^freeing the merged model"), "free merged"),
    (re.compile(r"^evaluating parent '(?P<name>[^']+)'"), "parent {name}: load, short, NLL, long"),
    (re.compile(r"^comparing every tensor"), "weights check"),
    (re.compile(r"^smoke \((cpu|cuda)\)"), "report"),
]
ESTIMATE = re.compile(r"^smoke: about ")


def write_tokenizer(folder: Path, vocab_size: int = CONFIG_1_5B["vocab_size"]) -> None:
    """The toy's tokenizer files, its vocabulary padded with letter-only placeholders to `vocab_size` ids."""
    data = json.loads((TOY / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    known, next_id, i = set(vocab), len(vocab), 0
    while next_id < vocab_size:
        name, n = "", i
        while True:  # bijective base 26: a, b, ..., z, aa, ab, ...
            n, r = divmod(n, 26)
            name = chr(97 + r) + name
            if n == 0:
                break
            n -= 1
        i += 1
        # "Ġ" is the byte-level space: a placeholder decodes to " qabc", letters only, so it never contains a pass key.
        if (token := f"Ġq{name}") not in known:
            vocab[token] = next_id
            next_id += 1
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(TOY / name, folder / name)


def build_reference(cache: Path, layers: int = CONFIG_1_5B["num_hidden_layers"], device: str = "cpu") -> tuple[Path, Path, dict]:
    """The reference pair (built once, its random numbers drawn on `device`) and its config."""
    config = {**CONFIG_1_5B, "num_hidden_layers": layers, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}
    a, b = build_pair(cache / f"qwen2-1.5b-reference-{layers}l", config, device, noise=NOISE, tokenizer=write_tokenizer)
    return a, b, config


def layout(recipe_text: str, checkpoints: Path, a: Path, b: Path) -> dict[str, Path]:
    """Point the recipe's ${CHECKPOINTS} source paths at the pair (symlinks), in the recipe's source order."""
    import yaml

    sources = yaml.safe_load(recipe_text)["sources"]
    placed = {}
    for (name, src), folder in zip(sources.items(), (a, b), strict=True):
        where = Path(src["model"].replace("${CHECKPOINTS}", str(checkpoints)))
        where.parent.mkdir(parents=True, exist_ok=True)
        if not where.is_symlink():
            where.symlink_to(folder, target_is_directory=True)
        placed[name] = where
    return placed


def recipe_copy(work: Path, override: str | None) -> tuple[Path, dict | None]:
    """The recipe beside the run without its eval: section, with `override` merged into its smoke block.

    The reference recipe's evaluation (AIME24 and MATH-500 through lm-eval, 32768 new tokens a sample)
    is a GPU job whose scores random weights cannot earn; this measures merge, smoke, card and publish.
    """
    import yaml

    dest = work / RECIPE.name
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe.pop("eval", None)
    extra = yaml.safe_load(override) if override is not None else None
    if override is not None and not isinstance(extra, dict):
        raise SystemExit(f"--smoke-override must be a YAML mapping, got {override!r}")
    smoke = recipe.setdefault("smoke", {})
    for key, value in (extra or {}).items():
        smoke[key] = {**smoke.get(key, {}), **value} if isinstance(value, dict) and isinstance(smoke.get(key), dict) else value
    dest.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return dest, extra


class TreeSampler(threading.Thread):
    """Samples RSS (sum over the process tree) and bytes written under one root pid until stopped."""

    def __init__(self, root: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.every = root, every
        self.samples: list[tuple[float, int, int]] = []  # (perf_counter, RSS bytes, bytes written)
        self.loads: list[float] = []  # the machine's 1-minute load average, once a second
        self.stopped = threading.Event()
        self._written: dict[int, int] = {}  # last write_bytes seen per pid: a pid that exits keeps its last figure

    def run(self) -> None:
        while not self.stopped.is_set():
            rss = 0
            for pid in self._tree():
                rss += _status(pid, "VmRSS")
                w = _io(pid)
                if w is not None:
                    self._written[pid] = w
            self.samples.append((time.perf_counter(), rss, sum(self._written.values())))
            if len(self.samples) % round(1 / self.every) == 1:
                self.loads.append(os.getloadavg()[0])
            self.stopped.wait(self.every)

    def _tree(self) -> list[int]:
        out, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    todo.extend(int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
            except OSError:
                continue
        return out

    def window(self, start: float, end: float) -> tuple[int, int]:
        """(peak RSS, bytes written) between two instants."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        before = [s for s in self.samples if s[0] < start]
        after = [s for s in self.samples if s[0] >= end]
        # A window shorter than the sampling period holds no sample: the next one stands for it.
        peak = max((s[1] for s in inside or after[:1]), default=0)
        first = before[-1][2] if before else 0
        last = (after[0] if after else (inside[-1] if inside else (before[-1] if before else (0, 0, 0))))[2]
        return peak, max(last - first, 0)


def _status(pid: int, field: str) -> int:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


def _io(pid: int) -> int | None:
    try:
        match = re.search(r"^write_bytes: (\d+)", Path(f"/proc/{pid}/io").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def run_publish(recipe: Path, env: dict[str, str], cwd: Path) -> dict:
    """One whole `registry publish` process: its stderr lines timestamped, its tree sampled, its ru_maxrss."""
    cmd = [*REGISTRY, "publish", str(recipe), "--target", "local", "--device", "cpu"]
    read_end, write_end = os.pipe()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCH, str(write_end), *cmd], env=env, cwd=cwd, pass_fds=(write_end,),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    os.close(write_end)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    lines: list[tuple[float, str]] = []
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    for line in proc.stderr:
        lines.append((time.perf_counter(), line.rstrip("\n")))
        print(f"  [{time.perf_counter() - started:7.1f} s] {line.rstrip()}", file=sys.stderr, flush=True)
    proc.wait()
    reader.join()
    ended = time.perf_counter()
    sampler.stopped.set()
    sampler.join()
    measured = os.read(read_end, 100).decode().split()
    os.close(read_end)
    if proc.returncode != 0:
        tail = "\n".join(text for _, text in lines[-30:])
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return {"cmd": cmd, "started": started, "ended": ended, "lines": lines, "stdout": "".join(out), "sampler": sampler,
            "ru_maxrss": int(measured[0]) * 1024, "cpu_s": float(measured[1]), "load_1min_during": sampler.loads}


def stages(pub: dict) -> tuple[list[dict], list[dict], dict | None]:
    """Per stage and per smoke part: wall, peak RSS and bytes written; and the printed smoke estimate."""
    sampler: TreeSampler = pub["sampler"]
    cuts, todo = [], list(STAGE_ENDS)
    for t, text in pub["lines"]:
        if todo and todo[0][1].search(text):
            cuts.append((todo.pop(0)[0], t))
    if todo:
        raise SystemExit(f"the publish printed no line for the end of stage '{todo[0][0]}': its progress lines changed")
    bounds = [pub["started"], *(t for _, t in cuts), pub["ended"]]
    names = [name for name, _ in cuts] + ["publish"]
    rows = []
    for name, start, end in zip(names, bounds, bounds[1:], strict=False):
        peak, written = sampler.window(start, end)
        rows.append({"stage": name, "wall_s": round(end - start, 2), "peak_rss_bytes": peak, "bytes_written": written})
    smoke_start, smoke_end = bounds[2], bounds[3]
    parts, estimate = [], None
    for t, text in pub["lines"]:
        if not smoke_start <= t <= smoke_end:
            continue
        if ESTIMATE.search(text) and estimate is None:
            estimate = {"line": text, "printed_after_s": round(t - smoke_start, 2)}
        for pattern, label in SMOKE_PARTS:
            if m := pattern.search(text):
                parts.append({"part": label.format(**m.groupdict()), "start": t})
                break
    # What comes before the first note (reading reports, the sources' pins) is the smoke's own set-up.
    parts.insert(0, {"part": "set-up", "start": smoke_start})
    for part, following in zip(parts, [*parts[1:], {"start": smoke_end}], strict=True):
        peak, written = sampler.window(part["start"], following["start"])
        part.update(wall_s=round(following["start"] - part.pop("start"), 2), peak_rss_bytes=peak, bytes_written=written)
    return rows, parts, estimate


def smoke_findings(smoke: dict) -> dict:
    """Skipped lengths with their reasons, retrieval of the merge and each parent, and the verdicts."""
    skipped: dict[tuple[int, str], list[float]] = {}
    for r in smoke.get("long", []):
        if r["status"] == "skipped":
            reason = r.get("reason") or ""
            if r.get("estimated_seconds") is not None:
                reason += f" (estimated {r['estimated_seconds']:.0f} s for this prompt)"
            skipped.setdefault((r["tokens"], reason), []).append(r["depth"])
    estimate = smoke.get("estimate") or {}
    ran = [r for r in smoke.get("long", []) if r["status"] != "skipped"]
    return {
        "passed": smoke["passed"],
        "checks": {c["name"]: {"status": c["status"], "reason": c["reason"]} for c in smoke["checks"]},
        "ran": [{"tokens": r["tokens"], "depth": r["depth"], "status": r["status"], "seconds": r.get("seconds")} for r in ran],
        "skipped": [{"tokens": n, "depths": d, "reason": reason} for (n, reason), d in sorted(skipped.items())],
        "retrieval": {p["model"]: f"{p['long_retrieved']}/{p['long_total']}" for p in smoke.get("parity", [])},
        "budget_skipped": smoke.get("skipped", []),
        "not_checked": smoke.get("not_checked", []),
        "dtype": smoke.get("dtype"), "dtype_reason": smoke.get("dtype_reason"),
        "estimate": {k: v for k, v in estimate.items() if k != "runs"} or None,
        "estimated_runs": estimate.get("runs", []),
    }


def merge_baseline(a: Path, b: Path, work: Path, env: dict[str, str], runs: int) -> dict:
    """`registry merge` against `mergekit-yaml`, whole processes, interleaved; medians and their ratio."""
    merge_block = {"merge_method": "linear", "parameters": {"normalize": True}, "dtype": "bfloat16",
                   "models": [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}]}
    (work / "mergekit.yml").write_text(json.dumps(merge_block))
    contenders = {
        "registry merge": lambda out: [*REGISTRY, "merge", str(work / RECIPE.name), "-o", str(out), "--device", "cpu",
                                       "--format", "json"],
        "mergekit-yaml": lambda out: [str(BIN / "mergekit-yaml"), str(work / "mergekit.yml"), str(out)],
    }
    results: dict[str, list[tuple[float, int, float]]] = {n: [] for n in contenders}
    same = None
    for round_ in range(runs):
        for name in (list(contenders) if round_ % 2 == 0 else list(contenders)[::-1]):
            out = work / f"out-{name.split()[0]}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # mergekit-yaml does not fsync: no contender pays for another's writeback
            results[name].append(run(contenders[name](out), env))
            print(f"  merge round {round_ + 1}: {name:<15} {results[name][-1][0]:7.2f} s  {results[name][-1][1] / GB:5.2f} GB",
                  file=sys.stderr, flush=True)
        if round_ == 0:
            same = _same_tensors(work / "out-registry", work / "out-mergekit-yaml")
        for name in contenders:
            shutil.rmtree(work / f"out-{name.split()[0]}", ignore_errors=True)
    summary = {name: {"median_s": statistics.median(w for w, _, _ in rows), "runs_s": [round(w, 2) for w, _, _ in rows],
                      "median_peak_rss_bytes": statistics.median(r for _, r, _ in rows)} for name, rows in results.items()}
    summary["ratio"] = summary["registry merge"]["median_s"] / summary["mergekit-yaml"]["median_s"]
    summary["identical_tensors"] = same
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=CONFIG_1_5B["num_hidden_layers"], help="hidden layers (default 28, the real size)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "registry-bench", help="where the pair is built once")
    ap.add_argument("--merge-runs", type=int, default=3, help="rounds of registry merge vs mergekit-yaml (default 3)")
    ap.add_argument("--smoke-override", metavar="YAML", help="a mapping merged into the recipe's smoke block, to bound the smoke")
    ap.add_argument("--json", type=Path, default=Path("reference-scale.json"), help="where the figures go")
    args = ap.parse_args()

    per_checkpoint = _parameters(args.layers) * 2
    built = (args.cache / f"qwen2-1.5b-reference-{args.layers}l" / "complete").exists()
    # The pair (unless built), the publish's build folder, the local registry's copy, two merge outputs at once.
    need = (0 if built else 2 * per_checkpoint) + 4 * per_checkpoint
    args.cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.cache).free
    if free < need:
        raise SystemExit(f"{args.cache}: {free / GB:.1f} GB free, {need / GB:.1f} GB needed; free some, or pass --layers or --cache")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    a, b, config = build_reference(args.cache, args.layers)
    build_s = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="reference-scale-", dir=args.cache))
    try:
        checkpoints = args.cache / f"checkpoints-{args.layers}l"
        recipe, override = recipe_copy(work, args.smoke_override)
        layout(recipe.read_text(), checkpoints, a, b)
        env = {**os.environ, "REGISTRY_HOME": str(work / "home"), "CHECKPOINTS": str(checkpoints), "PYTHONPATH": str(ROOT)}
        env.pop("REGISTRY_MERGE_ENGINE", None)
        print(f"publishing {RECIPE.relative_to(ROOT)} at {args.layers} layers ({per_checkpoint / GB:.2f} GB a checkpoint)"
              + (f", smoke overridden with {json.dumps(override)}" if override else ""), file=sys.stderr, flush=True)
        pub = run_publish(recipe, env, work)
        rows, parts, estimate = stages(pub)
        model_dir = Path(re.search(r"^model: +(.+)$", pub["stdout"], re.M)[1].strip())
        smoke = smoke_findings(json.loads((model_dir / "smoke.json").read_text()))
        written_dirs = {"build folder": _du(model_dir), "local registry": _du(work / "home" / "models")}
        merge = merge_baseline(a, b, work, env, args.merge_runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    total = pub["ended"] - pub["started"]
    smoke_s = next(r["wall_s"] for r in rows if r["stage"] == "smoke")
    figures = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
                    "load_1min_during_median": statistics.median(pub["load_1min_during"]) if pub["load_1min_during"] else None,
                    "load_1min_during_max": max(pub["load_1min_during"], default=None),
                    "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "model": {"layers": args.layers, "parameters": _parameters(args.layers), "checkpoint_bytes": per_checkpoint,
                  "noise": NOISE, "config": config, "pair_built_s": round(build_s, 1) if not built else None},
        "smoke_override": override,
        "publish": {"command": " ".join(pub["cmd"][1:]), "wall_s": round(total, 2), "cpu_s": round(pub["cpu_s"], 1),
                    "peak_rss_bytes": pub["ru_maxrss"], "stages": rows, "smoke_parts": parts, "written": written_dirs},
        "smoke_estimate": _estimate(estimate, smoke, parts, smoke_s),
        "smoke": smoke,
        "merge": merge,
        "targets": TARGETS,
    }
    figures["verdicts"] = {
        "publish <= 15 min": total <= TARGETS["publish_s"],
        "publish with default smoke settings": override is None,
        "peak RSS <= 10 GB": pub["ru_maxrss"] <= TARGETS["peak_rss_bytes"],
        "merge <= 0.8x mergekit-yaml": merge["ratio"] <= TARGETS["merge_ratio"],
        "smoke estimate within 30%": abs(figures["smoke_estimate"]["error"]) <= TARGETS["estimate_error"] if estimate else None,
    }
    args.json.write_text(json.dumps(figures, indent=2))
    _print(figures)
    print(f"\nfigures written to {args.json}")


def _estimate(printed: dict | None, smoke: dict, parts: list[dict], smoke_s: float) -> dict | None:
    """The printed estimate against the smoke's actual time: all of it, and what the estimate covers."""
    if smoke["estimate"] is None:
        return None
    seconds = smoke["estimate"]["total_seconds"]
    # The estimate covers the models' loads, generations and NLL; not the calibration before it is
    # printed, nor the weights check.
    covered = sum(p["wall_s"] for p in parts if p["part"] not in ("set-up", "weights check", "report"))
    return {**(printed or {"line": None}), "seconds": seconds, "actual_s": smoke_s, "error": seconds / smoke_s - 1,
            "actual_covered_s": round(covered, 2), "error_covered": seconds / covered - 1 if covered else None}


def _parameters(layers: int) -> int:
    c = CONFIG_1_5B
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    return 2 * v * h + h + layers * layer


def _du(folder: Path) -> int:
    """Bytes under a folder, each inode once (the local registry hard-links what an earlier version holds)."""
    seen, total = set(), 0
    for path in folder.rglob("*"):
        st = path.lstat()
        if path.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _print(f: dict) -> None:
    p = f["publish"]
    print(f"\n{f['publish']['command']}  ({f['model']['layers']} layers, {f['model']['parameters'] / 1e9:.2f}B parameters, "
          f"{f['machine']['cpus']} CPUs, load {f['machine']['load_1min_during_median']})")
    if f["smoke_override"]:
        print(f"smoke bounded by --smoke-override {json.dumps(f['smoke_override'])}: not the default settings")
    print(f"{'stage':<40} {'wall s':>8} {'peak RSS GB':>12} {'written GB':>11}")
    for r in p["stages"]:
        print(f"{r['stage']:<40} {r['wall_s']:8.1f} {r['peak_rss_bytes'] / GB:12.2f} {r['bytes_written'] / GB:11.2f}")
        if r["stage"] == "smoke":
            for part in p["smoke_parts"]:
                print(f"  {part['part']:<38} {part['wall_s']:8.1f} {part['peak_rss_bytes'] / GB:12.2f} {part['bytes_written'] / GB:11.2f}")
    print(f"{'whole publish':<40} {p['wall_s']:8.1f} {p['peak_rss_bytes'] / GB:12.2f}   (ru_maxrss; CPU {p['cpu_s']:.0f} s)")
    m = f["merge"]
    for name in ("registry merge", "mergekit-yaml"):
        print(f"{name:<40} {m[name]['median_s']:8.1f} {m[name]['median_peak_rss_bytes'] / GB:12.2f}   runs {m[name]['runs_s']}")
    print(f"merge ratio {m['ratio']:.2f}x mergekit-yaml; merged tensors identical: {m['identical_tensors']}")
    e = f["smoke_estimate"]
    print(f"smoke estimate: {e['seconds']:.0f} s printed, {e['actual_s']:.0f} s actual ({e['error']:+.0%})" if e
          else "smoke estimate: none printed (this registry prints no smoke time estimate)")
    s = f["smoke"]
    if e:
        print(f"  printed: {e['line']}")
        print(f"  against the loads, generations and NLL it covers: {e['actual_covered_s']:.0f} s ({e['error_covered']:+.0%})")
    print(f"smoke dtype: {s['dtype']} ({s['dtype_reason']})")
    for row in s["skipped"]:
        print(f"skipped {row['tokens']} tokens (depths {row['depths']}): {row['reason']}")
    for row in s["budget_skipped"]:
        print(f"left out {row['tokens']} tokens: {row['reason']} (estimated {row['estimated_seconds']:.0f} s, all models)")
    ran = int(s["retrieval"].get("merged", "0/0").split("/")[1])
    if not ran:
        print("retrieved: no long prompt ran (every length was left out, above), so retrieval was not compared")
    else:
        parents = [v for k, v in s["retrieval"].items() if k != "merged"]
        print(f"retrieved: {', '.join(f'{k} {v}' for k, v in s['retrieval'].items())}"
              + (f" (random weights: the parents retrieve {parents[0]} too)" if all(v.startswith("0/") for v in parents) else ""))
    print("smoke verdicts: " + "; ".join(f"{k} {v['status']}" for k, v in s["checks"].items()))
    print("targets: " + "; ".join(f"{k}: {'met' if v else ('MISSED' if v is False else 'n/a')}" for k, v in f["verdicts"].items()))


if __name__ == "__main__":
    main()
