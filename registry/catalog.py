"""The catalog: a static HTML site of every published model, with search, filters and lineage.

Models are read from the local registry (`registry.publish.local`) or from a Hub owner's models tagged
`merge`; each becomes a `CatalogModel` (the card text and the JSON reports, as published). Families
(weight sweeps) are read from the local registry as `CatalogFamily` (family.json and its chart).
`build_site` renders them with jinja2 templates (`templates/catalog/`, autoescaped) into an index, one
page per model and one per family. Everything shown comes from published files written by other people, so it is data: card
Markdown is rendered with raw HTML off and is the only markup marked safe; every other value is escaped,
and the pages forbid inline script through their Content-Security-Policy as a second line of defence.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import frontmatter
from .card import NUMBER_FILTERS, weight_text
from .errors import CatalogError, OlderReportError, UsageError
from .hub_rules import repo_id_problem
from .release import RECIPE_FILE
from .reports import Family, Provenance, Report, Smoke, parse
from .reports import read as read_report
from .templating import default_template_dir, template_dirs, template_loader

TEMPLATE_FOLDER = "catalog"
HUB_URL = "https://huggingface.co"
CARD_NAME = "README.md"
# Written into every built site, so a rebuild may replace the folder and nothing else.
MARKER = ".registry-catalog"
SMOKE_STATES = ("passed", "failed", "unknown", "not run")
OLDER_REPORT_NOTE = "report written by an older registry; re-publish to refresh it"
R = TypeVar("R", bound=Report)


@dataclass
class CatalogModel:
    """One published model as the catalog reads it: its card and reports, exactly as published."""

    repo_id: str
    card: str  # README.md, front matter included
    metadata: dict[str, Any]
    smoke: Smoke | None = None
    provenance: Provenance | None = None
    recipe: str | None = None  # the recipe YAML, when it was published beside the model
    version: str | None = None
    published_at: str | None = None
    smoke_passed: bool | None = None  # from the registry index, when smoke.json is not at hand
    # The model's page on the Hub, only when it was read from one: nothing records that a local
    # version was also published to a Hub, so a local model gets no link rather than a guessed one.
    url: str | None = None
    older_reports: list[str] = field(default_factory=list)  # reports an older registry wrote, shown as a note
    family: dict[str, Any] | None = None  # {name, label, weights}: the family this version is a point of
    # Read from a Hub repo: the family.json published beside the point, and which chart files lie there.
    family_report: Family | None = None
    charts: tuple[str, ...] = ()


@dataclass
class CatalogFamily:
    """One family as the catalog reads it: its family.json and the chart files drawn from it (name -> bytes)."""

    report: Family
    version: str | None = None
    charts: dict[str, bytes] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The family's name, as its sweep gives it."""
        return self.report.family


@dataclass
class BuildResult:
    """What `build_site` wrote."""

    output: Path
    models: int
    pages: list[str]
    seconds: float
    families: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {"output": str(self.output), "models": self.models, "pages": self.pages, "seconds": round(self.seconds, 3)}


# ---------------------------------------------------------------------------------------------
# Reading models


def parse_source(text: str) -> tuple[str, str | None]:
    """`local` -> ('local', None); `hf:ORG` -> ('hf', 'ORG'); anything else is a UsageError."""
    if text == "local":
        return "local", None
    if text.startswith("hf:"):
        owner = text[3:]
        if owner and repo_id_problem(owner, namespace_required=False) is None:
            return "hf", owner
    raise UsageError(f"--from {text!r}: expected 'local' or 'hf:ORG_OR_USER'", "e.g. --from hf:my-team")


def read_models(source: str = "local", home: Path | None = None, api: Any = None) -> list[CatalogModel]:
    """The models named by a `--from` value: the local registry at `home`, or a Hub owner's merges."""
    kind, owner = parse_source(source)
    if kind == "local":
        return read_local(home)
    assert owner is not None
    return read_hub(owner, api)


