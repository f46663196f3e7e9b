"""Smoke tests: a short and a long-context generation, parity with the parents, an exact weight check.

`run_smoke(model_dir, recipe, checks=...)` judges the smoke checks it is given (the caller passes
`plugins.get_smoke_checks()`: the built-ins of registry/smoke_checks.py and any plugin's) against a
model folder and returns a `SmokeReport`, written as smoke.json beside the weights. Each check declares
the measurements it judges (MEASUREMENTS); `Measurements` computes each once, only when needed: the
merged model's runs first, then, with the merged model freed, each parent in turn.

Nothing written to smoke.json names a local path: it is published with the model.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import re
import resource
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from .errors import RegistryError, SmokeError
from .identity import smoke_identity
from .machine import cpu_bf16_flag, memory_available, pick_device
from .recipe import SmokeConfig, WeightFilter, weight_for
from .reports import Provenance, Smoke
from .reports import read as read_report
from .reports import write as write_report
from .smoke_plan import SmokePlan, Throughput, choose_dtype, make_plan, model_cost, model_shape
from .sources import SHARD_INDEX, expand_local, folder_content_sha256

if TYPE_CHECKING:
    from .recipe import LongSmoke, Recipe, ShortSmoke

Status = Literal["passed", "failed", "skipped"]
# Prefill chunk sizes tried, largest first, when a whole-prompt forward would not fit in memory.
AUTO_CHUNKS = (8192, 4096, 2048, 1024, 512)
_MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class CheckResult:
    """The verdict of one smoke check."""

    name: str
    status: Status
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShortRun:
    """One short greedy generation through the chat template, with the measures the checks judge."""

    prompt: str
    output: str
    new_tokens: int
    stopped: Literal["eos", "max_new_tokens"]
    finite: bool
    logit_std: float
    repeated_ngrams: float
    longest_run: int


@dataclass(frozen=True)
class LongRun:
    """One needle-in-a-haystack prompt of `tokens` tokens with the needle at `depth`."""

    tokens: int
    depth: float
    status: Literal["retrieved", "missed", "skipped"]
    reason: str | None = None
    finite: bool | None = None
    seconds: float | None = None
    peak_memory_bytes: int | None = None
    key: str | None = None
    output: str | None = None
    estimated_memory_bytes: int | None = None
    prefill_chunk_size: int | None = None
    estimated_seconds: float | None = None  # the plan's estimate, before it ran (or why it was left out)


def not_checked(long: Iterable[LongRun]) -> list[str]:
    """Each long-context length none of whose prompts ran, with why: what a verdict over `long` did not check."""
    lengths: dict[int, list[LongRun]] = {}
    for run in long:
        lengths.setdefault(run.tokens, []).append(run)
    return [f"long context at {n} tokens ({runs[0].reason})" for n, runs in lengths.items()
            if all(r.status == "skipped" for r in runs)]


@dataclass(frozen=True)
class ParityRow:
    """One model's NLL on the fixed text and retrieval over the long prompts both it and the merge ran.

    A parent's row also holds KL(parent || merge) in nats per position and the share of positions whose
    top token agrees, over the comparison prompts (registry/comparison.py); None on the merged row, or
    where the two could not be compared.
    """

    model: str
    nll: float | None
    long_retrieved: int
    long_total: int
    kl: float | None = None
    top1_agreement: float | None = None


@dataclass
class SmokeReport:
    """Everything `registry smoke` found, in memory; `to_report()` is what smoke.json records."""

    passed: bool
    device: str
    smoke_identity: str | None  # None: run without a recipe or on a folder without provenance
    merge_identity: str | None
    checks: list[CheckResult]
    short: ShortRun | None
    long: list[LongRun]
    parity: list[ParityRow]
    # Every model load tried, in order ("merged", then the parents'); not written to smoke.json.
    loaded: tuple[str, ...] = ()
    dtype: str | None = None  # what the models computed in, and why
    dtype_reason: str | None = None
    plan: SmokePlan | None = None  # the estimate made before the first generation

    def not_checked(self) -> list[str]:
        """What the verdict did not check, with why (see `not_checked`)."""
        return not_checked(self.long)

    def to_report(self) -> Smoke:
        """The typed smoke.json report (reports.write writes it)."""
        short = self.short
        return Smoke(
            smoke_identity=self.smoke_identity,
            merge_identity=self.merge_identity,
            passed=self.passed,
            device=self.device,
            # A check's details are its own data: anything not JSON-shaped is recorded as text.
            checks=[{**asdict(c), "details": json.loads(json.dumps(c.details, default=str))} for c in self.checks],
            short=None if short is None else {"prompt": short.prompt, "output": short.output, "new_tokens": short.new_tokens,
                                              "stopped": short.stopped},
            long=[asdict(r) for r in self.long],
            parity=[asdict(r) for r in self.parity],
            dtype=self.dtype,
            dtype_reason=self.dtype_reason,
            estimate=None if self.plan is None else self.plan.to_report(),
            skipped=self._skipped(),
            not_checked=self.not_checked(),
        )

    def _skipped(self) -> list[dict[str, Any]]:
        """The lengths the plan left out, with their estimated seconds (all depths, the merge and its parents)."""
        plan = self.plan
        if plan is None:
            return []
        return [{"tokens": n, "estimated_seconds": round(plan.length_seconds[n], 3), "reason": reason}
                for n, reason in sorted(plan.skipped.items())]

    def failed(self) -> list[CheckResult]:
        """The checks that failed."""
        return [c for c in self.checks if c.status == "failed"]


# ---------------------------------------------------------------------------------------------
# Checks and their registration


class SmokeCheckLike(Protocol):
    """What `register_smoke_checks` accepts: a name, the measurements it needs, a judge over them."""

    name: str
    needs: tuple[str, ...]

    def judge(self, **inputs: Any) -> CheckResult: ...


@dataclass(frozen=True)
class SmokeCheck:
    """A named smoke check: `judge` is called with one keyword argument per name in `needs` (see MEASUREMENTS).

    Lower `order` comes first in the report (built-ins use 10-40, plugins default to 100); every
    check gets its measurements complete, whatever its order.
    """

    name: str
    judge: Callable[..., CheckResult]
    needs: tuple[str, ...] = ()
    order: int = 100
    description: str = ""


# ---------------------------------------------------------------------------------------------
# Sources (the parents), resolved to folders at hand


@dataclass(frozen=True)
class SourceModel:
    """A source of the merge: its weight and, when it is at hand, its folder (never written out)."""

    name: str
    kind: Literal["local", "hub"]
    weight: float | tuple[WeightFilter, ...] | None
    path: Path | None
    missing: str | None = None
    # Its folder is at hand but holds other weights than the merge read (a content sha256 mismatch).
    changed: bool = False
    # What keys its cached measurements: the content sha256 (local) or commit (Hub), when known without hashing.
    pin: str | None = None


CHANGED_SINCE_MERGE = "its weights changed since the merge (their sha256 is not the one in provenance.json)"


def resolve_local_source(text: str, recipe_dir: Path | None) -> tuple[Path | None, str | None]:
    """A local source's folder from the recipe's text (${VAR}, ~, relative to the recipe's folder), or why not."""
    from .recipe import env_names

    unset = [name for name in env_names(text) if not os.environ.get(name)]
    if unset:
        return None, f"environment variable {unset[0]} is not set"
    path = expand_local(text, recipe_dir or Path.cwd())
    if not (path / "config.json").is_file():
        return None, "its folder (with config.json) was not found"
    return path, None


def _hub_cached(repo_id: str, revision: str | None) -> tuple[Path | None, str | None]:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True)), None
    except Exception:  # any failure means the snapshot is not at hand
        return None, "it is not in the local Hub cache"


