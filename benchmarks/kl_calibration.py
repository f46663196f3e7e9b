#!/usr/bin/env python
"""KL(parent || merge) and top-1 agreement of toy merges, good and broken: the figures behind smoke.parity.max_kl.

Merges the toy's fine-tunes (tests/fixtures/toy) with mergekit at several mixes (normalized,
bfloat16), and builds the broken merges the smoke tests build (1/-1 without normalize, NaN weights,
shuffled embedding rows, merges with an untrained model of the same shape), then measures each
against both parents exactly as `registry smoke` does (registry.comparison, CPU, float32). Prints
one line per merge: KL to each parent, the nearest, top-1 agreement with each parent.

    .venv/bin/python benchmarks/kl_calibration.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOY = ROOT / "tests" / "fixtures" / "toy"


def merge(out: Path, models: list[tuple[Path, float]], normalize: bool = True) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = {"merge_method": "linear", "base_model": str(models[0][0]),
              "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in models],
              "parameters": {"normalize": normalize}, "dtype": "bfloat16"}
    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(device="cpu", copy_tokenizer=True, write_model_card=False, quiet=True))
    return out


def rewrite(src: Path, out: Path, change) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: change(k, v).contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def untrained(out: Path, seed: int) -> Path:
    import torch
    from transformers import AutoConfig, Qwen2ForCausalLM

    out.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOY / "ft_cos" / name, out / name)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(AutoConfig.from_pretrained(out)).to(torch.bfloat16).save_pretrained(out)
    return out


def main() -> None:
    import torch

    from registry.comparison import compare_logprobs, comparison_prompts, next_token_logprobs
    from registry.recipe import SmokeConfig
    from registry.smoke import SmokeSettings, load_model

    settings = SmokeSettings(Path("."), SmokeConfig(), "cpu", False, True, "bfloat16")

    def logprobs(folder: Path):
        model, tok = load_model(folder, "cpu")
        prompts = comparison_prompts(tok, settings.parity_text(), settings.config.short.prompt)
        return prompts, next_token_logprobs(model, prompts)

    tmp = Path(tempfile.mkdtemp(prefix="kl-calibration-"))
    cos, fmt, base = TOY / "ft_cos", TOY / "ft_fmt", TOY / "base"
    parents = {"cos": logprobs(cos), "fmt": logprobs(fmt), "base": logprobs(base)}
    print(f"positions: {parents['cos'][1].shape[0]} ({' + '.join(str(len(p)) for p in parents['cos'][0])})")
    cases: list[tuple[str, Path, tuple[str, str]]] = []
    for w in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        cases.append((f"cos/fmt {w:g}/{1 - w:g}", merge(tmp / f"m{w}", [(cos, w), (fmt, round(1 - w, 6))]), ("cos", "fmt")))
    cases.append(("base/cos 0.5/0.5", merge(tmp / "base-cos", [(base, 0.5), (cos, 0.5)]), ("base", "cos")))
    cases.append(("cos/fmt 1/-1, no normalize", merge(tmp / "pm", [(cos, 1.0), (fmt, -1.0)], normalize=False), ("cos", "fmt")))
    good = tmp / "m0.3"
    cases.append(("NaN weights", rewrite(good, tmp / "nan", lambda k, v: torch.full_like(v, float("nan"))), ("cos", "fmt")))
    generator = torch.Generator().manual_seed(0)
    embed = "model.embed_tokens.weight"
    cases.append(("shuffled embedding rows", rewrite(good, tmp / "shuffled", lambda k, v: v[torch.randperm(
        len(v), generator=generator)] if k == embed else v), ("cos", "fmt")))
    for seed in range(5):
        rnd = untrained(tmp / f"rnd{seed}", seed)
        parents[f"rnd{seed}"] = logprobs(rnd)
        for name, path in (("cos", cos), ("fmt", fmt)):
            cases.append((f"{name}/untrained(seed {seed}) 0.5/0.5", merge(tmp / f"{name}-rnd{seed}", [(path, 0.5), (rnd, 0.5)]),
                          (name, f"rnd{seed}")))
        if seed == 4:
            cases.append(("cos/untrained(seed 4) 0.7/0.3", merge(tmp / "cos-rnd-73", [(cos, 0.7), (rnd, 0.3)]), ("cos", "rnd4")))
            cases.append(("cos/untrained(seed 4) 0.9/0.1", merge(tmp / "cos-rnd-91", [(cos, 0.9), (rnd, 0.1)]), ("cos", "rnd4")))
    for label, folder, names in cases:
        prompts, merged = logprobs(folder)
        found = {n: compare_logprobs(parents[n][1], merged, parents[n][0], prompts) for n in names}
        kls = ", ".join(f"{n} {a.kl:.4f}" for n, a in found.items())
        agree = ", ".join(f"{n} {a.top1:.3f}" for n, a in found.items())
        nearest = min((a.kl for a in found.values()), key=lambda k: k if k == k else float("inf"))
        best = max(a.top1 for a in found.values())
        print(f"{label:36} KL {kls:32} nearest {nearest:.4f}  top-1 {agree}  best {best:.3f}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
