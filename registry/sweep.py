"""Families: every point of a sweep recipe merged, smoke-tested, compared and published in one process.

A sweep's points are ordinary recipes (`Recipe.points()`), each with its own identities, build folder
and repo. The sources are pinned and hashed once (`Plan.for_recipe` gives each point the family's
pins with its own weights); each point then goes through the same stages as a plain recipe
(`pipeline.prepare`/`build`/`finish`), a merge or smoke report already in its build folder being
reused, so an interrupted sweep resumes where it stopped. Once every point has its reports, the
family report (`family.json`, `family.build_family`) decides which points are published, and each
card gets the family section and chart. Nothing here imports torch: `show` and `report` only read
the build folders.

The family's own folder is `<build root>/families/<family>/`: `family.json` (every point, published
or not, with its state and where it went) and the chart. A point that is not published stays in its
build folder, `<build root>/<merge identity, 12 hex>/`, with its reports (the outcome's `model_dir`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from .family import PointReports
    from .pipeline import Job, Prepared, PublishOutcome
    from .recipe import Point, Recipe
    from .reports import Family
    from .sources import Plan

# What `sweep show` says of a point, from the reports at hand.
STATES = ("not built", "merged", "smoke passed", "smoke failed", "published")


@dataclass
class PointOutcome:
    """One point of a family run: where it stands and what publishing did with it."""

    index: int
    label: str
    weights: dict[str, float]
    repo_id: str
    state: str  # one of STATES
    selected: bool = False
    outcome: PublishOutcome | None = None  # merge, smoke, eval, card and results, as for a plain recipe
    model_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        done = self.outcome.to_dict() if self.outcome is not None else {}
        return {"index": self.index, "label": self.label, "weights": self.weights, "repo_id": self.repo_id,
                "state": self.state, "selected": self.selected, "model_dir": self.model_dir,
                **{k: done.get(k) for k in ("merge", "smoke", "eval", "card", "unchanged")},
                "results": done.get("results", []), "plans": done.get("plans", [])}


@dataclass
class FamilyOutcome:
    """What `registry publish SWEEP.yaml` (or `sweep build`) did: one entry per point, the family report and chart."""

    recipe: str
    family: str
    selection: str
    points: list[PointOutcome]
    report: str | None = None  # the local family.json
    chart: list[str] | None = None  # its chart files; None without matplotlib
    targets: list[str] = field(default_factory=list)
    collections: list[Any] = field(default_factory=list)  # what each target's family hook returned
    dry_run: bool = False
    built_only: bool = False

    @property
    def published(self) -> list[PointOutcome]:
        """The points sent to (or already current on) the targets."""
        return [p for p in self.points if p.outcome is not None and (p.outcome.results or p.outcome.plans)]

    @property
    def exit_code(self) -> int:
        """0 when every selected point was published (built, for `sweep build`, and passed); 1 when none could be."""
        if self.built_only:
            return 1 if any(p.state == "smoke failed" for p in self.points) else 0
        return 0 if any(p.selected for p in self.points) else 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, one entry per point."""
        return {
            "recipe": self.recipe, "family": self.family, "selection": self.selection, "targets": self.targets,
            "dry_run": self.dry_run, "report": self.report, "chart": self.chart,
            "collections": [c.to_dict() if hasattr(c, "to_dict") else c for c in self.collections],
            "points": [p.to_dict() for p in self.points],
        }


def family_folder(recipe: Recipe) -> Path:
    """`<build root>/families/<family>`: the family's own report and chart."""
    from . import build_root

    return build_root() / "families" / (recipe.family or "family")


def pick(recipe: Recipe, indices: Sequence[int] | None) -> list[Point]:
    """The points numbered `indices` (all when None); a UsageError names the valid range."""
    points = recipe.points()
    if not indices:
        return points
    bad = [i for i in indices if not 0 <= i < len(points)]
    if bad:
        raise UsageError(f"--point {bad[0]}: {recipe.path} has points 0 to {len(points) - 1}; `registry sweep show` lists them")
    return [points[i] for i in dict.fromkeys(indices)]


