"""The model card: README.md rendered from jinja2 templates, with Hub metadata, provenance and smoke results.

Only an allow-list of fields reaches the templates (aliases, labels, Hub ids, weights, hashes, versions,
smoke results), never a source's local path or an environment value; a final scan of the rendered text
refuses the card if anything path- or secret-shaped got through anyway. Recipe text is data: templates
run in a sandbox with StrictUndefined, and values are inserted, never evaluated.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__, frontmatter
from .errors import CardError, UsageError
from .files import replace_atomically
from .hub_rules import LICENSES, repo_id_problem
from .identity import smoke_identity
from .leaks import find_leaks
from .markdown import code, codeblock, md
from .recipe import MergeInput, Recipe, parse_ref
from .reports import EVAL_FILE, PROVENANCE_FILE, SMOKE_FILE, Eval, Family, MetricScore, Provenance, Smoke
from .reports import read as read_report
from .templating import template_loader

CARD_TEMPLATE = "model_card.md.j2"
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


# ---------------------------------------------------------------------------------------------
# Templates


def card_environment(template_dirs: Sequence[Path | str] = ()):
    """The Markdown environment: sandboxed, no autoescape, StrictUndefined, `default:` naming the packaged templates."""
    return _card_environment(tuple(str(d) for d in template_dirs))


@functools.lru_cache(maxsize=8)
def _card_environment(template_dirs: tuple[str, ...]):
    # Cached: compiling the templates costs more than rendering a card. The loader still notices
    # edited template files, so a cached environment never serves a stale template.
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(
        loader=template_loader(template_dirs),
        autoescape=False,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(md=md, code=code, codeblock=codeblock, pystr=pystr, **NUMBER_FILTERS)
    return env


# ---------------------------------------------------------------------------------------------
# Template filters (md, code and codeblock come from markdown.py): text from recipes and reports is data, shown as written


def pystr(value: Any) -> str:
    """A Python string literal for `value`."""
    return json.dumps(str(value), ensure_ascii=False)


def human_size(value: Any) -> str:
    """Bytes in binary units, to three significant digits: 512 B, 121 KiB, 3.47 GiB."""
    size = float(value)
    if not math.isfinite(size) or abs(size) < 1024:
        return f"{size:.0f} B" if math.isfinite(size) else "n/a"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        # Decided on the rounded value, so 1023.9 KiB reads 1.00 MiB rather than 1020 KiB.
        if abs(float(_significant(size, 3))) < 1024 or unit == "TiB":
            return f"{_significant(size, 3)} {unit}"
    raise AssertionError("unreachable")


def human_seconds(value: Any) -> str:
    """A duration to two significant digits, in the unit a reader expects: 0.43 s, 12 s, 1.3 min, 2.5 h."""
    seconds = float(value)
    if not math.isfinite(seconds):
        return "n/a"
    if abs(float(_significant(seconds))) < 60:
        return f"{_significant(seconds)} s"
    # At least 1.0 in the larger unit: 59.7 s rounds up to 60 s, which reads 1.0 min.
    minutes = max(seconds / 60, 1.0)
    if float(_significant(minutes)) < 60:
        return f"{_significant(minutes)} min"
    return f"{_significant(max(seconds / 3600, 1.0))} h"


def human_count(value: Any) -> str:
    """An integer with thousands separators: 131,072."""
    return f"{int(value):,}"


def human_percent(value: Any) -> str:
    """A fraction as a percentage to three significant digits: 0.5 -> 50%, 1/3 -> 33.3%."""
    percent = float(value) * 100
    return f"{percent:.3g}%" if abs(percent) < 1000 else f"{percent:.0f}%"


def human_number(value: Any, digits: int = 3) -> str:
    """A float with `digits` decimals (an NLL: 1.873)."""
    return f"{float(value):.{digits}f}"


def human_score(value: Any) -> str:
    """A benchmark score (MetricScore or its data) as value ± standard error, to three significant digits: 0.875 ± 0.125."""
    if isinstance(value, Mapping):
        value = MetricScore.model_validate(value)
    if value is None or value.value is None:
        return "n/a"
    shown = f"{value.value:.3g}"
    return shown + (f" ± {value.stderr:.3g}" if value.stderr is not None and math.isfinite(value.stderr) else "")


def weight_text(weight: Any) -> str:
    """A merge weight as the recipe wrote it: 0.3, or per-tensor '0.5 for mlp; 0.7 otherwise'."""
    if weight is None:
        return "none"
    if not isinstance(weight, list):
        return f"{weight:g}"
    return "; ".join(f"{w.value:g} for {w.filter}" if w.filter else f"{w.value:g} otherwise" for w in weight)


# The filters that show numbers: the card's and the catalog's environments both register these.
NUMBER_FILTERS = {
    "size": human_size, "seconds": human_seconds, "count": human_count, "percent": human_percent,
    "number": human_number, "weight": weight_text, "score": human_score,
}


def _significant(value: float, digits: int = 2) -> str:
    """`value` rounded to `digits` significant digits, written without an exponent: 0.0043, 4.3, 43, 430."""
    if value == 0:
        return "0"
    exponent = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - exponent)
    rounded = round(value, decimals)
    # Rounding can carry into a new leading digit (9.96 -> 10.0), which then needs one decimal less.
    if rounded and math.floor(math.log10(abs(rounded))) > exponent:
        decimals = max(0, decimals - 1)
    return f"{rounded:.{decimals}f}"


# ---------------------------------------------------------------------------------------------
# The allow-listed context


def base_models(recipe: Recipe) -> list[str]:
    """The Hub ids of the merge's parents (a source's Hub repo or its declared hub_id); else the ancestor."""
    found: list[str] = []
    for item in recipe.inputs():
        hub = item.ref.value if item.ref.kind == "hub" else (item.source.hub_id if item.source else None)
        if hub and hub not in found:
            found.append(hub)
    if not found and recipe.ancestor:
        found.append(recipe.ancestor)
    return found


def model_index(recipe: Recipe, evaluation: Eval) -> list[dict[str, Any]] | None:
    """The Hub's `model-index` for the merge's scores, built by huggingface_hub (EvalResult, ModelCardData); None without scores."""
    from huggingface_hub import EvalResult, ModelCardData

    results = [
        EvalResult(task_type="text-generation", task_name="Text Generation", dataset_type=task, dataset_name=task,
                   metric_type=metric, metric_name=metric, metric_value=score.value)
        for task, scores in evaluation.tasks.items() for metric, score in scores.metrics.items() if score.value is not None
    ]
    if not results:
        return None
    return ModelCardData(model_name=recipe.repo_id.rpartition("/")[2], eval_results=results).to_dict()["model-index"]


def card_metadata(recipe: Recipe, provenance: Provenance | None = None, signing_key: str | None = None,
                  evaluation: Eval | None = None) -> dict[str, Any]:
    """The card's YAML front matter: what the Hub reads for a merge, plus the fields publishing compares."""
    meta: dict[str, Any] = {}
    parents = base_models(recipe)
    if parents:
        meta["base_model"] = parents
        meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    if recipe.license:
        meta["license"] = recipe.license
        if recipe.license == "other":
            meta["license_name"] = recipe.license_name
            meta["license_link"] = recipe.license_link
    tags = ["merge", "mergekit", recipe.merge.merge_method]
    meta["tags"] = tags + [t for t in dict.fromkeys(recipe.tags) if t not in tags]
    index = model_index(recipe, evaluation) if evaluation is not None else None
    if index is not None:
        meta["model-index"] = index
    # The version of registry that built the weights when known, so re-rendering a card does not churn it.
    version = (provenance.versions.get("registry") if provenance is not None else None) or __version__
    registry: dict[str, Any] = {"recipe_sha256": recipe.sha256}
    if provenance is not None:
        registry["merge_identity"] = provenance.merge_identity
    registry["version"] = str(version)
    if signing_key is not None:
        # The fingerprint of the public key that signed model.sig (never the key or its path).
        registry["signing_key"] = signing_key
    # The sources' text facts, which provenance (merge facts only) does not record; the catalog reads them here.
    described = {
        item.key: {k: v for k, v in (("label", item.source.label), ("hub_id", item.source.hub_id)) if v}
        for item in recipe.inputs() if item.source is not None and (item.source.label or item.source.hub_id)
    }
    if described:
        registry["sources"] = described
    meta["registry"] = registry
    return meta


