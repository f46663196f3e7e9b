"""`registry publish`: validate → plan → merge → smoke → eval → card → push, as one composition of the stages.

The order is chosen so the cheap questions come first: once the sources are pinned (hashes and Hub
commit shas, no torch), every target says what it holds under this merge identity, and the card is
rendered from the reports at hand (the build folder's, else a target's). A target holding this merge
and this card is current; when all are, nothing is merged, nothing imported beyond the Hub client,
nothing sent. When only the card changed, the card alone is published; only what needs the weights
(another merge, other smoke or eval settings, a target that cannot keep files) builds the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PublishError, RegistryError, UsageError
from .publish import CARD_NAME, Bundle, PublishPlan, PublishResult, bundle_files, card_only_files

if TYPE_CHECKING:
    from pydantic import BaseModel
    from rich.console import Console

    from .publish import Published
    from .recipe import Recipe
    from .reports import Eval, Provenance, Smoke
    from .signing import SigningPlan
    from .sources import Plan


@dataclass
class Chosen:
    """A target picked for this publish, with its options."""

    name: str
    target: Any
    options: BaseModel


@dataclass
class PublishOutcome:
    """What `registry publish` did, stage by stage (plain data for --format json)."""

    recipe: str
    repo_id: str
    recipe_sha256: str
    targets: list[str]
    unchanged: bool = False
    model_dir: str | None = None
    merge: str | None = None  # "merged" | "reused" | "skipped" (card only: the targets keep their weights)
    smoke: dict[str, Any] | None = None  # {"passed": bool, "reused": bool, "failed": [...]}
    eval: dict[str, Any] | None = None  # {"passed": bool, "reused": bool, "evaluated": [...], "failed": [...]}; None: no eval: section
    card: str | None = None
    results: list[PublishResult] = field(default_factory=list)
    plans: list[PublishPlan] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "recipe": self.recipe, "repo_id": self.repo_id, "recipe_sha256": self.recipe_sha256,
            "targets": self.targets, "unchanged": self.unchanged, "dry_run": self.dry_run,
            "model_dir": self.model_dir, "merge": self.merge, "smoke": self.smoke, "eval": self.eval, "card": self.card,
            "results": [r.to_dict() for r in self.results], "plans": [p.to_dict() for p in self.plans],
        }


def choose_targets(recipe: Recipe, names: list[str] | None, overrides: dict[str, Any]) -> list[Chosen]:
    """Targets from --target (repeatable), else the recipe's publish list, else `local`; CLI flags override options."""
    from .hints import missing_target_message
    from .plugins import get_targets

    available = get_targets()
    from_recipe = {spec.target: spec.options for spec in recipe.publish}
    wanted = names or [spec.target for spec in recipe.publish] or ["local"]
    chosen = []
    given = {flag: value for flag, value in overrides.items() if value is not None}
    for name in dict.fromkeys(wanted):
        target_cls = available.get(name)
        if target_cls is None:
            raise UsageError(missing_target_message(name, list(available)))
        options = from_recipe.get(name) or target_cls.Options()
        fields = type(options).model_fields
        update = {flag: value for flag, value in given.items() if flag in fields}
        chosen.append(Chosen(name, target_cls(), options.model_copy(update=update)))
    unused = [flag for flag in given if not any(flag in type(c.options).model_fields for c in chosen)]
    if unused:
        flags = ", ".join("--" + flag.replace("_", "-") for flag in unused)
        raise UsageError(f"{flags} applies to none of the targets: {', '.join(c.name for c in chosen)}")
    return chosen


@dataclass
class Job:
    """What one `registry publish` applies to every model it publishes (each point of a family alike)."""

    chosen: list[Chosen]
    signer: SigningPlan | None = None
    evaluator: Any = None
    dry_run: bool = False
    force: bool = False
    device: str = "auto"
    console: Console | None = None
    note: Callable[[str], None] = lambda message: None

    @property
    def signing_key(self) -> str | None:
        """The signing key's fingerprint, which the card records."""
        return self.signer.fingerprint if self.signer is not None else None


@dataclass
class Reports:
    """A merge's reports, and the build folder holding them (None: read back from a target)."""

    provenance: Provenance
    smoke: Smoke
    evaluation: Eval | None
    folder: Path | None


@dataclass
class Prepared:
    """One model on its way to the targets: its plan and identity, what the targets hold, its reports so far."""

    recipe: Recipe
    plan: Plan
    out: Path
    outcome: PublishOutcome
    merge_id: str | None = None
    held: list[Published | None] = field(default_factory=list)
    reports: Reports | None = None
    built: bool = False  # merged, smoke-tested and evaluated here in this run (reports.folder is the build)


