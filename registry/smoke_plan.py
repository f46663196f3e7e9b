"""The smoke run's plan, made before any generation: the precision, each planned generation's time, the budget.

Time is estimated as memory is (smoke.estimate_long_memory): from the model's config, here its
floating-point operations, scaled by throughput measured on the chosen device with the loaded merged
model (smoke.calibrate). A generation over an n-token prompt with m new tokens costs

    prefill  (2·P·n + 2·h·V) / linear  +  A·n(n+1)/2 / attention
    decoding (m−1)·step  +  A·(m−1)(n + m/2) / attention

where P is the parameters a token passes through (every layer's projections), h·V the output head
(one position of logits), A = 4·layers·heads·head_dim the attention work per (query, key) pair,
`linear` and `attention` the measured FLOP/s of the weight products and of causal attention at the
model's shapes, and `step` the measured time of one decoding step (bound by reading the weights).
The quadratic term is what makes long prompts on CPU expensive; it is measured separately because
attention runs far below the speed of the weight products there (bfloat16 on CPU: about a fifth).
Generations are assumed to run to max_new_tokens (an upper bound), each parent to load as fast as
the merged model did.

The budget bounds the long prompts, the merge's and every parent's together: lengths are taken
longest first, each kept when all its prompts fit in what is left, so the longest lengths that fit
are kept and every other is reported as skipped with its estimated time.

Nothing here imports torch: the figures come in, a plan goes out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .recipe import SmokeConfig


@dataclass(frozen=True)
class Throughput:
    """What the chosen device does per second with the loaded model (measured by smoke.calibrate)."""

    linear_flops: float  # FLOP/s of the weight products in a prefill
    attention_flops: float  # FLOP/s of causal attention at the model's head shapes
    step_seconds: float  # one decoding step at a short context
    load_seconds: float = 0.0  # loading the merged model (each parent is assumed to take as long)


@dataclass(frozen=True)
class Cost:
    """The model's work in floating-point operations, from its config."""

    per_token: float  # 2 × the parameters one token passes through (all layers' projections)
    head: float  # 2 × hidden × vocabulary: one position of logits
    per_pair: float  # 4 × layers × heads × head_dim: attention per (query, key) pair, all layers


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder that its cost and memory follow from, read from its (text) config."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    inter: int
    vocab: int