def plain(recipe: Recipe, command: str, point: int | None = None) -> Recipe:
    """The one merge a single-merge command works on: the recipe, or the sweep's point `point`; UsageError otherwise."""
    if recipe.sweep is None:
        if point is not None:
            raise UsageError(f"--point is for a sweep recipe; {recipe.path} has no sweep: section")
        return recipe
    if point is None:
        count = len(recipe.points())
        raise UsageError(
            f"{recipe.path} is a sweep (family {recipe.sweep.family}, {count} points): `registry {command}` works on one merge",
            f"use `registry sweep build {recipe.path}` for every point, or `registry {command} --point K` for one; "
            "`registry sweep show` lists them",
        )
    return pick(recipe, [point])[0].recipe


class _Progress:
    """`point k/N cos=0.3 fmt=0.7: merging (elapsed 1:02, about 3:10 left)`, through the caller's note."""

    def __init__(self, total: int, note: Callable[[str], None]):
        self.total, self.note = total, note
        self.started = time.monotonic()
        self.point_started = self.started
        self.took: list[float] = []  # seconds of each point that did work here (a reused point costs nothing)
        self.done = 0

    def begin(self, point: Point) -> None:
        self.point, self.point_started = point, time.monotonic()

    def stage(self, name: str) -> None:
        now = time.monotonic()
        left = ""
        if self.took:
            remaining = sum(self.took) / len(self.took) * (self.total - self.done) - (now - self.point_started)
            left = f", about {_clock(max(remaining, 0.0))} left"
        self.note(f"point {self.point.index + 1}/{self.total} {self.point.label}: {name} "
                  f"(elapsed {_clock(now - self.started)}{left})")

    def inner(self, message: str) -> None:
        self.note(f"point {self.point.index + 1}/{self.total}: {message}")

    def end(self, worked: bool) -> None:
        self.done += 1
        if worked:
            self.took.append(time.monotonic() - self.point_started)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _family_plan(recipe: Recipe, points: list[Point], update: bool, device: str, dry_run: bool,
                 note: Callable[[str], None]) -> Plan:
    """One plan for the whole family: sources pinned and hashed once, the lock written once."""
    from .pipeline import make_plan_for

    return make_plan_for(points[0].recipe, update, device, dry_run, note)


def _run_points(job: Job, recipe: Recipe, points: list[Point], plan: Plan) -> list[Prepared]:
    """Each point prepared (targets asked, reports found) and, where its reports are not at hand, built."""
    from .pipeline import build, prepare

    progress = _Progress(len(recipe.points()), job.note)
    prepared = []
    for point in points:
        progress.begin(point)
        mine = replace(job, note=progress.inner)
        progress.stage("planning")
        prep = prepare(mine, point.recipe, plan.for_recipe(point.recipe), source=str(recipe.path))
        worked = False
        if prep.reports is None:
            build(mine, prep, strict=False, stage=progress.stage)
            worked = prep.outcome.merge == "merged" or not (prep.outcome.smoke or {}).get("reused", False)
        else:
            # Reports at hand: the build folder's, or a target's (nothing built here; `finish` builds only if a target needs the weights).
            r = prep.reports
            prep.outcome.merge = "reused" if r.folder is not None else "skipped"
            prep.outcome.model_dir = str(r.folder) if r.folder is not None else None
            prep.outcome.smoke = {"passed": r.smoke.passed, "reused": True, "failed": [c.name for c in r.smoke.failed()]}
            progress.inner(f"reused the merge and its reports in {r.folder}" if r.folder is not None
                           else "reports read from a target; not merged here")
        progress.end(worked)
        prepared.append(prep)
    return prepared


def _point_reports(point: Point, prep: Prepared, published: tuple[str, ...] = ()) -> PointReports:
    from .family import PointReports

    r = prep.reports
    if r is None:
        return PointReports(point, None, None)
    return PointReports(point, r.provenance, r.smoke, r.evaluation, published)


