"""Signing at publish: its share of a whole `registry publish` of the toy example.

    python benchmarks/sign_bench.py [--runs 5]

Copies recipes/examples/toy_cos_fmt.yaml and its fixtures to a scratch folder and makes an EC P-256
key. Then, interleaved, each run in a fresh registry home (so it merges, smoke-tests and publishes to
the local target from scratch): `registry publish` signed (REGISTRY_SIGNING_KEY set) and unsigned.
Separately, the signing step alone as a publish pays it, in a fresh process each time: importing
model-signing, reading the key (`signing.signing_plan`) and signing the published folder. Prints medians, the signing step's share
of the signed publish, and the signed/unsigned ratio.
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


_COLD = """
import sys, time
from pathlib import Path
from registry.plugins import get_signers
from registry.recipe import load_recipe
from registry.signing import KEY_VARIABLE, signing_plan
recipe, signers = load_recipe(sys.argv[1]), get_signers()  # a publish does these anyway
start = time.perf_counter()
plan = signing_plan(recipe, [], signers, {KEY_VARIABLE: sys.argv[2]})
plan.sign(Path(sys.argv[3]))
print(time.perf_counter() - start)
"""


def publish(work: Path, home: Path, key: Path | None) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if k != "REGISTRY_SIGNING_KEY"}
    env["REGISTRY_HOME"] = str(home)
    if key is not None:
        env["REGISTRY_SIGNING_KEY"] = str(key)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "registry", "publish", RECIPE, "--format", "json"],
                         cwd=work, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, json.loads(run.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "repo"
        for part in ("recipes", "tests/fixtures/toy"):
            shutil.copytree(ROOT / part, work / part, ignore=shutil.ignore_patterns("*.lock.json"))
        key = Path(tmp) / "key.pem"
        key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        signed, unsigned, folder = [], [], None
        for i in range(args.runs):
            for times, use in ((signed, key), (unsigned, None)):
                home = Path(tmp) / f"home-{i}-{'signed' if use else 'unsigned'}"
                seconds, outcome = publish(work, home, use)
                times.append(seconds)
                if use is not None:
                    folder = Path(outcome["model_dir"])
            print(f"run {i + 1}: signed {signed[-1]:.2f} s, unsigned {unsigned[-1]:.2f} s", flush=True)
        assert folder is not None
        # The signing step as a publish pays it: in a fresh process, model-signing imported, the key
        # read (fingerprint) and the folder signed.
        step = []
        for _ in range(args.runs):
            run = subprocess.run([sys.executable, "-c", _COLD, str(work / RECIPE), str(key), str(folder)],
                                 check=True, capture_output=True, text=True, env=os.environ)
            step.append(float(run.stdout))
        files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        size = sum(p.stat().st_size for p in files)
    s, u, g = statistics.median(signed), statistics.median(unsigned), statistics.median(step)
    print(f"bundle: {len(files)} files, {size / 1024:.0f} KiB")
    print(f"publish signed   median {s:.2f} s")
    print(f"publish unsigned median {u:.2f} s  (signed/unsigned {s / u:.3f}x)")
    print(f"signing step (cold: import, key, sign) median {g * 1000:.0f} ms = {100 * g / s:.2f}% of the signed publish")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
