"""The family report: three points of the toy sweep merged and smoke-tested for real, shown as a table, Markdown, a chart and a card section."""

from __future__ import annotations

import io
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rich.console import Console

from registry import reports
from registry.card import render_card
from registry.family import (
    CHART_HINT,
    CHART_PNG,
    CHART_SVG,
    PointReports,
    build_family,
    chart_bytes,
    chart_lines,
    draw_chart,
    family_files,
    markdown_table,
    measure_parents,
    metric_value,
    print_table,
    select,
    show_family,
)
from registry.leaks import find_leaks
from registry.recipe import load_recipe, parse_recipe, parse_selection
from registry.reports import Eval, Family, FamilyRow, MetricScore, Retrieved, TaskScores

ROOT = Path(__file__).parent.parent
TOY = ROOT / "tests" / "fixtures" / "toy"

SWEEP = f"""\
repo_id: team/toy-cos{{cos}}-fmt{{fmt}}
summary: A family of toy merges
license: mit
sources:
  cos: {{model: {TOY / "ft_cos"}, label: Toy fine-tune A}}
  fmt: {{model: {TOY / "ft_fmt"}, label: Toy fine-tune B}}
merge:
  merge_method: linear
  models: [{{model: cos}}, {{model: fmt}}]
  parameters: {{normalize: true}}
  dtype: bfloat16
sweep:
  family: toy-cos-fmt
  grid: {{cos: [0, 0.5, 1], fmt: 1 - cos}}
smoke:
  short: {{max_new_tokens: 16}}
  long: {{lengths: [256, 512], depths: [0.5], max_new_tokens: 10}}
"""


@pytest.fixture(scope="module")
def toy_family(tmp_path_factory):
    """(sweep recipe, [PointReports], parent endpoints): cos 0, 0.5 and 1 merged with mergekit and smoke-tested on CPU."""
    from registry.merge import merge
    from registry.plugins import get_smoke_checks
    from registry.smoke import run_smoke
    from registry.sources import plan

    root = tmp_path_factory.mktemp("family")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REGISTRY_HOME", str(root / "home"))
        (root / "sweep.yaml").write_text(SWEEP)
        recipe = load_recipe(root / "sweep.yaml")
        items = []
        for point in recipe.points():
            out = root / f"point-{point.index}"
            result = merge(point.recipe, plan(point.recipe, out=out, device="cpu"), out, "cpu")
            run_smoke(result.out, point.recipe, device="cpu", checks=get_smoke_checks())
            items.append(PointReports(point, reports.read(reports.Provenance, out), reports.read(reports.Smoke, out)))
        endpoints = measure_parents(recipe, items, "cpu")
    return recipe, items, endpoints


@pytest.fixture(scope="module")
def family(toy_family) -> Family:
    recipe, items, endpoints = toy_family
    return build_family(recipe, items, endpoints=endpoints)


TABLE = """\
                                family toy-cos-fmt (select: passed)
┏━━━━━━━━━━━━━━━━━┳━━━━━━━━┳━━━━━━━┳━━━━━━━━━━━┳━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━━┓
┃ point           ┃ state  ┃   NLL ┃ retrieved ┃ KL cos ┃ KL fmt ┃ top1 cos ┃ top1 fmt ┃ selected ┃
┡━━━━━━━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━┩
│ cos=0 fmt=1     │ passed │ 0.324 │       2/2 │ 0.7099 │ 0.0000 │    0.823 │    1.000 │ yes      │
│ cos=0.5 fmt=0.5 │ passed │ 0.312 │       2/2 │ 0.2072 │ 0.2892 │    0.885 │    0.858 │ yes      │
│ cos=1 fmt=0     │ passed │ 0.296 │       2/2 │ 0.0000 │ 1.0470 │    1.000 │    0.823 │ yes      │
├─────────────────┼────────┼───────┼───────────┼────────┼────────┼──────────┼──────────┼──────────┤
│ parent cos      │ parent │ 0.296 │       2/2 │ 0.0000 │ 1.0470 │    1.000 │    0.823 │          │
│ parent fmt      │ parent │ 0.324 │       2/2 │ 0.7099 │ 0.0000 │    0.823 │    1.000 │          │
└─────────────────┴────────┴───────┴───────────┴────────┴────────┴──────────┴──────────┴──────────┘
"""

