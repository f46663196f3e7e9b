"""Evaluation: benchmark scores of a merge and of its parents, through an evaluator plugin.

An evaluator is a class registered through the `register_evaluators` hook (the lm-evaluation-harness
one ships as the `registry-lm-eval` distribution); the core never imports an evaluator's library.
It receives an `EvalRequest` and returns each task's scores; this module turns them into eval.json.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationError

from .errors import EvalError, RegistryError
from .reports import Eval, GateRow, MetricScore, Provenance, TaskScores, read_current
from .reports import read as read_report
from .reports import write as write_report

if TYPE_CHECKING:
    from .recipe import EvalSpec, GateRule, Recipe


@dataclass(frozen=True)
class EvalRequest:
    """One evaluation of one model folder: what an evaluator is asked to score."""

    model_dir: Path
    tasks: tuple[str, ...]
    limit: int | None  # samples per task; None: all
    # Generation settings as the recipe gives them (temperature, top_p, do_sample, max_gen_toks, seed, ...).
    generation: Mapping[str, Any]
    batch_size: int | str  # a number, or the evaluator's own word such as "auto"
    device: str
    options: BaseModel  # the evaluator's own Options, validated
    recipe_dir: Path | None = None  # relative paths in options resolve against it


@runtime_checkable
class Evaluator(Protocol):
    """What an evaluator plugin registers: a class with a name, its distribution, its Options model, and two methods."""

    name: ClassVar[str]
    package: ClassVar[str]  # the distribution that provides it, named in error messages
    Options: ClassVar[type[BaseModel]]

    def version(self) -> str:
        """The evaluator's version as eval.json records it (its library's version, for instance)."""
        ...

    def evaluate(self, request: EvalRequest) -> dict[str, TaskScores]:
        """Score `request.model_dir` on each of `request.tasks`: task name → its scores."""
        ...


# ---------------------------------------------------------------------------------------------
# Running an evaluation: the merge, then each parent (cached by its pin), then the gate


@dataclass(frozen=True)
class EvalRun:
    """What `run_eval` did: the report it wrote (or reused) and which models it evaluated now."""

    report: Eval
    reused: bool  # the merge's scores came from an eval.json with this eval identity
    evaluated: tuple[str, ...]  # "merged" and parent aliases evaluated in this run (the rest came from caches)
    missing: dict[str, str]  # parent alias -> why it was not scored


def get_evaluator(spec: EvalSpec, evaluators: Mapping[str, Any]) -> Any:
    """The evaluator class an eval: section names; a one-line EvalError naming the package to install otherwise."""
    from .hints import missing_evaluator_message

    found = evaluators.get(spec.evaluator)
    if found is None:
        raise EvalError(missing_evaluator_message(spec.evaluator, list(evaluators)))
    return found


def eval_settings(recipe: Recipe, evaluator: Any) -> tuple[str, str, BaseModel]:
    """(config_sha256, evaluator version, validated options) for the recipe's eval: section."""
    from .identity import eval_config_sha256

    spec = _spec(recipe)
    options = spec._options if spec._options is not None else _validate_options(recipe, evaluator)
    return eval_config_sha256({**spec.settings(), "evaluator": evaluator.name}), str(evaluator().version()), options


def eval_id_for(model_id: str, recipe: Recipe, evaluator: Any) -> str:
    """The eval identity of a model (`merge identity`, or `kind:pin` of a parent) under the recipe's eval settings."""
    from .identity import eval_identity

    config, version, _ = eval_settings(recipe, evaluator)
    return eval_identity(model_id, config, evaluator.name, version)


