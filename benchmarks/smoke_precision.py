#!/usr/bin/env python
"""bfloat16 against float32 for the smoke test on CPU: speed, and whether the checks' measurements agree.

For each model and dtype, in a fresh process (float32 and bfloat16 alternating, --repeats times):
  - a prefill of 512 (median of 3) and 2048 tokens (last-position logits, as the long-context check runs it);
  - one decoding step, the median of 16;
  - the NLL of the parity check's default fixed text (registry.smoke.nll);
  - the pass-key prompts the toy recipe runs (256 and 512 tokens, depths 0.1/0.5/0.9): retrieved or not;
  - the arg-max token after each prompt, compared between the dtypes.

Models: the trained toy (tests/fixtures/toy: base, ft_cos, ft_fmt; 0.6M parameters) and a larger
random model built by tests/models.py (hidden 1024, 8 layers, vocabulary 32000: 155M parameters),
both stored in bfloat16 as the reference merge is. The smoke test picks bfloat16 on CPU only for a
bfloat16 checkpoint on a CPU with native bfloat16 instructions (registry.machine.cpu_bf16_flag);
this script says whether this CPU has them and what either choice costs.

    .venv/bin/python benchmarks/smoke_precision.py [--repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
TOY = ROOT / "tests" / "fixtures" / "toy"
LENGTHS = (512, 2048)
NEEDLES = ((256, 0.1), (256, 0.5), (256, 0.9), (512, 0.1), (512, 0.5), (512, 0.9))


def measure(folder: Path, dtype: str) -> dict:
    """One process's figures for one model in one dtype."""
    import torch

    from registry.recipe import LongSmoke, SmokeConfig
    from registry.smoke import (
        NeedlePromptBuilder,
        SmokeSettings,
        greedy_generate,
        load_model,
        nll,
        pass_key,
        prefill,
    )

    model, tok = load_model(folder, "cpu", dtype)
    vocab = model.config.vocab_size
    out: dict = {"parameters": sum(p.numel() for p in model.parameters())}
    prefill(model, [5] * 16)
    for n in LENGTHS:
        ids = [(7919 * i + 13) % vocab for i in range(n)]
        times = []
        for _ in range(3 if n <= 512 else 1):
            start = time.perf_counter()
            logits, _ = prefill(model, ids)
            times.append(time.perf_counter() - start)
        out[f"prefill_{n}"] = statistics.median(times)
        out[f"argmax_{n}"] = int(logits[0, -1].float().argmax())
    short = [(7919 * i + 13) % vocab for i in range(64)]
    one = time.perf_counter()
    greedy_generate(model, short, 1, set())
    one = time.perf_counter() - one
    many = time.perf_counter()
    greedy_generate(model, short, 17, set())
    many = time.perf_counter() - many
    out["step"] = (many - one) / 16
    config = SmokeConfig()
    settings = SmokeSettings(folder, config, "cpu", False, True, None)
    out["nll"] = nll(model, tok, settings.parity_text())
    long = LongSmoke()
    builder = NeedlePromptBuilder(tok, long.filler, long.needle, long.question)
    retrieved, argmaxes = [], []
    for n, depth in NEEDLES:
        key = pass_key(n, depth, long.key_digits)
        prompt = builder.build(n, depth, key)
        gen = greedy_generate(model, prompt.ids, 10, set())
        retrieved.append(key in tok.decode(gen.tokens, skip_special_tokens=True))
        argmaxes.append(gen.tokens[0])
    out["retrieved"] = retrieved
    out["needle_argmax"] = argmaxes
    out["threads"] = torch.get_num_threads()
    return out


def larger_model(root: Path) -> Path:
    """A 155M-parameter random Qwen2 in bfloat16 (tests/models.py), built once under `root`."""
    from models import TinyConfig, build_base

    folder = root / "larger"
    if not (folder / "model.safetensors").exists():
        build_base(folder, TinyConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096))
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--models", nargs="+", choices=("base", "ft_cos", "ft_fmt", "larger"), default=["base", "ft_cos", "ft_fmt", "larger"])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.child[1])))
        return 0

    from registry.machine import cpu_bf16_flag

    with tempfile.TemporaryDirectory(prefix="smoke-precision-") as tmp:
        every = {"base": ("toy base", lambda: TOY / "base"), "ft_cos": ("toy ft_cos", lambda: TOY / "ft_cos"),
                 "ft_fmt": ("toy ft_fmt", lambda: TOY / "ft_fmt"), "larger": ("larger (random)", lambda: larger_model(Path(tmp)))}
        models = {every[m][0]: every[m][1]() for m in args.models}
        results: dict[str, dict[str, list[dict]]] = {}
        for name, folder in models.items():
            for i in range(args.repeats):
                order = ("float32", "bfloat16") if i % 2 == 0 else ("bfloat16", "float32")
                for dtype in order:
                    run = subprocess.run([sys.executable, __file__, "--child", str(folder), dtype],
                                         capture_output=True, text=True, check=True)
                    results.setdefault(name, {}).setdefault(dtype, []).append(json.loads(run.stdout.splitlines()[-1]))
                    print(f"{name} {dtype}: {run.stdout.splitlines()[-1]}", file=sys.stderr, flush=True)
    flag = cpu_bf16_flag()
    first = next(iter(results.values()))["float32"][0]
    print(f"CPU bfloat16 instructions: {flag or 'none'}; {first['threads']} threads; "
          f"medians of {args.repeats} processes each")
    print(f"{'model':<16} {'params':>11} " + " ".join(f"{'prefill ' + str(n):>22}" for n in LENGTHS)
          + f" {'decode step':>22} {'NLL f32':>8} {'NLL bf16':>8} {'dNLL':>7} {'argmax agree':>12} {'keys f32/bf16':>13}")
    summary = {}
    for name, by in results.items():
        f32, bf16 = by["float32"], by["bfloat16"]

        def med(runs, key):
            return statistics.median(r[key] for r in runs)

        cells = []
        row = {}
        for key in [f"prefill_{n}" for n in LENGTHS] + ["step"]:
            a, b = med(f32, key), med(bf16, key)
            row[key] = {"float32": a, "bfloat16": b, "ratio": b / a}
            cells.append(f"{a * 1000:8.1f}/{b * 1000:7.1f} ms {b / a:4.2f}x")
        agree = sum(x == y for x, y in zip(f32[0]["needle_argmax"], bf16[0]["needle_argmax"], strict=True))
        agree += sum(f32[0][f"argmax_{n}"] == bf16[0][f"argmax_{n}"] for n in LENGTHS)
        total = len(NEEDLES) + len(LENGTHS)
        keys = f"{sum(f32[0]['retrieved'])}/{sum(bf16[0]['retrieved'])} of {len(NEEDLES)}"
        nll32, nll16 = f32[0]["nll"], bf16[0]["nll"]
        row.update(nll_float32=nll32, nll_bfloat16=nll16, argmax_agree=f"{agree}/{total}", keys=keys,
                   parameters=f32[0]["parameters"])
        summary[name] = row
        print(f"{name:<16} {f32[0]['parameters']:>11,} " + " ".join(f"{c:>22}" for c in cells)
              + f" {nll32:8.4f} {nll16:8.4f} {nll16 - nll32:+7.4f} {agree:>5}/{total:<6} {keys:>13}")
    if args.json:
        print(json.dumps({"cpu_bf16_flag": flag, "models": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