MARKDOWN = """\
| point | state | NLL | retrieved | KL cos | KL fmt | top1 cos | top1 fmt | selected |
|---|---|---:|---:|---:|---:|---:|---:|---|
| cos=0 fmt=1 | passed | 0.324 | 2/2 | 0.7099 | 0.0000 | 0.823 | 1.000 | yes |
| cos=0.5 fmt=0.5 | passed | 0.312 | 2/2 | 0.2072 | 0.2892 | 0.885 | 0.858 | yes |
| cos=1 fmt=0 | passed | 0.296 | 2/2 | 0.0000 | 1.0470 | 1.000 | 0.823 | yes |
| parent cos | parent | 0.296 | 2/2 | 0.0000 | 1.0470 | 1.000 | 0.823 |   |
| parent fmt | parent | 0.324 | 2/2 | 0.7099 | 0.0000 | 0.823 | 1.000 |   |
"""

CARD_SECTION = """\
## Family

This model is one point of the family `toy-cos-fmt`: 3 merges of the same parents at different weights, swept over the weight of `cos`, \
each run through the same tests. The parents are the family's endpoints.

| Model | `cos` | `fmt` | NLL | Retrieved | KL to nearest parent |
|---|---:|---:|---:|---:|---:|
| `team/toy-cos0-fmt1` | 0 | 1 | 0.324 | 2 of 2 | 0.0000 (`fmt`) |
| **this model** | 0.5 | 0.5 | 0.312 | 2 of 2 | 0.2072 (`cos`) |
| `team/toy-cos1-fmt0` | 1 | 0 | 0.296 | 2 of 2 | 0.0000 (`cos`) |
| parent `cos` | 1 | 0 | 0.296 | 2 of 2 | 0.0000 (`cos`) |
| parent `fmt` | 0 | 1 | 0.324 | 2 of 2 | 0.0000 (`fmt`) |

NLL: negative log-likelihood per token of a fixed text (lower is better). Retrieved: pass keys found in long inputs. \
KL: mean per-token KL divergence from the nearest parent's next-token distribution, in nats (0 for the parent itself).

![Each metric of the family against the weight of cos, the parents marked at the ends](family.svg)
"""


def table_text(family: Family, width: int = 200) -> str:
    out = io.StringIO()
    print_table(family, Console(file=out, width=width, highlight=False))
    return unpadded(out.getvalue())


def unpadded(text: str) -> str:
    """`text` without the spaces rich pads a centred title with."""
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def with_rows(family: Family, **changes: dict) -> Family:
    """`family` with some point rows changed: {label: {field: value}}."""
    rows = [r.model_copy(update=changes.get(r.label, {})) if r.kind == "point" else r for r in family.rows]
    return family.model_copy(update={"rows": rows})


def labels(rows: list[FamilyRow]) -> list[str]:
    return [r.label for r in rows]


# ---------------------------------------------------------------------------------------------
# family.json


def test_endpoints_reproduce_the_parents_exactly(family):
    points, parents = family.points, {r.label: r for r in family.parents}
    assert labels(points) == ["cos=0 fmt=1", "cos=0.5 fmt=0.5", "cos=1 fmt=0"]
    for point, parent in ((points[0], parents["fmt"]), (points[2], parents["cos"])):
        # Bit-identical weights give the same NLL, retrieval and distributions as the parent itself.
        assert point.nll == parent.nll
        assert point.retrieval == parent.retrieval == {256: Retrieved(retrieved=1, total=1), 512: Retrieved(retrieved=1, total=1)}
        assert point.kl == parent.kl and point.top1 == parent.top1
        assert point.kl[parent.label] == 0.0 and point.top1[parent.label] == 1.0
    assert parents["cos"].weights == {"cos": 1.0, "fmt": 0.0} and parents["fmt"].weights == {"cos": 0.0, "fmt": 1.0}
    middle = points[1]
    assert 0 < middle.kl["cos"] < parents["fmt"].kl["cos"] and 0 < middle.kl["fmt"] < parents["cos"].kl["fmt"]
    assert middle.nearest_parent == "cos"