def read_local(home: Path | None = None) -> list[CatalogModel]:
    """The newest version of every model in the local registry."""
    from . import registry_home
    from .publish.local import list_latest, version_folder

    home = home or registry_home()
    models = []
    for entry in list_latest(home):
        repo_id = str(entry.get("repo_id"))
        _check_repo_id(repo_id, f"{home}/index.json")
        # The index is only data: a path leading out of the registry is not followed.
        found = version_folder(home, entry)
        inside = found is not None
        folder = found or home
        card = _read_text(folder / CARD_NAME) if inside else None
        meta, _ = split_front_matter(card or "")
        files = entry.get("files") or {}
        older: list[str] = []
        models.append(CatalogModel(
            repo_id=repo_id,
            card=card or "",
            metadata=meta if meta is not None else dict(entry.get("metadata") or {}),
            smoke=_current(older, read_report, Smoke, folder) if inside else None,
            provenance=_current(older, read_report, Provenance, folder) if inside else None,
            recipe=_read_text(folder / RECIPE_FILE) if inside and RECIPE_FILE in files else None,
            version=entry.get("version"),
            published_at=entry.get("published_at"),
            smoke_passed=entry.get("smoke_passed"),
            older_reports=older,
            family=_family_mark(entry.get("family")),
        ))
    return models


def _family_mark(mark: Any) -> dict[str, Any] | None:
    """An index entry's `family` ({name, label, weights}) when it is well formed; anything else is ignored."""
    from .recipe import family_name_problem

    if not isinstance(mark, dict) or not isinstance(mark.get("name"), str) or family_name_problem(mark["name"]):
        return None
    weights = mark.get("weights") if isinstance(mark.get("weights"), dict) else {}
    return {"name": mark["name"], "label": str(mark.get("label") or ""), "weights": weights}


def read_families(source: str = "local", home: Path | None = None, models: Sequence[CatalogModel] = (),
                  api: Any = None) -> list[CatalogFamily]:
    """The families named by a `--from` value: the newest version of each in the local registry, or, for a Hub
    owner, the family.json its points (`models`, as `read_hub` read them) carry, with the chart from one of them."""
    kind, _ = parse_source(source)
    return read_local_families(home) if kind == "local" else hub_families(models, api)


def hub_families(models: Sequence[CatalogModel], api: Any = None) -> list[CatalogFamily]:
    """Each family the Hub models belong to, from the point published last (its family.json is the newest)."""
    from huggingface_hub import HfApi

    from .hub_errors import describe

    newest: dict[str, CatalogModel] = {}
    for model in models:
        if model.family_report is not None:
            name = model.family_report.family
            if name not in newest or (model.published_at or "") > (newest[name].published_at or ""):
                newest[name] = model
    api = api or HfApi()
    families = []
    for name in sorted(newest):
        model = newest[name]
        charts = {}
        for chart in model.charts:
            try:
                charts[chart] = Path(api.hf_hub_download(model.repo_id, chart, revision=model.version)).read_bytes()
            except Exception as exc:
                found = describe(exc, model.repo_id, model.version, str(api.endpoint))
                if found is None:
                    raise
                raise CatalogError(f"cannot download {chart} of {model.repo_id} from {api.endpoint}: {found.message}",
                                   "check your token and the network") from None
        assert model.family_report is not None
        families.append(CatalogFamily(model.family_report, model.version, charts))
    return families


def read_local_families(home: Path | None = None) -> list[CatalogFamily]:
    """The newest version of every family in the local registry, with its chart files when they were drawn."""
    from . import registry_home
    from .family import CHART_PNG, CHART_SVG
    from .publish.local import list_families, version_folder
    from .recipe import family_name_problem

    home = home or registry_home()
    families = []
    for entry in list_families(home):
        name = str(entry.get("family"))
        problem = family_name_problem(name)
        if problem:
            raise CatalogError(f"{home}/index.json: {problem}", "remove that entry or fix it")
        folder = version_folder(home, entry)
        if folder is None:
            continue  # a path leading out of the registry is not followed
        report = read_report(Family, folder)
        if report is None:
            continue
        if report.family != name:
            raise CatalogError(f"{folder}/{Family.FILE}: names family {report.family!r}, but the index lists it as {name!r}",
                               "remove that entry of the index or publish the family again")
        charts = {n: data for n in (CHART_SVG, CHART_PNG) if (data := _read_bytes(folder / n)) is not None}
        families.append(CatalogFamily(report, entry.get("version"), charts))
    return families


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes() if path.is_file() and not path.is_symlink() else None
    except OSError:
        return None