def merge_sources(recipe: Recipe | None, provenance: Provenance | None) -> list[SourceModel]:
    """The merge's sources with their weights, and their folders where they are at hand."""
    pinned = provenance.sources if provenance is not None else {}
    out: list[SourceModel] = []
    if recipe is not None:
        recipe_dir = recipe.path.resolve().parent if recipe.path else None
        for inp in recipe.inputs():
            if inp.ref.kind == "local":
                path, missing = resolve_local_source(inp.ref.value, recipe_dir)
                merged_from = pin.content_sha256 if (pin := pinned.get(inp.name)) else None
                changed = path is not None and bool(merged_from) and folder_content_sha256(path) != merged_from
                if changed:
                    path, missing = None, CHANGED_SINCE_MERGE
                content = merged_from if path is not None else None
            else:
                revision = (pin.revision if (pin := pinned.get(inp.name)) else None) or inp.ref.revision
                path, missing = _hub_cached(inp.ref.value, revision)
                changed = False
                content = _snapshot_commit(path)
            out.append(SourceModel(inp.name, inp.ref.kind, _frozen_weight(inp.weight), path, missing, changed, content))
        return out
    for name, info in pinned.items():
        weight: Any = info.weight
        if isinstance(weight, list):
            weight = tuple(WeightFilter.model_validate(w.model_dump()) for w in weight)
        if info.kind == "hub" and info.repo_id:
            path, missing = _hub_cached(info.repo_id, info.revision)
        else:
            path, missing = None, "it is a local folder: pass --recipe to locate it"
        out.append(SourceModel(name, info.kind, weight, path, missing, pin=(info.pin or None) if path else None))
    return out


def _snapshot_commit(path: Path | None) -> str | None:
    """The commit of a Hub cache snapshot folder (its name), or None."""
    return path.name if path is not None and re.fullmatch(r"[0-9a-f]{40}", path.name) else None


def source_pin(source: SourceModel) -> str | None:
    """A source's pin: from provenance or its Hub snapshot, else the content sha256 of its folder (hashed here)."""
    if source.pin or source.path is None:
        return source.pin
    return folder_content_sha256(source.path) if source.kind == "local" else None


def _frozen_weight(weight: Any) -> float | tuple[WeightFilter, ...] | None:
    """A recipe weight as checks receive it: a list of filters becomes a tuple of copies."""
    return tuple(w.model_copy() for w in weight) if isinstance(weight, list) else weight


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(path: str | Path, device: str, dtype: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a folder: sdpa attention, in `dtype`, else float32 on CPU and the checkpoint's dtype on CUDA."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
        dtype = getattr(torch, dtype) if dtype else torch.float32
        if device == "cuda" and dtype is torch.float32:
            stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
            stored = getattr(torch, stored) if isinstance(stored, str) else stored
            dtype = stored if stored in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        model.to(device).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise SmokeError(f"cannot load the model in {path}: {_one_line(exc)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise SmokeError(f"cannot load the tokenizer in {path}: {_one_line(exc)}; copy the tokenizer files into the folder") from None
    return model, tokenizer


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a bar per model load; the smoke run reports its stages itself."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def _free() -> None:
    """Collect what was just dropped (models hold reference cycles) and hand cached GPU memory back."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Generation: last-position logits only, KV cache, optional chunked prefill


def _cache_kwarg(model: Any) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefill(model: Any, input_ids: list[int], *, chunk_size: int | None = None) -> tuple[Any, Any]:
    """Run the prompt through the model; returns (last-position logits [1, 1, vocab], KV cache)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    step = chunk_size or ids.shape[1]
    key = _cache_kwarg(model)
    cache = None
    logits = None
    with torch.inference_mode():
        for start in range(0, ids.shape[1], step):
            kwargs = {key: cache} if cache is not None else {}
            # logits_to_keep=1: without it the forward materialises [N, vocab] logits (tens of GB at 128k);
            # `num_logits_to_keep` is the old name and is silently ignored by transformers 5.
            out = model(input_ids=ids[:, start : start + step], use_cache=True, logits_to_keep=1, **kwargs)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            logits = out.logits
    return logits, cache


@dataclass
class Generation:
    """The new tokens of a greedy generation, how it stopped, and what its logits looked like."""

    tokens: list[int]
    stopped: Literal["eos", "max_new_tokens"]
    finite: bool
    first_logit_std: float


def greedy_generate(
    model: Any, input_ids: list[int], max_new_tokens: int, eos_ids: Iterable[int], *, chunk_size: int | None = None
) -> Generation:
    """Greedy decoding with a KV cache, checking every step's logits are finite."""
    import torch

    eos = set(eos_ids)
    logits, cache = prefill(model, input_ids, chunk_size=chunk_size)
    first = logits[0, -1].float()
    finite = bool(torch.isfinite(first).all())
    std = float(first.std()) if finite else float("nan")
    tokens: list[int] = []
    stopped: Literal["eos", "max_new_tokens"] = "max_new_tokens"
    key = _cache_kwarg(model)
    device = first.device
    with torch.inference_mode():
        for i in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            if token in eos:
                stopped = "eos"
                break
            if i + 1 == max_new_tokens:
                break
            out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, logits_to_keep=1, **{key: cache})
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            logits = out.logits
            finite = finite and bool(torch.isfinite(logits).all())
    return Generation(tokens, stopped, finite, std)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a generation: the generation config's, the model config's and the tokenizer's."""
    ids: set[int] = set()
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def repeated_ngram_fraction(tokens: list[int], n: int) -> float:
    """The fraction of the n-grams of `tokens` that repeat an earlier one (0 for fewer than n tokens)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def longest_token_run(tokens: list[int]) -> int:
    """The length of the longest run of one repeated token."""
    best = run = 0
    for i, token in enumerate(tokens):
        run = run + 1 if i and token == tokens[i - 1] else 1
        best = max(best, run)
    return best


class Unmeasurable(SmokeError):
    """A measurement that cannot be made on this model; every check needing it fails with this message."""


class NoChatTemplate(Unmeasurable):
    """The tokenizer has no chat template, so the short generation cannot be run as users would."""


def run_short(model: Any, tokenizer: Any, config: ShortSmoke) -> ShortRun:
    """The short greedy generation of `config.prompt` through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate(
            "the tokenizer has no chat template: add chat_template.jinja to the model folder or set merge.chat_template in the recipe"
        )
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": config.prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    ids = list(encoded["input_ids"])
    gen = greedy_generate(model, ids, config.max_new_tokens, eos_token_ids(model, tokenizer))
    body = gen.tokens[:-1] if gen.stopped == "eos" else gen.tokens
    return ShortRun(
        prompt=config.prompt,
        output=tokenizer.decode(body, skip_special_tokens=True),
        new_tokens=len(gen.tokens),
        stopped=gen.stopped,
        finite=gen.finite,
        logit_std=gen.first_logit_std,
        repeated_ngrams=repeated_ngram_fraction(body, config.ngram),
        longest_run=longest_token_run(body),
    )


# Positions of full-vocabulary logits held at once by `nll` (512 x 151936 float32 logits: 311 MB).
NLL_CHUNK = 512


def nll(model: Any, tokenizer: Any, text: str) -> float:
    """Mean negative log-likelihood (nats per token) of `text` under the model, in float32."""
    import torch

    ids = tokenizer(text)["input_ids"]
    if len(ids) < 2:
        return math.nan
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    key = _cache_kwarg(model)
    cache, total = None, 0.0
    with torch.inference_mode():
        # Every position's logits are needed, but only a chunk's at a time: the KV cache carries the rest.
        for start in range(0, len(ids) - 1, NLL_CHUNK):
            kwargs = {key: cache} if cache is not None else {}
            out = model(input_ids=tokens[:, start : start + NLL_CHUNK], use_cache=True, **kwargs)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            logits = out.logits[0, : len(ids) - 1 - start].float()
            target = tokens[0, start + 1 : start + 1 + len(logits)]
            total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
    return total / (len(ids) - 1)


# ---------------------------------------------------------------------------------------------
# The needle-in-a-haystack prompt


@dataclass(frozen=True)
class NeedlePrompt:
    """A pass-key prompt of exactly len(ids) tokens; the needle's tokens start at `needle_start`."""

    ids: list[int]
    key: str
    depth: float
    needle_start: int


def pass_key(tokens: int, depth: float, digits: int) -> str:
    """The pass key for one (length, depth): fixed, so every model and every run gets the same prompts."""
    rng = random.Random(f"pass-key:{tokens}:{depth}:{digits}")
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(digits - 1))


