#!/usr/bin/env bash
# The GPU checks of the reference job, as one prepared script for a machine with one CUDA GPU (about 8 min):
#
#   1. merge    benchmarks/merge_gpu.py --compare-cpu: `registry merge --device cuda` of a pair with the
#               reference merge's real 1.5B configuration against the I/O floor (target <= 2x), and
#               bit-identity of the CUDA output with the CPU merge's
#   2. long     benchmarks/smoke_long.py --device cuda: the long-context check of the reference
#               architecture at 32768, 65536 and 131072 tokens, whole and chunked prefill
#               (target <= 16 GB peak and <= 60 s at 131072)
#
# Writes every figure to one JSON file: $OUT/gpu-suite.json when OUT is set, else ./gpu-suite.json.
# Run from anywhere: it works in the repository that holds it and builds its pair in
# ${REGISTRY_BENCH_CACHE:-$HOME/.cache/registry-bench} (7.1 GB of disk).
#
# Needs: a Python with torch built for CUDA, transformers, safetensors, mergekit and registry's other
# dependencies (pyproject.toml). It uses the first of $PYTHON, ./.venv/bin/python, python3 that imports
# torch; registry itself is taken from this checkout (PYTHONPATH), so `pip install -e .` is not needed.
# Without CUDA, or without a dependency, each part says what is missing, the JSON records it, and the
# script exits 0 (measuring nothing): it cannot fail a machine that has no GPU.
#
#     bash benchmarks/gpu_suite.sh

set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-.}
mkdir -p "$OUT_DIR"
JSON="$OUT_DIR/gpu-suite.json"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
CACHE=${REGISTRY_BENCH_CACHE:-$HOME/.cache/registry-bench}
STARTED=$(date +%s)

say() { printf 'gpu_suite: %s\n' "$*" >&2; }

# Writes the JSON from what is in $WORK: part results (merge.json, long.json) and status lines (*.status).
finish() {
    "${PY:-python3}" - "$WORK" "$JSON" "$STARTED" <<'EOF' || printf '{"status": "could not assemble the figures"}\n' > "$JSON"
import json, pathlib, sys, time
work, out, started = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
figures = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": int(time.time()) - started}
for f in sorted(work.glob("*.status")):
    figures[f.stem + "_status"] = f.read_text().strip()
for f in sorted(work.glob("*.json")):
    try:
        figures[f.stem] = json.loads(f.read_text())
    except ValueError:
        figures[f.stem] = {"unreadable": f.read_text()[-2000:]}
out.write_text(json.dumps(figures, indent=2))
EOF
    say "figures written to $JSON"
}

# 0. A Python with torch, and CUDA.
PY=
for candidate in "${PYTHON:-}" "$REPO/.venv/bin/python" python3 python; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import torch' >/dev/null 2>&1; then PY=$(command -v "$candidate"); break; fi
done
if [ -z "$PY" ]; then
    say "no Python here imports torch: install torch built for CUDA and registry's dependencies (pyproject.toml), or set PYTHON"
    echo "not measured: no Python with torch (set PYTHON, or install torch built for CUDA)" > "$WORK/suite.status"
    PY=python3 finish
    exit 0
fi
"$PY" -c 'import torch, sys; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, " + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"))' \
    > "$WORK/environment.status" 2>&1
say "$PY: $(cat "$WORK/environment.status")"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    say "torch sees no CUDA device: the GPU figures were not measured"
    echo "not measured: torch sees no CUDA device" > "$WORK/suite.status"
    finish
    exit 0
fi
MISSING=$(cd "$REPO" && PYTHONPATH="$REPO" "$PY" -c '
import importlib.util
missing = [m for m in ("transformers", "safetensors", "mergekit", "pydantic", "typer", "rich", "yaml", "huggingface_hub", "jinja2") if importlib.util.find_spec(m) is None]
if not missing:
    try:
        import registry.cli  # noqa: F401
    except Exception as exc:
        missing.append(f"registry ({type(exc).__name__}: {exc})")
print(" ".join(missing))' 2>&1)
if [ -n "$MISSING" ]; then
    say "$PY lacks: $MISSING (pip install them, or -e $REPO, with network access)"
    echo "not measured: $PY lacks $MISSING" > "$WORK/suite.status"
    finish
    exit 0
fi

# registry runs from this checkout: installed or not, `python -m registry` finds it here.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export REGISTRY_LOAD_PLUGINS=""

# 1. The merge on CUDA against the I/O floor, and against the CPU merge (about 4 min with the pair's build).
say "1/2 merge: registry merge --device cuda vs the I/O floor, and the CPU merge"
if timeout 330 "$PY" "$REPO/benchmarks/merge_gpu.py" --runs 2 --compare-cpu --cache "$CACHE" --json "$WORK/merge.json" >&2; then
    echo "measured" > "$WORK/merge.status"
else
    echo "failed or timed out (exit $?); see the output" > "$WORK/merge.status"
fi

# 2. The long-context check at 32768, 65536 and 131072 tokens (whole prompt when it fits, and 4096-token chunks).
say "2/2 long: the long-context check on CUDA at 32768, 65536 and 131072 tokens"
timeout 170 "$PY" "$REPO/benchmarks/smoke_long.py" --device cuda --json > "$WORK/long.out"
code=$?
# smoke_long.py prints its table, then the JSON from the first line that opens an object.
sed -n '/^{/,$p' "$WORK/long.out" > "$WORK/long.json"
grep -v '^[ {}\]]' "$WORK/long.out" | grep -v '^  ' >&2 || true
case $code in
    0) echo "measured: targets at 131072 met" > "$WORK/long.status" ;;
    1) echo "measured: a target at 131072 missed" > "$WORK/long.status" ;;
    *) echo "failed or timed out (exit $code); see the output" > "$WORK/long.status"; [ -s "$WORK/long.json" ] || rm -f "$WORK/long.json" ;;
esac

finish