def model_shape(model_config: Any) -> ModelShape:
    """The decoder's sizes, with the defaults transformers applies where a config leaves one out."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    return ModelShape(
        hidden=hidden, heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads, layers=text.num_hidden_layers,
        inter=getattr(text, "intermediate_size", None) or 4 * hidden, vocab=text.vocab_size,
    )


def model_cost(model_config: Any) -> Cost:
    """The floating-point operations of the model described by `model_config` (a transformers config)."""
    m = model_shape(model_config)
    # q and o are heads × head_dim wide, k and v kv_heads × head_dim; the MLP is gate, up and down.
    per_layer = m.hidden * m.head_dim * (2 * m.heads + 2 * m.kv_heads) + 3 * m.hidden * m.inter
    return Cost(per_token=2.0 * m.layers * per_layer, head=2.0 * m.hidden * m.vocab, per_pair=4.0 * m.layers * m.heads * m.head_dim)


def prefill_seconds(cost: Cost, speed: Throughput, n: int, *, logits: int = 1) -> float:
    """Seconds of one forward over an n-token prompt keeping `logits` positions of logits."""
    return ((cost.per_token * n + cost.head * logits) / speed.linear_flops
            + cost.per_pair * n * (n + 1) / 2 / speed.attention_flops)


def generation_seconds(cost: Cost, speed: Throughput, n: int, new_tokens: int) -> float:
    """Seconds of a greedy generation of `new_tokens` after an n-token prompt."""
    steps = max(new_tokens - 1, 0)
    return (prefill_seconds(cost, speed, n) + steps * speed.step_seconds
            + cost.per_pair * steps * (n + new_tokens / 2) / speed.attention_flops)


# ---------------------------------------------------------------------------------------------
# Precision


# Below this hidden size, bfloat16 products on CPU are slower than float32 even with native instructions:
# the matrices are too small for the bfloat16 kernels to pay off (benchmarks/smoke_precision.py: the toy,
# hidden 128, is 2-3x slower in bfloat16; a 155M model of hidden 1024 2.6-5x faster).
BF16_CPU_MIN_HIDDEN = 1024


def choose_dtype(setting: str, device: str, stored: str | None, cpu_bf16_flag: str | None,
                 hidden_size: int | None = None) -> tuple[str, str]:
    """(dtype, why): what the smoke run computes in on `device` for a checkpoint stored in `stored`."""
    if setting != "auto":
        return setting, f"smoke.dtype is {setting}"
    stored = stored if stored in ("float32", "float16", "bfloat16") else None
    if device == "cuda":
        return stored or "bfloat16", (f"the checkpoint's dtype ({stored})" if stored
                                      else "the checkpoint names no dtype; bfloat16 on CUDA")
    if stored != "bfloat16":
        # Rounding float32 weights to bfloat16 would test another model than the one published.
        return "float32", f"the checkpoint is stored in {stored or 'an unnamed dtype'}, computed in float32 on CPU"
    if cpu_bf16_flag is None:
        return "float32", ("this CPU has no bfloat16 instructions (avx512_bf16, amx_bf16 or bf16), "
                           "where bfloat16 is slower than float32")
    if hidden_size is not None and hidden_size < BF16_CPU_MIN_HIDDEN:
        return "float32", (f"a small model (hidden size {hidden_size}, under {BF16_CPU_MIN_HIDDEN}), where bfloat16 "
                           "is slower than float32 on CPU")
    return "bfloat16", (f"the checkpoint's dtype, and this CPU multiplies bfloat16 natively ({cpu_bf16_flag}): "
                        "faster than float32, with the same verdicts (benchmarks/smoke_precision.py)")


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class PlannedRun:
    """One generation (or forward) the smoke run plans, with its estimated seconds."""

    model: str  # "merged" or a parent's name
    what: Literal["load", "short", "nll", "long"]
    seconds: float
    tokens: int | None = None  # the prompt's length (long prompts, NLL text)
    depth: float | None = None
    status: Literal["planned", "skipped"] = "planned"


@dataclass(frozen=True)
class SmokePlan:
    """The long lengths kept and left out, every planned run's estimated time, and the run's precision."""

    device: str
    dtype: str
    dtype_reason: str
    models: tuple[str, ...]  # "merged" and the parents that will be run
    budget_seconds: float | None
    budget_setting: str | None  # which setting the budget came from
    throughput: Throughput | None
    runs: tuple[PlannedRun, ...] = ()
    # Length -> why it is not run (the time budget) and what it would have cost, all models together.
    skipped: Mapping[int, str] = field(default_factory=dict)
    length_seconds: Mapping[int, float] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        """The estimated time of everything planned (skipped lengths excluded)."""
        return sum(r.seconds for r in self.runs if r.status == "planned")

    def long_seconds(self, tokens: int, depth: float, model: str = "merged") -> float | None:
        """The estimated seconds of one long prompt, planned or skipped."""
        return next((r.seconds for r in self.runs
                     if r.what == "long" and r.tokens == tokens and r.depth == depth and r.model == model), None)

    def to_report(self) -> dict[str, Any]:
        """The estimate as smoke.json records it (reports.EstimateEntry)."""
        speed = self.throughput
        return {
            "total_seconds": round(self.total_seconds, 3), "budget_seconds": self.budget_seconds,
            "budget_setting": self.budget_setting,
            **({} if speed is None else {"linear_flops": speed.linear_flops, "attention_flops": speed.attention_flops,
                                        "step_seconds": speed.step_seconds, "load_seconds": speed.load_seconds}),
            "runs": [{**asdict(r), "seconds": round(r.seconds, 3)} for r in self.runs],
        }

    def message(self) -> str:
        """One line for the person waiting: the total, what runs, and how to bound it."""
        from .numbers import human_seconds

        parents = len(self.models) - 1
        who = "merged" + (f" + {parents} parent{'s' * (parents != 1)}" if parents else "")
        line = f"smoke: about {human_seconds(self.total_seconds)} on {self.device} in {self.dtype} ({who})"
        if self.skipped:
            left = sum(self.length_seconds[n] for n in self.skipped)
            lengths = ", ".join(str(n) for n in sorted(self.skipped))
            line += (f"; {lengths} tokens left out by {self.budget_setting} ({human_seconds(self.budget_seconds)}), "
                     f"which would add about {human_seconds(left)}")
        elif self.device == "cpu" and self.total_seconds >= 60:
            line += "; --device cuda, or smoke.long.time_budget to bound it"
        return line


def budget(config: SmokeConfig, device: str) -> tuple[float | None, str | None]:
    """(seconds the long prompts may take, the setting that says so): the tighter of those that apply."""
    found = [(config.long.time_budget, "smoke.long.time_budget")]
    if device == "cpu":
        found.append((config.long.cpu_time_budget, "smoke.long.cpu_time_budget"))
    found = [(s, name) for s, name in found if s is not None]
    return min(found) if found else (None, None)


def make_plan(
    config: SmokeConfig, *, device: str, dtype: str, dtype_reason: str, cost: Cost, speed: Throughput,
    parents: tuple[str, ...], short_tokens: int, nll_tokens: int, long_lengths: list[int],
) -> SmokePlan:
    """Every run's estimated time, and the long lengths the budget keeps (longest first)."""
    long, parity = config.long, config.parity
    with_parents = parents if parity.enabled else ()
    long_models = ("merged", *(with_parents if parity.retrieval else ()))
    runs: list[PlannedRun] = []
    for model in ("merged", *with_parents):
        if model != "merged":  # the merged model is loaded already: its load time is what `load_seconds` measured
            runs.append(PlannedRun(model, "load", speed.load_seconds))
        runs.append(PlannedRun(model, "short", generation_seconds(cost, speed, short_tokens, config.short.max_new_tokens),
                               tokens=short_tokens))
        if parity.enabled:  # the NLL on the fixed text is measured for parity only
            runs.append(PlannedRun(model, "nll", prefill_seconds(cost, speed, nll_tokens, logits=nll_tokens),
                                   tokens=nll_tokens))
    each = {n: generation_seconds(cost, speed, n, long.max_new_tokens) for n in long_lengths}
    length_seconds = {n: each[n] * len(long.depths) * len(long_models) for n in long_lengths}
    limit, setting = budget(config, device)
    skipped: dict[int, str] = {}
    left = limit
    for n in sorted(long_lengths, reverse=True):
        if left is None or length_seconds[n] <= left:
            left = None if left is None else left - length_seconds[n]
            continue
        skipped[n] = _over_budget(length_seconds[n], len(long.depths), long_models, limit, left, setting, device)
    for model in long_models:
        for n in long_lengths:
            for depth in long.depths:
                runs.append(PlannedRun(model, "long", each[n], tokens=n, depth=depth,
                                       status="skipped" if n in skipped else "planned"))
    return SmokePlan(device, dtype, dtype_reason, ("merged", *with_parents), limit, setting, speed, tuple(runs),
                     skipped, length_seconds)


def _over_budget(seconds: float, depths: int, models: tuple[str, ...], limit: float, left: float,
                 setting: str | None, device: str) -> str:
    from .numbers import human_seconds

    parents = len(models) - 1
    who = "merged" + (f" + {parents} parent{'s' * (parents != 1)}" if parents else "")
    what = f"{depths} depth{'s' * (depths != 1)} × {who}"
    hint = "raise it or run with --device cuda" if device == "cpu" else "raise it"
    return (f"would take about {human_seconds(seconds)} ({what}), more than the "
            f"{human_seconds(left)} left of {setting} ({human_seconds(limit)}); {hint}")