def read_hub(owner: str, api: Any = None, workers: int = 8) -> list[CatalogModel]:
    """Every model of `owner` on the Hub tagged `merge`, with its card and reports."""
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import HfApi

    from .hub_errors import describe

    api = api or HfApi()
    endpoint = str(api.endpoint).rstrip("/")
    try:
        infos = list(api.list_models(author=owner, filter="merge", full=True))
    except Exception as exc:
        found = describe(exc, owner, endpoint=endpoint)
        if found is None:
            raise
        raise CatalogError(f"cannot list the models of {owner} on {endpoint}: {found.message}",
                           "check the name, your token and the network") from None

    def fetch(info: Any) -> CatalogModel:
        files = {s.rfilename for s in info.siblings or []}

        def text(name: str) -> str | None:
            if name not in files:
                return None
            try:
                path = api.hf_hub_download(info.id, name, revision=info.sha)
            except Exception as exc:
                found = describe(exc, info.id, info.sha, endpoint)
                if found is None:
                    raise
                raise CatalogError(f"cannot download {name} of {info.id} from {endpoint}: {found.message}",
                                   "check your token and the network") from None
            return _read_text(Path(path))

        _check_repo_id(info.id, endpoint)
        card = text(CARD_NAME) or ""
        meta, _ = split_front_matter(card)
        older: list[str] = []

        def report(kind: type[R]) -> R | None:
            found = text(kind.FILE)
            if found is None:
                return None
            return _current(older, parse, kind, found, f"{endpoint}/{info.id}/{kind.FILE}")

        modified = getattr(info, "last_modified", None)
        from .family import CHART_PNG, CHART_SVG

        family = report(Family)
        row = next((r for r in family.points if r.repo_id == info.id), None) if family is not None else None
        return CatalogModel(
            repo_id=info.id,
            card=card,
            metadata=meta if meta is not None else dict(getattr(info, "card_data", None) or {}),
            smoke=report(Smoke),
            provenance=report(Provenance),
            recipe=text(RECIPE_FILE),
            version=info.sha,
            published_at=modified.isoformat(timespec="seconds").replace("+00:00", "Z") if modified else None,
            url=f"{endpoint}/{info.id}",
            older_reports=older,
            family=_family_mark({"name": family.family, "label": row.label, "weights": row.weights}) if family and row else None,
            family_report=family if row is not None else None,
            charts=tuple(n for n in (CHART_SVG, CHART_PNG) if n in files) if row is not None else (),
        )

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sorted(pool.map(fetch, infos), key=lambda m: m.repo_id.lower())


def _current(older: list[str], read: Callable[..., R | None], kind: type[R], *args: Any) -> R | None:
    """`read(kind, *args)`: a published report; None, its file named in `older`, when an older registry wrote it.

    A corrupt report (not JSON, wrong types, an unknown format) stays a one-line ReportError.
    """
    try:
        return read(kind, *args)
    except OlderReportError:
        # Still worth listing: the card is as published, only this report needs a re-publish.
        older.append(kind.FILE)
        return None


def split_front_matter(text: str) -> tuple[dict[str, Any] | None, str]:
    """A card's YAML metadata (None when absent, not a mapping or not YAML) and its Markdown body."""
    import yaml

    try:
        return frontmatter.load(text)
    except yaml.YAMLError:
        return None, frontmatter.split(text)[1]


def card_body(text: str) -> str:
    """A card's Markdown without its front matter."""
    return frontmatter.split(text)[1]


def _check_repo_id(repo_id: str, where: str) -> None:
    # Page paths are built from repo ids, so anything else could write outside the site.
    problem = repo_id_problem(repo_id)
    if problem:
        raise CatalogError(f"{where}: {problem}", "remove that entry or fix it")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Markdown


_markdown = None


def _parser():
    global _markdown
    if _markdown is None:
        from markdown_it import MarkdownIt

        _markdown = MarkdownIt("commonmark", {"html": False}).enable("table")
        _markdown.core.ruler.push("align_classes", _align_classes)
    return _markdown


def render_markdown(text: str):
    """Card Markdown as HTML with raw HTML off (it is escaped) and unsafe link schemes dropped; Markup."""
    return render_card_body(text)[0]