def publish(
    recipe_path: Path,
    *,
    targets: list[str] | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool | None = None,
    dry_run: bool = False,
    force: bool = False,
    device: str = "auto",
    update: bool = False,
    console: Console | None = None,
    note: Callable[[str], None] = lambda message: None,
) -> PublishOutcome:
    """Publish a recipe to its targets; every stage's finished output is reused when it still matches."""
    from .plugins import get_evaluators, get_targets
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path, targets=get_targets(), evaluators=get_evaluators())
    return publish_recipe(recipe, targets=targets, private=private, revision=revision, create_pr=create_pr, dry_run=dry_run,
                          force=force, device=device, update=update, console=console, note=note)


def publish_recipe(recipe: Recipe, *, update: bool = False, **options: Any) -> PublishOutcome:
    """Publish a loaded plain recipe (`publish`'s options); a sweep is published by `sweep.publish_family`."""
    if recipe.sweep is not None:
        raise UsageError(f"{recipe.path} is a sweep (family {recipe.sweep.family}): publish it with `registry publish`, "
                         "which runs every point")
    job = start(recipe, [recipe], **options)
    return finish(job, prepare(job, recipe, make_plan_for(recipe, update, job.device, job.dry_run, job.note)))


def start(recipe: Recipe, recipes: list[Recipe], *, targets: list[str] | None, private: bool | None, revision: str | None,
          create_pr: bool | None, dry_run: bool, force: bool, device: str, console: Console | None,
          note: Callable[[str], None]) -> Job:
    """The targets, evaluator and signer for `recipes` (one, or a family's points), after every target has said it will accept them."""
    from .plugins import get_evaluators, get_signers
    from .signing import signing_plan

    evaluator = None
    if recipe.eval is not None:
        from .evaluate import get_evaluator

        evaluator = get_evaluator(recipe.eval, get_evaluators())
    overrides = {"private": private, "revision": revision, "create_pr": create_pr}
    chosen = choose_targets(recipe, targets, overrides)
    # A target that will refuse (a token without write access) says so before sources are hashed or merged;
    # so does a publish that must be signed without a key.
    for one in recipes:
        for c in chosen:
            _at(c, partial(c.target.check_access, one, c.options))
    signer = signing_plan(recipe, [c.options for c in chosen], get_signers())
    return Job(chosen, signer, evaluator, dry_run, force, device, console, note)


def make_plan_for(recipe: Recipe, update: bool, device: str, dry_run: bool, note: Callable[[str], None]) -> Plan:
    """The recipe's sources pinned (hashing, no torch), the lock written unless a dry run."""
    from . import build_root
    from .sources import plan as make_plan
    from .sources import write_lock

    plan = make_plan(recipe, update=update, out=build_root(), device=device)
    if not dry_run:
        write_lock(plan)
    note(f"pinned {len(plan.sources)} sources: " + ", ".join(f"{s.name} {s.pin[:12]}" for s in plan.sources))
    return plan


def prepare(job: Job, recipe: Recipe, plan: Plan, source: str | None = None) -> Prepared:
    """Ask the targets what they hold under this merge identity, and find its reports without merging (build folder, else a target)."""
    from .identity import merge_identity, smoke_identity
    from .merge import default_output

    outcome = PublishOutcome(source or str(recipe.path), recipe.repo_id, recipe.sha256, [c.name for c in job.chosen],
                             dry_run=job.dry_run)
    prep = Prepared(recipe, plan, default_output(recipe, plan), outcome)
    if job.dry_run:
        return prep
    prep.merge_id = merge_identity(recipe, plan)
    # Every target is asked (not just until one says no), so an unreachable one fails before the merge.
    prep.held = [_at(c, partial(c.target.current, recipe, prep.merge_id, c.options)) for c in job.chosen]
    eval_id = None
    if job.evaluator is not None:
        from .evaluate import eval_id_for

        eval_id = eval_id_for(prep.merge_id, recipe, job.evaluator)
    at_hand = _reports_at_hand(recipe, plan, prep.out, prep.merge_id, smoke_identity(prep.merge_id, recipe), eval_id, prep.held)
    if at_hand is not None:
        prep.reports = Reports(*at_hand)
    return prep


