"""The family report: a sweep's points and its parents side by side, as a table, Markdown and a chart.

`build_family` gathers each point's reports (provenance, smoke, eval) into one typed `family.json`
(reports.Family), with the parents' own rows from `measure_parents`; `select` picks the points to
publish; `print_table`, `markdown_table` and `draw_chart` show it (`show_family` does all three), and
`family_files` is what each point's repo carries. The chart needs matplotlib (the `chart` extra):
without it `draw_chart` returns None and the caller prints CHART_HINT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .markdown import cell
from .output import esc
from .recipe import Point, Recipe, Selection, format_weight, parse_ref, parse_selection
from .reports import Eval, Family, FamilyRow, MetricScore, Provenance, Retrieved, Smoke, TaskScores, dumps

if TYPE_CHECKING:
    from rich.console import Console

    from .smoke import ParentEndpoint

# The chart's files, beside family.json in each point's repo; the card refers to the SVG by this relative path.
CHART_SVG = "family.svg"
CHART_PNG = "family.png"
# What the terminal shows instead of the chart when matplotlib is missing.
CHART_HINT = "The chart needs matplotlib: pip install 'registry[chart]'"


@dataclass(frozen=True)
class PointReports:
    """One point of a family with the reports its stages left (None: that stage has not run)."""

    point: Point
    provenance: Provenance | None
    smoke: Smoke | None
    eval: Eval | None = None
    published: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Building and selecting


def build_family(
    recipe: Recipe,
    points: Sequence[PointReports],
    selection: str | None = None,
    endpoints: Sequence[ParentEndpoint] | None = None,
) -> Family:
    """The family report of `recipe` (a sweep, or a plain recipe as a family of one) from its points' reports.

    `selection` overrides the recipe's `select:`; `endpoints` (measure_parents) give the parents' own
    rows their retrieval per length and KL against each other, else the points' smoke reports speak for them.
    """
    aliases = list(points[0].point.weights) if points else []
    keys = _keys(recipe)
    measured = {e.name: e for e in endpoints or ()}
    rows = [_point_row(p, keys) for p in points]
    rows += [_parent_row(recipe, name, aliases, points, measured.get(name), keys) for name in keys]
    text = selection or (recipe.sweep.select if recipe.sweep else "passed")
    family = Family(
        family=recipe.family or recipe.repo_id.rpartition("/")[2],
        recipe_sha256=recipe.sha256,
        aliases=aliases,
        axes=_axes(aliases, [p.point.weights for p in points]),
        selection=text,
        rows=rows,
    )
    chosen = {id(r) for r in select(family, parse_selection(text))}
    return family.model_copy(update={"rows": [r.model_copy(update={"selected": id(r) in chosen}) for r in family.rows]})


def _keys(recipe: Recipe) -> dict[str, str]:
    # Reports name a parent by its alias; one written as a path in the merge block is shown by its key (model_N), never the path.
    return {item.name: item.key for item in recipe.inputs()}


def _point_row(item: PointReports, keys: dict[str, str]) -> FamilyRow:
    smoke = item.smoke
    merged = next((r for r in smoke.parity if r.model == "merged"), None) if smoke else None
    retrieval: dict[int, Retrieved] = {}
    for entry in smoke.long if smoke else []:
        if entry.status == "skipped":
            continue
        seen = retrieval.get(entry.tokens, Retrieved(retrieved=0, total=0))
        retrieval[entry.tokens] = Retrieved(retrieved=seen.retrieved + (entry.status == "retrieved"), total=seen.total + 1)
    parents = [r for r in smoke.parity if r.model != "merged"] if smoke else []
    if item.published:
        state = "published"
    elif smoke is not None:
        state = "tested"
    elif item.provenance is not None:
        state = "merged"
    else:
        state = "planned"
    return FamilyRow(
        kind="point",
        label=item.point.label or item.point.recipe.repo_id,
        weights=dict(item.point.weights),
        repo_id=item.point.recipe.repo_id,
        merge_identity=item.provenance.merge_identity if item.provenance else None,
        state=state,
        smoke_passed=smoke.passed if smoke else None,
        nll=merged.nll if merged else None,
        retrieved=_total(retrieval),
        retrieval=dict(sorted(retrieval.items())),
        kl={keys.get(r.model, r.model): r.kl for r in parents},
        top1={keys.get(r.model, r.model): r.top1_agreement for r in parents},
        scores=_scores(item.eval.tasks) if item.eval is not None else {},
        published=list(item.published),
    )


def _parent_row(recipe: Recipe, alias: str, aliases: list[str], points: Sequence[PointReports], endpoint: ParentEndpoint | None,
                keys: dict[str, str]) -> FamilyRow:
    source = recipe.sources.get(alias)
    ref = parse_ref(source.model if source else alias)
    key = keys[alias]
    scores = next((p.eval.parents[n] for p in points if p.eval is not None for n in (key, alias) if n in p.eval.parents), None)
    row = FamilyRow(
        kind="parent",
        label=key,
        weights={a: 1.0 if a == alias else 0.0 for a in aliases},
        repo_id=ref.value if ref.kind == "hub" else None,
        state="parent",
        scores=_scores(scores) if scores else {},
    )
    if endpoint is not None and endpoint.missing is None:
        retrieval = {tokens: Retrieved(retrieved=got, total=ran) for tokens, (got, ran) in sorted(endpoint.retrieval.items())}
        return row.model_copy(update={
            "nll": endpoint.nll, "retrieval": retrieval, "retrieved": _total(retrieval),
            "kl": {keys.get(n, n): v for n, v in endpoint.kl.items()},
            "top1": {keys.get(n, n): v for n, v in endpoint.top1_agreement.items()},
        })
    # Every point runs its parents on the same text and prompts: the first report that has the parent speaks for all.
    parity = next((r for p in points if p.smoke for r in p.smoke.parity if r.model == alias), None)
    if parity is None:
        return row
    return row.model_copy(update={
        "nll": parity.nll,
        "retrieved": Retrieved(retrieved=parity.long_retrieved, total=parity.long_total) if parity.long_total else None,
        # Against itself a parent is exact by definition; against the others only measure_parents knows.
        "kl": {key: 0.0}, "top1": {key: 1.0},
    })


def _total(retrieval: dict[int, Retrieved]) -> Retrieved | None:
    if not retrieval:
        return None
    return Retrieved(retrieved=sum(r.retrieved for r in retrieval.values()), total=sum(r.total for r in retrieval.values()))


def measure_parents(recipe: Recipe, points: Sequence[PointReports], device: str = "auto") -> list[ParentEndpoint]:
    """The parents as the family's endpoints (smoke.parent_endpoints): mostly read from the parents' cache the points' smoke runs left."""
    from .smoke import parent_endpoints

    first = points[0] if points else None
    return parent_endpoints(first.point.recipe if first else recipe, device=device, provenance=first.provenance if first else None)