class NeedlePromptBuilder:
    """Builds RULER-style pass-key prompts of an exact token count with any tokenizer.

    The haystack is the filler's sentences repeated (the first without a leading space, the rest
    with one), cut to the tokens left once the needle (" " + needle) and the question
    (" " + question) are counted; the needle goes in at the sentence boundary nearest to
    depth * haystack length. Pieces are tokenized once and concatenated as token ids, so the count
    is exact whatever the tokenizer; a tokenizer that prepends BOS gets it in front.

    A filler or question that the tokenizer encodes to no tokens is a SmokeError naming `model`:
    the haystack could never grow to length, and a prompt without its question tests nothing.
    """

    def __init__(self, tokenizer: Any, filler: str, needle: str, question: str, *, model: str = "the model"):
        self.tokenizer = tokenizer
        self.needle = needle
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", filler.strip()) if s]
        self.first_ids = [self._encode(s) for s in sentences]
        self.next_ids = [self._encode(" " + s) for s in sentences]
        self.question_ids = self._encode(" " + question)
        for what, ids in (("filler", self.first_ids), ("filler", self.next_ids), ("question", [self.question_ids])):
            if not any(ids):
                raise SmokeError(
                    f"the tokenizer of {model} encodes the long-context {what} to no tokens, so no pass-key prompt "
                    f"can be built; check the model's tokenizer files, or set smoke.long.{what} to text it encodes"
                )
        with_special = list(tokenizer("a")["input_ids"])
        plain = self._encode("a")
        cut = len(with_special) - len(plain)
        self.prefix = with_special[:cut] if cut > 0 and with_special[cut:] == plain else []

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def build(self, n_tokens: int, depth: float, key: str) -> NeedlePrompt:
        """A prompt of exactly `n_tokens` tokens hiding `key` at `depth` (0 = start, 1 = end)."""
        needle = self.needle.replace("{key}", key)
        needle_ids = self._encode(" " + needle)
        n_hay = n_tokens - len(self.prefix) - len(needle_ids) - len(self.question_ids)
        if n_hay < 0:
            shortest = n_tokens - n_hay
            raise SmokeError(f"a pass-key prompt needs at least {shortest} tokens with this tokenizer, got {n_tokens}")
        hay, bounds = self._haystack(n_hay, lead_space=False)
        target = depth * n_hay
        pos = min(bounds, key=lambda b: (abs(b - target), b))
        if pos == 0:
            # The needle opens the prompt: it loses its leading space and the haystack gains one.
            needle_ids = self._encode(needle)
            n_hay = n_tokens - len(self.prefix) - len(needle_ids) - len(self.question_ids)
            hay, _ = self._haystack(max(n_hay, 0), lead_space=True)
        ids = self.prefix + hay[:pos] + needle_ids + hay[pos:] + self.question_ids
        return NeedlePrompt(ids, key, depth, len(self.prefix) + pos)

    def _haystack(self, n: int, *, lead_space: bool) -> tuple[list[int], list[int]]:
        """The filler's token ids cut to `n`, and the sentence boundaries within them."""
        hay: list[int] = []
        bounds = [0]
        # Some sentence adds a token in every pass over them (checked in __init__), so this many steps always suffice.
        for i in range((n + 2) * len(self.next_ids)):
            if len(hay) >= n:
                return hay[:n], bounds
            k = i % len(self.next_ids)
            hay += self.next_ids[k] if hay or lead_space else self.first_ids[k]
            if len(hay) <= n:
                bounds.append(len(hay))
        if len(hay) >= n:
            return hay[:n], bounds
        raise SmokeError(f"the long-context filler did not reach {n} tokens; set smoke.long.filler to longer text")


# ---------------------------------------------------------------------------------------------
# Memory and time: estimate before running, measure while running


def estimate_long_memory(model_config: Any, n_tokens: int, *, dtype_bytes: int, chunk_size: int | None = None) -> int:
    """Bytes a forward over `n_tokens` needs beyond the weights (KV cache, activations, attention), with margin."""
    m = model_shape(model_config)
    hidden, heads, kv_heads, head_dim, layers, inter, vocab = m.hidden, m.heads, m.kv_heads, m.head_dim, m.layers, m.inter, m.vocab
    b = dtype_bytes
    n = n_tokens
    c = min(chunk_size or n, n)
    kv_cache = 2 * layers * kv_heads * head_dim * n * b
    # The cache grows by concatenation: one layer's keys and values exist twice for a moment.
    kv_copy = 2 * kv_heads * head_dim * n * b
    # Residual, normed input and attention output (~4 x hidden); MLP gate, up, activation, product (~4 x inter).
    activations = c * b * (4 * hidden + 4 * inter) + c * b * 2 * (heads + 2 * kv_heads) * head_dim + c * head_dim * 8
    if c < n:
        # A chunk attends to the whole cache through an explicit mask (bool, then additive in the compute
        # dtype), and GQA keys/values are repeated to every head because masked SDPA cannot share them.
        attention = c * n * (1 + b) + (2 * heads * n * head_dim * b if kv_heads < heads else 0)
    else:
        attention = heads * n * 4 * 2  # fused causal kernel: O(n) softmax statistics
    logits = 2 * vocab * 4
    return int((kv_cache + kv_copy + activations + attention + logits) * 1.2) + 64 * _MIB


# Calibration sizes: a prefill long enough to keep the device's matrix units busy, and one layer's
# causal attention long enough to be measured (the quadratic term of long prompts).
CALIBRATION_TOKENS = {"cpu": 256, "cuda": 4096}
CALIBRATION_ATTENTION = {"cpu": 1024, "cuda": 16384}
CALIBRATION_STEPS = 4