def build(job: Job, prep: Prepared, *, strict: bool = True, stage: Callable[[str], None] = lambda name: None) -> Reports:
    """Merge, smoke-test and evaluate (each reused when its report still matches); `strict`: a failed smoke test or gate raises.

    Not strict (a family's point), a failed smoke test is recorded in the outcome and the point is not evaluated.
    """
    stage("merging")
    model_dir = _merged(prep.recipe, prep.plan, prep.out, job.device, job.console, prep.outcome, job.note)
    stage("smoke-testing")
    provenance, smoke = _smoked(prep.recipe, model_dir, job.device, prep.outcome, job.note, job.console)
    if strict:
        _check_smoke(smoke, job.force)
    evaluation = None
    if job.evaluator is not None and (smoke.passed or job.force):
        stage("evaluating")
        evaluation = _evaluated(prep.recipe, model_dir, job.evaluator, job.device, prep.outcome, job.note, job.console)
        if strict:
            _check_eval(evaluation, job.force)
    prep.reports = Reports(provenance, smoke, evaluation, model_dir)
    prep.built = True
    return prep.reports


def finish(job: Job, prep: Prepared, *, family: Any = None, assets: dict[str, bytes] | None = None) -> PublishOutcome:
    """Render the card and publish: nothing when every target is current, the card alone when only it changed, else the build.

    `family` (a family's report) gives the card its family section; `assets` (name in the repo: file) go beside the card.
    """
    from .identity import card_identity

    recipe, outcome, assets = prep.recipe, prep.outcome, assets or {}
    extra = {"family": family} if family is not None else {}
    if not job.dry_run and prep.reports is not None and not prep.built:
        from .card import render_card

        r = prep.reports
        text = render_card(recipe, r.provenance, r.smoke, signing_key=job.signing_key, evaluation=r.evaluation, **extra)
        # Current: this merge, and the card we would render now, byte for byte.
        stale = [(c, h) for c, h in zip(job.chosen, prep.held, strict=True)
                 if h is None or h.merge_identity != prep.merge_id or h.card_identity != card_identity(text)]
        if not stale:
            outcome.unchanged = True
            outcome.results = [PublishResult(c.name, "", None, changed=False, detail="already published", repo_id=recipe.repo_id)
                               for c in job.chosen]
            return outcome
        # A signature covers the weights' bytes: signing a card-only publish needs the build folder.
        if (job.signer is None or r.folder is not None) and all(
                c.target.card_only and h is not None and h.provenance is not None
                and h.provenance.files == r.provenance.files for c, h in stale):
            _check_smoke(r.smoke, job.force)
            _check_eval(r.evaluation, job.force)
            stale_names = {c.name for c, _ in stale}
            return _publish_card(outcome, [(c, c.name in stale_names) for c in job.chosen], r.provenance, r.smoke, r.folder,
                                 text, pins_of(prep.plan), recipe, job.note, prep.plan, job.signer, r.evaluation, assets)

    reports = prep.reports if prep.built else build(job, prep)
    _check_smoke(reports.smoke, job.force)
    _check_eval(reports.evaluation, job.force)
    model_dir = reports.folder
    assert model_dir is not None

    from .card import write_card

    _place(assets, model_dir)
    card_path = model_dir / CARD_NAME
    text = write_card(recipe, card_path, reports.provenance, reports.smoke, signing_key=job.signing_key,
                      evaluation=reports.evaluation, **extra)
    outcome.card = str(card_path)
    _release(model_dir, recipe, prep.plan, job.signer, job.note)
    bundle = Bundle(
        repo_id=recipe.repo_id,
        recipe_sha256=recipe.sha256,
        pins=pins_of(prep.plan),
        files=_without_stale_eval(bundle_files(model_dir, known=reports.provenance.files), reports.evaluation),
        provenance=reports.provenance,
        smoke=reports.smoke,
        card=text,
        evaluation=reports.evaluation,
    )
    for c in job.chosen:
        if job.dry_run:
            outcome.plans.append(_at(c, partial(c.target.plan, bundle, c.options)))
            continue
        _publish_to(c, bundle, outcome, job.note)
    return outcome


def _place(assets: dict[str, bytes], folder: Path) -> None:
    """Write each asset (a family's report and chart) to its name in `folder`, beside the card that refers to it."""
    from .files import replace_atomically

    for rel, blob in assets.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(folder / rel, blob)