def card_context(
    recipe: Recipe,
    provenance: Provenance | None = None,
    smoke: Smoke | None = None,
    sections: Iterable[tuple[str, str]] = (),
    signing_key: str | None = None,
    evaluation: Eval | None = None,
    family: Family | None = None,
) -> dict[str, Any]:
    """Everything a card template sees, as plain data built from an allow-list of fields (never a local path)."""
    import yaml

    from .release import LOCK_FILE, RECIPE_FILE
    from .signing import SIGNATURE_FILE

    inputs = recipe.inputs()
    names = {item.name: item.key for item in inputs}
    metadata = card_metadata(recipe, provenance, signing_key, evaluation)
    merge = recipe.merge
    return {
        "repo_id": recipe.repo_id,
        "name": recipe.repo_id.rpartition("/")[2],
        "summary": recipe.summary,
        "recipe_sha256": recipe.sha256,
        "metadata": metadata,
        "front_matter": yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, default_flow_style=False),
        "license": {"id": recipe.license, "name": recipe.license_name, "link": recipe.license_link} if recipe.license else None,
        "ancestor": recipe.ancestor,
        "base_models": metadata.get("base_model", []),
        "merge": {
            "method": merge.merge_method,
            "normalize": merge.parameters.normalize,
            "dtype": merge.dtype or (provenance.dtype if provenance is not None else None),
            "out_dtype": merge.out_dtype,
            "config_donor": _config_donor(recipe, provenance, names),
        },
        "sources": [_source_context(item, provenance) for item in inputs],
        "config_yaml": yaml.safe_dump(_safe_config(recipe, names), sort_keys=False, allow_unicode=True, default_flow_style=False),
        "smoke": _smoke_context(smoke, names) if smoke is not None else None,
        "evaluation": _eval_context(evaluation, names) if evaluation is not None else None,
        "usage": {"prompt": recipe.smoke.short.prompt, "max_new_tokens": recipe.smoke.short.max_new_tokens},
        "provenance": _provenance_context(provenance) if provenance is not None else None,
        "sections": [{"title": str(title), "body": str(body).strip("\n")} for title, body in sections],
        "release": {"recipe": RECIPE_FILE, "lock": LOCK_FILE, "signature": SIGNATURE_FILE, "signing_key": signing_key},
        "family": _family_context(family, recipe) if family is not None else None,
    }