def _scores(tasks: dict[str, TaskScores]) -> dict[str, MetricScore]:
    return {f"{task}/{metric}": score for task, t in sorted(tasks.items()) for metric, score in sorted(t.metrics.items())}


def _axes(aliases: list[str], weights: list[dict[str, float]]) -> list[str]:
    # The first alias is the x axis; another is an axis of its own when it varies at a fixed x (a grid
    # of both), not when it follows from x (`fmt: 1 - cos`).
    if not aliases:
        return []
    axes = aliases[:1]
    for alias in aliases[1:]:
        seen: dict[float, float] = {}
        if any(seen.setdefault(w[aliases[0]], w[alias]) != w[alias] for w in weights):
            axes.append(alias)
    return axes


def metric_value(row: FamilyRow, metric: str) -> float | None:
    """The value `select` ranks `row` by (KL and top-1: against the nearest parent); None when not measured."""
    if metric == "nll":
        value = row.nll
    elif metric == "retrieved":
        value = row.retrieved.retrieved / row.retrieved.total if row.retrieved and row.retrieved.total else None
    elif metric == "kl":
        value = min((v for v in row.kl.values() if v is not None and math.isfinite(v)), default=None)
    elif metric == "top1":
        nearest = row.nearest_parent
        value = row.top1.get(nearest) if nearest else max((v for v in row.top1.values() if v is not None and math.isfinite(v)), default=None)
    elif metric.startswith("score:"):
        score = row.scores.get(metric.removeprefix("score:"))
        value = score.value if score else None
    else:
        raise ValueError(f"unknown metric {metric!r}")
    return value if value is not None and math.isfinite(value) else None


def select(family: Family, selection: Selection) -> list[FamilyRow]:
    """The points to publish: every merged point whose smoke test did not fail, or the `top` best of them by the metric.

    A point without a smoke report (smoke disabled) counts as not failed; a point without the metric is not ranked.
    Ties keep the sweep's order.
    """
    eligible = [r for r in family.points if r.state != "planned" and r.smoke_passed is not False]
    if selection.metric is None:
        return eligible
    sign = -1.0 if selection.higher_is_better else 1.0
    ranked = [(sign * v, i, r) for i, r in enumerate(eligible) if (v := metric_value(r, selection.metric)) is not None]
    return [r for _, _, r in sorted(ranked, key=lambda t: (t[0], t[1]))[: selection.top]]


# ---------------------------------------------------------------------------------------------
# Table and Markdown


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


