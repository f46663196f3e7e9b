#!/usr/bin/env python
"""Whole-process timing of `registry merge` against `mergekit-yaml` and the I/O floor, on the CPU.

Builds once (cached in ~/.cache/registry-bench) a pair of ~380M-parameter bfloat16 Qwen2 checkpoints
with random weights, then times, interleaved and each at least --runs times, every contender as a fresh
process merging the pair 0.3/0.7 with normalization:

  registry         registry merge RECIPE -o OUT --device cpu
  mergekit         mergekit-yaml CONFIG OUT                (its defaults, the same merge)
  mergekit+opts    mergekit-yaml with the options registry picks (shard size, async write, no card,
                   pinned donor)
  io-floor         read both inputs and write (and fsync) an output of the same size

Each round starts from a warm page cache (a first, untimed round reads everything once) with no dirty
pages left by an earlier run, and registry's hash cache is warm (sources are hashed once, when first
pinned). Peak RSS is each process's ru_maxrss.
Prints medians and ratios (of the medians, and the median of each round's ratio, which a machine whose
speed drifts during the run affects less); --json FILE also writes them.

    .venv/bin/python benchmarks/merge_bench.py [--runs 3]
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
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent
# The registry CLI beside this Python, else run as a module (a checkout on PYTHONPATH, as gpu_suite.sh does).
REGISTRY = [str(BIN / "registry")] if (BIN / "registry").exists() else [sys.executable, "-m", "registry"]
CONFIG = {
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 6,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
# The reference merge's real configuration (DeepSeek-R1-Distill-Qwen-1.5B): 1.78B parameters with the untied head.
CONFIG_1_5B = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}
FLOOR = r"""
import os, sys
inputs, out, size = sys.argv[1:3], sys.argv[3], int(sys.argv[4])
buf = bytearray(8 << 20)
view = memoryview(buf)
for path in inputs:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
with open(out, "wb", buffering=0) as f:
    left = size
    while left:
        left -= f.write(view[: min(left, len(buf))])
    os.fsync(f.fileno())
