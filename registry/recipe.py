"""The recipe: a strict pydantic model of a merge, loaded from YAML with file:line:col errors.

A recipe names its sources (aliases for local checkpoints or Hub repos), a mergekit configuration
whose models may name those aliases, the smoke tests to run and where to publish. A plain mergekit
config file is accepted too and read as the `merge:` block of a recipe with defaults for the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import Problem, RecipeError
from .hints import missing_target_message, suggest
from .hub_rules import LICENSES, repo_id_problem
from .yamldoc import Document, Loc, load_document, parse_document

SUPPORTED_METHODS = ("linear",)
# mergekit methods we know of but do not execute yet: named, so the error can say "not supported yet".
KNOWN_METHODS = (
    "linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "karcher",
    "passthrough", "nearswap", "arcee_fusion", "sce", "multislerp", "core_space",
)
DTYPES = ("float32", "float16", "bfloat16")
# Weights beyond this are a typo or an attack, not a mixing ratio; it keeps sums finite in float32.
MAX_WEIGHT = 1e6
DEFAULT_SHORT_PROMPT = "What is 17 * 24? Think step by step."
# The needle-in-a-haystack strings (RULER-style pass key); the toy model in tests/fixtures/toy was trained on them.
DEFAULT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEFAULT_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
DEFAULT_QUESTION = "What is the pass key? The pass key is"

_ENV_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ALIAS = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
_REVISION = re.compile(r"[A-Za-z0-9._/-]{1,255}")
# Where and how to publish, not what is built: left out of the recipe's hash and of the published recipe.
PUBLISH_SETTINGS = {"publish", "sign"}


class Strict(BaseModel):
    """Base for every recipe model: unknown keys are errors and nothing is coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, defer_build=True)


class WeightFilter(Strict):
    """One entry of a filtered weight list: `value` applies to tensors whose name contains `filter`."""

    filter: str | None = None
    value: float


def _weight_kind(value: Any) -> str:
    return "~list" if isinstance(value, list) else "~number"


# The tags start with '~' so error locations can drop them (see _problems_from_validation).
Weight = Annotated[
    Annotated[float, Tag("~number")] | Annotated[list[WeightFilter], Tag("~list")],
    Discriminator(_weight_kind),
]


class ModelParameters(Strict):
    """Per-model parameters of a linear merge."""

    weight: Weight


class MergeModel(Strict):
    """One input of the merge: an alias declared under `sources:`, a local path or a Hub repo id."""

    model: str
    parameters: ModelParameters | None = None


class MergeParameters(Strict):
    """Merge-wide parameters."""

    normalize: bool = True


class TokenSpec(Strict):
    """Where one token's embedding comes from (mergekit's `tokenizer.tokens` entries)."""

    source: str | dict[str, str | int] | None = None
    force: bool = False


class TokenizerConfig(Strict):
    """mergekit's `tokenizer:` block."""

    source: str = "union"
    tokens: dict[str, TokenSpec] | None = None
    pad_to_multiple_of: int | None = Field(default=None, gt=0)


Dtype = Literal["float32", "float16", "bfloat16"]


class MergeConfig(Strict):
    """A mergekit configuration, as users already write it."""

    merge_method: str
    models: list[MergeModel]
    parameters: MergeParameters = Field(default_factory=MergeParameters)
    base_model: str | None = None
    dtype: Dtype | None = None
    out_dtype: Dtype | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None


class Source(Strict):
    """A source checkpoint: where it lies, and how the card may name it."""

    model: str
    revision: str | None = None
    hub_id: str | None = None
    label: str | None = None


class ShortSmoke(Strict):
    """The short greedy generation through the chat template."""

    prompt: str = DEFAULT_SHORT_PROMPT
    max_new_tokens: int = Field(default=128, ge=1, le=8192)
    # A healthy model's first-step logits spread over several units; a 1/-1 merge leaves them near 0.
    min_logit_std: float = Field(default=0.05, gt=0)
    ngram: int = Field(default=4, ge=1, le=64)
    max_repeated_ngrams: float = Field(default=0.5, ge=0.0, le=1.0)
    max_token_run: int = Field(default=16, ge=2)