@dataclass(frozen=True)
class _Column:
    header: str
    text: Any  # row → the cell's text
    number: bool = True  # right-aligned


def _columns(family: Family) -> list[_Column]:
    """The columns the family has data for."""
    parents = [r.label for r in family.parents]
    rows = family.rows
    # The label carries the weights (`cos=0.3 fmt=0.7`); a tested point's state is its smoke verdict.
    columns = [
        _Column("point", lambda r: r.label if r.kind == "point" else f"parent {r.label}", number=False),
        _Column("state", _state_text, number=False),
        _Column("NLL", lambda r: _number(r.nll)),
        _Column("retrieved", lambda r: f"{r.retrieved.retrieved}/{r.retrieved.total}" if r.retrieved else "n/a"),
    ]
    if any(r.kl for r in rows):
        columns += [_Column(f"KL {p}", lambda r, p=p: _number(r.kl.get(p), 4)) for p in parents]
    if any(r.top1 for r in rows):
        columns += [_Column(f"top1 {p}", lambda r, p=p: _number(r.top1.get(p))) for p in parents]
    names = sorted({name for r in rows for name in r.scores})
    columns += [_Column(name, lambda r, n=name: _number(r.scores[n].value) if n in r.scores else "n/a") for name in names]
    columns += [_Column("selected", lambda r: "" if r.kind == "parent" else "yes" if r.selected else "no", number=False)]
    return columns


def _state_text(row: FamilyRow) -> str:
    if row.state == "tested":
        return {True: "passed", False: "failed", None: "tested"}[row.smoke_passed]
    if row.state == "published" and row.smoke_passed is False:
        return "published, failed"
    return row.state


def table_rows(family: Family) -> tuple[list[str], list[list[str]]]:
    """The table's headers and its rows as plain text (points, then the parents), shared by every form."""
    columns = _columns(family)
    return [c.header for c in columns], [[str(c.text(r)) for c in columns] for r in family.points + family.parents]


def print_table(family: Family, console: Console) -> None:
    """Show the family as a rich table (user text escaped: recipe text is data)."""
    from rich.measure import Measurement
    from rich.segment import Segments
    from rich.table import Table

    _, rows = table_rows(family)
    table = Table(title=f"family {esc(family.family)} (select: {esc(family.selection)})")
    for column in _columns(family):
        table.add_column(esc(column.header), justify="right" if column.number else "left", no_wrap=True)
    points = len(family.points)
    for i, row in enumerate(rows):
        if i == points and i:
            table.add_section()
        table.add_row(*[esc(c) for c in row])
    # At its natural width: a narrow terminal (a CI log is 80 columns) wraps the lines rather than rich cutting numbers short.
    width = max(console.width, Measurement.get(console, console.options.update_width(10_000), table).maximum)
    console.print(Segments(console.render(table, console.options.update_width(width))), soft_wrap=True)


def markdown_table(family: Family) -> str:
    """The family as a Markdown table (points, then the parents), every cell escaped."""
    headers, rows = table_rows(family)
    rule = "|".join("---:" if c.number else "---" for c in _columns(family))
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", f"|{rule}|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The chart


def chart_available() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def chart_panels(family: Family) -> list[tuple[str, list[tuple[str, Any]]]]:
    """The chart's panels with data: (title, [(series name, row → value or None)])."""
    parents = [r.label for r in family.parents]
    panels: list[tuple[str, list[tuple[str, Any]]]] = [
        ("NLL on the fixed text (nats per token, lower is better)", [("NLL", lambda r: metric_value(r, "nll"))]),
        ("Pass keys retrieved (share)", [("retrieved", lambda r: metric_value(r, "retrieved"))]),
        ("KL divergence to each parent (nats per token)", [(f"to {p}", lambda r, p=p: r.kl.get(p)) for p in parents]),
        ("Top-1 agreement with each parent", [(f"with {p}", lambda r, p=p: r.top1.get(p)) for p in parents]),
    ]
    names = sorted({name for r in family.rows for name in r.scores})
    panels += [(f"Score {name}", [(name, lambda r, n=name: metric_value(r, f"score:{n}"))]) for name in names]
    return [(title, series) for title, series in panels if any(_finite(f(r)) for _, f in series for r in family.rows)]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def chart_lines(family: Family) -> list[tuple[str, list[FamilyRow]]]:
    """The chart's lines: one per combination of the other independent aliases' weights, its points in x order."""
    x_alias, others = (family.axes[0], family.axes[1:]) if family.axes else (None, [])
    groups: dict[tuple[float, ...], list[FamilyRow]] = {}
    for row in family.points:
        groups.setdefault(tuple(row.weights.get(a, 0.0) for a in others), []).append(row)
    return [
        (" ".join(f"{a}={format_weight(w)}" for a, w in zip(others, key, strict=True)),
         sorted(rows, key=lambda r: r.weights.get(x_alias, 0.0) if x_alias else 0.0))
        for key, rows in sorted(groups.items())
    ]


