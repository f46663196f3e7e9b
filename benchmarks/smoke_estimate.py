#!/usr/bin/env python
"""The smoke test's time estimate against the time it then takes, at the reference merge's size.

A randomly initialised model of the reference architecture (Qwen2 1.5B: hidden 1536, 28 layers,
12 heads, 2 KV heads, intermediate 8960, vocabulary 151936, untied head), built in memory in
bfloat16 (no download, nothing written), is calibrated exactly as `registry smoke` calibrates the
merged model (registry.smoke.calibrate) in the dtype the smoke test would choose on this machine.
The script then prints the plan `recipes/cos_fmt.yaml`'s default smoke settings get (merged + 2
parents, CPU budget included) and runs one long prompt per --lengths value, timing it against its
estimate. Prompts are built with the toy's tokenizer, as benchmarks/smoke_long.py does.

    .venv/bin/python benchmarks/smoke_estimate.py [--device cpu|cuda] [--lengths 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
TOY = ROOT / "tests" / "fixtures" / "toy"
from smoke_long import REFERENCE_CONFIG  # noqa: E402 - the benchmarks folder is on the path above


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from registry.card import human_seconds
    from registry.machine import cpu_bf16_flag
    from registry.recipe import load_recipe
    from registry.smoke import NeedlePromptBuilder, calibrate, long_lengths, long_precheck, run_long_prompt
    from registry.smoke_plan import choose_dtype, generation_seconds, make_plan, model_cost

    dtype, why = choose_dtype("auto", args.device, "bfloat16", cpu_bf16_flag() if args.device == "cpu" else None)
    start = time.perf_counter()
    config = Qwen2Config(**REFERENCE_CONFIG, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen2ForCausalLM._from_config(config, dtype=getattr(torch, dtype)).eval()
    built = time.perf_counter() - start
    start = time.perf_counter()
    speed = calibrate(model, args.device, load_seconds=built)
    calibration = time.perf_counter() - start
    recipe = load_recipe(ROOT / "recipes" / "cos_fmt.yaml")
    smoke = recipe.smoke
    lengths, limit = long_lengths(smoke.long, model.config)
    runnable = [n for n in lengths if long_precheck(model, n, 0.5, smoke.long, args.device, limit).reason is None]
    cost = model_cost(model.config)
    plan = make_plan(smoke, device=args.device, dtype=dtype, dtype_reason=why, cost=cost, speed=speed, parents=("cos", "fmt"),
                     short_tokens=24, nll_tokens=200, long_lengths=runnable)
    print(f"{dtype}: {why}")
    print(f"calibration {calibration:.1f} s: {speed.linear_flops / 1e9:.0f} GFLOP/s weight products, "
          f"{speed.attention_flops / 1e9:.0f} GFLOP/s attention, {speed.step_seconds * 1000:.0f} ms a decoding step; "
          f"{torch.get_num_threads()} threads")
    print(plan.message())
    for n in lengths:
        state = "left out" if n in plan.skipped else ("planned" if n in runnable else "cannot run")
        estimate = generation_seconds(cost, speed, n, smoke.long.max_new_tokens)
        print(f"  {n:>7} tokens: {human_seconds(estimate)} a prompt, {human_seconds(plan.length_seconds.get(n, 0))} "
              f"for all ({state})")
    tokenizer = AutoTokenizer.from_pretrained(TOY / "base")
    long = smoke.long.model_copy(update={"cpu_max_tokens": max(args.lengths + [smoke.long.cpu_max_tokens])})
    builder = NeedlePromptBuilder(tokenizer, long.filler, long.needle, long.question)
    rows = []
    for n in args.lengths:
        estimate = generation_seconds(cost, speed, n, long.max_new_tokens)
        run = run_long_prompt(model, tokenizer, builder, n, 0.5, long, args.device, limit)
        # Random weights never emit EOS here: the run generated all max_new_tokens, as the estimate assumes.
        rows.append({"tokens": n, "estimated_seconds": estimate, "seconds": run.seconds, "status": run.status})
        ratio = f"{run.seconds / estimate:.2f}" if run.seconds else "-"
        print(f"  ran {n} tokens: {run.seconds} s against {estimate:.1f} s estimated (actual/estimate {ratio}) {run.reason or ''}")
    if args.json:
        print(json.dumps({"dtype": dtype, "throughput": speed.__dict__, "total_seconds": plan.total_seconds,
                          "skipped": dict(plan.skipped), "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