def _state(prep: Prepared | None, published: bool = False) -> str:
    if published:
        return "published"
    if prep is None or prep.reports is None:
        return "not built"
    return "smoke passed" if prep.reports.smoke.passed else "smoke failed"


def _write_family(recipe: Recipe, family: Family) -> tuple[Path, list[Path] | None]:
    """family.json and the chart in the family's folder (what stays local, published or not)."""
    from .family import draw_chart
    from .reports import write as write_report

    folder = family_folder(recipe)
    folder.mkdir(parents=True, exist_ok=True)
    write_report(family, folder)
    return folder / family.FILE, draw_chart(family, folder)


def publish_family(
    recipe: Recipe,
    *,
    select: str | None = None,
    update: bool = False,
    targets: list[str] | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool | None = None,
    dry_run: bool = False,
    force: bool = False,
    device: str = "auto",
    console: Console | None = None,
    note: Callable[[str], None] = lambda message: None,
) -> FamilyOutcome:
    """Merge, smoke-test and compare every point of a sweep, then publish the selected ones, each to its own repo.

    A point whose smoke test (or eval gate) failed is never published; the family fails (exit_code 1)
    only when no point is selected.
    """
    from .family import build_family, family_files
    from .pipeline import finish, start
    from .recipe import parse_selection

    assert recipe.sweep is not None
    selection = select or recipe.sweep.select
    try:
        parse_selection(selection)
    except ValueError as exc:
        raise UsageError(f"--select: {exc}") from None
    points = recipe.points()
    job = start(recipe, [p.recipe for p in points], targets=targets, private=private, revision=revision,
                create_pr=create_pr, dry_run=dry_run, force=force, device=device, console=console, note=note)
    plan = _family_plan(recipe, points, update, device, dry_run, note)
    prepared = _run_points(job, recipe, points, plan)

    family = build_family(recipe, [_point_reports(p, prep) for p, prep in zip(points, prepared, strict=True)], selection)
    chosen = {row.repo_id for row in family.points if row.selected}
    assets = family_files(family)
    outcome = FamilyOutcome(str(recipe.path), family.family, selection, [], targets=[c.name for c in job.chosen], dry_run=dry_run)
    published: dict[str, tuple[str, ...]] = {}
    for point, prep in zip(points, prepared, strict=True):
        r = prep.reports
        gate_failed = r is not None and r.evaluation is not None and not r.evaluation.passed and not force
        selected = point.recipe.repo_id in chosen and not gate_failed
        entry = PointOutcome(point.index, point.label, dict(point.weights), point.recipe.repo_id, _state(prep),
                             selected, prep.outcome, prep.outcome.model_dir)
        outcome.points.append(entry)
        if not selected:
            why = "its smoke test failed" if entry.state == "smoke failed" else "eval gate failed" if gate_failed else "not selected"
            kept = f"; its reports stay in {prep.outcome.model_dir}" if prep.outcome.model_dir else ""
            note(f"point {point.index + 1}/{len(points)} {point.label}: not published ({why}){kept}")
            continue
        note(f"point {point.index + 1}/{len(points)} {point.label}: publishing {point.recipe.repo_id}")
        done = finish(replace(job, note=lambda m, i=point.index: note(f"point {i + 1}/{len(points)}: {m}")),
                      prep, family=family, assets=assets)
        entry.model_dir = done.model_dir or entry.model_dir
        if not dry_run:
            entry.state = "published"
            # Where it went, as `target:repo id` (a target that found it current names no new location).
            published[point.recipe.repo_id] = tuple(f"{r.target}:{point.recipe.repo_id}" for r in done.results)

    # The family as it stands now, published points included, stays in the build root.
    if not dry_run:
        final = build_family(recipe, [_point_reports(p, prep, published.get(p.recipe.repo_id, ()))
                                      for p, prep in zip(points, prepared, strict=True)], selection)
        report, chart = _write_family(recipe, final)
        outcome.report, outcome.chart = str(report), [str(c) for c in chart] if chart is not None else None
        if outcome.published:
            for c in job.chosen:
                hook = getattr(c.target, "publish_family", None)
                if hook is not None:
                    results = [r for p in outcome.published for r in p.outcome.results if r.target == c.name]
                    recorded = hook(final, results, c.options)
                    if recorded is not None:
                        outcome.collections.append(recorded)
    if not any(p.selected for p in outcome.points):
        note(f"no point of family {family.family} was selected ({selection}): nothing was published")
    return outcome