def _reports_at_hand(recipe, plan, out: Path, merge_id: str, smoke_id: str, eval_id: str | None, held: list[Published | None]):
    """(provenance, smoke, eval or None, build folder or None) for this merge and these smoke and eval settings, without merging.

    The build folder first; else the reports a target holds. None when neither has them all (eval.json
    only when the recipe has an eval: section, `eval_id`); a reused eval report has its gate judged again.
    """
    from .merge import matches
    from .reports import Eval, Provenance, Smoke, read_current

    def judged(evaluation: Eval | None) -> Eval | None:
        from .evaluate import rejudge

        return rejudge(evaluation, recipe.eval.gate) if evaluation is not None and recipe.eval is not None else None

    provenance = read_current(Provenance, out)
    if matches(provenance, recipe, plan, out):
        smoke, evaluation = read_current(Smoke, out), read_current(Eval, out) if eval_id is not None else None
        if _smoke_fits(smoke, smoke_id) and _eval_fits(evaluation, eval_id):
            return provenance, smoke, judged(evaluation), out
    for h in held:
        if h is not None and h.provenance is not None and h.provenance.merge_identity == merge_id \
                and _smoke_fits(h.smoke, smoke_id) and _eval_fits(h.evaluation, eval_id):
            return h.provenance, h.smoke, judged(h.evaluation if eval_id is not None else None), None
    return None


def _eval_fits(evaluation: Eval | None, eval_id: str | None) -> bool:
    """True when no eval is wanted, or the eval report was made with this eval identity (this merge, these settings, this evaluator)."""
    return eval_id is None or (evaluation is not None and evaluation.eval_identity == eval_id)


def _without_stale_eval(files: dict, evaluation: Eval | None) -> dict:
    """The bundle's files without an eval.json the recipe no longer asks for (one left in the build folder by an earlier run)."""
    from .reports import EVAL_FILE

    return files if evaluation is not None else {rel: f for rel, f in files.items() if rel != EVAL_FILE}


def _smoke_fits(smoke: Smoke | None, smoke_id: str) -> bool:
    """True when a smoke report was made with this smoke identity (this merge, these smoke settings): it is reused."""
    return smoke is not None and smoke.smoke_identity == smoke_id


def _check_eval(evaluation: Eval | None, force: bool) -> None:
    if evaluation is not None and not evaluation.passed and not force:
        failed = "; ".join(f"{g.task} {g.metric}: {g.reason}" for g in evaluation.failed())
        raise PublishError(
            f"eval gate failed ({failed}); nothing was published",
            "fix the recipe, or publish anyway with --force",
        )


def _check_smoke(smoke: Smoke, force: bool) -> None:
    if not smoke.passed and not force:
        failed = "; ".join(f"{c.name}: {c.reason}" for c in smoke.failed())
        raise PublishError(
            f"smoke test failed ({failed}); nothing was published",
            "fix the recipe, or publish anyway with --force",
        )


def _release(folder: Path, recipe: Recipe, plan: Plan, signer: SigningPlan | None, note) -> None:
    """Write the published recipe and lock beside the card, then sign the folder (or drop an old signature)."""
    from .release import write_release
    from .signing import SIGNATURE_FILE

    write_release(folder, recipe, plan)
    if signer is None:
        # A signature left from an earlier signed publish covers other files: it must not travel.
        (folder / SIGNATURE_FILE).unlink(missing_ok=True)
        return
    started = time.perf_counter()
    signer.sign(folder)
    note(f"signed the bundle with {signer.signer.name} in {time.perf_counter() - started:.2f} s")


def _publish_card(outcome, targets: list[tuple[Chosen, bool]], provenance: Provenance, smoke: Smoke, folder: Path | None, text: str,
                  pins, recipe: Recipe, note, plan: Plan, signer: SigningPlan | None, evaluation: Eval | None = None,
                  assets: dict[str, bytes] | None = None) -> PublishOutcome:
    """Publish a re-rendered card beside the weights the targets already hold: no merge, no smoke, no weight sent."""
    import tempfile

    from .files import replace_atomically
    from .reports import write as write_report

    outcome.merge = "skipped"
    outcome.smoke = {"passed": smoke.passed, "reused": True, "failed": [c.name for c in smoke.failed()]}
    if evaluation is not None:
        outcome.eval = _eval_outcome(evaluation, True, [])
    outcome.model_dir = str(folder) if folder is not None else None
    note("card only: the merge and its smoke report are unchanged" + ("" if folder is not None else "; reports read from the target"))
    with tempfile.TemporaryDirectory(prefix="registry-card-") as scratch:
        # The card goes beside the build it describes; with no build here, the reports and card are written to scratch.
        where = folder if folder is not None else Path(scratch)
        if folder is None:
            write_report(provenance, where)
            write_report(smoke, where)
        if evaluation is not None:
            # Written again where it lies: a gate edited since keeps the scores and changes the verdict.
            write_report(evaluation, where)
        _place(assets or {}, where)
        replace_atomically(where / CARD_NAME, text.encode("utf-8"))
        outcome.card = str(where / CARD_NAME) if folder is not None else None
        _release(where, recipe, plan, signer, note)
        files = card_only_files(provenance, where, extra=list(assets or {}))
        bundle = Bundle(
            repo_id=recipe.repo_id, recipe_sha256=recipe.sha256, pins=pins,
            files=_without_stale_eval(files, evaluation), provenance=provenance, smoke=smoke, card=text, evaluation=evaluation,
        )
        for c, stale in targets:
            if stale:
                _publish_to(c, bundle, outcome, note)
            else:
                outcome.results.append(PublishResult(c.name, "", None, changed=False, detail="already published",
                                                     repo_id=recipe.repo_id))
    return outcome


