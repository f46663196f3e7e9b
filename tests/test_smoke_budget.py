"""The smoke run's plan: the estimate printed before the first generation, time budgets, precision, memory.

Nothing here depends on how fast this machine is: where a test needs the estimate's figures, it gives
the throughput the estimate uses (run_smoke(throughput=...)), or a budget of 0.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from registry.machine import cpu_bf16_flag
from registry.plugins import get_smoke_checks
from registry.recipe import LongSmoke, ParitySmoke, ShortSmoke, SmokeConfig, load_recipe
from registry.reports import Smoke
from registry.reports import read as read_report
from registry.smoke import print_report, run_smoke
from registry.smoke_plan import Cost, Throughput, budget, choose_dtype, generation_seconds, make_plan, model_cost, prefill_seconds

TOY = Path(__file__).parent / "fixtures" / "toy"
# Figures a test gives instead of measuring: 1 GFLOP/s for the weight products and for attention,
# 10 ms a decoding step, 2 s a load (the toy is 0.6M parameters, so these make whole seconds).
SLOW = Throughput(linear_flops=1e9, attention_flops=1e9, step_seconds=0.01, load_seconds=2.0)


# ---------------------------------------------------------------------------------------------
# The cost model and the budget, as arithmetic


def test_prefill_and_generation_time_follow_the_documented_formula():
    cost = Cost(per_token=1e9, head=1e8, per_pair=1e5)
    speed = Throughput(linear_flops=1e11, attention_flops=1e10, step_seconds=0.05)
    # (2·P·n + 2·h·V) / linear + A·n(n+1)/2 / attention
    assert prefill_seconds(cost, speed, 1000) == pytest.approx((1e9 * 1000 + 1e8) / 1e11 + 1e5 * 1000 * 1001 / 2 / 1e10)
    assert prefill_seconds(cost, speed, 1000, logits=1000) == pytest.approx((1e9 * 1000 + 1e8 * 1000) / 1e11 + 5.005)
    # + (m−1)·step + A·(m−1)(n + m/2) / attention
    assert generation_seconds(cost, speed, 1000, 16) == pytest.approx(
        prefill_seconds(cost, speed, 1000) + 15 * 0.05 + 1e5 * 15 * (1000 + 8) / 1e10)
    # The quadratic term: four times the tokens cost more than four times the time.
    assert prefill_seconds(cost, speed, 4000) > 4 * prefill_seconds(cost, speed, 1000)


def test_model_cost_counts_the_reference_architecture():
    from transformers import Qwen2Config

    ref = Qwen2Config(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                      intermediate_size=8960, vocab_size=151936)
    cost = model_cost(ref)
    # 1.31B parameters in the layers' projections (q, k, v, o and the MLP), 233M in the head.
    assert cost.per_token == 2 * 28 * (1536 * 128 * (2 * 12 + 2 * 2) + 3 * 1536 * 8960)
    assert cost.per_token / 2 == pytest.approx(1.3102e9, rel=1e-4)
    assert cost.head == 2 * 1536 * 151936
    assert cost.per_pair == 4 * 28 * 12 * 128


def _plan(config: SmokeConfig, lengths: list[int], *, parents=("cos", "fmt"), device="cpu"):
    cost = Cost(per_token=1e9, head=0.0, per_pair=0.0)  # 1 s per 1000 tokens at 1e12 FLOP/s: linear in n
    speed = Throughput(linear_flops=1e12, attention_flops=1e12, step_seconds=0.0, load_seconds=3.0)
    return make_plan(config, device=device, dtype="bfloat16", dtype_reason="test", cost=cost, speed=speed, parents=parents,
                     short_tokens=1000, nll_tokens=500, long_lengths=lengths)


def test_the_budget_keeps_the_longest_lengths_that_fit_parents_included():
    # Each prompt of n tokens takes n/1000 s; 3 depths × 3 models: a length costs 9n/1000 s.
    config = SmokeConfig(long=LongSmoke(lengths=[1000, 2000, 4000], time_budget=50.0, cpu_time_budget=None))
    plan = _plan(config, [1000, 2000, 4000])
    assert dict(plan.length_seconds) == pytest.approx({1000: 9.0, 2000: 18.0, 4000: 36.0})
    # Longest first: 4000 (36 s) fits in 50, 2000 (18 s) not in the 14 left, 1000 (9 s) does.
    assert sorted(plan.skipped) == [2000]
    assert plan.skipped[2000] == ("would take about 18 s (3 depths × merged + 2 parents), more than the 14 s left of "
                                  "smoke.long.time_budget (50 s); raise it or run with --device cuda")
    # Loads of two parents (3 s each), three short generations (1 s), three NLLs (0.5 s), and the kept lengths.
    assert plan.total_seconds == pytest.approx(6 + 3 + 1.5 + 36 + 9)
    assert plan.message() == ("smoke: about 56 s on cpu in bfloat16 (merged + 2 parents); 2000 tokens left out by "
                              "smoke.long.time_budget (50 s), which would add about 18 s")
    # Without parity no parent runs, and the same budget holds every length.
    config.parity = ParitySmoke(enabled=False)
    plan = _plan(config, [1000, 2000, 4000])
    assert plan.skipped == {} and plan.models == ("merged",)
    assert plan.total_seconds == pytest.approx(1 + 3 * 7)


def test_a_budget_of_zero_leaves_out_every_length_and_no_budget_none():
    config = SmokeConfig(long=LongSmoke(lengths=[1000, 2000], time_budget=0.0))
    assert sorted(_plan(config, [1000, 2000]).skipped) == [1000, 2000]
    config = SmokeConfig(long=LongSmoke(lengths=[1000, 2000], time_budget=None, cpu_time_budget=None))
    plan = _plan(config, [1000, 2000])
    assert plan.skipped == {} and plan.budget_seconds is None
    assert plan.message() == "smoke: about 38 s on cpu in bfloat16 (merged + 2 parents)"
    plan = _plan(SmokeConfig(long=LongSmoke(lengths=[64000], cpu_time_budget=None)), [64000])
    assert plan.message() == ("smoke: about 9.8 min on cpu in bfloat16 (merged + 2 parents); "
                              "--device cuda, or smoke.long.time_budget to bound it")


def test_the_tighter_budget_applies_and_cpu_time_budget_only_on_cpu():
    assert budget(SmokeConfig(), "cpu") == (480.0, "smoke.long.cpu_time_budget")
    assert budget(SmokeConfig(), "cuda") == (None, None)
    both = SmokeConfig(long=LongSmoke(time_budget=100.0, cpu_time_budget=480.0))
    assert budget(both, "cpu") == (100.0, "smoke.long.time_budget")
    assert budget(both, "cuda") == (100.0, "smoke.long.time_budget")
    assert budget(SmokeConfig(long=LongSmoke(time_budget=900.0)), "cpu") == (480.0, "smoke.long.cpu_time_budget")


# ---------------------------------------------------------------------------------------------
# Precision


@pytest.mark.parametrize(("setting", "device", "stored", "flag", "expected"), [
    ("auto", "cpu", "bfloat16", "avx512_bf16", ("bfloat16", "the checkpoint's dtype, and this CPU multiplies bfloat16 natively "
                                                "(avx512_bf16): faster than float32, with the same verdicts "
                                                "(benchmarks/smoke_precision.py)")),
    ("auto", "cpu", ("bfloat16", 1536), "avx512_bf16", ("bfloat16", "the checkpoint's dtype, and this CPU multiplies bfloat16 "
                                                         "natively (avx512_bf16): faster than float32, with the same verdicts "
                                                         "(benchmarks/smoke_precision.py)")),
    ("auto", "cpu", ("bfloat16", 128), "avx512_bf16", ("float32", "a small model (hidden size 128, under 1024), where bfloat16 "
                                                       "is slower than float32 on CPU")),
    ("auto", "cpu", "bfloat16", None, ("float32", "this CPU has no bfloat16 instructions (avx512_bf16, amx_bf16 or bf16), "
                                       "where bfloat16 is slower than float32")),
    ("auto", "cpu", "float32", "amx_bf16", ("float32", "the checkpoint is stored in float32, computed in float32 on CPU")),
    ("auto", "cpu", None, "amx_bf16", ("float32", "the checkpoint is stored in an unnamed dtype, computed in float32 on CPU")),
    ("auto", "cuda", "bfloat16", None, ("bfloat16", "the checkpoint's dtype (bfloat16)")),
    ("auto", "cuda", "float32", None, ("float32", "the checkpoint's dtype (float32)")),
    ("auto", "cuda", None, None, ("bfloat16", "the checkpoint names no dtype; bfloat16 on CUDA")),
    ("float32", "cpu", "bfloat16", "avx512_bf16", ("float32", "smoke.dtype is float32")),
    ("bfloat16", "cpu", "float32", None, ("bfloat16", "smoke.dtype is bfloat16")),
])
def test_precision_is_chosen_per_device_and_checkpoint(setting, device, stored, flag, expected):
    stored, hidden = stored if isinstance(stored, tuple) else (stored, None)
    assert choose_dtype(setting, device, stored, flag, hidden) == expected


@pytest.mark.parametrize(("cpuinfo", "flag"), [
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n", "avx512_bf16"),
    ("processor\t: 0\nflags\t\t: fpu sse avx2 amx_bf16 amx_tile\n", "amx_bf16"),
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n", None),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", "bf16"),
    ("", None),
])
def test_cpu_bfloat16_instructions_are_read_from_cpuinfo(tmp_path, cpuinfo, flag):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(cpuinfo)
    assert cpu_bf16_flag(tmp_path) == flag
    assert cpu_bf16_flag(tmp_path / "nowhere") is None


# ---------------------------------------------------------------------------------------------
# The toy, end to end

SETTINGS = """
smoke:
  short: {max_new_tokens: 8}
  long: {lengths: [256, 512], depths: [0.1, 0.5, 0.9], max_new_tokens: 10%s}
  parity: {enabled: %%s}