def render_card_body(text: str) -> tuple[Any, str]:
    """The card body as safe HTML (Markup) and its summary (first paragraph, plain text), from one parse."""
    from markupsafe import Markup

    md = _parser()
    tokens = md.parse(text)
    # Escaped by markdown-it itself: raw HTML is off and validateLink refuses javascript:/vbscript:/data: links.
    return Markup(md.renderer.render(tokens, md.options, {})), _summary(tokens)


# Below this many cards, starting worker processes costs more than it saves.
PARALLEL_MIN_CARDS = 200


def render_card_bodies(bodies: Sequence[str], workers: int | None = None) -> list[tuple[Any, str]]:
    """`render_card_body` for many cards, spread over the CPUs when there are enough of them to pay off."""
    from markupsafe import Markup

    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers < 2 or len(bodies) < PARALLEL_MIN_CARDS:
        return [render_card_body(b) for b in bodies]
    # Markdown parsing is pure Python and most of a large build. Helpers are plain child interpreters
    # fed JSON on stdin, not multiprocessing: spawning re-runs an unguarded main script, and forking a
    # process with threads (a server, a browser driver) can deadlock.
    chunks = [list(bodies[i::workers]) for i in range(workers)]
    helpers = [_start_helper(chunk) for chunk in chunks[1:]]
    done = [[render_card_body(b) for b in chunks[0]]]
    for chunk, helper in zip(chunks[1:], helpers, strict=True):
        done.append(_helper_result(helper, chunk))
    results: list[tuple[Any, str]] = [("", "")] * len(bodies)
    for i, rendered in enumerate(done):
        results[i::workers] = [(Markup(html), summary) for html, summary in rendered]
    return results


def _start_helper(chunk: list[str]) -> tuple[Any, Any] | None:
    import subprocess
    import sys
    import threading

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from registry.catalog import _render_helper; _render_helper()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )
    except OSError:
        return None
    data = json.dumps(chunk).encode()

    def feed() -> None:
        try:
            proc.stdin.write(data)
            proc.stdin.close()
        except OSError:
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    return proc, writer


def _helper_result(helper: tuple[Any, Any] | None, chunk: list[str]) -> list[tuple[Any, str]]:
    if helper is not None:
        proc, writer = helper
        out = proc.stdout.read()
        writer.join()
        if proc.wait() == 0:
            try:
                rendered = json.loads(out)
                if isinstance(rendered, list) and len(rendered) == len(chunk):
                    return [(html, summary) for html, summary in rendered]
            except ValueError:
                pass
    # A helper that could not start or failed: render its share here, so the build still completes.
    return [render_card_body(b) for b in chunk]


def _render_helper() -> None:
    """Entry point of a rendering helper: JSON list of card bodies on stdin, [html, summary] pairs out."""
    import sys

    bodies = json.load(sys.stdin)
    json.dump([[str(html), summary] for html, summary in map(render_card_body, bodies)], sys.stdout)


def _align_classes(state: Any) -> None:
    # Table alignment comes out as style="text-align:…", which the pages' CSP (style-src 'self') refuses.
    for token in state.tokens:
        if token.type in ("th_open", "td_open"):
            style = token.attrs.pop("style", None)
            if isinstance(style, str) and style.startswith("text-align:"):
                token.attrSet("class", "align-" + style.partition(":")[2])


def _summary(tokens: list[Any]) -> str:
    # The card template puts the recipe's summary in the first paragraph, right under the title.
    for i, token in enumerate(tokens):
        if token.type == "inline" and i > 0 and tokens[i - 1].type == "paragraph_open":
            return " ".join(_plain(token).split())
    return ""


def _plain(token: Any) -> str:
    parts = []
    for child in token.children or []:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# What the templates see


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def merge_method(model: CatalogModel) -> str:
    """The merge method: from provenance.json, else the card's tags, else 'unknown'."""
    from .recipe import KNOWN_METHODS

    if model.provenance is not None and model.provenance.merge_method:
        return model.provenance.merge_method
    for tag in _strings(model.metadata.get("tags")):
        if tag in KNOWN_METHODS:
            return tag
    return "unknown"


