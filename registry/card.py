"""The model card: README.md rendered from jinja2 templates, with Hub metadata, provenance and smoke results.

Only an allow-list of fields reaches the templates (aliases, labels, Hub ids, weights, hashes, versions,
smoke results), never a source's local path or an environment value; a final scan of the rendered text
refuses the card if anything path- or secret-shaped got through anyway. Recipe text is data: templates
run in a sandbox with StrictUndefined, and values are inserted, never evaluated.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__, frontmatter
from .errors import CardError, UsageError
from .files import replace_atomically
from .hub_rules import LICENSES, repo_id_problem
from .markdown import code, codeblock, md
from .recipe import MergeInput, Recipe, parse_ref
from .templating import template_loader

CARD_TEMPLATE = "model_card.md.j2"
REPORT_FORMAT = 1
PROVENANCE_FILE = "provenance.json"
SMOKE_FILE = "smoke.json"
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
    env.filters.update(
        md=md, code=code, codeblock=codeblock, pystr=pystr,
        size=human_size, seconds=human_seconds, count=human_count, percent=human_percent, number=human_number,
    )
    return env


# ---------------------------------------------------------------------------------------------
# Template filters (md, code and codeblock come from markdown.py): text from recipes and reports is data, shown as written


def pystr(value: Any) -> str:
    """A Python string literal for `value`."""
    return json.dumps(str(value), ensure_ascii=False)


def human_size(value: Any) -> str:
    """Bytes in binary units: 3.31 GiB."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_seconds(value: Any) -> str:
    """Seconds, to the precision a reader needs: 0.41 s, 12.3 s, 4 min 05 s."""
    seconds = float(value)
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def human_count(value: Any) -> str:
    """An integer with thousands separators: 131,072."""
    return f"{int(value):,}"


def human_percent(value: Any) -> str:
    """A fraction as a percentage: 0.5 -> 50%."""
    return f"{float(value) * 100:g}%"


def human_number(value: Any, digits: int = 3) -> str:
    """A float with `digits` decimals."""
    return f"{float(value):.{digits}f}"


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