def run_eval(
    model_dir: Path,
    recipe: Recipe,
    evaluator_cls: Any,
    *,
    device: str = "auto",
    cache_root: Path | None = None,
    progress: Callable[[str], None] | None = None,
    strict: bool = False,
) -> EvalRun:
    """Score the model in `model_dir` and its parents with the recipe's eval: settings; writes eval.json beside the weights.

    A report with this eval identity is reused (its gate judged again, as the gate is no part of the
    identity); a parent's scores are cached under `cache_root` (build_root()/eval) by its pin and the
    settings. `strict` (publish): a parent whose weights changed since the merge is an error.
    """
    from . import build_root
    from .identity import eval_identity
    from .machine import pick_device
    from .sources import folder_content_sha256

    spec = _spec(recipe)
    say = progress or (lambda message: None)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise EvalError(f"{model_dir}: not a model folder (no config.json)", "give the folder `registry merge` wrote")
    config, version, options = eval_settings(recipe, evaluator_cls)
    provenance = read_report(Provenance, model_dir)
    if provenance is not None:
        model_id, merge_id = provenance.merge_identity, provenance.merge_identity
    else:
        model_id, merge_id = f"local:{folder_content_sha256(model_dir)}", None
    identity = eval_identity(model_id, config, evaluator_cls.name, version)
    existing = read_current(Eval, model_dir)
    if existing is not None and existing.eval_identity == identity:
        report = rejudge(existing, spec.gate)
        if report != existing:
            write_report(report, model_dir)
        say("evaluation reused: same model, same eval settings")
        return EvalRun(report, True, (), {})

    device = pick_device(device)
    evaluator = evaluator_cls()
    recipe_dir = recipe.path.resolve().parent if recipe.path else None

    def request(folder: Path) -> EvalRequest:
        return EvalRequest(folder, tuple(spec.tasks), spec.limit, MappingProxyType(dict(spec.generation)), spec.batch_size,
                           device, options, recipe_dir)

    tasks = _scores(evaluator, request(model_dir), "the merged model", say)
    evaluated = ["merged"]
    parents: dict[str, dict[str, TaskScores]] = {}
    missing: dict[str, str] = {}
    if spec.parents:
        from .smoke import CHANGED_SINCE_MERGE, merge_sources

        cache = Path(cache_root) if cache_root is not None else build_root() / "eval"
        pinned = provenance.sources if provenance is not None else {}
        for source in merge_sources(recipe, provenance):
            if source.path is None:
                if strict and source.missing == CHANGED_SINCE_MERGE:
                    raise EvalError(f"source '{source.name}' {source.missing}",
                                    "restore the source, or accept its new weights with `registry publish --update`")
                missing[source.name] = source.missing or "not at hand"
                continue
            pin = pinned[source.name].pin if source.name in pinned else (folder_content_sha256(source.path) or "")
            parent_id = eval_identity(f"{source.kind}:{pin}", config, evaluator_cls.name, version)
            folder = cache / parent_id[:24]
            cached = read_current(Eval, folder)
            if cached is not None and cached.eval_identity == parent_id:
                parents[source.name] = cached.tasks
                say(f"parent {source.name}: scores reused")
                continue
            scores = _scores(evaluator, request(source.path), f"parent '{source.name}'", say)
            folder.mkdir(parents=True, exist_ok=True)
            write_report(Eval(eval_identity=parent_id, evaluator=evaluator_cls.name, evaluator_version=version,
                              config_sha256=config, device=device, limit=spec.limit, tasks=scores, passed=True), folder)
            parents[source.name] = scores
            evaluated.append(source.name)
    gate = judge_gate(spec.gate, tasks, parents, missing)
    report = Eval(eval_identity=identity, merge_identity=merge_id, evaluator=evaluator_cls.name, evaluator_version=version,
                  config_sha256=config, device=device, limit=spec.limit, tasks=tasks, parents=parents, gate=gate,
                  passed=all(row.passed for row in gate))
    write_report(report, model_dir)
    return EvalRun(read_report(Eval, model_dir) or report, False, tuple(evaluated), missing)


def _spec(recipe: Recipe) -> EvalSpec:
    if recipe.eval is None:
        where = f"{recipe.path}: " if recipe.path else ""
        raise EvalError(f"{where}the recipe has no eval: section", "add one naming the evaluator and its tasks")
    return recipe.eval


def _validate_options(recipe: Recipe, evaluator: Any) -> BaseModel:
    """The eval options checked by the evaluator's model, for a recipe loaded without `evaluators=`."""
    from .errors import RecipeError
    from .recipe import _problems_from_validation

    spec = _spec(recipe)
    try:
        spec._options = evaluator.Options.model_validate(spec.options)
    except ValidationError as exc:
        if recipe.document is None:
            raise EvalError(f"eval.options: {exc.errors()[0]['msg']}") from None
        raise RecipeError(_problems_from_validation(exc, recipe.document, evaluator.Options, ("eval", "options"))) from None
    return spec._options