def smoke_status(model: CatalogModel) -> str:
    """'passed', 'failed', 'unknown' (smoke.json of an older format) or 'not run', from smoke.json, else the index."""
    passed = model.smoke.passed if model.smoke is not None else model.smoke_passed
    if passed is None:
        return "unknown" if Smoke.FILE in model.older_reports else "not run"
    return "passed" if passed is True else "failed"


def model_page(repo_id: str) -> str:
    """Where a model's page lies in the site, relative to its root."""
    return f"models/{repo_id}.html"


def family_page(name: str) -> str:
    """Where a family's page lies in the site, relative to its root (its chart files in `families/<name>/`)."""
    return f"families/{name}.html"


def catalog_context(models: Sequence[CatalogModel], families: Sequence[CatalogFamily] = ()) -> dict[str, Any]:
    """Everything the index, model and family templates see, as plain data (strings are escaped by the templates)."""
    ordered = sorted(models, key=lambda m: m.repo_id.lower())
    bodies = render_card_bodies([card_body(m.card) for m in ordered])
    entries = [_entry(m, html, summary) for m, (html, summary) in zip(ordered, bodies, strict=True)]
    by_id = {e["repo_id"].lower(): e for e in entries}
    for entry in entries:
        entry["parents"] = [
            {"repo_id": p, "page": by_id[p.lower()]["page"] if p.lower() in by_id else None, "url": f"{HUB_URL}/{p}"}
            for p in entry["parent_ids"]
        ]
    for entry in entries:
        for parent in entry["parent_ids"]:
            found = by_id.get(parent.lower())
            if found is not None and found is not entry:
                found["children"].append({"repo_id": entry["repo_id"], "page": entry["page"]})

    def options(key: str) -> list[dict[str, Any]]:
        counts = Counter(v for e in entries for v in (e[key] if isinstance(e[key], list) else [e[key]]))
        return [{"value": v, "count": n} for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0].lower()))]

    family_entries = [_family_entry(f, by_id) for f in sorted(families, key=lambda f: f.name.lower())]
    known = {f["name"] for f in family_entries}
    for entry in entries:
        mark = entry["family"]
        if mark is not None:
            mark["page"] = family_page(mark["name"]) if mark["name"] in known else None
    return {
        "models": entries,
        "families": family_entries,
        "filters": {
            "tag": options("tags"),
            "method": options("method"),
            "parent": options("parent_ids"),
            "license": options("license_id"),
            "smoke": [o for s in SMOKE_STATES for o in options("smoke") if o["value"] == s],
            "family": options("family_name"),
        },
    }


def _sort_value(text: str) -> float | None:
    """A table cell's number for sorting: `0.302` -> 0.302, `5/6` -> 0.833; None for text (`n/a`, `passed`)."""
    import re

    if re.fullmatch(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text):
        return float(text)
    fraction = re.fullmatch(r"(\d+)/(\d+)", text)
    if fraction and int(fraction[2]):
        return int(fraction[1]) / int(fraction[2])
    return None