"""


def build_pair(root: Path, config: dict = CONFIG, device: str = "cpu", *, noise: float | None = None,
               tokenizer: Callable[[Path], None] | None = None) -> tuple[Path, Path]:
    """Two random bf16 Qwen2 checkpoints with `config` (built once; a marker says complete).

    Independently initialised by default; with `noise`, one shared random base (initialised as
    transformers does: N(0, 0.02) matrices, unit norms) plus N(0, noise) per checkpoint, as two fine-tunes
    of one model are. `tokenizer(folder)` writes the tokenizer files (default: a tiny trained BPE).
    """
    a, b = root / "a", root / "b"
    if (root / "complete").exists():
        return a, b
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    shutil.rmtree(root, ignore_errors=True)
    cfg = Qwen2Config(
        **config,
        architectures=["Qwen2ForCausalLM"],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen2ForCausalLM(cfg).state_dict().items()}
    print(f"building a {sum(torch.Size(s).numel() for s in shapes.values()) / 1e6:.0f}M-parameter pair in {root}", file=sys.stderr)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["The grass is green. The sky is blue."], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    for seed, folder in ((1, a), (2, b)):
        folder.mkdir(parents=True)
        cfg.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer(folder)
        else:
            PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>").save_pretrained(folder)
        gen = torch.Generator(device).manual_seed(seed)
        if noise is None:
            state = {k: (torch.randn(s, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu() for k, s in sorted(shapes.items())}
        else:
            # The base is drawn again, identically, for each checkpoint: one state dict in memory at a time.
            base = torch.Generator(device).manual_seed(0)
            state = {k: ((torch.ones(s, device=device) if k.endswith("norm.weight") else torch.randn(s, generator=base, device=device) * 0.02)
                         + torch.randn(s, generator=gen, device=device) * noise).to(torch.bfloat16).cpu()
                     for k, s in sorted(shapes.items())}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        del state
    (root / "complete").write_text("")
    return a, b


# Measures one command from a small process: a child's ru_maxrss starts from the RSS of the process
# it was forked from, so forking the (large) benchmark process directly would inflate every figure.
LAUNCH = r"""
import os, sys
fd = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
os.write(fd, f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}".encode())
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds of one process."""
    read_end, write_end = os.pipe()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCH, str(write_end), *cmd], env=env, pass_fds=(write_end,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(write_end)
    _, err = proc.communicate()
    wall = time.perf_counter() - started
    measured = os.read(read_end, 100).decode().split()
    os.close(read_end)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    return wall, int(measured[0]) * 1024, float(measured[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each contender (default 3)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "registry-bench",
                        help="where the checkpoint pair is built once")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from registry.machine import WRITE_THREADS, shard_size

    a, b = build_pair(args.cache / "qwen2-380m")
    work = args.cache / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    models = [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}]
    merge_block = {"merge_method": "linear", "models": models, "parameters": {"normalize": True}, "dtype": "bfloat16"}
    (work / "mergekit.yml").write_text(json.dumps(merge_block))
    (work / "mergekit-opts.yml").write_text(json.dumps({**merge_block, "base_model": str(a)}))
    # Two independently initialised checkpoints: what is timed is the merge, not their ancestry.
    (work / "recipe.yaml").write_text(json.dumps({"repo_id": "bench/qwen2-380m-merge", "allow_unrelated": True, "merge": merge_block}))
    out_bytes = sum(f.stat().st_size for f in a.glob("*.safetensors"))
    env = {**os.environ, "REGISTRY_HOME": str(work / "home")}
    env.pop("REGISTRY_MERGE_ENGINE", None)  # the default engine is what is measured

    contenders = {
        "registry": lambda out: [*REGISTRY, "merge", str(work / "recipe.yaml"), "-o", str(out), "--device", "cpu", "--format", "json"],
        "mergekit": lambda out: [str(BIN / "mergekit-yaml"), str(work / "mergekit.yml"), str(out)],
        "mergekit+opts": lambda out: [str(BIN / "mergekit-yaml"), str(work / "mergekit-opts.yml"), str(out), "--async-write",
                                      "--write-threads", str(WRITE_THREADS), "--out-shard-size", str(shard_size(out_bytes)), "--no-write-model-card"],
        "io-floor": lambda out: [sys.executable, "-c", FLOOR, str(a / "model.safetensors"), str(b / "model.safetensors"), str(out), str(out_bytes)],
    }
    names = list(contenders)
    results: dict[str, list[tuple[float, int, float]]] = {n: [] for n in names}
    for round_ in range(args.runs + 1):
        # Rotate the order so no contender always runs right after another's writes.
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in order:
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            out.unlink(missing_ok=True)
            # Flush the dirty pages of earlier runs (mergekit-yaml does not fsync its output), so no
            # contender pays for another's writeback.
            os.sync()
            wall, rss, cpu = run(contenders[name](out), env)
            if round_ == 0 and name in ("registry", "mergekit"):
                _keep(out, work / f"first-{name}")
            if round_ > 0:
                results[name].append((wall, rss, cpu))
            print(f"round {round_}{' (warm-up)' if round_ == 0 else ''}: {name:<14} {wall:6.2f} s  {rss / 1e9:5.2f} GB  "
                  f"cpu {cpu:6.2f} s", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
            Path(out).unlink(missing_ok=True)
    same = _same_tensors(work / "first-registry", work / "first-mergekit")

    base_wall = statistics.median(w for w, _, _ in results["mergekit"])
    base_rss = statistics.median(r for _, r, _ in results["mergekit"])
    base_cpu = statistics.median(c for _, _, c in results["mergekit"])
    summary = {}
    base_min = min(w for w, _, _ in results["mergekit"])
    base_walls = [w for w, _, _ in results["mergekit"]]
    print(f"\n{'contender':<14} {'median s':>9} {'x mk':>6} {'paired':>7} {'min s':>7} {'x mk':>6} {'peak RSS GB':>12} "
          f"{'x mk':>6} {'CPU s':>7} {'x mk':>6}  runs (s)")
    for name in names:
        walls = [w for w, _, _ in results[name]]
        rss = statistics.median(r for _, r, _ in results[name])
        cpu = statistics.median(c for _, _, c in results[name])
        wall, fastest = statistics.median(walls), min(walls)
        paired = statistics.median(w / b for w, b in zip(walls, base_walls, strict=True))
        summary[name] = {"median_s": wall, "ratio_wall": wall / base_wall, "ratio_paired": paired, "min_s": fastest,
                         "ratio_min": fastest / base_min, "median_peak_rss": rss, "ratio_rss": rss / base_rss,
                         "median_cpu_s": cpu, "ratio_cpu": cpu / base_cpu, "runs_s": walls}
        print(f"{name:<14} {wall:9.2f} {wall / base_wall:6.2f} {paired:7.2f} {fastest:7.2f} {fastest / base_min:6.2f} "
              f"{rss / 1e9:12.2f} {rss / base_rss:6.2f} {cpu:7.2f} {cpu / base_cpu:6.2f}  {', '.join(f'{w:.2f}' for w in walls)}")
    print("(x mk: ratio to default mergekit-yaml; paired: median over rounds of the ratio to mergekit-yaml in the same round)")
    print(f"\nmerged tensors of registry and default mergekit-yaml identical: {same}")
    print(f"machine: {os.cpu_count()} CPUs, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps({"runs": args.runs, "results": summary, "identical": same}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def _keep(out: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(out, dest)


def _same_tensors(x: Path, y: Path) -> bool:
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        found = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                found.update(dict.fromkeys(st.keys(), f))
        return found

    ix, iy = index(x), index(y)
    if set(ix) != set(iy):
        return False
    for key in sorted(ix):
        with safe_open(ix[key], "pt") as fx, safe_open(iy[key], "pt") as fy:
            if not torch.equal(fx.get_tensor(key), fy.get_tensor(key)):
                return False
    return True


if __name__ == "__main__":
    main()
