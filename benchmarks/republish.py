"""Re-publishing, whole process: `registry publish` with nothing to do, and after a card-only edit.

    python benchmarks/republish.py [--runs 11]

Publishes recipes/examples/toy_cos_fmt.yaml once into a scratch registry home, then times, interleaved
with `python -c pass`:

- an unchanged re-publish (pin the sources, ask the local target, render the card, stop);
- a card-only edit: the team template changes before every run, so each run re-renders the card and
  publishes a new local version whose other files are hard links (no merge, no smoke test).

Targets: unchanged median <= 3 s; card-only median <= 1.5x the unchanged one; mergekit (and torch)
never imported by a card-only run (checked with `-X importtime` in a separate run).
"""

from __future__ import annotations

import argparse
import json
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
CARD_ONLY_RATIO = 1.5


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    args = parser.parse_args()
    registry = os.path.join(os.path.dirname(sys.executable), "registry")
    default_template = (ROOT / "templates" / "model_card.md.j2").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        # A copy of the recipes and fixtures, so the lock file the first publish writes stays out of the repo.
        work = Path(tmp) / "repo"
        for part in ("recipes", "tests/fixtures/toy"):
            shutil.copytree(ROOT / part, work / part, ignore=shutil.ignore_patterns("*.lock.json"))
        (work / "templates").mkdir()
        team_template = work / "templates" / "model_card.md.j2"
        edits = iter(range(1_000_000))

        def edit_card() -> None:
            team_template.write_text(default_template + f"\nCard edit {next(edits)}.\n")

        env = {**os.environ, "REGISTRY_HOME": str(Path(tmp) / "home")}
        edit_card()
        first = timed([registry, "publish", RECIPE], env, work)

        # The check: a card-only run imports neither mergekit nor torch, and merges nothing.
        edit_card()
        check = subprocess.run([sys.executable, "-X", "importtime", registry, "publish", RECIPE, "--format", "json"],
                               cwd=work, env=env, capture_output=True, text=True, check=True)
        imported = {line.rsplit("|", 1)[-1].strip() for line in check.stderr.splitlines() if line.startswith("import time:")}
        outcome = json.loads(check.stdout)
        heavy = sorted(imported & {"mergekit", "torch", "transformers"})

        names = ("registry publish (unchanged)", "registry publish (card-only edit)", "python -c pass")
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.runs):
            edit_card()
            times[names[1]].append(timed([registry, "publish", RECIPE], env, work))
            times[names[0]].append(timed([registry, "publish", RECIPE], env, work))
            times[names[2]].append(timed([sys.executable, "-c", "pass"], env, work))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"first publish (merge, smoke, card, local): {first:.2f}s")
    print(f"{'command':<36} {'median':>8} {'min':>8} {'max':>8}   ({args.runs} runs, {os.cpu_count()} cores)")
    for name, ts in times.items():
        print(f"{name:<36} {medians[name]:>7.3f}s {min(ts):>7.3f}s {max(ts):>7.3f}s")
    unchanged, card_only = medians[names[0]], medians[names[1]]
    ratio = card_only / unchanged
    print(f"card-only edit: merge {outcome['merge']}, smoke reused {outcome['smoke']['reused']}, "
          f"heavy modules imported: {', '.join(heavy) or 'none'}")
    met_unchanged = unchanged <= TARGET_S
    met_ratio = ratio <= CARD_ONLY_RATIO and not heavy and outcome["merge"] == "skipped"
    print(f"target unchanged median <= {TARGET_S}s: {'met' if met_unchanged else 'MISSED'}")
    print(f"target card-only <= {CARD_ONLY_RATIO}x unchanged, mergekit not imported: ratio {ratio:.2f}, "
          f"{'met' if met_ratio else 'MISSED'}")
    return 0 if met_unchanged and met_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