def _family_context(family: Family, recipe: Recipe) -> dict[str, Any]:
    """The card's family section: every point and parent with its weights and key metrics, this point marked."""
    from .family import CHART_SVG, chart_available, metric_value
    from .recipe import format_weight

    scores = sorted({name for row in family.rows for name in row.scores})
    rows = [{
        "this": row.kind == "point" and row.repo_id == recipe.repo_id,
        "kind": row.kind,
        "label": row.label,
        "repo_id": row.repo_id,
        "weights": [format_weight(row.weights[a]) if a in row.weights else "" for a in family.aliases],
        "nll": row.nll,
        "retrieved": f"{row.retrieved.retrieved} of {row.retrieved.total}" if row.retrieved else None,
        "kl": metric_value(row, "kl"),
        "kl_parent": row.nearest_parent,
        "scores": [metric_value(row, f"score:{name}") for name in scores],
        "smoke_passed": row.smoke_passed,
    } for row in family.points + family.parents]
    return {
        "name": family.family,
        "aliases": family.aliases,
        "x": family.axes[0] if family.axes else None,
        "points": len(family.points),
        "rows": rows,
        "scores": scores,
        "has_kl": any(r["kl"] is not None for r in rows),
        # The chart lies beside the card in the repo (family_files): referred to relatively, never by a local path.
        "chart": CHART_SVG if chart_available() else None,
    }


def _source_context(item: MergeInput, provenance: Provenance | None) -> dict[str, Any]:
    name = item.key
    # Reports key a source by its alias, or by the reference as written when it has none.
    recorded = provenance.sources if provenance is not None else {}
    pinned = recorded.get(name) or recorded.get(item.name)
    label = item.source.label if item.source else None
    hub_id = item.source.hub_id if item.source else None
    repo_id = item.ref.value if item.ref.kind == "hub" else None
    revision = (pinned.revision if repo_id and pinned else None) or item.ref.revision
    return {
        "alias": name,
        "label": label,
        "kind": item.ref.kind,
        "repo_id": repo_id,
        "revision": revision,
        # Only a commit sha from provenance.json is a pin; a branch or tag in the recipe can move.
        "pinned": bool(repo_id and pinned and pinned.revision),
        "hub_id": hub_id,
        "content_sha256": pinned.content_sha256 if pinned and item.ref.kind == "local" else None,
        "weight": _plain_weight(item.weight),
        "weight_text": weight_text(item.weight),
    }


