"""The toy evaluation, whole process: `registry eval` with the lm-eval plugin vs lm-eval's own CLI (`lm-eval run`).

    python benchmarks/eval_toy.py [--runs 3] [--tests]

Setup (not timed): the plugin pip-installed into a scratch folder (found through its entry point, as
a user's install would be), the toy's 0.3/0.7 merge made by `registry merge`, and a recipe whose
`eval:` section scores the pass-key task of plugins/registry-lm-eval/tests/tasks (10 chat prompts of
256 and 512 tokens), parents off, so both commands score the same folder on the same task once:

- `registry eval MERGE --recipe R --device cpu` (eval.json removed before each run, so it evaluates);
- `lm-eval run --model hf --model_args pretrained=MERGE,dtype=bfloat16 --tasks toy_passkey --include_path TASKS
  --apply_chat_template --device cpu --batch_size 1`.

Runs alternate, both offline (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1). Printed: medians, min, max,
the ratio of the medians, and a row for the README's benchmark table. `--tests` also times
`pytest tests/test_lm_eval_plugin.py` once (whole process), for the CI budget.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugins" / "registry-lm-eval"
TASKS = PLUGIN / "tests" / "tasks"
TOY = ROOT / "tests" / "fixtures" / "toy"
BIN = Path(sys.executable).parent

RECIPE = f"""\
repo_id: bench/toy-eval
sources:
  cos: {{model: {TOY / 'ft_cos'}}}
  fmt: {{model: {TOY / 'ft_fmt'}}}
merge:
  merge_method: linear
  models:
    - {{model: cos, parameters: {{weight: 0.3}}}}
    - {{model: fmt, parameters: {{weight: 0.7}}}}
  parameters: {{normalize: true}}
  dtype: bfloat16
eval:
  evaluator: lm-eval
  tasks: [toy_passkey]
  parents: false
  options: {{include_path: {TASKS}, dtype: bfloat16}}
"""


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    """Wall seconds of the command; it must succeed."""
    return run_cpu(cmd, env, cwd)[0]


def run_cpu(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and its children): on a loaded machine the CPU time is the steadier figure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tests", action="store_true", help="also time pytest tests/test_lm_eval_plugin.py once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as scratch:
        work = Path(scratch)
        site = work / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", str(site), str(PLUGIN)], check=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REGISTRY_LOAD_PLUGINS", "PYTHONDONTWRITEBYTECODE")}
        env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(site)]), REGISTRY_HOME=str(work / ".registry"),
                   HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        recipe = work / "toy.yaml"
        recipe.write_text(RECIPE)
        merged = work / "merge"
        run([sys.executable, "-m", "registry", "merge", str(recipe), "-o", str(merged), "--device", "cpu"], env, work)
        ours = [sys.executable, "-m", "registry", "eval", str(merged), "--recipe", str(recipe), "--device", "cpu"]
        base = [str(BIN / "lm-eval"), "run", "--model", "hf", "--model_args", f"pretrained={merged},dtype=bfloat16",
                "--tasks", "toy_passkey", "--include_path", str(TASKS), "--apply_chat_template",
                "--device", "cpu", "--batch_size", "1"]
        times: dict[str, list[float]] = {"registry eval": [], "lm-eval run": []}
        for i in range(args.runs + 1):  # the first round warms the page and bytecode caches and is not counted
            (merged / "eval.json").unlink(missing_ok=True)
            t_ours = run(ours, env, work)
            t_base = run(base, env, work)
            if i:
                times["registry eval"].append(t_ours)
                times["lm-eval run"].append(t_base)
        tests = None
        if args.tests:
            test_env = {**env, "PYTHONPATH": str(ROOT)}
            for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "REGISTRY_HOME"):
                test_env.pop(name)
            tests = run_cpu([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_lm_eval_plugin.py"], test_env, ROOT)
        shutil.rmtree(site, ignore_errors=True)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{'command':<16} {'median':>8} {'min':>8} {'max':>8}   ({args.runs} runs, {os.cpu_count()} cores)")
    for name, ts in times.items():
        print(f"{name:<16} {medians[name]:>7.2f}s {min(ts):>7.2f}s {max(ts):>7.2f}s")
    ratio = medians["registry eval"] / medians["lm-eval run"]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"ratio {ratio:.2f}x lm-eval run's wall time")
    if tests is not None:
        print(f"pytest tests/test_lm_eval_plugin.py: {tests[0]:.0f} s wall, {tests[1]:.0f} s CPU; load average {os.getloadavg()[0]:.1f}")
    row = (f"| `eval_toy.py` | `registry eval` of the toy merge on the 10-prompt pass-key task (lm-eval plugin, hf, CPU) vs "
           f"`lm-eval run` on the same folder and task | {medians['registry eval']:.1f} s vs {medians['lm-eval run']:.1f} s "
           f"medians: {ratio:.2f}×" + (f"; the plugin's test file {tests[0]:.0f} s ({tests[1]:.0f} s CPU)" if tests is not None else "") + " |")
    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