"""


@pytest.fixture(scope="module")
def toy_merge(tmp_path_factory):
    from test_smoke import _mergekit, _toy_recipe

    root = tmp_path_factory.mktemp("budget")
    (root / "r").mkdir()
    recipe = _toy_recipe(root / "r", (0.3, 0.7), normalize=True, settings=SETTINGS % "")
    return _mergekit(recipe, root / "merged"), recipe


def _with(recipe_path: Path, **long):
    recipe = load_recipe(recipe_path)
    for key, value in long.items():
        setattr(recipe.smoke.long, key, value)
    return recipe


def test_the_estimate_is_printed_before_the_first_generation(toy_merge):
    folder, recipe_path = toy_merge
    notes: list[str] = []
    report = run_smoke(folder, _with(recipe_path, cpu_time_budget=None), device="cpu", checks=get_smoke_checks(),
                       progress=notes.append, write=False, throughput=SLOW)
    estimate = [i for i, n in enumerate(notes) if n.startswith("smoke: about ")]
    assert len(estimate) == 1
    # After the merged model is loaded (its speed is measured on it), before any generation.
    assert notes[: estimate[0]] == ["loading the model on cpu"]
    assert notes[estimate[0] + 1] == "short generation"
    assert re.fullmatch(r"smoke: about \d+(\.\d)? s on cpu in (bfloat16|float32) \(merged \+ 2 parents\)", notes[estimate[0]])
    plan = report.plan
    assert plan.total_seconds == pytest.approx(sum(r.seconds for r in plan.runs))
    assert [(r.model, r.what) for r in plan.runs if r.what != "long"] == [
        ("merged", "short"), ("merged", "nll"), ("cos", "load"), ("cos", "short"), ("cos", "nll"),
        ("fmt", "load"), ("fmt", "short"), ("fmt", "nll")]
    assert sum(r.what == "long" for r in plan.runs) == 2 * 3 * 3
    # Every prompt that ran records the estimate it was planned with; the parents' too.
    assert [r.estimated_seconds for r in report.long] == [round(plan.long_seconds(r.tokens, r.depth), 3) for r in report.long]
    assert all(r.status != "skipped" for r in report.long) and report.not_checked() == []


def test_a_budget_too_small_for_any_long_prompt_skips_them_all_and_the_verdict_says_so(toy_merge, tmp_path):
    import shutil

    folder = shutil.copytree(toy_merge[0], tmp_path / "m")
    notes: list[str] = []
    report = run_smoke(folder, _with(toy_merge[1], time_budget=0.0), device="cpu", checks=get_smoke_checks(),
                       progress=notes.append, throughput=SLOW)
    assert [(r.tokens, r.depth, r.status) for r in report.long] == [
        (256, 0.1, "skipped"), (256, 0.5, "skipped"), (256, 0.9, "skipped"),
        (512, 0.1, "skipped"), (512, 0.5, "skipped"), (512, 0.9, "skipped")]
    seconds = report.plan.length_seconds
    from registry.numbers import human_seconds

    for run in report.long:
        assert run.reason == (f"would take about {human_seconds(seconds[run.tokens])} (3 depths × merged + 2 parents), "
                              "more than the 0 s left of smoke.long.time_budget (0 s); raise it or run with --device cuda")
        assert run.estimated_seconds == pytest.approx(seconds[run.tokens] / 9, abs=1e-3)
        assert run.seconds is None and run.output is None
    checks = {c.name: (c.status, c.reason) for c in report.checks}
    assert checks["long"] == ("skipped", f"every prompt was skipped: {report.long[0].reason}")
    # The parents ran no long prompt either: parity is the NLL alone.
    assert checks["parity"][0] == "passed" and "pass keys" not in checks["parity"][1]
    assert [(p.model, p.long_total) for p in report.parity] == [("merged", 0), ("cos", 0), ("fmt", 0)]
    assert report.not_checked() == [f"long context at 256 tokens ({report.long[0].reason})",
                                    f"long context at 512 tokens ({report.long[3].reason})"]
    assert not any(n.startswith("long ") for n in notes)
    saved = read_report(Smoke, folder)
    assert [(s.tokens, s.estimated_seconds, s.reason) for s in saved.skipped] == [
        (256, round(seconds[256], 3), report.long[0].reason), (512, round(seconds[512], 3), report.long[3].reason)]
    assert saved.not_checked == report.not_checked()
    assert saved.estimate.budget_seconds == 0.0 and saved.estimate.budget_setting == "smoke.long.time_budget"
    assert saved.estimate.linear_flops == 1e9 and saved.estimate.step_seconds == 0.01
    assert [r.status for r in saved.estimate.runs if r.what == "long"] == ["skipped"] * 18
    assert saved.dtype == report.dtype and saved.dtype_reason == report.dtype_reason != ""

    from rich.console import Console

    console = Console(record=True, width=400)
    print_report(report, console)
    last = console.export_text().strip().splitlines()[-1]
    assert last == f"smoke passed; not checked: {'; '.join(report.not_checked())}"


def test_with_a_budget_the_longest_fitting_length_is_kept_and_parity_judges_what_ran(toy_merge):
    folder, recipe_path = toy_merge
    probe = run_smoke(folder, _with(recipe_path, time_budget=None, cpu_time_budget=None), device="cpu",
                      checks=get_smoke_checks(), write=False, throughput=SLOW)
    seconds = probe.plan.length_seconds
    assert seconds[512] > seconds[256]
    # Room for 512 but not for 256 as well: the longer one is kept.
    limit = seconds[512] + seconds[256] / 2
    report = run_smoke(folder, _with(recipe_path, time_budget=limit), device="cpu", checks=get_smoke_checks(),
                       write=False, throughput=SLOW)
    assert [(r.tokens, r.status) for r in report.long] == [
        (256, "skipped"), (256, "skipped"), (256, "skipped"), (512, "retrieved"), (512, "retrieved"), (512, "retrieved")]
    assert report.plan.skipped.keys() == {256}
    # Parity compares the 512-token prompts, the only ones the merge and the parents ran.
    assert [(p.model, p.long_retrieved, p.long_total) for p in report.parity] == [("merged", 3, 3), ("cos", 3, 3), ("fmt", 3, 3)]
    checks = {c.name: (c.status, c.reason) for c in report.checks}
    assert checks["long"] == ("passed", f"retrieved 3 of 3 pass keys at up to 512 tokens, 3 skipped; "
                                        f"not checked: long context at 256 tokens ({report.long[0].reason})")
    assert checks["parity"][0] == "passed" and "retrieved 3 of 3 pass keys (cos 3, fmt 3)" in checks["parity"][1]
    assert report.not_checked() == [f"long context at 256 tokens ({report.long[0].reason})"]
    assert report.passed


def test_the_chosen_precision_is_used_for_every_model_and_recorded(toy_merge):
    folder, recipe_path = toy_merge
    recipe = _with(recipe_path, lengths=[256], depths=[0.5], time_budget=None, cpu_time_budget=None)
    recipe.smoke.dtype = "float32"
    report = run_smoke(folder, recipe, device="cpu", checks=get_smoke_checks(), write=False, throughput=SLOW)
    assert (report.dtype, report.dtype_reason) == ("float32", "smoke.dtype is float32")
    assert report.plan.dtype == "float32" and report.passed
    recipe.smoke.dtype = "auto"
    report = run_smoke(folder, recipe, device="cpu", checks=get_smoke_checks(), write=False, throughput=SLOW)
    # The toy is stored in bfloat16, and small (hidden size 128): float32, whatever the CPU.
    assert (report.dtype, report.dtype_reason) == choose_dtype("auto", "cpu", "bfloat16", cpu_bf16_flag(), 128)
    assert report.dtype == "float32"
    assert report.passed


# ---------------------------------------------------------------------------------------------
# One model in memory at a time, measured


def test_moving_from_the_merged_model_to_a_parent_needs_no_more_than_one_model(tmp_path):
    # Each in a fresh process: memory an earlier run freed but the allocator kept would hide an allocation from RSS.
    def measured(hold: bool) -> dict:
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; "
                f"from test_smoke_budget import measure_transition; measure_transition(Path({str(tmp_path)!r}), {hold})")
        # A registry home of its own: parents cached by another run would not be loaded at all.
        env = {**os.environ, "REGISTRY_HOME": str(tmp_path / f"home-{hold}")}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.strip().splitlines()[-1])

    freed, held = measured(False), measured(True)
    weights = freed["weights"]
    # The first parent's load and runs, over the memory before the merged model loaded, need no more than the
    # merged model's own load and runs (one model's weights plus working space), give or take a quarter of its weights.
    assert freed["parent"] < freed["merged"] + weights / 4, freed
    # The measurement sees a second model: a check that keeps the merged model until the parity is measured holds both.
    assert held["parent"] > held["merged"] + weights / 2, held


def measure_transition(root: Path, hold: bool) -> None:
    """Peak RSS of the merged model's phase and of the first parent's, each over the RSS before the merged model loaded.

    The toy's weights (1.2 MB) are below what one model load moves RSS by, so a tiny family from
    tests/models.py stands in: 8 layers of hidden size 512 make each model 36M parameters, nearly all
    of them in the layers, which every forward reads (a bfloat16 model may map its file rather than copy
    it, and an embedding row no prompt uses is never read into memory).
    """
    from models import TinyConfig, build_family
    from test_smoke import _mergekit, _toy_recipe

    from registry.smoke import CheckResult, SmokeCheck, _read_status, load_model, nll, prefill
    from registry.smoke_checks import builtin_checks

    family = build_family(root / "family", TinyConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                                          vocab_size=4000))
    (root / "r").mkdir(exist_ok=True)
    recipe_path = _toy_recipe(root / "r", (0.3, 0.7), normalize=True, sources=(("a", family.a), ("b", family.b)),
                              settings=SETTINGS % "")
    folder = root / "merged"
    if not (folder / "config.json").exists():
        _mergekit(recipe_path, folder)
    recipe = load_recipe(recipe_path)
    recipe.smoke = SmokeConfig(short=ShortSmoke(max_new_tokens=4), long=LongSmoke(lengths=[128], depths=[0.5], max_new_tokens=2))
    # Imports, kernels and the allocator's first arenas, on the 1 MB toy, so the merged model's phase pays none of them.
    warm, tok = load_model(TOY / "base", "cpu", "bfloat16" if cpu_bf16_flag() else "float32")
    prefill(warm, [5] * 128)
    nll(warm, tok, "The grass is green. The sky is blue.")
    del warm, tok
    marks: dict[str, int] = {}

    def note(message: str) -> None:
        if message.startswith("loading the model"):
            marks["base"] = _read_status("VmRSS")
        elif message in ("evaluating parent 'a'", "evaluating parent 'b'"):
            marks["merged" if message.endswith("'a'") else "parent"] = _read_status("VmHWM") - marks["base"]
        else:
            return
        Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here

    def keep(model, parity):
        return CheckResult("hold", "passed", "kept the merged model until the parity was measured")

    checks = [*builtin_checks(), *([SmokeCheck("hold", keep, ("model", "parity"))] if hold else [])]
    report = run_smoke(folder, recipe, device="cpu", checks=checks, write=False, progress=note, throughput=SLOW)
    marks["weights"] = _parameters(folder) * {"bfloat16": 2, "float32": 4}[report.dtype]
    print(json.dumps(marks))


def _parameters(folder: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - a handle is not iterable


# ---------------------------------------------------------------------------------------------
# Full-vocabulary logits only where a check needs them


def test_nll_holds_logits_for_one_chunk_of_positions_and_equals_the_whole_forward():
    import torch

    from registry.smoke import NLL_CHUNK, load_model, nll, prefill

    model, tok = load_model(TOY / "base", "cpu", "float32")
    text = " ".join(["The grass is green. The sky is blue. The pass key is 40917."] * 80)
    ids = tok(text)["input_ids"]
    assert len(ids) > 2 * NLL_CHUNK
    shapes: list[tuple[int, ...]] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    try:
        value = nll(model, tok, text)
        prefill(model, ids)
    finally:
        hook.remove()
    # NLL: every position, NLL_CHUNK at a time; prefill: the last position only.
    chunks = [min(NLL_CHUNK, len(ids) - start) for start in range(0, len(ids) - 1, NLL_CHUNK)]
    assert len(chunks) > 2 and max(chunks) == NLL_CHUNK
    assert shapes == [*((1, n, 512) for n in chunks), (1, 1, 512)]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    whole = float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])))
    assert value == pytest.approx(whole, rel=1e-4)