def card_metadata(recipe: Recipe, provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
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
    # The version of registry that built the weights when known, so re-rendering a card does not churn it.
    version = _get(provenance, "versions", "registry") or __version__
    meta["registry"] = {"recipe_sha256": recipe.sha256, "version": str(version)}
    return meta


def card_context(
    recipe: Recipe,
    provenance: Mapping[str, Any] | None = None,
    smoke: Mapping[str, Any] | None = None,
    sections: Iterable[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Everything a card template sees, as plain data built from an allow-list of fields (never a local path)."""
    import yaml

    inputs = recipe.inputs()
    names = {item.name: item.key for item in inputs}
    metadata = card_metadata(recipe, provenance)
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
            "dtype": merge.dtype or _get(provenance, "dtype"),
            "out_dtype": merge.out_dtype,
            "config_donor": _config_donor(recipe, provenance, names),
        },
        "sources": [_source_context(item, provenance) for item in inputs],
        "config_yaml": yaml.safe_dump(_safe_config(recipe, names), sort_keys=False, allow_unicode=True, default_flow_style=False),
        "smoke": _smoke_context(smoke, names) if smoke is not None else None,
        "usage": {"prompt": recipe.smoke.short.prompt, "max_new_tokens": recipe.smoke.short.max_new_tokens},
        "provenance": _provenance_context(provenance) if provenance is not None else None,
        "sections": [{"title": str(title), "body": str(body).strip("\n")} for title, body in sections],
    }


def _source_context(item: MergeInput, provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    name = item.key
    # Reports key a source by its alias, or by the reference as written when it has none.
    pinned = _get(provenance, "sources", name) or _get(provenance, "sources", item.name)
    pinned = pinned if isinstance(pinned, Mapping) else {}
    label = item.source.label if item.source else None
    hub_id = item.source.hub_id if item.source else None
    repo_id = item.ref.value if item.ref.kind == "hub" else None
    revision = (pinned.get("revision") if repo_id else None) or item.ref.revision
    return {
        "alias": name,
        "label": label,
        "kind": item.ref.kind,
        "repo_id": repo_id,
        "revision": revision,
        # Only a commit sha from provenance.json is a pin; a branch or tag in the recipe can move.
        "pinned": bool(repo_id and pinned.get("revision")),
        "hub_id": hub_id,
        "content_sha256": pinned.get("content_sha256") if item.ref.kind == "local" else None,
        "weight": _plain_weight(item.weight),
        "weight_text": _weight_text(item.weight),
    }


def _plain_weight(weight: Any) -> Any:
    if isinstance(weight, list):
        return [{"filter": w.filter, "value": w.value} for w in weight]
    return weight


def _weight_text(weight: Any) -> str:
    if weight is None:
        return "none"
    if not isinstance(weight, list):
        return f"{weight:g}"
    parts = [f"{w.value:g} for {w.filter}" if w.filter else f"{w.value:g} otherwise" for w in weight]
    return "; ".join(parts)


def _config_donor(recipe: Recipe, provenance: Mapping[str, Any] | None, names: Mapping[str, str]) -> str | None:
    donor = _get(provenance, "config_donor")
    if donor is not None:
        return _safe_name(str(donor), names)
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


def _smoke_context(smoke: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    short = smoke.get("short")
    long_rows = _list(smoke, "long", SMOKE_FILE)
    retrieved = [row.get("tokens") for row in long_rows if row.get("status") == "retrieved" and isinstance(row.get("tokens"), int)]
    return {
        "passed": bool(smoke.get("passed")),
        "longest_retrieved": max(retrieved, default=None),
        "device": smoke.get("device"),
        "checks": [
            {"name": str(c.get("name")), "status": str(c.get("status")), "reason": c.get("reason") or ""}
            for c in _list(smoke, "checks", SMOKE_FILE)
        ],
        "short": None if not short else {
            "prompt": short.get("prompt") or "",
            "output": short.get("output") or "",
            "new_tokens": short.get("new_tokens"),
            "stopped": short.get("stopped"),
        },
        "long": [
            {
                "tokens": row.get("tokens"),
                "depth": row.get("depth"),
                "status": row.get("status"),
                "reason": row.get("reason"),
                "finite": row.get("finite"),
                "seconds": row.get("seconds"),
                "peak_memory_bytes": row.get("peak_memory_bytes"),
            }
            for row in long_rows
        ],
        "parity": [
            {
                "model": "merged" if row.get("model") == "merged" else _safe_name(str(row.get("model")), names),
                "nll": row.get("nll"),
                "long_retrieved": row.get("long_retrieved"),
                "long_total": row.get("long_total"),
            }
            for row in _list(smoke, "parity", SMOKE_FILE)
        ],
    }


def _provenance_context(provenance: Mapping[str, Any]) -> dict[str, Any]:
    files = provenance.get("files") or {}
    versions = provenance.get("versions") or {}
    if not isinstance(files, dict) or not isinstance(versions, dict) or not all(isinstance(f, Mapping) for f in files.values()):
        raise CardError(f"{PROVENANCE_FILE}: 'files' and 'versions' must be mappings", "re-run `registry merge`")
    return {
        "device": provenance.get("device"),
        "files": [{"name": name, "sha256": f.get("sha256"), "size": f.get("size")} for name, f in sorted(files.items())],
        "versions": [{"name": name, "version": str(v)} for name, v in versions.items()],
    }


def _get(data: Mapping[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _list(data: Mapping[str, Any], key: str, file: str) -> list[Mapping[str, Any]]:
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise CardError(f"{file}: '{key}' must be a list of objects", "re-run the stage that wrote it")
    return value


# ---------------------------------------------------------------------------------------------
# Rendering


def render_card(
    recipe: Recipe,
    provenance: Mapping[str, Any] | None = None,
    smoke: Mapping[str, Any] | None = None,
    template_dirs: Sequence[Path | str] | None = None,
) -> str:
    """The model card (README.md text) for `recipe`; raises CardError rather than return a card that leaks."""
    _check_report(recipe, provenance, PROVENANCE_FILE, "registry merge")
    _check_report(recipe, smoke, SMOKE_FILE, "registry smoke")
    if template_dirs is None:
        from .templating import template_dirs as default_dirs

        template_dirs = default_dirs()
    sections = plugin_sections(recipe, provenance, smoke)
    context = card_context(recipe, provenance, smoke, sections)
    text = _render(card_environment(template_dirs), CARD_TEMPLATE, context)
    text = text.rstrip("\n") + "\n"
    check_card(text, recipe)
    return text


def write_card(
    recipe: Recipe,
    path: Path,
    provenance: Mapping[str, Any] | None = None,
    smoke: Mapping[str, Any] | None = None,
    template_dirs: Sequence[Path | str] | None = None,
) -> str:
    """Render the card and write it to `path` (whole or not at all); returns the text."""
    text = render_card(recipe, provenance, smoke, template_dirs)
    try:
        replace_atomically(path, text.encode("utf-8"))
    except OSError as exc:
        raise CardError(f"{path}: cannot write the card: {exc.strerror or exc}", "check the folder exists and is writable") from None
    return text


def plugin_sections(recipe: Recipe, provenance: Mapping[str, Any] | None, smoke: Mapping[str, Any] | None) -> list[tuple[str, str]]:
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


def read_reports(model_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """provenance.json and smoke.json from a model folder; None for each one that is absent."""
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir}: no such model folder", "give --model-dir the folder `registry merge` wrote")
    return _read_json(model_dir / PROVENANCE_FILE, "registry merge"), _read_json(model_dir / SMOKE_FILE, "registry smoke")


def _read_json(path: Path, stage: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise CardError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}", f"re-run `{stage}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CardError(f"{path}: cannot be read: {exc}", f"re-run `{stage}`") from None
    if not isinstance(data, dict):
        raise CardError(f"{path}: expected a JSON object", f"re-run `{stage}`")
    return data


def _check_report(recipe: Recipe, report: Mapping[str, Any] | None, file: str, stage: str) -> None:
    if report is None:
        return
    if report.get("format") != REPORT_FORMAT:
        raise CardError(f"{file}: format {report.get('format')!r} is not {REPORT_FORMAT}", f"re-run `{stage}` with this version of registry")
    sha = report.get("recipe_sha256")
    if sha is not None and sha != recipe.sha256:
        raise CardError(
            f"{file} was written for another recipe (sha256 {str(sha)[:12]}…, this one is {recipe.sha256[:12]}…)",
            f"re-run `{stage}`",
        )


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
    if _get(meta, "registry", "recipe_sha256") != recipe.sha256:
        raise CardError(
            f"card metadata for {recipe.repo_id} lacks registry.recipe_sha256 {recipe.sha256[:12]}…, which publishing compares",
            "keep the default template's front matter block",
        )


@dataclass(frozen=True)
class Leak:
    """Something path- or secret-shaped in a rendered card, and where."""

    line: int
    col: int
    section: str
    what: str

    def __str__(self) -> str:
        return f"line {self.line}:{self.col} ({self.section}) contains {self.what}"


# Where a path may start: line start, whitespace, or punctuation that opens a value or a quote.
_PATH_START = r"(?:(?<=^)|(?<=[\s\"'`(\[{=,:;*|>]))"
_SEGMENT = r"[A-Za-z0-9._~@+%-]+"
_WELL_KNOWN_ROOTS = "home|Users|root|tmp|mnt|scratch|data|local|opt|srv|media|workspace|gpfs|lustre|nfs|Volumes"
_PATTERNS: list[tuple[re.Pattern[str], str, bool]] = [
    # (pattern, what it is, whether the match may be shown in the message)
    (re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,}"), "a Hugging Face token (hf_…)", False),
    (re.compile(r"(?<![A-Za-z0-9_])api_org_[A-Za-z0-9]{30,}"), "a Hugging Face organization token (api_org_…)", False),
    (re.compile(r"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36,}"), "a GitHub token", False),
    (re.compile(r"(?<![A-Z0-9])AKIA[0-9A-Z]{16}(?![A-Z0-9])"), "an AWS access key id", False),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key", False),
    (re.compile(r"\$\{[^}\n]*\}"), "an environment reference", True),
    (re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*[\\/]|%[A-Za-z_][A-Za-z0-9_]*%[\\/]"), "an environment reference", True),
    (re.compile(r"(?<![A-Za-z0-9])[A-Za-z]:[\\/]+[^\s|`'\"<>]*"), "a Windows path", True),
    (re.compile(r"(?<![\w\\])\\{2,}[A-Za-z0-9._$-]+\\+[A-Za-z0-9._$-]+[^\s|`'\"<>]*"), "a network (UNC) path", True),
    (re.compile(r"(?<![\w/.~-])~(?:[A-Za-z_][A-Za-z0-9._-]*)?[\\/][^\s|`'\"<>]*"), "a home-relative path", True),
    (
        re.compile(
            _PATH_START + rf"/(?:(?:{_SEGMENT}/)+{_SEGMENT}?|(?:{_WELL_KNOWN_ROOTS})(?![A-Za-z0-9._-]))[^\s|`'\"<>]*",
            re.M,
        ),
        "an absolute path",
        True,
    ),
]
_ESCAPABLE = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH", re.I)
_PATHLIKE = re.compile(r"^(?:/|~|[A-Za-z]:[\\/]|\\\\)")


def find_leaks(text: str, environ: Mapping[str, str] | None = None) -> list[Leak]:
    """Every path- or secret-shaped thing in `text`, including values of secret or path-valued environment variables."""
    environ = os.environ if environ is None else environ
    # Scan the text as a reader sees it: `hf\_abc` in the Markdown is `hf_abc` on the page.
    plain, where = _unescaped(text)
    # (start, end, rank, what): environment values first, so a token is named by its variable.
    candidates: list[tuple[int, int, int, str]] = []
    for name, value in sorted(environ.items()):
        if _SECRET_NAME.search(name) and len(value) >= 8:
            for match in re.finditer(re.escape(value), plain):
                candidates.append((match.start(), match.end(), 0, f"the value of environment variable {name}"))
        elif _PATHLIKE.match(value) and len(path := value.rstrip("/\\")) >= 5:
            for match in re.finditer(r"(?<![\w./\\-])" + re.escape(path) + r"(?![\w.-])", plain):
                candidates.append((match.start(), match.end(), 0, f"the value of environment variable {name} (a path)"))
    for rank, (pattern, what, show) in enumerate(_PATTERNS, 1):
        for match in pattern.finditer(plain):
            shown = match.group()
            shown = shown if len(shown) <= 60 else shown[:57] + "…"
            candidates.append((match.start(), match.end(), rank, f"{what} '{shown}'" if show else what))
    leaks: list[Leak] = []
    covered = -1
    # One leak per place: a Windows path also looks like a UNC path once its backslashes are escaped.
    for start, end, _, what in sorted(candidates, key=lambda c: (c[0], c[2])):
        if start < covered:
            continue
        covered = end
        at = where[start]
        line = text.count("\n", 0, at) + 1
        col = at - (text.rfind("\n", 0, at) + 1) + 1
        leaks.append(Leak(line, col, _section_at(text, at), what))
    return leaks


def _unescaped(text: str) -> tuple[str, list[int]]:
    """`text` without Markdown backslash escapes, and the offset in `text` of each character kept."""
    chars: list[str] = []
    where: list[int] = []
    i = 0
    while i < len(text):
        where.append(i)
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            i += 1
        chars.append(text[i])
        i += 1
    return "".join(chars), where


def _section_at(text: str, offset: int) -> str:
    before = text[:offset]
    if offset < frontmatter.end(text):
        return "front matter"
    headings = re.findall(r"^#{2,6} +(.+)$", before, re.M)
    return headings[-1].strip() if headings else "title"