def test_family_json_records_every_point_and_parent_and_reads_back(family, toy_family, tmp_path):
    recipe, items, _ = toy_family
    assert (family.family, family.recipe_sha256, family.aliases, family.axes, family.selection) == (
        "toy-cos-fmt", recipe.sha256, ["cos", "fmt"], ["cos"], "passed")
    assert [(r.kind, r.repo_id, r.merge_identity, r.state, r.smoke_passed, r.selected) for r in family.rows] == [
        ("point", "team/toy-cos0-fmt1", items[0].provenance.merge_identity, "tested", True, True),
        ("point", "team/toy-cos0.5-fmt0.5", items[1].provenance.merge_identity, "tested", True, True),
        ("point", "team/toy-cos1-fmt0", items[2].provenance.merge_identity, "tested", True, True),
        ("parent", None, None, "parent", None, False),
        ("parent", None, None, "parent", None, False),
    ]
    path = reports.write(family, tmp_path)
    assert path.name == "family.json"
    assert reports.read(Family, tmp_path) == family
    assert reports.dumps(reports.read(Family, tmp_path)) == path.read_text()


def test_states_follow_the_reports_at_hand(toy_family):
    recipe, items, _ = toy_family
    planned = PointReports(items[0].point, None, None)
    merged = PointReports(items[1].point, items[1].provenance, None)
    published = PointReports(items[2].point, items[2].provenance, items[2].smoke, published=("local:registry/toy-cos1-fmt0",))
    family = build_family(recipe, [planned, merged, published])
    nll = {row.model: row.nll for row in items[2].smoke.parity}
    assert nll["merged"] == nll["cos"]  # the endpoint is its parent
    assert [(r.state, r.smoke_passed, r.nll, r.published, r.selected) for r in family.points] == [
        ("planned", None, None, [], False),
        ("merged", None, None, [], True),  # no smoke report (smoke disabled): not failed
        ("published", True, nll["merged"], ["local:registry/toy-cos1-fmt0"], True),
    ]
    assert [line.split(" | ")[:3] for line in markdown_table(family).splitlines()[2:5]] == [
        ["| cos=0 fmt=1", "planned", "n/a"], ["| cos=0.5 fmt=0.5", "merged", "n/a"], ["| cos=1 fmt=0", "published", "0.296"]]
    # Without measured endpoints the smoke reports speak for the parents: NLL, retrieval, and exact against themselves.
    assert [(r.label, r.nll, r.retrieved, r.kl, r.top1) for r in family.parents] == [
        ("cos", nll["cos"], Retrieved(retrieved=2, total=2), {"cos": 0.0}, {"cos": 1.0}),
        ("fmt", nll["fmt"], Retrieved(retrieved=2, total=2), {"fmt": 0.0}, {"fmt": 1.0}),
    ]