def _publish_to(c: Chosen, bundle: Bundle, outcome: PublishOutcome, note) -> None:
    note(f"publishing to {c.name}")
    try:
        result = c.target.publish(bundle, c.options)
    except RegistryError as exc:
        raise PublishError(_partial(outcome.results, c.name, exc.message), exc.hint) from None
    # A plugin's target may not say which model its result is about; the family hook needs it.
    result.repo_id = result.repo_id or bundle.repo_id
    outcome.results.append(result)
    for message in outcome.results[-1].notes:
        note(f"{c.name}: {message}")


def _at(chosen: Chosen, call: Callable[[], Any]) -> Any:
    """Run a target's method; its errors name the target."""
    try:
        return call()
    except RegistryError as exc:
        raise PublishError(f"{chosen.name}: {exc.message}", exc.hint) from None


def pins_of(plan: Plan) -> dict[str, dict[str, Any]]:
    """The plan's source pins, as the lock file records them."""
    return {s.name: s.provenance() for s in plan.sources}


def _merged(recipe, plan, out, device, console, outcome, note) -> Path:
    from .merge import merge

    result = merge(recipe, plan, out, device, console=console)
    outcome.model_dir = str(result.out)
    outcome.merge = "reused" if result.reused else "merged"
    note(f"{'reused the merge in' if result.reused else 'merged into'} {result.out}")
    return result.out


def _smoked(recipe, model_dir: Path, device, outcome, note, console) -> tuple[Provenance, Smoke]:
    """The merge's provenance and smoke report; a report made for this merge with these smoke settings is reused."""
    from .identity import smoke_identity
    from .reports import Provenance, Smoke, read, read_current

    provenance = read(Provenance, model_dir)
    if provenance is None:
        raise PublishError(f"{model_dir} has no provenance.json; run `registry merge` again")
    smoke = read_current(Smoke, model_dir)
    reused = _smoke_fits(smoke, smoke_identity(provenance.merge_identity, recipe))
    if not reused:
        from .plugins import get_smoke_checks
        from .smoke import run_smoke

        report = run_smoke(model_dir, recipe, device=device, checks=get_smoke_checks(), progress=note, strict=True)
        smoke = read(Smoke, model_dir)  # as written: non-finite numbers are null there
        if console is not None:
            from .smoke import print_report

            print_report(report, console)
    outcome.smoke = {"passed": smoke.passed, "reused": reused, "failed": [c.name for c in smoke.failed()]}
    note(f"smoke test {'passed' if smoke.passed else 'FAILED'}{' (reused)' if reused else ''}")
    return provenance, smoke


def _evaluated(recipe, model_dir: Path, evaluator, device, outcome, note, console) -> Eval:
    """The merge's eval report (the merge and its parents scored with the recipe's eval: settings); reused while they match."""
    from .evaluate import print_report, run_eval

    run = run_eval(model_dir, recipe, evaluator, device=device, progress=note, strict=True)
    for alias, why in run.missing.items():
        note(f"parent {alias} not scored: {why}")
    if console is not None and not run.reused:
        print_report(run.report, console)
    outcome.eval = _eval_outcome(run.report, run.reused, list(run.evaluated))
    note(f"eval {'passed' if run.report.passed else 'gate FAILED'}{' (reused)' if run.reused else ''}")
    return run.report


def _eval_outcome(evaluation: Eval, reused: bool, evaluated: list[str]) -> dict[str, Any]:
    return {"passed": evaluation.passed, "reused": reused, "evaluated": evaluated,
            "failed": [f"{g.task}:{g.metric}" for g in evaluation.failed()]}


def _partial(done: list[PublishResult], failed: str, message: str) -> str:
    if not done:
        return f"{failed}: {message}"
    where = ", ".join(f"{r.target} ({r.location})" for r in done)
    return f"published to {where}, but {failed} failed: {message}"