class LongSmoke(Strict):
    """The long-context needle-in-a-haystack generation."""

    context_tokens: int | None = Field(default=None, ge=64, le=4_194_304)
    lengths: list[Annotated[int, Field(ge=64, le=4_194_304)]] | None = None
    depths: list[Annotated[float, Field(ge=0.0, le=1.0)]] = [0.1, 0.5, 0.9]
    cpu_max_tokens: int = Field(default=8192, ge=64)
    prefill_chunk_size: int | None = Field(default=None, ge=16)
    max_new_tokens: int = Field(default=16, ge=1, le=1024)
    key_digits: int = Field(default=5, ge=1, le=32)
    filler: str = DEFAULT_FILLER
    needle: str = DEFAULT_NEEDLE
    question: str = DEFAULT_QUESTION
    # Off by default: an absolute bar misjudges models whose parents do not retrieve at length either.
    min_retrieved: float = Field(default=0.0, ge=0.0, le=1.0)
    memory_fraction: float = Field(default=0.9, gt=0.0, le=1.0)
    # Seconds the long prompts may take, the merge's and every parent's together, as estimated before
    # they run; the longest lengths that fit are kept. `time_budget` applies on any device (null: no
    # limit); `cpu_time_budget` on CPU only, where a 1.5B model's 4096-token prompts would take an hour.
    time_budget: float | None = Field(default=None, ge=0.0)
    cpu_time_budget: float | None = Field(default=480.0, ge=0.0)

    @field_validator("filler", "question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("needle")
    @classmethod
    def _has_key(cls, value: str) -> str:
        if "{key}" not in value:
            raise ValueError("needle must contain '{key}', where the pass key goes")
        return value

    @model_validator(mode="after")
    def _lengths_fit(self) -> LongSmoke:
        if self.context_tokens is not None and self.lengths:
            over = [n for n in self.lengths if n > self.context_tokens]
            if over:
                raise ValueError(f"lengths {over} are over context_tokens ({self.context_tokens})")
        return self


class ParitySmoke(Strict):
    """Merged model against each parent: NLL on a fixed text and retrieval at the same lengths."""

    enabled: bool = True
    text: str | None = None
    retrieval: bool = True
    # "Clearly worse than both": NLL over the worse parent's by this many nats per token ...
    nll_margin: float = Field(default=0.2, ge=0.0)
    # ... or a retrieved fraction under the worse parent's by more than this.
    retrieval_margin: float = Field(default=0.25, ge=0.0, le=1.0)
    # "Far worse than the better parent", which is what a merge with an unrelated parent looks like.
    # NLL over the better parent's by more than this (nats/token; 0.5 = perplexity x1.65). Toy merges of
    # the fine-tunes at 0.1/0.9 … 0.9/0.1 stay within 0.023 of it; the toy merged 0.5/0.5 with an
    # untrained model of the same shape is 1.8-2.3 over it (docs/architecture.md, "Smoke verdicts").
    best_nll_margin: float = Field(default=0.5, ge=0.0)
    # Fewer pass keys than this share of the better parent's, where the better parent retrieves every
    # key or every parent retrieves some: good toy merges keep 6 of 6, the untrained merge keeps 0-2.
    best_retrieval_share: float = Field(default=0.5, ge=0.0, le=1.0)


class WeightsSmoke(Strict):
    """Every merged tensor against the recipe's weighted sum of the sources."""

    enabled: bool = True
    tolerance: float | None = Field(default=None, gt=0.0)


class SmokeConfig(Strict):
    """What `registry smoke` checks, with defaults that suit most models."""

    short: ShortSmoke = Field(default_factory=ShortSmoke)
    long: LongSmoke = Field(default_factory=LongSmoke)
    parity: ParitySmoke = Field(default_factory=ParitySmoke)
    weights: WeightsSmoke = Field(default_factory=WeightsSmoke)
    # What the models compute in: `auto` is the checkpoint's dtype on CUDA, and on CPU bfloat16 for a
    # bfloat16 checkpoint when the CPU multiplies bfloat16 natively, else float32 (smoke_plan.choose_dtype).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class SignSpec(Strict):
    """How a publish is signed (`registry.signing`): publish settings, not part of what was built."""

    # `method`: a registered signer (`key`, `sigstore`); else REGISTRY_SIGNING_METHOD, else `key`.
    # `key`: a local EC private key file (${VAR}, ~, relative to the recipe); else REGISTRY_SIGNING_KEY.
    method: str | None = None
    key: str | None = None
    required: bool = False

    @field_validator("key")
    @classmethod
    def _key_refs(cls, value: str | None) -> str | None:
        if value is not None:
            if not value.strip():
                raise ValueError("key must name a file")
            check_env_refs(value)
        return value


class PublishSpec(BaseModel):
    """`{target: NAME, ...options}`; the options are checked by the target's own model."""

    model_config = ConfigDict(extra="allow", strict=True, defer_build=True)

    target: str
    _options: BaseModel | None = PrivateAttr(default=None)

    @property
    def options(self) -> BaseModel:
        """The options, validated by the target's own pydantic model."""
        assert self._options is not None, "options are validated when the recipe is loaded with targets="
        return self._options


class Recipe(Strict):
    """A merge recipe: what to merge, how to test it, where to publish it."""

    repo_id: str
    summary: str = ""
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    ancestor: str | None = None
    # Merge sources that plan finds far apart in weight space (see sources.MAX_RELATIVE_DISTANCE).
    allow_unrelated: bool = False
    tags: list[str] = []
    sources: dict[str, Source] = {}
    merge: MergeConfig
    smoke: SmokeConfig = Field(default_factory=SmokeConfig)
    publish: list[PublishSpec] = []
    sign: SignSpec | None = None

    _document: Document | None = PrivateAttr(default=None)
    _path: Path | None = PrivateAttr(default=None)

    @property
    def path(self) -> Path | None:
        """The file the recipe was read from."""
        return self._path

    @property
    def document(self) -> Document | None:
        """The parsed YAML with node positions, for errors found after loading."""
        return self._document

    @property
    def sha256(self) -> str:
        """Content hash of the recipe (without publish settings): same merge, same hash."""
        data = self.model_dump(mode="json", exclude=PUBLISH_SETTINGS, exclude_defaults=True)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def problem(self, loc: Loc, message: str) -> Problem:
        """A Problem pointing at `loc` in the recipe's file (for errors found by later stages)."""
        if self._document is None:
            from .yamldoc import format_loc

            return Problem(str(self._path or "<recipe>"), 1, 1, format_loc(loc), message)
        return self._document.problem(loc, message)

    def inputs(self) -> list[MergeInput]:
        """The merge's models with their references resolved through `sources:`."""
        out = []
        for i, entry in enumerate(self.merge.models):
            source = self.sources.get(entry.model)
            ref = parse_ref(source.model if source else entry.model)
            if source and source.revision:
                ref = ModelRef(ref.kind, ref.value, source.revision)
            weight = entry.parameters.weight if entry.parameters else None
            out.append(MergeInput(i, entry.model, ref, source, weight))
        return out


@dataclass(frozen=True)
class ModelRef:
    """A model reference: a local path (env references unexpanded) or a Hub repo id and revision."""

    kind: Literal["local", "hub"]
    value: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.value}@{self.revision}" if self.revision else self.value