def test_scores_come_from_the_eval_reports_of_points_and_parents(toy_family):
    recipe, items, endpoints = toy_family

    def scores(value: float) -> dict[str, TaskScores]:
        return {"passkey": TaskScores(version="1", samples=8, metrics={"acc": MetricScore(value=value, stderr=0.1)})}

    def evaluated(value: float) -> Eval:
        return Eval(evaluator="toy", evaluator_version="1", config_sha256="0" * 64, device="cpu", tasks=scores(value),
                    parents={"cos": scores(0.5), "fmt": scores(0.25)}, passed=True)

    with_eval = [PointReports(p.point, p.provenance, p.smoke, evaluated(v)) for p, v in zip(items, (0.25, 0.75, 0.5), strict=True)]
    family = build_family(recipe, with_eval, "best:score:passkey/acc", endpoints)
    assert [(r.label, r.scores) for r in family.rows] == [
        (label, {"passkey/acc": MetricScore(value=v, stderr=0.1)})
        for label, v in (("cos=0 fmt=1", 0.25), ("cos=0.5 fmt=0.5", 0.75), ("cos=1 fmt=0", 0.5), ("cos", 0.5), ("fmt", 0.25))
    ]
    assert [r.label for r in family.rows if r.selected] == ["cos=0.5 fmt=0.5"]
    assert markdown_table(family).splitlines()[:3] == [
        "| point | state | NLL | retrieved | KL cos | KL fmt | top1 cos | top1 fmt | passkey/acc | selected |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        "| cos=0 fmt=1 | passed | 0.324 | 2/2 | 0.7099 | 0.0000 | 0.823 | 1.000 | 0.250 | no |",
    ]
    # The score is a fifth panel of the chart, and a column of the card's family section.
    svg = ET.fromstring(chart_bytes(family)[CHART_SVG])
    assert [e.get("id") for e in svg.iter() if (e.get("id") or "").startswith("family-line-4")] == ["family-line-4-0-0"]
    middle = with_eval[1]
    card = render_card(middle.point.recipe, middle.provenance, middle.smoke, family=family)
    assert "| Model | `cos` | `fmt` | NLL | Retrieved | KL to nearest parent | passkey/acc |" in card
    assert "| **this model** | 0.5 | 0.5 | 0.312 | 2 of 2 | 0.2072 (`cos`) | 0.750 |" in card
    assert "| parent `fmt` | 0 | 1 | 0.324 | 2 of 2 | 0.0000 (`fmt`) | 0.250 |" in card


# ---------------------------------------------------------------------------------------------
# Selection


@pytest.mark.parametrize(("text", "chosen"), [
    ("passed", ["cos=0 fmt=1", "cos=0.5 fmt=0.5", "cos=1 fmt=0"]),
    ("best:nll", ["cos=1 fmt=0"]),
    ("best:nll:2", ["cos=1 fmt=0", "cos=0.5 fmt=0.5"]),
    # Both endpoints agree fully with their nearest parent: the tie keeps the sweep's order.
    ("best:top1:2", ["cos=0 fmt=1", "cos=1 fmt=0"]),
    ("best:kl", ["cos=0 fmt=1"]),
    ("best:retrieved:3", ["cos=0 fmt=1", "cos=0.5 fmt=0.5", "cos=1 fmt=0"]),
    ("best:nll:10", ["cos=1 fmt=0", "cos=0.5 fmt=0.5", "cos=0 fmt=1"]),
])
def test_selection_ranks_by_the_metric_direction(family, text, chosen):
    assert labels(select(family, parse_selection(text))) == chosen


def test_a_point_whose_smoke_failed_is_never_selected(family):
    failed = with_rows(family, **{"cos=1 fmt=0": {"smoke_passed": False}})
    assert labels(select(failed, parse_selection("passed"))) == ["cos=0 fmt=1", "cos=0.5 fmt=0.5"]
    assert labels(select(failed, parse_selection("best:nll"))) == ["cos=0.5 fmt=0.5"]
    assert labels(select(failed, parse_selection("best:top1:2"))) == ["cos=0 fmt=1", "cos=0.5 fmt=0.5"]
    assert markdown_table(failed).splitlines()[4].startswith("| cos=1 fmt=0 | failed | 0.296 |")