def _scores(evaluator: Any, request: EvalRequest, what: str, say: Callable[[str], None]) -> dict[str, TaskScores]:
    """One evaluator call, timed; what it returns is checked, since it comes from a plugin."""
    started = time.perf_counter()
    try:
        found = evaluator.evaluate(request)
    except RegistryError:
        raise
    except Exception as exc:  # a plugin's failure, told in one line (REGISTRY_DEBUG=1 shows the traceback)
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise EvalError(f"evaluator '{evaluator.name}' failed on {what}: {text}") from exc
    try:
        scores = {str(task): TaskScores.model_validate(value) for task, value in dict(found).items()}
    except (TypeError, ValueError) as exc:
        raise EvalError(f"evaluator '{evaluator.name}' returned something other than task -> TaskScores for {what}: "
                        f"{' '.join(str(exc).split())[:200]}") from None
    say(f"evaluated {what} on {', '.join(request.tasks)} in {time.perf_counter() - started:.1f} s")
    return scores


def judge_gate(rules: Iterable[GateRule], tasks: Mapping[str, TaskScores], parents: Mapping[str, Mapping[str, TaskScores]],
               missing: Mapping[str, str] | None = None) -> list[GateRow]:
    """Each gate rule judged: the merge's value against the better parent's, allowed to be worse by max_drop."""
    rows = []
    for rule in rules:
        value = _value(tasks, rule.task, rule.metric)
        sign = -1.0 if rule.lower_is_better else 1.0
        scored = {alias: v for alias, scores in parents.items() if (v := _value(scores, rule.task, rule.metric)) is not None}
        best = max(scored, key=lambda alias: sign * scored[alias]) if scored else None
        best_value = scored[best] if best is not None else None
        if value is None:
            have = sorted(tasks[rule.task].metrics) if rule.task in tasks else []
            passed = False
            reason = f"the merge has no {rule.metric} score on {rule.task}" + (f" (it has {', '.join(have)})" if have else "")
        elif best is None or best_value is None:
            passed = False
            why = "; ".join(f"{alias}: {text}" for alias, text in sorted((missing or {}).items()))
            reason = f"no parent has a {rule.metric} score on {rule.task} to compare with" + (f" ({why})" if why else "")
        else:
            drop = sign * (best_value - value)
            passed = drop <= rule.max_drop + 1e-12
            reason = (f"{value:.4g} against {best}'s {best_value:.4g}: "
                      + ("as good" if drop == 0 else f"{abs(drop):.4g} better" if drop < 0 else f"{drop:.4g} worse")
                      + f", {'within' if passed else 'over'} the allowed {rule.max_drop:g}")
        rows.append(GateRow(task=rule.task, metric=rule.metric, max_drop=rule.max_drop, value=value, parent=best,
                            parent_value=best_value, passed=passed, reason=reason))
    return rows


def rejudge(report: Eval, rules: Iterable[GateRule]) -> Eval:
    """`report` with its gate judged again under `rules` (the scores stay: the gate is no part of the eval identity)."""
    gate = judge_gate(rules, report.tasks, report.parents)
    return report.model_copy(update={"gate": gate, "passed": all(row.passed for row in gate)})


def _value(tasks: Mapping[str, TaskScores], task: str, metric: str) -> float | None:
    scores = tasks.get(task)
    score = scores.metrics.get(metric) if scores is not None else None
    return score.value if score is not None and score.value is not None and math.isfinite(score.value) else None


def print_report(report: Eval, console: Any) -> None:
    """The scores as a rich table (the merge beside each parent), then the gate."""
    from rich.table import Table

    from .output import esc

    aliases = list(report.parents)
    table = Table("task", "metric", "merged", *(esc(a) for a in aliases),
                  title=f"eval ({esc(report.evaluator)} {esc(report.evaluator_version)}, {esc(report.device)})")
    for task, scores in report.tasks.items():
        for metric, score in scores.metrics.items():
            cells = [_shown(score)]
            for alias in aliases:
                theirs = report.parents[alias].get(task)
                cells.append(_shown(theirs.metrics.get(metric)) if theirs is not None else "")
            table.add_row(esc(task), esc(metric), *cells)
    console.print(table)
    for row in report.gate:
        mark = "[green]passed[/]" if row.passed else "[red]failed[/]"
        console.print(f"gate {esc(row.task)} {esc(row.metric)}: {mark} ({esc(row.reason)})")
    if report.gate:
        console.print(f"eval gate {'[green]passed[/]' if report.passed else '[red]failed[/]'}")


def _shown(score: MetricScore | None) -> str:
    if score is None or score.value is None:
        return "n/a"
    return f"{score.value:.4g}" + (f" ± {score.stderr:.2g}" if score.stderr is not None else "")