@dataclass(frozen=True)
class MergeInput:
    """One model of the merge, with its alias (or reference text), parsed reference and weight."""

    index: int
    name: str
    ref: ModelRef
    source: Source | None
    weight: float | list[WeightFilter] | None

    @property
    def key(self) -> str:
        """How locks, provenance, reports and cards name this input: alias, Hub reference, or model_N; never a path."""
        if self.source is not None:
            return self.name
        if self.ref.kind == "hub":
            return str(self.ref)
        return f"model_{self.index + 1}"


def is_local_path(text: str) -> bool:
    """True when `text` reads as a local path rather than a Hub repo id."""
    return (
        text.startswith(("/", "./", "../", "~", "${", ".\\", "..\\", "\\\\"))
        or bool(_DRIVE.match(text))
        or text in (".", "..")
    )


def parse_ref(text: str) -> ModelRef:
    """Parse a model reference; raises ValueError with a one-line reason when it is unusable."""
    if not text.strip():
        raise ValueError("model reference is empty")
    if any(ord(ch) < 32 for ch in text):
        raise ValueError("model reference contains a control character")
    if is_local_path(text):
        check_env_refs(text)
        for char, meaning in (("+", "a LoRA adapter"), ("@", "a revision")):
            if char in text:
                raise ValueError(
                    f"local path '{text}' contains '{char}', which mergekit reads as {meaning}; "
                    "rename or symlink the directory"
                )
        return ModelRef("local", text)
    if "+" in text:
        raise ValueError(f"'{text}': LoRA adapters ('model+adapter') are not supported yet")
    repo_id, _, revision = text.partition("@")
    if "@" in text and not _REVISION.fullmatch(revision):
        raise ValueError(f"'{text}': revision after '@' must be a branch, tag or commit sha")
    problem = repo_id_problem(repo_id)
    if problem:
        raise ValueError(problem + " (local paths start with '/', './', '../', '~' or '${')")
    return ModelRef("hub", repo_id, revision or None)