def _plain_weight(weight: Any) -> Any:
    if isinstance(weight, list):
        return [{"filter": w.filter, "value": w.value} for w in weight]
    return weight


def _config_donor(recipe: Recipe, provenance: Provenance | None, names: Mapping[str, str]) -> str | None:
    if provenance is not None:
        return _safe_name(provenance.config_donor, names)
    return _safe_name(recipe.merge.base_model, names) if recipe.merge.base_model else None


def _safe_name(model: str, names: Mapping[str, str]) -> str:
    """A model as the card may show it: an alias or a Hub repo id; a bare local path becomes its model_N name."""
    if model in names:
        return names[model]
    try:
        ref = parse_ref(model)
    except ValueError:
        return "(unknown model)"
    return str(ref) if ref.kind == "hub" else "(local path)"


def _safe_config(recipe: Recipe, names: Mapping[str, str]) -> dict[str, Any]:
    """The merge configuration with every model reference replaced by the name the card uses for it."""
    config = recipe.merge.model_dump(mode="json", exclude_none=True)
    for entry in config["models"]:
        entry["model"] = _safe_name(entry["model"], names)
    for key in ("base_model", "tokenizer_source"):
        if key in config and not (key == "tokenizer_source" and config[key] in ("union", "base")):
            config[key] = _safe_name(config[key], names)
    tokenizer = config.get("tokenizer")
    if tokenizer:
        if tokenizer.get("source") not in (None, "union", "base"):
            tokenizer["source"] = _safe_name(tokenizer["source"], names)
        for spec in (tokenizer.get("tokens") or {}).values():
            source = spec.get("source")
            if isinstance(source, str):
                spec["source"] = _safe_name(source, names)
            elif isinstance(source, dict) and isinstance(source.get("model"), str):
                source["model"] = _safe_name(source["model"], names)
    return config


def _smoke_context(smoke: Smoke, names: Mapping[str, str]) -> dict[str, Any]:
    short = smoke.short
    return {
        "passed": smoke.passed,
        "longest_retrieved": smoke.longest_retrieved,
        "device": smoke.device,
        "checks": [{"name": c.name, "status": c.status, "reason": c.reason} for c in smoke.checks],
        "short": None if short is None else short.model_dump(),
        "long": [
            row.model_dump(include={"tokens", "depth", "status", "reason", "finite", "seconds", "peak_memory_bytes"})
            for row in smoke.long
        ],
        "parity": [
            {**row.model_dump(), "model": "merged" if row.model == "merged" else _safe_name(row.model, names)}
            for row in smoke.parity
        ],
    }


def _eval_context(evaluation: Eval, names: Mapping[str, str]) -> dict[str, Any]:
    """The scores as rows (task, metric, the merge's score, each parent's), the parents in the report's order."""
    parents = list(evaluation.parents)
    rows = []
    for task, scores in evaluation.tasks.items():
        for metric, score in scores.metrics.items():
            theirs = [evaluation.parents[p][task].metrics.get(metric) if task in evaluation.parents[p] else None for p in parents]
            rows.append({"task": task, "metric": metric, "version": scores.version, "samples": scores.samples,
                         "merged": score.model_dump(), "parents": [t.model_dump() if t is not None else None for t in theirs]})
    return {
        "evaluator": evaluation.evaluator,
        "evaluator_version": evaluation.evaluator_version,
        "device": evaluation.device,
        "limit": evaluation.limit,
        "config_sha256": evaluation.config_sha256,
        "passed": evaluation.passed,
        "parents": [_safe_name(p, names) for p in parents],
        "rows": rows,
        "gate": [g.model_dump() | {"parent": _safe_name(g.parent, names) if g.parent else None} for g in evaluation.gate],
    }


def _provenance_context(provenance: Provenance) -> dict[str, Any]:
    return {
        "device": provenance.device,
        "files": [{"name": name, **f.model_dump()} for name, f in sorted(provenance.files.items())],
        "versions": [{"name": name, "version": v} for name, v in provenance.versions.items()],
    }


# ---------------------------------------------------------------------------------------------
# Rendering


