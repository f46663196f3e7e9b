#!/usr/bin/env python
"""Time and peak memory of the long-context smoke check at several lengths.

CPU (default): the toy model of tests/fixtures/toy (or --model DIR) at 512-4096 tokens.
CUDA (--device cuda): a randomly initialised model of the reference merge's architecture
(Qwen2 1.5B: hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960, vocabulary 151936,
bfloat16) at 32768, 65536 and 131072 tokens, against the targets of <= 16 GB peak and <= 60 s at
131072. Prompts are built with the toy's tokenizer (no download), so the synthetic model sees the
same exact-length pass-key prompts a real one would; it retrieves nothing, which does not matter here.

Each length runs exactly what `registry smoke` runs for it (registry.smoke.run_long_prompt):
memory estimate, the skip decision, chunked or whole prefill with last-position logits, greedy
decoding; the figures are the check's own wall time and peak memory (CUDA allocator peak; peak RSS
of the process on CPU, so the weights and the Python runtime are included).

    .venv/bin/python benchmarks/smoke_long.py
    .venv/bin/python benchmarks/smoke_long.py --device cuda [--prefill-chunk-size 0 4096 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOY = ROOT / "tests" / "fixtures" / "toy"

REFERENCE_CONFIG = dict(
    hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    intermediate_size=8960, vocab_size=151936, max_position_embeddings=131072,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
    use_sliding_window=False, rms_norm_eps=1e-6,
)
TARGET_PEAK_BYTES = 16 * 10**9
TARGET_SECONDS = 60.0
GIB = 1 << 30


def synthetic_reference(device: str):
    """The reference architecture with random weights, built directly on `device` in bfloat16."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**REFERENCE_CONFIG, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", type=Path, help="model folder for the CPU run [default: the toy's base]")
    ap.add_argument("--lengths", type=int, nargs="+", help="token counts [cpu: 512 1024 2048 4096; cuda: 32768 65536 131072]")
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--prefill-chunk-size", type=int, nargs="+",
                    help="prefill chunk sizes to compare, 0 = the check's default (whole prompt when it fits) [cpu: 0; cuda: 0 4096]")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from registry.recipe import LongSmoke
    from registry.smoke import NeedlePromptBuilder, _read_status, load_model, run_long_prompt

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    started = time.perf_counter()
    if args.device == "cuda":
        lengths = args.lengths or [32768, 65536, 131072]
        tokenizer = AutoTokenizer.from_pretrained(TOY / "base")
        model = synthetic_reference("cuda")
        what = "synthetic Qwen2 1.5B (reference config), bfloat16"
        gpu = torch.cuda.get_device_name()
    else:
        folder = args.model or TOY / "base"
        model, tokenizer = load_model(folder, "cpu")
        lengths = args.lengths or [512, 1024, 2048, 4096]
        what = f"{folder.name} ({sum(p.numel() for p in model.parameters()):,} parameters), float32"
        gpu = None
    load_seconds = time.perf_counter() - started
    chunks = args.prefill_chunk_size or ([0, 4096] if args.device == "cuda" else [0])
    baseline = int(torch.cuda.memory_allocated()) if args.device == "cuda" else _read_status("VmRSS")
    builder = None
    results: dict[str, list] = {}
    for chunk in chunks:
        config = LongSmoke(
            context_tokens=max(lengths), lengths=lengths, depths=[args.depth], cpu_max_tokens=max(lengths),
            prefill_chunk_size=chunk or None, max_new_tokens=args.max_new_tokens,
        )
        builder = builder or NeedlePromptBuilder(tokenizer, config.filler, config.needle, config.question)
        mode = f"chunk {chunk}" if chunk else "default"
        rows = results.setdefault(mode, [])
        for n in lengths:
            run = run_long_prompt(model, tokenizer, builder, n, args.depth, config, args.device, max(lengths))
            rows.append(run)
            peak = f"{run.peak_memory_bytes / GIB:6.2f} GiB" if run.peak_memory_bytes else "      -   "
            secs = f"{run.seconds:7.2f} s" if run.seconds is not None else "      - "
            est = f"{run.estimated_memory_bytes / GIB:6.2f} GiB" if run.estimated_memory_bytes else "-"
            print(f"[{mode}] {n:>7} tokens  {run.status:<9}  {secs}  peak {peak}  estimate beyond weights {est}  "
                  f"prefill {run.prefill_chunk_size or 'whole'}  {run.reason or ''}", flush=True)
    print(f"model: {what}; device: {gpu or 'cpu'} ({torch.get_num_threads()} threads); "
          f"weights + runtime before the runs: {baseline / GIB:.2f} GiB; load {load_seconds:.1f} s")
    verdict = 0
    if args.device == "cuda" and 131072 in lengths:
        met_any = False
        for mode, rows in results.items():
            last = rows[lengths.index(131072)]
            ok_mem = last.peak_memory_bytes is not None and last.peak_memory_bytes <= TARGET_PEAK_BYTES
            ok_time = last.seconds is not None and last.seconds <= TARGET_SECONDS
            met_any = met_any or (ok_mem and ok_time)
            print(f"[{mode}] targets at 131072 tokens: peak <= 16 GB {'met' if ok_mem else 'MISSED'}, "
                  f"time <= 60 s {'met' if ok_time else 'MISSED'}")
        verdict = 0 if met_any else 1
    if args.json:
        print(json.dumps({"device": args.device, "gpu": gpu, "model": what, "baseline_bytes": baseline,
                          "runs": {mode: [run.__dict__ for run in rows] for mode, rows in results.items()}}, indent=2))
    return verdict


if __name__ == "__main__":
    sys.exit(main())