def check_env_refs(text: str) -> None:
    """Raise ValueError unless every '$' in `text` starts a well-formed ${NAME} reference."""
    names = _ENV_REF.findall(text)
    for name in names:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"'${{{name}}}' is not a valid environment reference: use ${{NAME}} with letters, digits and '_'")
    if text.count("$") != len(names):
        raise ValueError(f"'{text}': write environment references as ${{NAME}}")


def env_names(text: str) -> list[str]:
    """The environment variables a path refers to."""
    return _ENV_REF.findall(text)


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    hint = suggest(word, choices)
    return f" (did you mean '{hint}'?)" if hint else ""


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, *, targets: dict[str, Any] | None = None) -> Recipe:
    """Read, validate and return the recipe at `path`; raises RecipeError listing every problem."""
    # `targets` (plugins.get_targets()) checks each publish: entry's options; without it they are left unchecked.
    doc = load_document(path)
    recipe = recipe_from_document(doc, targets=targets)
    recipe._path = Path(path)
    return recipe


def parse_recipe(text: str, name: str = "<recipe>", *, targets: dict[str, Any] | None = None) -> Recipe:
    """Validate recipe YAML given as text (see load_recipe)."""
    return recipe_from_document(parse_document(text, name), targets=targets)


def is_mergekit_config(data: dict[str, Any]) -> bool:
    """A bare mergekit config: it has mergekit's top-level keys and no recipe ones."""
    return "merge" not in data and ("merge_method" in data or "slices" in data)


def recipe_from_document(doc: Document, *, targets: dict[str, Any] | None = None) -> Recipe:
    """Validate a parsed Document into a Recipe, collecting every problem with its position."""
    data = doc.data
    if is_mergekit_config(data):
        if "slices" in data:
            raise RecipeError([doc.problem(("slices",), "slices are not supported yet; list whole models under 'models:'", key=True)])
        doc.prefix = ("merge",)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(doc.file).stem).strip("-.") or "merge"
        data = {"repo_id": f"local/{stem}", "merge": data}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_problems_from_validation(exc, doc)) from None
    recipe._document = doc
    problems = list(_semantic_problems(recipe, doc, targets))
    if problems:
        raise RecipeError(problems)
    return recipe