def calibrate(model: Any, device: str, *, load_seconds: float = 0.0) -> Throughput:
    """The loaded model's speed on `device`: a short prefill, a few decoding steps, one layer's causal attention."""
    import torch

    cost = model_cost(model.config)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = text.vocab_size
    limit = getattr(text, "max_position_embeddings", None) or 4096
    n = min(CALIBRATION_TOKENS.get(device, 256), limit)
    ids = [(7919 * i + 13) % vocab for i in range(n)]

    def timed(call: Callable[[], Any]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    prefill(model, ids[:16])  # the first forward pays for kernel selection and allocation
    seconds = timed(lambda: prefill(model, ids))
    eos: set[int] = set()
    short = ids[:16]
    first = timed(lambda: greedy_generate(model, short, 1, eos))
    steps = timed(lambda: greedy_generate(model, short, 1 + CALIBRATION_STEPS, eos))
    step = max((steps - first) / CALIBRATION_STEPS, 1e-6)
    attention = _attention_flops(model, device, min(CALIBRATION_ATTENTION.get(device, 1024), limit), timed)
    linear_seconds = max(seconds - cost.per_pair * n * (n + 1) / 2 / attention, seconds / 2)
    return Throughput(linear_flops=(cost.per_token * n + cost.head) / linear_seconds, attention_flops=attention,
                      step_seconds=step, load_seconds=load_seconds)


def _attention_flops(model: Any, device: str, n: int, timed: Callable[[Callable[[], Any]], float]) -> float:
    """FLOP/s of one layer's causal attention over n tokens at the model's head shapes and dtype."""
    import torch

    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    dtype = next(model.parameters()).dtype
    q = torch.randn(1, heads, n, head_dim, dtype=dtype, device=device)
    kv = torch.randn(1, kv_heads, n, head_dim, dtype=dtype, device=device)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        sdpa(q[:, :, :16], kv[:, :, :16], kv[:, :, :16], is_causal=True, enable_gqa=kv_heads != heads)
        seconds = timed(lambda: sdpa(q, kv, kv, is_causal=True, enable_gqa=kv_heads != heads))
    return 4.0 * heads * head_dim * n * (n + 1) / 2 / max(seconds, 1e-9)


def _read_status(field_name: str) -> int | None:
    try:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


class PeakMemory:
    """Peak memory over a block: CUDA's allocator peak on GPU, peak RSS on CPU (Linux's VmHWM, reset first)."""

    def __init__(self, device: str):
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                # Writing 5 resets the process's peak RSS (VmHWM) to the current RSS.
                Path("/proc/self/clear_refs").write_text("5")
                self._reset = True
            except OSError:
                self._reset = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.bytes = int(torch.cuda.max_memory_allocated())
        else:
            peak = _read_status("VmHWM") if self._reset else None
            # Without a reset the best available figure is the process's lifetime peak.
            self.bytes = peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def long_lengths(config: LongSmoke, model_config: Any) -> tuple[list[int], int]:
    """(lengths to try, context limit): the recipe's lengths, or powers of 4 from 1024 up to the limit."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    limit = config.context_tokens or getattr(text_config, "max_position_embeddings", None) or 4096
    if config.lengths:
        return sorted(set(config.lengths)), limit
    lengths = []
    n = 1024
    while n < limit:
        lengths.append(n)
        n *= 4
    return [*lengths, limit], limit


def long_precheck(model: Any, n_tokens: int, depth: float, config: LongSmoke, device: str, limit: int) -> LongRun:
    """A prompt not yet run: skipped with its reason when it cannot (or must not) run, else its chunk and memory estimate."""
    key = pass_key(n_tokens, depth, config.key_digits)
    skipped = LongRun(n_tokens, depth, "skipped", key=key)
    if n_tokens > limit:
        return replace(skipped, reason=f"{n_tokens} tokens is over the context limit ({limit})")
    if device == "cpu" and n_tokens > config.cpu_max_tokens:
        return replace(skipped, reason=(
            f"{n_tokens} tokens is over cpu_max_tokens ({config.cpu_max_tokens}) on CPU; "
            "run with --device cuda or raise smoke.long.cpu_max_tokens"
        ))
    dtype_bytes = next(model.parameters()).element_size()
    budget = int((memory_available(device) or 0) * config.memory_fraction)
    choices = [config.prefill_chunk_size] if config.prefill_chunk_size else [None, *(c for c in AUTO_CHUNKS if c < n_tokens)]
    for chunk in choices:
        estimate = estimate_long_memory(model.config, n_tokens, dtype_bytes=dtype_bytes, chunk_size=chunk)
        if estimate <= budget:
            break
    skipped = replace(skipped, estimated_memory_bytes=estimate)
    if estimate > budget:
        return replace(skipped, reason=f"needs about {estimate / _MIB:.0f} MiB, {budget / _MIB:.0f} MiB can be used on {device}")
    return replace(skipped, prefill_chunk_size=chunk if chunk and chunk < n_tokens else None)


def run_long_prompt(
    model: Any, tokenizer: Any, builder: NeedlePromptBuilder, n_tokens: int, depth: float,
    config: LongSmoke, device: str, limit: int,
) -> LongRun:
    """One needle-in-a-haystack generation, or a skip with its reason when it cannot (or must not) run."""
    import torch

    skipped = long_precheck(model, n_tokens, depth, config, device, limit)
    if skipped.reason is not None:
        return skipped
    key, chunk, estimate = skipped.key or "", skipped.prefill_chunk_size, skipped.estimated_memory_bytes or 0
    prompt = builder.build(n_tokens, depth, key)
    try:
        start = time.perf_counter()
        with PeakMemory(device) as peak:
            gen = greedy_generate(model, prompt.ids, config.max_new_tokens, eos_token_ids(model, tokenizer), chunk_size=chunk)
        seconds = round(time.perf_counter() - start, 3)
    except torch.OutOfMemoryError:
        _free()
        return replace(skipped, reason=f"ran out of memory on {device} although about {estimate / _MIB:.0f} MiB were estimated to fit")
    output = tokenizer.decode(gen.tokens, skip_special_tokens=True)
    return replace(skipped, status="retrieved" if key in output else "missed", seconds=seconds,
                   peak_memory_bytes=peak.bytes, finite=gen.finite, output=output)


def run_long(model: Any, tokenizer: Any, config: LongSmoke, device: str, cells: list[tuple[int, float]] | None = None,
             progress: Callable[[str], None] | None = None, model_name: str = "the model",
             plan: SmokePlan | None = None, planned_as: str = "merged") -> list[LongRun]:
    """Every (length, depth) of the long-context check, in order (or just `cells`); `model_name` is for messages.

    With a `plan`, the lengths it leaves out are skipped with its reason, and each prompt records its
    estimated seconds (the plan's runs for `planned_as`: "merged" or a parent's name).
    """
    builder = NeedlePromptBuilder(tokenizer, config.filler, config.needle, config.question, model=model_name)
    lengths, limit = long_lengths(config, model.config)
    todo = cells if cells is not None else [(n, d) for n in lengths for d in config.depths]
    runs = []
    for n, depth in todo:
        estimated = plan.long_seconds(n, depth, planned_as) if plan is not None else None
        if plan is not None and n in plan.skipped:
            runs.append(LongRun(n, depth, "skipped", reason=plan.skipped[n], key=pass_key(n, depth, config.key_digits),
                                estimated_seconds=None if estimated is None else round(estimated, 3)))
            continue
        run = run_long_prompt(model, tokenizer, builder, n, depth, config, device, limit)
        if estimated is not None and run.status != "skipped":
            run = replace(run, estimated_seconds=round(estimated, 3))
        if progress and run.status != "skipped":
            progress(f"long {n} tokens, depth {depth}: {run.status} in {run.seconds:.2f}s")
        runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------
# The exact weight check


_EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7, "float64": 2.0**-52}
_ROWS_ELEMENTS = 1 << 24  # compare big tensors in slices of about this many elements


class _TensorFiles:
    """Tensor name -> where its bytes lie in one checkpoint folder; rows are read from the file, never mapped.

    A mapped checkpoint stays resident (and counted in RSS) until the mapping closes: the merged model
    and two sources at the reference size would hold 10 GB. Reading rows into buffers of their own keeps
    the check at the rows it compares.
    """

    _DTYPES: ClassVar[dict[str, str]] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}

    def __init__(self, folder: Path):
        from .errors import SourceError
        from .sources import index_shards, read_safetensors_header

        self.folder = folder
        index = folder / SHARD_INDEX
        files = [folder / name for name in index_shards(index)] if index.is_file() else sorted(folder.glob("*.safetensors"))
        self.info: dict[str, Any] = {}
        try:
            for file in files:
                self.info.update(read_safetensors_header(file))
        except SourceError as exc:
            raise SmokeError(exc.message) from None
        if not self.info:
            raise SmokeError(f"no safetensors weights in {folder}")
        self.where = {name: folder / info.file for name, info in self.info.items()}
        self._open: dict[Path, Any] = {}

    def shape(self, name: str) -> list[int]:
        return list(self.info[name].shape)

    def dtype(self, name: str) -> str:
        return self._DTYPES.get(self.info[name].dtype, "other")

    def rows(self, name: str, start: int, stop: int) -> Any:
        import torch

        from .sources import DTYPE_BYTES

        info = self.info[name]
        if info.dtype not in self._DTYPES:
            raise SmokeError(f"{self.where[name]}: tensor {name} is {info.dtype}, not a floating-point tensor")
        shape = info.shape
        if shape:
            start, stop = min(start, shape[0]), min(stop, shape[0])
        else:
            start, stop = 0, 1
        row = math.prod(shape[1:]) * DTYPE_BYTES[info.dtype]
        buffer = bytearray((stop - start) * row)
        file = self.where[name]
        if file not in self._open:
            self._open[file] = file.open("rb")
        handle = self._open[file]
        handle.seek(info.offset + start * row)
        if handle.readinto(buffer) != len(buffer):
            raise SmokeError(f"{file}: shorter than its header says (tensor {name})")
        if not buffer:
            return torch.empty((0, *shape[1:]), dtype=getattr(torch, self._DTYPES[info.dtype]))
        tensor = torch.frombuffer(buffer, dtype=getattr(torch, self._DTYPES[info.dtype]))
        return tensor.reshape(stop - start, *shape[1:]) if shape else tensor.reshape(())


@dataclass(frozen=True)
class WeightComparison:
    """Every merged tensor against the weighted sum of the sources: what differs, holds NaN/inf, or could not be compared."""

    sources: tuple[str, ...]
    normalize: bool
    tensors: int  # in the merged model
    tensors_checked: int
    mismatched: tuple[Mapping[str, Any], ...]
    non_finite: tuple[str, ...]
    skipped: tuple[Mapping[str, str], ...]


def compare_weights(
    model_dir: str | Path, sources: Iterable[SourceModel], *, normalize: bool, merge_dtype: str | None,
    tolerance: float | None = None,
) -> WeightComparison:
    """Every merged tensor against the (normalized) weighted sum of the sources, streamed tensor by tensor."""
    import torch

    merged = _TensorFiles(Path(model_dir))
    srcs = [(s, _TensorFiles(s.path)) for s in sources if s.path is not None]
    names = sorted(merged.where)
    mismatched: list[dict[str, Any]] = []
    non_finite: list[str] = []
    skipped: list[dict[str, str]] = []
    checked = 0
    cast = getattr(torch, merge_dtype) if merge_dtype else None
    for name in names:
        shape = merged.shape(name)
        out_dtype = merged.dtype(name)
        if out_dtype == "other":
            skipped.append({"tensor": name, "reason": "not a floating-point tensor"})
            continue
        weights, parts = [], []
        why = None
        for source, files in srcs:
            # A tied LM head may be stored only as the embedding in a source.
            src_name = name if name in files.where else ("model.embed_tokens.weight" if name == "lm_head.weight" else None)
            if src_name not in files.where:
                why = f"missing in source '{source.name}'"
                break
            if files.shape(src_name) != shape:
                why = f"shape {files.shape(src_name)} in source '{source.name}' differs from {shape} (tokenizer rebuilt?)"
                break
            w = weight_for(source.weight, name)
            if w is None:
                why = f"no weight of source '{source.name}' applies to it"
                break
            weights.append(float(w))
            parts.append((files, src_name))
        if why:
            (mismatched if why.startswith("missing") else skipped).append({"tensor": name, "reason": why})
            continue
        total = sum(weights) if normalize else 1.0
        rel = tolerance if tolerance is not None else max(_EPS.get(out_dtype, 0.0), _EPS.get(merge_dtype or "", 0.0))
        rows = shape[0] if shape else 1
        step = max(1, _ROWS_ELEMENTS // max(1, math.prod(shape[1:]))) if shape else 1
        bad = 0
        tensor_worst = 0.0
        finite = True
        for start in range(0, rows, step):
            got = merged.rows(name, start, start + step).float()
            finite = finite and bool(torch.isfinite(got).all())
            expected = torch.zeros_like(got)
            scale = torch.zeros_like(got)
            for w, (files, src_name) in zip(weights, parts, strict=True):
                x = files.rows(src_name, start, start + step)
                x = (x.to(cast) if cast is not None else x).float()
                expected.add_(x, alpha=w)
                scale.add_(x.abs(), alpha=abs(w))
            expected.div_(total)
            scale.div_(abs(total))
            error = (got - expected).abs()
            # One unit in the last place of the stored dtype, plus fp32 summation error.
            allowed = rel * expected.abs() + 2.0**-20 * scale + 1e-12
            over = ~(error <= allowed)
            bad += int(over.sum())
            if bool(over.any()):
                tensor_worst = max(tensor_worst, float(torch.nan_to_num(error, nan=math.inf)[over].max()))
        checked += 1
        if not finite:
            non_finite.append(name)
        if bad:
            mismatched.append({"tensor": name, "elements": bad, "max_abs_error": tensor_worst})
    for source, files in srcs:
        for name in sorted(set(files.where) - set(merged.where)):
            mismatched.append({"tensor": name, "reason": f"in source '{source.name}' but missing from the merged model"})
    return WeightComparison(
        sources=tuple(s.name for s, _ in srcs), normalize=normalize, tensors=len(names), tensors_checked=checked,
        mismatched=tuple(MappingProxyType(m) for m in mismatched), non_finite=tuple(non_finite),
        skipped=tuple(MappingProxyType(m) for m in skipped),
    )


# ---------------------------------------------------------------------------------------------
# Measurements: what checks judge, each computed at most once, only when a check needs it


@dataclass(frozen=True)
class SmokeSettings:
    """What the run was asked to do: the model folder, the recipe's smoke settings, the device, the mode."""

    model_dir: Path
    config: SmokeConfig  # each check gets its own copy
    device: str
    # Set by `registry publish`: what cannot be verified there (a source changed since the merge) fails.
    strict: bool
    normalize: bool  # whether the merge normalized its weights
    merge_dtype: str | None  # the dtype the merge computed in, when known
    dtype: str | None = None  # what every model is loaded in for this run (None: load_model's default)
    dtype_reason: str = ""

    def parity_text(self) -> str:
        """The fixed text whose NLL is compared: the recipe's, else the haystack with a needle and its answer."""
        if self.config.parity.text:
            return self.config.parity.text
        long = self.config.long
        key = "73914"
        return f"{long.filler} {long.needle.replace('{key}', key)} {long.filler} {long.question} {key}."


@dataclass(frozen=True)
class LoadedModel:
    """The merged model and its tokenizer, for a check that runs something of its own."""

    model: Any
    tokenizer: Any


@dataclass(frozen=True)
class Logprobs:
    """Next-token log-probs at every position of the comparison prompts (float32, CPU): what KL compares."""

    prompts: tuple[tuple[int, ...], ...]
    values: Any  # torch.Tensor [positions, vocab]


@dataclass(frozen=True)
class ParentEval:
    """What a parent did on the same prompts as the merge, and how close the merge's next-token distributions are to its."""

    name: str
    short: ShortRun | None
    nll: float | None
    long: tuple[LongRun, ...]
    kl: float | None = None  # KL(parent || merge), nats per position
    top1_agreement: float | None = None
    not_compared: str | None = None  # why kl is None


@dataclass(frozen=True)
class Parents:
    """The parents evaluated on the merge's prompts, and the sources that could not be (with why)."""

    evaluated: tuple[ParentEval, ...]
    unavailable: tuple[SourceModel, ...]


# Name -> what a check declaring it receives. The runner computes them in this order, so the merged
# model's runs are done and the model freed before any parent loads (one model in memory at a time).
MEASUREMENTS: dict[str, str] = {
    "settings": "SmokeSettings: the model folder, the recipe's smoke settings, the device, strict mode",
    "sources": "tuple[SourceModel]: the merge's sources with their weights, and their folders where at hand",
    "model": "LoadedModel: the merged model and tokenizer (a check needing it is judged before the parents load)",
    "plan": "SmokePlan: every planned run's estimated seconds and the long lengths the time budget keeps",
    "short": "ShortRun: the merged model's short generation",
    "long": "tuple[LongRun]: the merged model's needle-in-a-haystack prompts, every (length, depth)",
    "nll": "float: the merged model's NLL on the fixed text, when the parity check compares it",
    "logprobs": "Logprobs: the merged model's next-token log-probs over the comparison prompts (float32, CPU)",
    "parents": "Parents: each parent at hand run on the merged model's prompts (none when parity is disabled)",
    "weights": "WeightComparison | None: every tensor against the weighted sum of the sources (None: not run)",
    "parity": "tuple[ParityRow]: the merge and each parent side by side (empty without parents)",
}


class Measurements:
    """Computes each measurement once, on demand, and judges every check over the ones it declares."""

    def __init__(self, settings: SmokeSettings, recipe: Recipe | None, provenance: Provenance | None,
                 progress: Callable[[str], None] | None = None, throughput: Throughput | None = None):
        self.settings = settings
        self.throughput = throughput  # given: the plan uses it instead of calibrating
        self.recipe = recipe
        self.provenance = provenance
        self.progress = progress
        self.values: dict[str, Any] = {}
        self.failed: dict[str, str] = {}  # measurement -> the reason each check needing it fails with
        self.seconds: dict[str, float] = {}
        # Every model load tried, in order ("merged", then parents' names): what a run cost, for callers and tests.
        self.loaded: list[str] = []

    def note(self, message: str) -> None:
        """Tell the person watching what is happening (no-op for machines)."""
        if self.progress:
            self.progress(message)

    def depends(self, name: str) -> tuple[str, ...]:
        """What a measurement is computed from (parents and parity need nothing when parity is disabled)."""
        parity = self.settings.config.parity
        if name == "long":
            return ("model", "plan")
        if name == "plan":
            return ("model", "sources")
        if name in ("short", "nll", "logprobs"):
            return ("model",)
        if name == "weights":
            return ("sources",)
        if name == "parents":
            if not parity.enabled:
                return ()
            # Parents run only the prompts the merge ran: parity compares where both did.
            return ("sources", "logprobs", "long") if parity.retrieval else ("sources", "logprobs")
        if name == "parity":
            return ("nll", "long", "parents") if parity.enabled else ()
        return ()

    def closure(self, names: Iterable[str]) -> set[str]:
        """The measurements `names` need, with what they are computed from."""
        out: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name not in out:
                out.add(name)
                todo.extend(self.depends(name))
        return out

    def measure(self, name: str) -> None:
        """Compute one measurement whose dependencies are measured (a failed dependency fails it too)."""
        if name in self.values or name in self.failed:
            return
        broken = [self.failed[d] for d in self.depends(name) if d in self.failed]
        if broken:
            self.failed[name] = broken[0]
            return
        start = time.perf_counter()
        try:
            self.values[name] = getattr(self, f"_{name}")()
        except Unmeasurable as exc:
            self.failed[name] = exc.message
        except RegistryError:
            raise
        except Exception as exc:  # a broken measurement fails the checks needing it, not the run
            if os.environ.get("REGISTRY_DEBUG") == "1":
                raise
            self.failed[name] = f"measuring the {name} raised {type(exc).__name__}: {_one_line(exc)}"
        self.seconds[name] = time.perf_counter() - start

    def judge_all(self, checks: Iterable[SmokeCheckLike]) -> list[CheckResult]:
        """Every check's verdict, in the checks' order; each is judged once all it declared is measured."""
        checks = list(checks)
        for check in checks:
            if not callable(getattr(check, "judge", None)) or not isinstance(getattr(check, "needs", None), tuple):
                raise SmokeError(f"smoke check '{check.name}' has no judge and needs; register "
                                 "SmokeCheck(name, judge, needs=(...)) with the measurements it judges")
            unknown = [n for n in check.needs if n not in MEASUREMENTS]
            if unknown:
                raise SmokeError(f"smoke check '{check.name}' needs '{unknown[0]}', which is not a measurement; "
                                 f"it can need {', '.join(MEASUREMENTS)}")
        wanted = self.closure(n for c in checks for n in c.needs)
        results: dict[int, CheckResult] = {}
        for name in [*(m for m in MEASUREMENTS if m in wanted), None]:
            for i, check in enumerate(checks):
                if i not in results and all(n in self.values or n in self.failed for n in check.needs):
                    results[i] = self._judge(check)
            waiting = [c for i, c in enumerate(checks) if i not in results]
            unmeasured = [m for m in wanted if m not in self.values and m not in self.failed]
            # Freed as soon as nothing left needs it, so a parent never loads beside it.
            if "model" in self.values and not any("model" in c.needs for c in waiting) and not any(
                    "model" in self.depends(m) for m in unmeasured):
                self.note("freeing the merged model")
                del self.values["model"]
                _free()
            if name is not None:
                self.measure(name)
        return [results[i] for i in range(len(checks))]

    def _judge(self, check: SmokeCheckLike) -> CheckResult:
        failed = [self.failed[n] for n in check.needs if n in self.failed]
        if failed:
            return CheckResult(check.name, "failed", failed[0], {"seconds": self._seconds(check)})
        inputs = {n: self.values[n] for n in check.needs}
        if "settings" in inputs:
            # A copy per check: the recipe's settings are a pydantic model, which a check could change.
            inputs["settings"] = replace(self.settings, config=self.settings.config.model_copy(deep=True))
        start = time.perf_counter()
        try:
            result = check.judge(**inputs)
        except RegistryError:
            raise
        except Exception as exc:  # a broken check is a failed check, not a crash
            if os.environ.get("REGISTRY_DEBUG") == "1":
                raise
            result = CheckResult(check.name, "failed", f"the check raised {type(exc).__name__}: {_one_line(exc)}")
        result.details.setdefault("seconds", self._seconds(check) + round(time.perf_counter() - start, 3))
        return result

    def _seconds(self, check: SmokeCheckLike) -> float:
        # The time of what the check declared: a measurement two checks share counts for both.
        return round(sum(self.seconds.get(n, 0.0) for n in self.closure(check.needs)), 3)

    def _settings(self) -> SmokeSettings:
        return self.settings

    def _sources(self) -> tuple[SourceModel, ...]:
        return tuple(merge_sources(self.recipe, self.provenance))

    def _model(self) -> LoadedModel:
        self.note(f"loading the model on {self.settings.device}")
        self.loaded.append("merged")
        return LoadedModel(*load_model(self.settings.model_dir, self.settings.device, self.settings.dtype))

    def _plan(self) -> SmokePlan:
        s, loaded = self.settings, self.values["model"]
        model, tokenizer, long = loaded.model, loaded.tokenizer, s.config.long
        speed = self.throughput or calibrate(model, s.device, load_seconds=round(self.seconds.get("model", 0.0), 3))
        lengths, limit = long_lengths(long, model.config)
        # Lengths that cannot run (context, cpu_max_tokens, memory) cost nothing and are reported as they are.
        runnable = [n for n in lengths if long_precheck(model, n, 0.5, long, s.device, limit).reason is None]
        parents = tuple(src.name for src in self.values["sources"] if src.path is not None)
        if getattr(tokenizer, "chat_template", None):
            short_tokens = len(tokenizer.apply_chat_template([{"role": "user", "content": s.config.short.prompt}],
                                                             add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        else:
            short_tokens = len(tokenizer(s.config.short.prompt)["input_ids"])
        plan = make_plan(s.config, device=s.device, dtype=s.dtype or str(next(model.parameters()).dtype).removeprefix("torch."),
                         dtype_reason=s.dtype_reason, cost=model_cost(model.config), speed=speed, parents=parents,
                         short_tokens=short_tokens, nll_tokens=len(tokenizer(s.parity_text())["input_ids"]),
                         long_lengths=runnable)
        self.note(plan.message())
        return plan

    def _short(self) -> ShortRun:
        self.note("short generation")
        loaded = self.values["model"]
        return run_short(loaded.model, loaded.tokenizer, self.settings.config.short)

    def _long(self) -> tuple[LongRun, ...]:
        loaded, s = self.values["model"], self.settings
        return tuple(run_long(loaded.model, loaded.tokenizer, s.config.long, s.device, progress=self.note,
                              model_name=f"the model in {s.model_dir}", plan=self.values["plan"]))

    def _nll(self) -> float:
        loaded = self.values["model"]
        return nll(loaded.model, loaded.tokenizer, self.settings.parity_text())

    def _logprobs(self) -> Logprobs:
        from .comparison import comparison_prompts, next_token_logprobs

        loaded, s = self.values["model"], self.settings
        prompts = comparison_prompts(loaded.tokenizer, s.parity_text(), s.config.short.prompt)
        return Logprobs(tuple(tuple(p) for p in prompts), next_token_logprobs(loaded.model, prompts))

    def _parents(self) -> Parents:
        from .comparison import compare_logprobs

        s = self.settings
        if not s.config.parity.enabled:
            return Parents((), ())
        evaluated, unavailable = [], []
        cells = [(r.tokens, r.depth) for r in self.values.get("long", ()) if r.status != "skipped"]
        merged = self.values.get("logprobs")
        for source in self.values["sources"]:
            if source.path is None:
                unavailable.append(source)
                continue
            try:
                record = measure_parent(source, s, cells, progress=self.note, loaded=self.loaded, plan=self.values.get("plan"))
            except SmokeError:
                # The message names the folder, which must not reach smoke.json.
                unavailable.append(replace(source, path=None, missing="its folder could not be loaded as a model"))
                continue
            agreement = compare_logprobs(record.logprobs.values, merged.values, record.logprobs.prompts, merged.prompts)
            long = tuple(record.long[c] for c in cells if c in record.long)
            evaluated.append(ParentEval(source.name, record.short, record.nll, long, agreement.kl, agreement.top1,
                                        agreement.reason))
            del record
        return Parents(tuple(evaluated), tuple(unavailable))

    def _weights(self) -> WeightComparison | None:
        s, sources = self.settings, self.values["sources"]
        if not s.config.weights.enabled or not sources or any(src.path is None for src in sources):
            return None
        self.note("comparing every tensor with the weighted sum of the sources")
        return compare_weights(s.model_dir, sources, normalize=s.normalize, merge_dtype=s.merge_dtype,
                               tolerance=s.config.weights.tolerance)

    def _parity(self) -> tuple[ParityRow, ...]:
        if not self.settings.config.parity.enabled or not self.values["parents"].evaluated:
            return ()
        parents, long = self.values["parents"].evaluated, self.values["long"]
        # Compare retrieval only where the merge and every parent ran.
        ran = {p.name: {(r.tokens, r.depth): r for r in p.long if r.status != "skipped"} for p in parents}
        merged_runs = {(r.tokens, r.depth): r for r in long if r.status != "skipped"}
        cells = ([c for c in merged_runs if all(c in runs for runs in ran.values())]
                 if self.settings.config.parity.retrieval else [])
        rows = [ParityRow("merged", self.values["nll"], sum(merged_runs[c].status == "retrieved" for c in cells), len(cells))]
        rows += [ParityRow(p.name, p.nll, sum(ran[p.name][c].status == "retrieved" for c in cells), len(cells), p.kl,
                           p.top1_agreement) for p in parents]
        return tuple(rows)


# ---------------------------------------------------------------------------------------------
# A parent's measurements, cached by its pin (registry/comparison.py), and the parents as a family's end points


@dataclass(frozen=True)
class ParentRecord:
    """A parent's measurements under the run's smoke settings: from the cache, completed by running it where needed."""

    name: str
    pin: str | None
    short: ShortRun | None
    nll: float | None
    long: Mapping[tuple[int, float], LongRun]  # (tokens, depth) -> run, for the cells asked for
    logprobs: Logprobs


def measure_parent(source: SourceModel, settings: SmokeSettings, cells: Iterable[tuple[int, float]], *,
                   progress: Callable[[str], None] | None = None, loaded: list[str] | None = None,
                   cache_root: Path | None = None, plan: SmokePlan | None = None) -> ParentRecord:
    """A parent's NLL, short generation, log-probs and pass-key prompts at `cells`, loading it only for what its cache lacks.

    The cache (build_root()/parents/, or `cache_root`) is keyed by the parent's pin and the smoke settings
    that shape the measurements; a source without a pin is measured every time. Each load appends the
    source's name to `loaded`. Raises SmokeError when the folder cannot be loaded.
    """
    from .comparison import comparison_prompts, next_token_logprobs, parent_settings_hash, read_cache, write_cache
    from .reports import LongEntry, ParentMeasurements, ParentShortEntry

    note = progress or (lambda message: None)
    if source.path is None:
        raise SmokeError(f"source '{source.name}' is not at hand: {source.missing}")
    pin = source_pin(source)
    # The precision a parent runs in shapes its measurements: it is part of the key with the device.
    key = parent_settings_hash(settings.config, settings.parity_text(), f"{settings.device}:{settings.dtype or 'default'}")
    cached = read_cache(pin, key, cache_root) if pin else None
    measured, values = cached if cached is not None else (ParentMeasurements(pin=pin or "", settings=key), None)
    long = {(r.tokens, r.depth): LongRun(**r.model_dump()) for r in measured.long}
    todo = [c for c in dict.fromkeys(cells) if c not in long]
    has_short = measured.short is not None or measured.short_missing is not None
    if cached is None or values is None or not has_short or todo:
        note(f"evaluating parent '{source.name}'")
        if loaded is not None:
            loaded.append(source.name)
        model, tokenizer = load_model(source.path, settings.device, settings.dtype)
        try:
            short, short_missing = run_short(model, tokenizer, settings.config.short), None
        except NoChatTemplate as exc:
            short, short_missing = None, exc.message
        value = nll(model, tokenizer, settings.parity_text())
        prompts = comparison_prompts(tokenizer, settings.parity_text(), settings.config.short.prompt)
        values = next_token_logprobs(model, prompts)
        runs = (run_long(model, tokenizer, settings.config.long, settings.device, todo,
                         model_name=f"parent '{source.name}' ({source.path})", plan=plan, planned_as=source.name) if todo else [])
        del model, tokenizer
        _free()
        long.update({(r.tokens, r.depth): r for r in runs})
        measured = ParentMeasurements(
            pin=measured.pin, settings=key, nll=value if math.isfinite(value) else None, short_missing=short_missing,
            short=None if short is None else ParentShortEntry(
                prompt=short.prompt, output=short.output, new_tokens=short.new_tokens, stopped=short.stopped,
                finite=short.finite, logit_std=short.logit_std if math.isfinite(short.logit_std) else None,
                repeated_ngrams=short.repeated_ngrams, longest_run=short.longest_run),
            # A prompt skipped for lack of memory may run another time: only what ran is kept.
            long=[LongEntry(**asdict(r)) for r in sorted(long.values(), key=lambda r: (r.tokens, r.depth))
                  if r.status != "skipped"],
            prompts=prompts,
        )
        if pin:
            write_cache(measured, values, cache_root)
    else:
        note(f"parent '{source.name}': measurements from the cache")
    short_entry = measured.short
    short_run = None if short_entry is None else ShortRun(
        prompt=short_entry.prompt, output=short_entry.output, new_tokens=short_entry.new_tokens, stopped=short_entry.stopped,
        finite=short_entry.finite, logit_std=short_entry.logit_std if short_entry.logit_std is not None else math.nan,
        repeated_ngrams=short_entry.repeated_ngrams, longest_run=short_entry.longest_run)
    wanted = set(cells)
    return ParentRecord(
        name=source.name, pin=pin, short=short_run, nll=measured.nll if measured.nll is not None else math.nan,
        long=MappingProxyType({c: r for c, r in long.items() if c in wanted}),
        logprobs=Logprobs(tuple(tuple(p) for p in measured.prompts or ()), values),
    )


@dataclass(frozen=True)
class ParentEndpoint:
    """A parent as an end point of its merge family: the figures a merge's row has, measured on the parent itself.

    `kl[other]` is KL(other || this parent) in nats per position and `top1_agreement[other]` the share of
    positions whose top token agrees, the same direction as a merge's KL against `other` (against itself:
    exactly 0.0 and 1.0). `retrieval` maps a prompt length to (pass keys retrieved, prompts run).
    A parent not at hand has `missing` set and no figures.
    """

    name: str
    pin: str | None
    nll: float | None
    retrieval: Mapping[int, tuple[int, int]]
    kl: Mapping[str, float | None]
    top1_agreement: Mapping[str, float | None]
    missing: str | None = None


def parent_endpoints(recipe: Recipe, *, device: str = "auto", provenance: Provenance | None = None,
                     progress: Callable[[str], None] | None = None, cache_root: Path | None = None,
                     loaded: list[str] | None = None) -> list[ParentEndpoint]:
    """Each of the recipe's sources as an end point of its family: NLL, retrieval per length, KL and top-1 agreement against every parent.

    Figures come from the parents' cache (what a smoke run of any merge of them left), and what is
    missing is measured and cached; one parent is in memory at a time.
    """
    from transformers import AutoConfig

    from .comparison import compare_logprobs

    config = recipe.smoke
    sources = merge_sources(recipe, provenance)
    # The precision a smoke run of the merge chose, so the parents' cache entries it left are the ones read.
    device = pick_device(device)
    at_hand = next((s.path for s in sources if s.path is not None), None)
    stored, hidden = stored_dtype(at_hand) if at_hand is not None else (None, None)
    stored = recipe.merge.out_dtype or recipe.merge.dtype or stored
    dtype, why = choose_dtype(config.dtype, device, stored, cpu_bf16_flag() if device == "cpu" else None, hidden)
    settings = SmokeSettings(Path("."), config, device, False, recipe.merge.parameters.normalize, recipe.merge.dtype, dtype, why)
    records: dict[str, ParentRecord] = {}
    missing: dict[str, SourceModel] = {}
    for source in sources:
        if source.path is None:
            missing[source.name] = source
            continue
        cells: list[tuple[int, float]] = []
        if config.parity.retrieval:
            lengths, limit = long_lengths(config.long, AutoConfig.from_pretrained(source.path))
            # Prompts that are always skipped (over the context, or over cpu_max_tokens on CPU) are not asked for.
            cells = [(n, d) for n in lengths for d in config.long.depths
                     if n <= limit and not (settings.device == "cpu" and n > config.long.cpu_max_tokens)]
        try:
            records[source.name] = measure_parent(source, settings, cells, progress=progress, loaded=loaded,
                                                  cache_root=cache_root)
        except SmokeError:
            missing[source.name] = replace(source, path=None, missing="its folder could not be loaded as a model")
    out = []
    for name in (s.name for s in sources):
        if name in missing:
            out.append(ParentEndpoint(name, None, None, MappingProxyType({}), MappingProxyType({}), MappingProxyType({}),
                                      missing[name].missing))
            continue
        this = records[name]
        kl: dict[str, float | None] = {}
        top1: dict[str, float | None] = {}
        for other, record in records.items():
            agreement = compare_logprobs(record.logprobs.values, this.logprobs.values, record.logprobs.prompts,
                                         this.logprobs.prompts)
            kl[other], top1[other] = agreement.kl, agreement.top1
        retrieval: dict[int, tuple[int, int]] = {}
        for (tokens, _depth), run in sorted(this.long.items()):
            if run.status != "skipped":
                got, ran = retrieval.get(tokens, (0, 0))
                retrieval[tokens] = (got + (run.status == "retrieved"), ran + 1)
        out.append(ParentEndpoint(name, this.pin, this.nll if math.isfinite(this.nll) else None,
                                  MappingProxyType(retrieval), MappingProxyType(kl), MappingProxyType(top1)))
    return out


# ---------------------------------------------------------------------------------------------
# Running


def run_smoke(
    model_dir: str | Path,
    recipe: Recipe | None = None,
    *,
    device: str = "auto",
    checks: list[SmokeCheckLike],
    write: bool = True,
    progress: Callable[[str], None] | None = None,
    strict: bool = False,
    throughput: Throughput | None = None,
) -> SmokeReport:
    """Run `checks` (plugins.get_smoke_checks(): every registered one) on a model folder; return (and by default write) the report.

    `strict` (what `registry publish` passes): a source whose weights changed since the merge fails the
    weights check instead of skipping it, so a publish never passes a merge it could not verify.
    `throughput`: figures the time estimate uses instead of measuring them (benchmarks, tests).
    """
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise SmokeError(f"{folder}: no config.json here; pass the folder `registry merge` wrote")
    provenance = read_report(Provenance, folder)
    config = recipe.smoke if recipe is not None else SmokeConfig()
    if recipe is not None:
        normalize, merge_dtype = recipe.merge.parameters.normalize, recipe.merge.dtype
    else:
        normalize = provenance is None or provenance.normalize is not False
        merge_dtype = provenance.dtype if provenance is not None else None
    device = pick_device(device)
    stored, hidden = stored_dtype(folder)
    dtype, why = choose_dtype(config.dtype, device, stored, cpu_bf16_flag() if device == "cpu" else None, hidden)
    settings = SmokeSettings(folder, config, device, strict, normalize, merge_dtype, dtype, why)
    measured = Measurements(settings, recipe, provenance, progress, throughput)
    results = measured.judge_all(checks)
    merge_id = provenance.merge_identity if provenance is not None else None
    report = SmokeReport(
        passed=all(r.status != "failed" for r in results),
        device=settings.device,
        smoke_identity=smoke_identity(merge_id, recipe) if merge_id is not None and recipe is not None else None,
        merge_identity=merge_id,
        checks=results,
        short=measured.values.get("short"),
        long=list(measured.values.get("long", ())),
        parity=list(measured.values.get("parity", ())),
        loaded=tuple(measured.loaded),
        dtype=dtype,
        dtype_reason=why,
        plan=measured.values.get("plan"),
    )
    if write:
        write_report(report.to_report(), folder)
    return report


def stored_dtype(folder: Path) -> tuple[str | None, int | None]:
    """(the dtype its weights are stored in, its hidden size), as a checkpoint's config.json says, where it says."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(config, dict):
        return None, None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    found = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    hidden = text.get("hidden_size")
    return (found if isinstance(found, str) else None), (hidden if isinstance(hidden, int) else None)


def print_report(report: SmokeReport, console: Any) -> None:
    """The report as rich tables: one row per check, then the long-context prompts."""
    from rich.table import Table

    from .output import esc

    colour = {"passed": "green", "failed": "red", "skipped": "yellow", "retrieved": "green", "missed": "red"}
    table = Table("check", "status", "reason", title=f"smoke ({esc(report.device)})")
    for check in report.checks:
        table.add_row(esc(check.name), f"[{colour[check.status]}]{check.status}[/]", esc(check.reason))
    console.print(table)
    if report.dtype:
        console.print(f"computed in {esc(report.dtype)}: {esc(report.dtype_reason or '')}")
    if report.short:
        console.print(f"short: {report.short.new_tokens} tokens, stopped on {esc(report.short.stopped)}: {esc(repr(report.short.output))}")
    if report.long:
        long = Table("tokens", "depth", "status", "seconds", "estimated", "peak memory", "note", title="long context")
        for run in report.long:
            peak = f"{run.peak_memory_bytes / _MIB:.0f} MiB" if run.peak_memory_bytes else ""
            seconds = f"{run.seconds:.2f}" if run.seconds is not None else ""
            estimated = f"{run.estimated_seconds:.2f}" if run.estimated_seconds is not None else ""
            long.add_row(str(run.tokens), f"{run.depth:g}", f"[{colour[run.status]}]{run.status}[/]", seconds, estimated, peak,
                         esc(run.reason or ""))
        console.print(long)
    if report.parity:
        parity = Table("model", "nll", "kl", "top-1", "retrieved", title="parity (kl: KL(parent || merge), nats/token)")
        for row in report.parity:
            value = f"{row.nll:.3f}" if row.nll is not None and math.isfinite(row.nll) else "nan"
            kl = "" if row.kl is None else f"{row.kl:.4f}" if math.isfinite(row.kl) else "nan"
            top1 = "" if row.top1_agreement is None else f"{row.top1_agreement:.1%}"
            parity.add_row(esc(row.model), value, kl, top1, f"{row.long_retrieved}/{row.long_total}")
        console.print(parity)
    verdict = "[green]passed[/]" if report.passed else f"[red]failed[/] ({esc(', '.join(c.name for c in report.failed()))})"
    missing = report.not_checked()
    console.print(f"smoke {verdict}" + (f"; not checked: {esc('; '.join(missing))}" if missing else ""))