def _plain(text: str) -> str:
    # A '$' pair would start matplotlib's math text: user text is shown as written.
    return text.replace("$", r"\$")


def chart_bytes(family: Family) -> dict[str, bytes] | None:
    """The chart as {CHART_SVG: bytes, CHART_PNG: bytes}, the same bytes for the same family; None without matplotlib."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        return None
    import io

    panels, lines = chart_panels(family), chart_lines(family)
    x_alias = family.axes[0] if family.axes else None

    def x_of(row: FamilyRow) -> float:
        return row.weights.get(x_alias, 0.0) if x_alias else 0.0

    files: dict[str, bytes] = {}
    # Fixed ids and no date: the same family gives the same bytes. The figure is drawn without pyplot
    # (its own Agg canvas), so no global backend or state is touched.
    with matplotlib.rc_context({"svg.hashsalt": "registry-family", "svg.fonttype": "path", "font.family": "DejaVu Sans"}):
        columns = 2 if len(panels) > 1 else 1
        rows = max(1, math.ceil(len(panels) / columns))
        fig = Figure(figsize=(5.5 * columns, 3.4 * rows), layout="constrained")
        fig.suptitle(_plain(f"Family {family.family}: each metric against the weight of {x_alias or 'the point'}"))
        for n, (title, series) in enumerate(panels):
            ax = fig.add_subplot(rows, columns, n + 1)
            ax.set_title(_plain(title), fontsize=10)
            ax.set_xlabel(_plain(f"weight of {x_alias}" if x_alias else "point"))
            ax.grid(True, alpha=0.3)
            for s, (name, value) in enumerate(series):
                color = f"C{s}"
                for g, (group, members) in enumerate(lines):
                    xs = [x_of(r) for r in members]
                    ys = [v if _finite(v := value(r)) else float("nan") for r in members]
                    label = " ".join(t for t in (name if len(series) > 1 else "", group) if t) or name
                    (line,) = ax.plot(xs, ys, marker="o", color=color, linestyle=("-", "--", ":", "-.")[g % 4], label=_plain(label))
                    line.set_gid(f"family-line-{n}-{s}-{g}")
                for p, parent in enumerate(family.parents):
                    v = value(parent)
                    if not _finite(v):
                        continue
                    (mark,) = ax.plot([x_of(parent)], [v], marker="*", markersize=13, color=color, linestyle="none",
                                      markeredgecolor="black", markeredgewidth=0.6)
                    mark.set_gid(f"family-parent-{n}-{s}-{p}")
                    ax.annotate(_plain(parent.label), (x_of(parent), v), textcoords="offset points", xytext=(6, 4), fontsize=8)
            if title.startswith(("Pass keys", "Top-1")):
                ax.set_ylim(-0.05, 1.05)
            if len(series) > 1 or len(lines) > 1:
                ax.legend(fontsize=7)
        for fmt, name, metadata in (("svg", CHART_SVG, {"Date": None}), ("png", CHART_PNG, {"Software": None})):
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, metadata=metadata, dpi=100)
            files[name] = buffer.getvalue()
    return files


def draw_chart(family: Family, folder: str | Path) -> list[Path] | None:
    """Write the chart into `folder` as family.svg and family.png; None (nothing written) without matplotlib."""
    from .files import replace_atomically

    files = chart_bytes(family)
    if files is None:
        return None
    paths = []
    for name, blob in files.items():
        path = Path(folder) / name
        replace_atomically(path, blob)
        paths.append(path)
    return paths


def show_family(family: Family, console: Console, folder: str | Path | None = None) -> list[Path] | None:
    """Print the family's table, then draw its chart into `folder` and name the files, or say how to get the chart."""
    print_table(family, console)
    if folder is None:
        return None
    paths = draw_chart(family, folder)
    if paths is None:
        console.print(CHART_HINT, markup=False)
    else:
        console.print("chart: " + ", ".join(esc(p) for p in paths))
    return paths


def family_files(family: Family) -> dict[str, bytes]:
    """The files each point's bundle carries for its family: family.json, and the chart when matplotlib is at hand."""
    return {family.FILE: dumps(family).encode("utf-8"), **(chart_bytes(family) or {})}


__all__ = [
    "CHART_HINT", "CHART_PNG", "CHART_SVG", "PointReports", "build_family", "chart_available", "chart_bytes", "chart_lines",
    "chart_panels", "draw_chart", "family_files", "markdown_table", "measure_parents", "metric_value", "print_table", "select",
    "show_family", "table_rows",
]