# ---------------------------------------------------------------------------------------------
# pydantic errors, in our words


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        return {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[repr(value)]
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


_TYPE_WORDS = {
    "float_type": "a number",
    "int_type": "an integer",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
}


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """Field names of the model that validates the mapping at `loc` (for did-you-mean)."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if _is_model(current) and isinstance(part, str) and part in current.model_fields:
            current = current.model_fields[part].annotation
        elif typing.get_origin(current) is list and isinstance(part, int):
            current = typing.get_args(current)[0]
        elif typing.get_origin(current) is dict and isinstance(part, str):
            current = typing.get_args(current)[1]
        else:
            return []
    current = _unwrap(current)
    return list(current.model_fields) if _is_model(current) else []


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional/Union down to the model or container inside."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            inner = _unwrap(arg)
            if _is_model(inner) or typing.get_origin(inner) in (list, dict):
                return inner
    return tp


def _problems_from_validation(exc: ValidationError, doc: Document, model: type[BaseModel] = Recipe, prefix: Loc = ()) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc: Loc = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("~")))
        kind = err["type"]
        name = next((p for p in reversed(loc) if isinstance(p, str)), "value")
        value = err.get("input")
        if kind == "extra_forbidden":
            choices = _fields_at(model, loc[len(prefix) : -1])
            problems.append(doc.problem(loc, f"unknown key '{loc[-1]}'{_did_you_mean(str(loc[-1]), choices)}", key=True))
            continue
        if kind == "missing":
            problems.append(doc.problem(loc[:-1], f"missing required key '{loc[-1]}'"))
            continue
        if kind == "finite_number":
            message = f"{name} must be a finite number, got {_show(value)}"
        elif kind == "literal_error" and name in ("dtype", "out_dtype"):
            message = f"unknown dtype {_show(value)}{_did_you_mean(str(value), DTYPES)}; expected one of {', '.join(DTYPES)}"
        elif kind == "float_type" and name == "weight":
            message = f"weight must be a number or a list of {{filter, value}} entries, got {_show(value)}"
        elif kind in _TYPE_WORDS:
            message = f"{name} must be {_TYPE_WORDS[kind]}, got {_show(value)}"
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            message = f"{name} {err['msg'].removeprefix('Input ')}, got {_show(value)}"
        else:
            message = err["msg"].removeprefix("Value error, ")
        problems.append(doc.problem(loc, message))
    return _drop_missing_explained_by_typos(problems)


def _drop_missing_explained_by_typos(problems: list[Problem]) -> list[Problem]:
    """`alpha: 0.5` yields "unknown key 'alpha' (did you mean 'weight'?)"; "missing 'weight'" adds nothing."""
    suggested = set()
    for p in problems:
        match = re.search(r"unknown key '[^']*' \(did you mean '([^']*)'\?\)", p.message)
        if match:
            suggested.add((p.loc.rpartition(".")[0], match.group(1)))
    return [
        p for p in problems
        if not (p.message.startswith("missing required key '") and (p.loc, p.message.split("'")[1]) in suggested)
    ]


# ---------------------------------------------------------------------------------------------
# Checks beyond types


def _semantic_problems(recipe: Recipe, doc: Document, targets: dict[str, Any] | None):
    yield from _check_metadata(recipe, doc)
    resolved = yield from _check_sources(recipe, doc)
    yield from _check_merge(recipe, doc, resolved)
    yield from _check_publish(recipe, doc, targets)


def _check_metadata(recipe: Recipe, doc: Document):
    problem = repo_id_problem(recipe.repo_id)
    if problem:
        yield doc.problem(("repo_id",), problem)
    if recipe.ancestor is not None:
        problem = repo_id_problem(recipe.ancestor)
        if problem:
            yield doc.problem(("ancestor",), problem)
    if recipe.license is not None and recipe.license not in LICENSES:
        yield doc.problem(
            ("license",),
            f"unknown license '{recipe.license}'{_did_you_mean(recipe.license, sorted(LICENSES))}; "
            "use a Hub license id, or 'other' with license_name and license_link",
        )
    if recipe.license == "other" and not (recipe.license_name and recipe.license_link):
        yield doc.problem(("license",), "license 'other' needs license_name and license_link")
    for i, tag in enumerate(recipe.tags):
        if not tag.strip() or any(ch.isspace() for ch in tag):
            yield doc.problem(("tags", i), f"tag {_show(tag)} must be a non-empty word without spaces")


def _check_sources(recipe: Recipe, doc: Document):
    resolved: dict[str, ModelRef] = {}
    for alias, source in recipe.sources.items():
        if not _ALIAS.fullmatch(alias):
            yield doc.problem(
                ("sources", alias),
                f"source alias {_show(alias)} must start with a letter or '_' and use letters, digits, '_', '-' and '.'",
                key=True,
            )
            continue
        try:
            ref = parse_ref(source.model)
        except ValueError as exc:
            yield doc.problem(("sources", alias, "model"), str(exc))
            continue
        if source.revision is not None:
            if ref.kind == "local":
                yield doc.problem(("sources", alias, "revision"), "revision applies to Hub models only; this source is a local path")
            elif ref.revision:
                yield doc.problem(
                    ("sources", alias, "revision"), f"revision given twice: '@{ref.revision}' in model and revision: '{source.revision}'"
                )
            elif not _REVISION.fullmatch(source.revision):
                yield doc.problem(("sources", alias, "revision"), "revision must be a branch, tag or commit sha")
            else:
                ref = ModelRef("hub", ref.value, source.revision)
        if source.hub_id is not None:
            problem = repo_id_problem(source.hub_id)
            if problem:
                yield doc.problem(("sources", alias, "hub_id"), problem)
        resolved[alias] = ref
    return resolved


def _resolve(name: str, recipe: Recipe, resolved: dict[str, ModelRef]) -> ModelRef:
    """An alias's reference, or `name` parsed as a reference; ValueError when it is neither."""
    if name in resolved:
        return resolved[name]
    if name in recipe.sources:
        raise _Skip  # the source itself is invalid and was reported already
    if "/" not in name and "\\" not in name and not is_local_path(name):
        declared = ", ".join(recipe.sources) or "none"
        raise ValueError(
            f"'{name}' is not a declared source{_did_you_mean(name, list(recipe.sources))}; "
            f"declared sources: {declared}; a Hub model is written 'owner/name'"
        )
    return parse_ref(name)


class _Skip(Exception):
    pass


def _check_merge(recipe: Recipe, doc: Document, resolved: dict[str, ModelRef]):
    merge = recipe.merge
    method = merge.merge_method
    if method not in SUPPORTED_METHODS:
        if method in KNOWN_METHODS:
            message = f"merge method '{method}' is not supported yet; registry executes: {', '.join(SUPPORTED_METHODS)}"
        else:
            message = f"unknown merge method '{method}'{_did_you_mean(method, KNOWN_METHODS)}"
        yield doc.problem(("merge", "merge_method"), message)

    if len(merge.models) < 2:
        yield doc.problem(("merge", "models"), f"a merge needs at least two models, got {len(merge.models)}")

    seen: dict[ModelRef, int] = {}
    for i, entry in enumerate(merge.models):
        loc = ("merge", "models", i)
        try:
            ref = _resolve(entry.model, recipe, resolved)
        except _Skip:
            continue
        except ValueError as exc:
            yield doc.problem((*loc, "model"), str(exc))
            continue
        if ref in seen:
            yield doc.problem((*loc, "model"), f"'{entry.model}' is the same model as merge.models[{seen[ref]}]; list each model once")
        seen.setdefault(ref, i)
        if entry.parameters is None:
            yield doc.problem(loc, "missing weight: add 'parameters: {weight: ...}'")

    for key in ("base_model", "tokenizer_source"):
        value = getattr(merge, key)
        if value is None or (key == "tokenizer_source" and value in ("union", "base")):
            continue
        try:
            _resolve(value, recipe, resolved)
        except _Skip:
            pass
        except ValueError as exc:
            yield doc.problem(("merge", key), str(exc))
    if merge.tokenizer is not None:
        if merge.tokenizer_source is not None:
            yield doc.problem(("merge", "tokenizer"), "give either tokenizer_source or tokenizer, not both")
        elif merge.tokenizer.source not in ("union", "base"):
            try:
                _resolve(merge.tokenizer.source, recipe, resolved)
            except _Skip:
                pass
            except ValueError as exc:
                yield doc.problem(("merge", "tokenizer", "source"), str(exc))

    yield from _check_weights(recipe, doc)


def _check_weights(recipe: Recipe, doc: Document):
    merge = recipe.merge
    normalize = merge.parameters.normalize
    entries = [m.parameters.weight if m.parameters else None for m in merge.models]
    filters = {w.filter for weight in entries if isinstance(weight, list) for w in weight}
    too_large = False
    for i, weight in enumerate(entries):
        loc = ("merge", "models", i, "parameters", "weight")
        if isinstance(weight, list):
            if not weight:
                yield doc.problem(loc, "weight list is empty; give a number or {filter, value} entries")
                continue
            for j, item in enumerate(weight):
                if abs(item.value) > MAX_WEIGHT:
                    too_large = True
                    yield doc.problem((*loc, j, "value"), _too_large("value", item.value))
                elif normalize and item.value < 0:
                    yield doc.problem((*loc, j, "value"), _negative(item.value))
        elif weight is not None and abs(weight) > MAX_WEIGHT:
            too_large = True
            yield doc.problem(loc, _too_large("weight", weight))
        elif weight is not None and normalize and weight < 0:
            yield doc.problem(loc, _negative(weight))
    if too_large or not normalize or not entries or any(w is None or w == [] for w in entries):
        return
    # Tensor names are unknown here (validate reads no model), so each filter stands for the tensors it
    # names: a name equal to the filter contains every filter that is part of it, as those tensors' names
    # do. The empty name stands for tensors no filter names.
    named = sorted(f for f in filters if f and f != "*")
    for probe in ["", *named]:
        values = [weight_for(w, probe) for w in entries]
        if any(v is None for v in values):
            continue
        scope = f" for tensors matching '{probe}'" if probe else ""
        total = sum(values)  # type: ignore[arg-type]
        if total == 0:
            yield doc.problem(
                ("merge", "models"),
                f"weights sum to 0{scope}; with normalize: true every merged tensor would be NaN",
            )
        elif not _normalizable(values):  # type: ignore[arg-type]
            yield doc.problem(
                ("merge", "models"),
                f"weights sum to {total:g}{scope}, which is 0 in float32, the precision mergekit merges in; "
                "with normalize: true every merged tensor would be NaN; scale the weights up",
            )


def weight_for(weight: float | list[WeightFilter] | None, tensor: str) -> float | None:
    """A model's weight for one tensor, as mergekit resolves filters: the first entry whose filter is absent, '*' or in the name."""
    if weight is None or isinstance(weight, (int, float)):
        return weight
    for item in weight:
        if item.filter is None or item.filter == "*" or (tensor and item.filter in tensor):
            return item.value
    return None


def _float32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _normalizable(values: list[float]) -> bool:
    """True when mergekit's float32 arithmetic gives finite normalised weights and a finite, nonzero sum."""
    total = 0.0
    for v in values:
        total = _float32(total + _float32(v))
    return total != 0 and math.isfinite(total) and all(math.isfinite(_float32(v) / total) for v in values)


def _too_large(name: str, value: float) -> str:
    return f"{name} must be at most {MAX_WEIGHT:,.0f} in magnitude, got {value:g}; weights are relative, so scale them all down"


def _negative(value: float) -> str:
    return (
        f"negative weight {value} with normalize: true; if you mean it, "
        "set 'parameters: {normalize: false}' under merge"
    )


def _check_publish(recipe: Recipe, doc: Document, targets: dict[str, Any] | None):
    # Without targets (the caller passes plugins.get_targets()), publish entries are left unchecked.
    if not recipe.publish or targets is None:
        return
    for i, spec in enumerate(recipe.publish):
        target = targets.get(spec.target)
        if target is None:
            yield doc.problem(("publish", i, "target"), missing_target_message(spec.target, list(targets)))
            continue
        try:
            spec._options = target.Options.model_validate(spec.model_extra or {})
        except ValidationError as exc:
            yield from _problems_from_validation(exc, doc, target.Options, ("publish", i))


def json_schema(targets: dict[str, Any]) -> dict[str, Any]:
    """The recipe's JSON Schema, with each publish target's own options (`targets`: plugins.get_targets())."""
    schema = Recipe.model_json_schema()
    variants = []
    for name, target in sorted(targets.items()):
        sub = target.Options.model_json_schema()
        sub.setdefault("properties", {})["target"] = {"const": name}
        sub["required"] = ["target", *sub.get("required", [])]
        sub["additionalProperties"] = False
        variants.append(sub)
    schema["properties"]["publish"]["items"] = {"anyOf": variants} if variants else {"type": "object"}
    schema["$defs"].pop("PublishSpec", None)
    return schema