def build_points(
    recipe: Recipe,
    indices: Sequence[int] | None = None,
    *,
    update: bool = False,
    device: str = "auto",
    console: Console | None = None,
    note: Callable[[str], None] = lambda message: None,
) -> FamilyOutcome:
    """Merge, smoke-test (and evaluate) the chosen points without publishing, for a later `registry publish` to reuse."""
    from .family import build_family
    from .pipeline import Job

    assert recipe.sweep is not None
    points = pick(recipe, indices)
    job = Job([], device=device, console=console, note=note)
    if recipe.eval is not None:
        from .evaluate import get_evaluator
        from .plugins import get_evaluators

        job.evaluator = get_evaluator(recipe.eval, get_evaluators())
    plan = _family_plan(recipe, points, update, device, False, note)
    prepared = _run_points(job, recipe, points, plan)
    outcome = FamilyOutcome(str(recipe.path), recipe.sweep.family, recipe.sweep.select, [], built_only=True)
    for point, prep in zip(points, prepared, strict=True):
        outcome.points.append(PointOutcome(point.index, point.label, dict(point.weights), point.recipe.repo_id,
                                           _state(prep), False, prep.outcome, prep.outcome.model_dir))
    # The family report from every point at hand, built here or earlier (another machine's folders copied in).
    found = survey(recipe, plan=plan)
    family = build_family(recipe, [s.reports for s in found])
    report, chart = _write_family(recipe, family)
    outcome.report, outcome.chart = str(report), [str(c) for c in chart] if chart is not None else None
    return outcome


@dataclass
class Found:
    """A point as the build folders and the local registry show it, without running anything."""

    point: Point
    state: str
    model_dir: Path
    reports: PointReports


def survey(recipe: Recipe, *, plan: Plan | None = None) -> list[Found]:
    """Each point's state from its build folder's reports and the local registry (pins hashed through the cache; nothing merged)."""
    from . import build_root
    from .family import PointReports
    from .identity import merge_identity, smoke_identity
    from .merge import matches
    from .plugins import get_targets
    from .reports import Eval, Provenance, Smoke, read_current
    from .sources import plan as make_plan

    points = recipe.points()
    if plan is None:
        plan = make_plan(points[0].recipe, check_resources=False)
    local = get_targets().get("local")
    found = []
    for point in points:
        mine = plan.for_recipe(point.recipe)
        merge_id = merge_identity(point.recipe, mine)
        out = build_root() / merge_id[:12]
        provenance = read_current(Provenance, out)
        if not matches(provenance, point.recipe, mine, out):
            provenance = None
        smoke = read_current(Smoke, out) if provenance is not None else None
        if smoke is not None and smoke.smoke_identity != smoke_identity(merge_id, point.recipe):
            smoke = None
        evaluation = read_current(Eval, out) if smoke is not None and recipe.eval is not None else None
        held = local().current(point.recipe, merge_id, local.Options()) if local is not None else None
        if held is not None:
            state = "published"
        elif provenance is None:
            state = "not built"
        elif smoke is None:
            state = "merged"
        else:
            state = "smoke passed" if smoke.passed else "smoke failed"
        if held is not None and provenance is None:
            provenance, smoke, evaluation = held.provenance, held.smoke, held.evaluation
        published = ("local",) if held is not None else ()
        found.append(Found(point, state, out, PointReports(point, provenance, smoke, evaluation, published)))
    return found