def render_card(
    recipe: Recipe,
    provenance: Provenance | None = None,
    smoke: Smoke | None = None,
    template_dirs: Sequence[Path | str] | None = None,
    signing_key: str | None = None,
    evaluation: Eval | None = None,
    family: Family | None = None,
) -> str:
    """The model card (README.md text) for `recipe` (a point of `family`, when given); raises CardError rather than return a card that leaks."""
    check_reports(recipe, provenance, smoke, evaluation)
    if template_dirs is None:
        from .templating import template_dirs as default_dirs

        template_dirs = default_dirs()
    sections = plugin_sections(recipe, provenance, smoke)
    context = card_context(recipe, provenance, smoke, sections, signing_key, evaluation, family)
    text = _render(card_environment(template_dirs), CARD_TEMPLATE, context)
    text = text.rstrip("\n") + "\n"
    check_card(text, recipe)
    return text


def write_card(
    recipe: Recipe,
    path: Path,
    provenance: Provenance | None = None,
    smoke: Smoke | None = None,
    template_dirs: Sequence[Path | str] | None = None,
    signing_key: str | None = None,
    evaluation: Eval | None = None,
    family: Family | None = None,
) -> str:
    """Render the card and write it to `path` (whole or not at all); returns the text."""
    text = render_card(recipe, provenance, smoke, template_dirs, signing_key, evaluation, family)
    try:
        replace_atomically(path, text.encode("utf-8"))
    except OSError as exc:
        raise CardError(f"{path}: cannot write the card: {exc.strerror or exc}", "check the folder exists and is writable") from None
    return text


def plugin_sections(recipe: Recipe, provenance: Provenance | None, smoke: Smoke | None) -> list[tuple[str, str]]:
    """Extra (title, markdown) sections from plugins' `card_sections` hooks."""
    from .plugins import get_plugin_manager

    result = {"provenance": provenance, "smoke": smoke}
    sections: list[tuple[str, str]] = []
    for found in get_plugin_manager().hook.card_sections(recipe=recipe, result=result):
        for entry in found or []:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise CardError(f"a card_sections plugin returned {entry!r}", "return a list of (title, markdown) pairs")
            sections.append((str(entry[0]), str(entry[1])))
    return sections


def read_reports(model_dir: Path) -> tuple[Provenance | None, Smoke | None]:
    """provenance.json and smoke.json from a model folder; None for each one that is absent."""
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir}: no such model folder", "give --model-dir the folder `registry merge` wrote")
    return read_report(Provenance, model_dir), read_report(Smoke, model_dir)


def check_reports(recipe: Recipe, provenance: Provenance | None, smoke: Smoke | None, evaluation: Eval | None = None) -> None:
    """Raise CardError when the reports were not made for this recipe's merge and smoke settings."""
    if provenance is not None:
        difference = _other_merge(recipe, provenance)
        if difference:
            raise CardError(f"{PROVENANCE_FILE} was written for another merge: {difference}", "re-run `registry merge`")
        if evaluation is not None and evaluation.merge_identity not in (None, provenance.merge_identity):
            raise CardError(f"{EVAL_FILE} was made for another merge (merge identity {evaluation.merge_identity[:12]}…, "
                            f"{PROVENANCE_FILE} has {provenance.merge_identity[:12]}…)", "re-run `registry eval`")
    if smoke is None or smoke.merge_identity is None or provenance is None:
        return
    if smoke.merge_identity != provenance.merge_identity:
        raise CardError(
            f"{SMOKE_FILE} was made for another merge (merge identity {smoke.merge_identity[:12]}…, "
            f"{PROVENANCE_FILE} has {provenance.merge_identity[:12]}…)",
            "re-run `registry smoke`",
        )
    if smoke.smoke_identity is not None and smoke.smoke_identity != smoke_identity(provenance.merge_identity, recipe):
        raise CardError(f"{SMOKE_FILE} was made with other smoke settings than {recipe.repo_id}'s", "re-run `registry smoke`")


def _other_merge(recipe: Recipe, provenance: Provenance) -> str | None:
    """How the merge settings provenance records differ from the recipe's (pins aside: checking them needs hashing)."""
    inputs = recipe.inputs()
    recorded, wanted = sorted(provenance.sources), sorted(item.key for item in inputs)
    # Reports key a source by its alias, or by the reference as written when it has none.
    if recorded != wanted and recorded != sorted(item.name for item in inputs):
        return f"its sources are {', '.join(recorded)}, this recipe merges {', '.join(wanted)}"
    for item in inputs:
        pin = provenance.sources.get(item.key) or provenance.sources[item.name]
        had = [w.model_dump() for w in pin.weight] if isinstance(pin.weight, list) else pin.weight
        if had != _plain_weight(item.weight):
            return f"its weight of {item.key} is {json.dumps(had)}, this recipe's is {json.dumps(_plain_weight(item.weight))}"
    return None