def test_a_point_without_the_metric_is_not_ranked(family):
    unmeasured = with_rows(family, **{"cos=1 fmt=0": {"nll": None}, "cos=0 fmt=1": {"nll": float("nan")}})
    assert labels(select(unmeasured, parse_selection("best:nll:3"))) == ["cos=0.5 fmt=0.5"]
    assert labels(select(family, parse_selection("best:score:passkey/acc"))) == []
    broken = with_rows(family, **{"cos=0 fmt=1": {"kl": {"cos": float("nan"), "fmt": float("nan")}}})
    assert labels(select(broken, parse_selection("best:kl"))) == ["cos=1 fmt=0"]
    assert broken.points[0].nearest_parent is None


def test_the_recipe_selection_or_its_override_marks_the_selected_rows(toy_family):
    recipe, items, endpoints = toy_family
    assert [r.selected for r in build_family(recipe, items, "best:nll:2", endpoints).rows] == [False, True, True, False, False]
    assert build_family(recipe, items, "best:nll:2", endpoints).selection == "best:nll:2"


def test_metric_values_are_against_the_nearest_parent(family):
    middle = family.points[1]
    assert metric_value(middle, "kl") == middle.kl["cos"]
    assert metric_value(middle, "top1") == middle.top1["cos"]
    assert metric_value(middle, "retrieved") == 1.0
    assert metric_value(middle, "score:passkey/acc") is None


# ---------------------------------------------------------------------------------------------
# Table and Markdown


def test_terminal_table(family):
    assert table_text(family) == TABLE
    # A narrow terminal (a CI log) gets the table at its natural width, no number cut short.
    assert table_text(family, width=60) == TABLE


def test_markdown_table(family):
    assert markdown_table(family) == MARKDOWN


def test_user_text_in_the_table_is_data(family):
    odd = with_rows(family, **{"cos=0 fmt=1": {"label": "[bold red]x|y[/] <b>"}})
    assert "│ [bold red]x|y[/] <b> │ passed │ 0.324 │" in table_text(odd)
    assert markdown_table(odd).splitlines()[2].startswith("| [bold red]x\\|y[/] &lt;b&gt; | passed | 0.324 |")


# ---------------------------------------------------------------------------------------------
# The chart


def test_chart_files_are_written_and_the_same_bytes_each_time(family, tmp_path):
    paths = draw_chart(family, tmp_path)
    assert paths == [tmp_path / CHART_SVG, tmp_path / CHART_PNG]
    svg, png = (p.read_bytes() for p in paths)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    root = ET.fromstring(svg)
    ids = sorted(e.get("id") for e in root.iter() if (e.get("id") or "").startswith("family-"))
    # Panels: NLL, retrieval, KL (a line per parent), top-1 (a line per parent); one line each (fmt follows cos).
    assert [i for i in ids if i.startswith("family-line-")] == [
        "family-line-0-0-0", "family-line-1-0-0", "family-line-2-0-0", "family-line-2-1-0", "family-line-3-0-0", "family-line-3-1-0"]
    # Each parent marked at its end of every line.
    assert len([i for i in ids if i.startswith("family-parent-")]) == 12
    assert b"/tmp" not in svg and str(tmp_path).encode() not in svg
    again = tmp_path / "again"
    again.mkdir()
    assert [p.read_bytes() for p in draw_chart(family, again)] == [svg, png]
    assert chart_bytes(family) == {CHART_SVG: svg, CHART_PNG: png}


def test_a_grid_of_independent_weights_draws_one_line_per_other_weight(family):
    def row(a: float, b: float) -> FamilyRow:
        return FamilyRow(kind="point", label=f"a={a} b={b}", weights={"a": a, "b": b}, state="tested", smoke_passed=True,
                         nll=1 + a - b)

    grid = Family(family="grid", recipe_sha256="0" * 64, aliases=["a", "b"], axes=["a", "b"], selection="passed",
                  rows=[row(a, b) for a in (0.0, 1.0, 0.5) for b in (0.2, 0.8)])
    assert [(name, labels(rows)) for name, rows in chart_lines(grid)] == [
        ("b=0.2", ["a=0.0 b=0.2", "a=0.5 b=0.2", "a=1.0 b=0.2"]),
        ("b=0.8", ["a=0.0 b=0.8", "a=0.5 b=0.8", "a=1.0 b=0.8"]),
    ]
    svg = ET.fromstring(chart_bytes(grid)[CHART_SVG])
    assert sorted(e.get("id") for e in svg.iter() if (e.get("id") or "").startswith("family-")) == [
        "family-line-0-0-0", "family-line-0-0-1"]