def _family_entry(family: CatalogFamily, by_id: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """A family's page: the table the terminal and the card show (family.table_rows), each cell with a sort value."""
    from .family import CHART_PNG, CHART_SVG, table_rows
    from .recipe import family_name_problem

    report = family.report
    # The name becomes a page's path: only a valid family name may.
    problem = family_name_problem(family.name)
    if problem:
        raise CatalogError(problem, "fix the family's name in its sweep and publish it again")
    headers, texts = table_rows(report)
    rows = []
    for row, cells in zip(report.points + report.parents, texts, strict=True):
        found = by_id.get(row.repo_id.lower()) if row.repo_id else None
        rows.append({
            "kind": row.kind,
            "label": row.label,
            "repo_id": row.repo_id,
            "page": found["page"] if found is not None else None,
            "url": f"{HUB_URL}/{row.repo_id}" if row.kind == "parent" and row.repo_id else None,
            "cells": [{"text": text, "value": _sort_value(text)} for text in cells],
        })
        # The point column (its weights, `a=0.25 b=0.75`) sorts by the chart's x axis, the first swept alias.
        axis = report.axes[0] if report.axes else None
        if axis is not None and axis in row.weights:
            rows[-1]["cells"][0]["value"] = row.weights[axis]
    folder = f"families/{family.name}/"
    return {
        "name": family.name,
        "page": family_page(family.name),
        "version": family.version,
        "selection": report.selection,
        "aliases": report.aliases,
        "headers": headers,
        "points": [r for r in rows if r["kind"] == "point"],
        "parents": [r for r in rows if r["kind"] == "parent"],
        "chart": {"svg": folder + CHART_SVG if CHART_SVG in family.charts else None,
                  "png": folder + CHART_PNG if CHART_PNG in family.charts else None} if family.charts else None,
        "charts": family.charts,
    }


def _entry(model: CatalogModel, html: Any, summary: str) -> dict[str, Any]:
    meta = model.metadata
    described = _described_sources(meta)
    labels = [d["label"] for d in described.values() if d.get("label")]
    license_id = meta.get("license") if isinstance(meta.get("license"), str) else "unknown"
    license_name = meta.get("license_name") if isinstance(meta.get("license_name"), str) else None
    tags = list(dict.fromkeys(_strings(meta.get("tags"))))
    parents = list(dict.fromkeys(_strings(meta.get("base_model"))))
    method = merge_method(model)
    smoke = smoke_status(model)
    family = dict(model.family) if model.family else None
    search = " ".join([model.repo_id, summary, method, license_id, license_name or "", smoke, *labels, *tags, *parents,
                       *([family["name"], family["label"]] if family else [])])
    return {
        "repo_id": model.repo_id,
        "name": model.repo_id.rpartition("/")[2],
        "owner": model.repo_id.partition("/")[0],
        "page": model_page(model.repo_id),
        "url": model.url,
        "summary": summary,
        "method": method,
        "license_id": license_id,
        "license": license_name or license_id,
        "license_link": meta.get("license_link") if isinstance(meta.get("license_link"), str) else None,
        "tags": tags,
        "parent_ids": parents,
        "relation": meta.get("base_model_relation") if isinstance(meta.get("base_model_relation"), str) else None,
        "children": [],
        "labels": labels,
        "smoke": smoke,
        "family": family,
        "family_name": family["name"] if family else [],
        "version": model.version,
        "published_at": model.published_at,
        "card_html": html,
        "recipe": model.recipe,
        "signing_key": _signing_key(meta),
        "merge": _merge_context(model.provenance, described),
        "smoke_report": _smoke_context(model.smoke),
        "notes": [f"{name}: {OLDER_REPORT_NOTE}" for name in model.older_reports],
        # Filters read these; JSON so that any tag text round-trips (the template escapes it).
        "data": {
            "search": " ".join(search.lower().split()),
            "tags": json.dumps(tags, ensure_ascii=False),
            "parents": json.dumps(parents, ensure_ascii=False),
        },
    }


def _signing_key(meta: Mapping[str, Any]) -> str | None:
    """The fingerprint of the key that signed the model (`registry.signing_key`), when the card records one."""
    registry = meta.get("registry")
    found = registry.get("signing_key") if isinstance(registry, dict) else None
    return found if isinstance(found, str) else None


def _described_sources(meta: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The card's text facts about each source (`registry.sources`: label, hub_id), as strings."""
    registry = meta.get("registry")
    found = registry.get("sources") if isinstance(registry, dict) else None
    if not isinstance(found, dict):
        return {}
    return {
        str(alias): {k: v for k, v in facts.items() if k in ("label", "hub_id") and isinstance(v, str)}
        for alias, facts in found.items() if isinstance(facts, dict)
    }


def _merge_context(provenance: Provenance | None, described: Mapping[str, Mapping[str, str]]) -> dict[str, Any] | None:
    if provenance is None:
        return None
    rows = []
    for alias, pin in provenance.sources.items():
        facts = described.get(alias, {})
        rows.append({
            "alias": alias,
            "label": facts.get("label"),
            "kind": pin.kind,
            "model": pin.repo_id or facts.get("hub_id"),
            "pin": pin.pin or None,
            "weight": weight_text(pin.weight),
        })
    return {
        "method": provenance.merge_method,
        "normalize": provenance.normalize,
        "dtype": provenance.dtype,
        "config_donor": provenance.config_donor,
        "device": provenance.device,
        "sources": rows,
        "versions": provenance.versions,
    }


def _smoke_context(smoke: Smoke | None) -> dict[str, Any] | None:
    if smoke is None:
        return None
    return {
        "passed": smoke.passed,
        "device": smoke.device,
        "checks": [c.model_dump() for c in smoke.checks],
        "short": smoke.short.model_dump() if smoke.short is not None else None,
        "long": [r.model_dump() for r in smoke.long],
        "parity": [r.model_dump() for r in smoke.parity],
    }


# ---------------------------------------------------------------------------------------------
# Templates and building


def html_environment(dirs: Sequence[Path | str] = ()):
    """The HTML environment: autoescape on, StrictUndefined, `default:` naming the packaged templates."""
    from jinja2 import Environment, StrictUndefined

    env = Environment(loader=template_loader(dirs), autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    # The card's number filters, so a number reads the same on the card and on its catalog page.
    env.filters.update(NUMBER_FILTERS, markdown=render_markdown)
    return env


def build_site(models: Sequence[CatalogModel], output: Path, dirs: Sequence[Path | str] | None = None,
               families: Sequence[CatalogFamily] = ()) -> BuildResult:
    """Render the index, one page per model and one per family into `output`, replacing a previous catalog there whole."""
    from jinja2 import TemplateError

    start = time.perf_counter()
    if dirs is None:
        dirs = template_dirs(holding=TEMPLATE_FOLDER)
    _check_output(output)
    env = html_environment(dirs)
    context = catalog_context(models, families)
    staging = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    pages = ["index.html"]
    try:
        index = env.get_template(f"{TEMPLATE_FOLDER}/index.html.j2")
        model = env.get_template(f"{TEMPLATE_FOLDER}/model.html.j2")
        (staging / "models").mkdir(parents=True)
        _copy_static(dirs, staging / "static")
        (staging / "index.html").write_text(index.render(root="", **context), encoding="utf-8")
        for entry in context["models"]:
            path = staging / entry["page"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(model.render(root="../../", model=entry, **context), encoding="utf-8")
            pages.append(entry["page"])
        if context["families"]:
            page = env.get_template(f"{TEMPLATE_FOLDER}/family.html.j2")
            for entry in context["families"]:
                charts = staging / "families" / entry["name"]
                charts.mkdir(parents=True)
                for name, data in entry["charts"].items():
                    (charts / name).write_bytes(data)
                (staging / entry["page"]).write_text(page.render(root="../", family=entry, **context), encoding="utf-8")
                pages.append(entry["page"])
        (staging / MARKER).write_text("built by `registry catalog build`; rebuilt whole each time\n")
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except TemplateError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        where = f"{exc.filename}:{exc.lineno}: " if getattr(exc, "lineno", None) else ""  # type: ignore[attr-defined]
        raise CatalogError(f"catalog template error: {where}{_one_line(exc)}", "fix the template under templates/catalog/") from None
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CatalogError(f"cannot write the catalog to {output}: {exc.strerror or exc}", "check free space and permissions") from None
    return BuildResult(output, len(context["models"]), pages, time.perf_counter() - start, len(context["families"]))


def _check_output(output: Path) -> None:
    # The site is rebuilt whole, so only a folder we built (or an empty one) may be replaced.
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} is a file, not a folder", "choose another -o")
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
        raise UsageError(f"{output} is not empty and was not built by `registry catalog build`", "choose another -o or empty it")


def _copy_static(dirs: Iterable[Path | str], dest: Path) -> None:
    # Lowest priority first, so a team's file replaces the default one of the same name.
    for folder in [default_template_dir(), *reversed([Path(d) for d in dirs])]:
        static = folder / TEMPLATE_FOLDER / "static"
        if static.is_dir():
            shutil.copytree(static, dest, dirs_exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Serving


def make_server(directory: Path, port: int = 8000):
    """An HTTP server for the site on 127.0.0.1 (port 0 picks a free one); call serve_forever()."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    if not (directory / "index.html").is_file():
        raise UsageError(f"{directory}: no index.html here", "run `registry catalog build` first, or give --dir")

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet: the CLI prints the address
            pass

    handler = functools.partial(Handler, directory=str(directory))
    try:
        return ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise CatalogError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", "choose another --port") from None