def _render(env: Any, name: str, context: dict[str, Any]) -> str:
    from jinja2 import TemplateError, TemplateNotFound, TemplateSyntaxError

    try:
        return env.get_template(name).render(context)
    except TemplateNotFound as exc:
        raise CardError(f"card template '{exc.name}' not found", "check the templates folders and any {% extends %}") from None
    except TemplateSyntaxError as exc:
        where = f"{_shown_path(exc.filename or exc.name or name)}:{exc.lineno}"
        raise CardError(f"{where}: template syntax error: {exc.message}", "fix the template") from None
    except TemplateError as exc:
        where = _template_frame(exc) or name
        raise CardError(f"{where}: {exc.message or type(exc).__name__}", "fix the template") from None
    except (TypeError, ValueError) as exc:
        # A filter given a value of the wrong kind: a report field that is not what its stage writes.
        where = _template_frame(exc) or name
        raise CardError(f"{where}: cannot show a value: {exc}", "check provenance.json and smoke.json, or re-run the stage that wrote them") from None


def _template_frame(exc: BaseException) -> str | None:
    """file:line of the innermost template frame in a rendering error's traceback."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(".j2"):
            found = f"{_shown_path(filename)}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def _shown_path(filename: str) -> str:
    try:
        return str(Path(filename).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return filename


# ---------------------------------------------------------------------------------------------
# Checks on the rendered card


def front_matter(text: str) -> dict[str, Any] | None:
    """The card's YAML metadata block, parsed; None when there is none."""
    import yaml

    try:
        data, _ = frontmatter.load(text)
    except yaml.YAMLError as exc:
        raise CardError(f"card metadata is not valid YAML: {str(exc).splitlines()[0]}", "fix the template's front matter") from None
    return data


def metadata_problems(meta: Mapping[str, Any]) -> list[str]:
    """What the Hub would refuse or misread in card metadata, checked locally."""
    problems = []
    base = meta.get("base_model")
    if base is not None:
        for item in [base] if isinstance(base, str) else base if isinstance(base, list) else [None]:
            problem = repo_id_problem(item) if isinstance(item, str) else "base_model must be a repo id or a list of them"
            if problem:
                problems.append(f"base_model: {problem}")
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in BASE_MODEL_RELATIONS:
        problems.append(f"base_model_relation: '{relation}' is not one of {', '.join(BASE_MODEL_RELATIONS)}")
    if relation is not None and base is None:
        problems.append("base_model_relation without base_model")
    license_id = meta.get("license")
    if license_id is not None and license_id not in LICENSES:
        problems.append(f"license: '{license_id}' is not a Hub license id")
    if license_id == "other" and not (meta.get("license_name") and meta.get("license_link")):
        problems.append("license: 'other' needs license_name and license_link")
    tags = meta.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        problems.append("tags must be a list of strings")
    for key in ("library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            problems.append(f"{key} must be a string")
    return problems


def check_card(text: str, recipe: Recipe, environ: Mapping[str, str] | None = None) -> None:
    """Raise CardError if the card leaks a path or secret, or its metadata would not do on the Hub."""
    leaks = find_leaks(text, environ)
    if leaks:
        more = f" ({len(leaks) - 1} more)" if len(leaks) > 1 else ""
        raise CardError(f"card for {recipe.repo_id} not written: {leaks[0]}{more}", "remove it from the recipe, report or template it came from")
    meta = front_matter(text)
    if meta is None:
        raise CardError(f"card for {recipe.repo_id} has no YAML front matter", "keep the default template's front matter block")
    problems = metadata_problems(meta)
    if problems:
        raise CardError(f"card metadata for {recipe.repo_id}: {problems[0]}", "fix the recipe or the template's front matter")
    registry = meta.get("registry")
    if not isinstance(registry, dict) or registry.get("recipe_sha256") != recipe.sha256:
        raise CardError(
            f"card metadata for {recipe.repo_id} lacks registry.recipe_sha256 {recipe.sha256[:12]}…, which publishing compares",
            "keep the default template's front matter block",
        )