def test_the_bundle_carries_family_json_and_the_chart(family):
    files = family_files(family)
    assert sorted(files) == ["family.json", "family.png", "family.svg"]
    assert reports.parse(Family, files["family.json"], "family.json") == family


def test_without_matplotlib_the_table_is_shown_with_one_line_saying_how_to_get_the_chart(family, tmp_path):
    (tmp_path / "family.json").write_text(reports.dumps(family))
    script = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from pathlib import Path\n"
        "from registry import reports\n"
        "from registry.family import chart_available, family_files, show_family\n"
        "from registry.output import console\n"
        f"family = reports.read(reports.Family, {str(tmp_path)!r})\n"
        f"assert show_family(family, console(), {str(tmp_path)!r}) is None\n"
        "print(chart_available(), sorted(family_files(family)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-2:] == [CHART_HINT, "False ['family.json']"]
    assert CHART_HINT == "The chart needs matplotlib: pip install 'registry[chart]'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["family.json"]


def test_show_family_names_the_chart_files(family, tmp_path):
    out = io.StringIO()
    paths = show_family(family, Console(file=out, width=200, highlight=False), tmp_path)
    assert unpadded(out.getvalue()) == TABLE + f"chart: {tmp_path / CHART_SVG}, {tmp_path / CHART_PNG}\n"
    assert paths == [tmp_path / CHART_SVG, tmp_path / CHART_PNG]


# ---------------------------------------------------------------------------------------------
# The card


def test_each_point_card_has_the_family_section_and_leaks_nothing(family, toy_family):
    _, items, _ = toy_family
    middle = items[1]
    card = render_card(middle.point.recipe, middle.provenance, middle.smoke, family=family)
    section = card[card.index("## Family"): card.index("## Usage")]
    assert section == CARD_SECTION + "\n"
    assert find_leaks(card) == []
    assert str(TOY) not in card
    first = render_card(items[0].point.recipe, items[0].provenance, items[0].smoke, family=family)
    assert "| **this model** | 0 | 1 | 0.324 | 2 of 2 | 0.0000 (`fmt`) |" in first
    assert "## Family" not in render_card(middle.point.recipe, middle.provenance, middle.smoke)


def test_parents_are_named_by_alias_or_key_never_by_path():
    recipe = parse_recipe(
        "repo_id: team/m-cos{cos}\n"
        "sources:\n  cos: {model: org/cos}\n"
        "merge:\n  merge_method: linear\n  models:\n    - model: cos\n"
        "    - {model: /data/private/fmt, parameters: {weight: 0.5}}\n  parameters: {normalize: true}\n"
        "sweep:\n  family: f\n  grid: {cos: [0.25, 0.5]}\n", "s.yaml")
    family = build_family(recipe, [PointReports(p, None, None) for p in recipe.points()])
    assert [(r.kind, r.label, r.repo_id, r.weights, r.state, r.selected) for r in family.rows] == [
        ("point", "cos=0.25", "team/m-cos0.25", {"cos": 0.25}, "planned", False),
        ("point", "cos=0.5", "team/m-cos0.5", {"cos": 0.5}, "planned", False),
        ("parent", "cos", "org/cos", {"cos": 1.0}, "parent", False),  # a Hub parent keeps its repo id
        ("parent", "model_2", None, {"cos": 0.0}, "parent", False),
    ]
    assert "/data/private" not in reports.dumps(family)
