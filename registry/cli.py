"""The `registry` command line: one subcommand per pipeline stage, errors as one clear line."""

from __future__ import annotations

import enum
import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .errors import RecipeError, RegistryError, UsageError
from .output import console as _console
from .output import emit_json, esc, shown, write

app = typer.Typer(
    name="registry",
    help="Turn declarative merge recipes into published, documented, smoke-tested models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Format(str, enum.Enum):
    text = "text"
    json = "json"


FormatOption = Annotated[Format, typer.Option("--format", help="text for people, json for machines and CI.")]
PointOption = Annotated[
    int | None, typer.Option("--point", help="For a sweep recipe: the point to work on (0-based; `registry sweep show` lists them).")
]


def _version(value: bool) -> None:
    if value:
        print(f"registry {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    """Turn declarative merge recipes into published, documented, smoke-tested models."""


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector paused (when it is on) for a block that builds only long-lived objects."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _styled_printer():
    """A print(*parts) whose parts are text or (text, style), never read as markup; user text goes through shown().

    rich colours the parts on a terminal; piped output is plain text, printed without importing rich
    (most of `registry validate`'s start-up otherwise), through the same guard as every other stream.
    """
    if not (sys.stdout.isatty() or os.environ.get("FORCE_COLOR")):
        from .output import GuardedStream

        stream = GuardedStream(sys.stdout)
        return lambda *parts: stream.write("".join(p if isinstance(p, str) else p[0] for p in parts) + "\n")
    from rich.text import Text

    console = _console()
    return lambda *parts: console.print(Text.assemble(*parts))


def recipe_files(paths: list[Path]) -> list[Path]:
    """The recipe files named by `paths`: files as given, folders searched for *.yaml/*.yml."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise UsageError(f"no recipes (*.yaml, *.yml) under {path}")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise UsageError(f"{path}: no such file or directory")
    return files


@app.command()
def validate(
    paths: Annotated[list[Path] | None, typer.Argument(help="Recipe files or folders [default: recipes/].")] = None,
    format: FormatOption = Format.text,
) -> None:
    """Check recipes statically: no network, no torch, no merge."""
    # Validating is mostly start-up (pydantic, yaml, the plugins): objects that live until exit, which
    # the cyclic garbage collector would walk again and again for nothing (a tenth of the run).
    with _collector_paused():
        _validate(paths, format)


def _validate(paths: list[Path] | None, format: Format) -> None:
    from .plugins import get_evaluators, get_targets
    from .recipe import load_recipe

    results = []
    files = recipe_files(paths or [Path("recipes")])
    targets, evaluators = get_targets(), get_evaluators()
    for file in files:
        try:
            recipe = load_recipe(file, targets=targets, evaluators=evaluators)
        except RecipeError as exc:
            results.append({"file": str(file), "valid": False, "problems": [p.to_dict() for p in exc.problems]})
        else:
            result = {"file": str(file), "valid": True, "repo_id": recipe.repo_id, "sha256": recipe.sha256, "problems": []}
            if recipe.sweep is not None:
                result.update(family=recipe.sweep.family, points=len(recipe.points()))
            results.append(result)
    invalid = [r for r in results if not r["valid"]]
    if format is Format.json:
        emit_json({"valid": not invalid, "recipes": results})
    else:
        say = _styled_printer()
        for result in results:
            if result["valid"]:
                family = f"; family {shown(result['family'])}, {result['points']} points" if "family" in result else ""
                say(("ok", "green"), f"    {shown(result['file'])}  ({shown(result['repo_id'])}{family})")
            for p in result["problems"]:
                where = f"{p['loc']}: " if p["loc"] else ""
                say(("error", "red"), f" {shown(p['file'])}:{p['line']}:{p['col']}: {shown(where + p['message'])}")
        total = len(results)
        if invalid:
            say(f"{len(invalid)} of {total} recipe{'s' if total != 1 else ''} invalid")
        else:
            say(f"{total} recipe{'s' if total != 1 else ''} valid")
    if invalid:
        raise typer.Exit(1)


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema, for editors to complete and check recipes."""
    from .plugins import get_targets
    from .recipe import json_schema

    emit_json(json_schema(get_targets()))


@app.command()
def plugins(format: FormatOption = Format.text) -> None:
    """List the loaded plugins, built-ins included, and the hooks each implements."""
    from .plugins import list_plugins

    found = list_plugins()
    if format is Format.json:
        emit_json(found)
        return
    from rich.table import Table

    table = Table("plugin", "package", "version", "hooks")
    for plugin in found:
        table.add_row(esc(plugin["name"]), esc(plugin["package"]), esc(plugin["version"]), esc(", ".join(plugin["hooks"])))
    _console().print(table)


@app.command()
def card(
    recipe: Annotated[Path, typer.Argument(help="Recipe file.")],
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", help="Folder of the merged model: its provenance.json and smoke.json are shown.")
    ] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the card to this file [default: print it].")] = None,
    templates: Annotated[
        Path | None, typer.Option("--templates", help="Folder of the team's card templates [default: ./templates].")
    ] = None,
    point: PointOption = None,
    format: FormatOption = Format.text,
) -> None:
    """Render the model card (README.md): Hub metadata, merge, sources, smoke results, provenance."""
    from .card import front_matter, read_reports, render_card, write_card
    from .plugins import get_targets
    from .recipe import load_recipe
    from .sweep import plain
    from .templating import template_dirs

    loaded = plain(load_recipe(recipe, targets=get_targets()), "card", point)
    provenance, smoke = read_reports(model_dir) if model_dir is not None else (None, None)
    evaluation = None
    if model_dir is not None and loaded.eval is not None:
        from .reports import Eval
        from .reports import read as read_report

        evaluation = read_report(Eval, model_dir)
    dirs = template_dirs(templates)
    if output is not None:
        text = write_card(loaded, output, provenance, smoke, dirs, evaluation=evaluation)
    else:
        text = render_card(loaded, provenance, smoke, dirs, evaluation=evaluation)
    if format is Format.json:
        emit_json({
            "repo_id": loaded.repo_id,
            "recipe_sha256": loaded.sha256,
            "output": str(output) if output is not None else None,
            "provenance": provenance is not None,
            "smoke": smoke is not None,
            "eval": evaluation is not None,
            "metadata": front_matter(text),
            "card": text if output is None else None,
        })
    elif output is None:
        write(text)
    else:
        found = ", ".join(name for name, data in (("provenance.json", provenance), ("smoke.json", smoke), ("eval.json", evaluation))
                          if data is not None) or "no reports"
        _console().print(f"wrote {esc(output)} for {esc(loaded.repo_id)} ({found})")


catalog_app = typer.Typer(
    help="Build and serve the static catalog of published models.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(catalog_app, name="catalog")


@catalog_app.command("build")
def catalog_build(
    source: Annotated[
        str, typer.Option("--from", help="'local' (the local registry) or 'hf:ORG_OR_USER' (their models tagged merge on the Hub).")
    ] = "local",
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write the site to; rebuilt whole.")] = Path("site"),
    templates: Annotated[
        Path | None, typer.Option("--templates", help="Folder holding the team's catalog/ templates [default: ./templates].")
    ] = None,
    format: FormatOption = Format.text,
) -> None:
    """Build a static site: an index with search and filters, and one page per model with card, recipe, smoke results and lineage."""
    from .catalog import TEMPLATE_FOLDER, build_site, read_families, read_models
    from .templating import template_dirs

    dirs = template_dirs(templates, holding=TEMPLATE_FOLDER)
    models = read_models(source)
    result = build_site(models, output, dirs, read_families(source, models=models))
    if format is Format.json:
        emit_json({"source": source, **result.to_dict()})
    else:
        plural = "" if result.models == 1 else "s"
        if source == "local":
            from . import registry_home

            source = f"the local registry {registry_home()}"
        families = f", {result.families} family page{'' if result.families == 1 else 's'}" if result.families else ""
        _console().print(f"wrote {esc(output / 'index.html')} and {result.models} model page{plural}{families} "
                         f"from {esc(source)} in {result.seconds:.2f} s")


@catalog_app.command("serve")
def catalog_serve(
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1 (0 picks a free one).")] = 8000,
    directory: Annotated[Path, typer.Option("--dir", help="The built site.")] = Path("site"),
) -> None:
    """Serve the built catalog on 127.0.0.1 for a quick look (Ctrl-C stops it)."""
    from .catalog import make_server

    server = make_server(directory, port)
    _console().print(f"serving {esc(directory)} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command()
def smoke(
    model_dir: Annotated[Path, typer.Argument(help="Folder of the merged model (config.json, weights, tokenizer).")],
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Recipe the model was merged from: smoke settings, and the parents to compare with.")
    ] = None,
    device: Annotated[Device, typer.Option("--device", help="auto picks cuda when a GPU is usable.")] = Device.auto,
    point: PointOption = None,
    format: FormatOption = Format.text,
) -> None:
    """Smoke-test a model: short and long-context generation, parity with parents, exact weights; writes smoke.json."""
    from .plugins import get_smoke_checks, get_targets
    from .recipe import load_recipe
    from .smoke import print_report, run_smoke

    if recipe is not None and not recipe.is_file():
        raise UsageError(f"{recipe}: no such recipe file")
    loaded = load_recipe(recipe, targets=get_targets()) if recipe is not None else None
    if loaded is not None:
        from .sweep import plain

        loaded = plain(loaded, "smoke", point)
    elif point is not None:
        raise UsageError("--point picks a point of the sweep recipe given with --recipe")
    err = _console(stderr=True)
    progress = None if format is Format.json else (lambda message: err.print(f"[dim]{esc(message)}[/dim]"))
    report = run_smoke(model_dir, loaded, device=device.value, checks=get_smoke_checks(), progress=progress)
    if format is Format.json:
        from .reports import data

        emit_json(data(report.to_report()))
    else:
        print_report(report, _console())
    if not report.passed:
        raise typer.Exit(1)


@app.command("eval")
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="Folder of the merged model (config.json, weights, tokenizer).")],
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Recipe with the eval: section, and the parents to compare with [default: MODEL_DIR/recipe.yaml].")
    ] = None,
    device: Annotated[Device, typer.Option("--device", help="auto picks cuda when a GPU is usable.")] = Device.auto,
    point: PointOption = None,
    format: FormatOption = Format.text,
) -> None:
    """Score a model and its parents on the recipe's eval: tasks; writes eval.json (reused while model and settings are unchanged)."""
    from .evaluate import get_evaluator, print_report, run_eval
    from .plugins import get_evaluators, get_targets
    from .recipe import load_recipe
    from .release import RECIPE_FILE

    if recipe is None:
        recipe = model_dir / RECIPE_FILE
        if not recipe.is_file():
            raise UsageError(f"{model_dir} holds no {RECIPE_FILE}; name the recipe with its eval: section: --recipe RECIPE")
    elif not recipe.is_file():
        raise UsageError(f"{recipe}: no such recipe file")
    evaluators = get_evaluators()
    from .sweep import plain

    loaded = plain(load_recipe(recipe, targets=get_targets(), evaluators=evaluators), "eval", point)
    if loaded.eval is None:
        raise UsageError(f"{recipe}: the recipe has no eval: section", "add one naming the evaluator and its tasks")
    err = _console(stderr=True)
    progress = None if format is Format.json else (lambda message: err.print(f"[dim]{esc(message)}[/dim]"))
    run = run_eval(model_dir, loaded, get_evaluator(loaded.eval, evaluators), device=device.value, progress=progress)
    if format is Format.json:
        from .reports import data

        emit_json({"reused": run.reused, "evaluated": list(run.evaluated), "missing": run.missing, "report": data(run.report)})
    else:
        for alias, why in run.missing.items():
            err.print(f"parent {esc(alias)} not scored: {esc(why)}")
        print_report(run.report, _console())
    if not run.report.passed:
        raise typer.Exit(1)


UpdateOption = Annotated[
    bool, typer.Option("--update", help="Accept sources that changed since the lock file pinned them; re-resolve Hub revisions.")
]
OutputDirOption = Annotated[
    Path | None, typer.Option("-o", "--output", help="Output folder [default: .registry/build/<recipe sha12>, or under $REGISTRY_HOME].")
]


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(help="Recipe file.")],
    output: OutputDirOption = None,
    update: UpdateOption = False,
    point: PointOption = None,
    format: FormatOption = Format.text,
) -> None:
    """Pin every source (Hub commit, local content hash), check they can be merged, write the lock file."""
    from .plugins import get_targets
    from .recipe import load_recipe
    from .sources import plan as make_plan
    from .sources import write_lock
    from .sweep import plain

    loaded = plain(load_recipe(recipe, targets=get_targets()), "plan", point)
    with _HashBar(format is Format.text) as bar:
        result = make_plan(loaded, update=update, out=output, on_hash=bar.update)
    wrote = write_lock(result)
    if format is Format.json:
        emit_json({**result.to_dict(), "lock_written": wrote})
        return
    _print_plan(result, wrote)


class _HashBar:
    """A transient progress bar for hashing source weights, shown only once hashing starts."""

    def __init__(self, enabled: bool):
        self.enabled, self.progress, self.task = enabled, None, None

    def __enter__(self) -> _HashBar:
        return self

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.progress is None:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

            self.progress = Progress(TextColumn("hashing sources"), BarColumn(), DownloadColumn(),
                                     console=_console(stderr=True), transient=True)
            self.progress.start()
            self.task = self.progress.add_task("hash", total=total)
        self.progress.update(self.task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


def _print_plan(result: Any, wrote: bool) -> None:
    from rich.table import Table

    out = _console()
    table = Table("source", "kind", "pinned to", "license", "status", "weights")
    for s in result.sources:
        where = f"{s.repo_id}@{s.revision[:12]}" if s.kind == "hub" else f"{s.model}  sha256:{s.content_sha256[:12]}"
        table.add_row(esc(s.name + (" (donor)" if s.name == result.donor else "")), esc(s.kind), esc(where), esc(s.license or "-"),
                      esc(s.status), f"{s.weight_bytes / 1e9:.2f} GB")
    out.print(table)
    for c in result.checks:
        colour = {"passed": "green", "warning": "yellow", "failed": "red"}[c.status]
        out.print(f"[{colour}]{c.status:<7}[/{colour}] {esc(c.name)}: {esc(c.message)}")
    if result.estimate is not None:
        e = result.estimate
        out.print(f"needs {e.output_bytes / 1e9:.2f} GB of disk under {esc(e.out)} ({(e.disk_free_bytes or 0) / 1e9:.2f} GB free) "
                  f"and about {e.memory_bytes / 1e9:.2f} GB of memory ({(e.memory_available_bytes or 0) / 1e9:.2f} GB available)")
    if result.lock_path is not None:
        out.print(f"wrote {esc(result.lock_path)}" if wrote else f"{esc(result.lock_path)} is up to date")


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe file.")],
    output: OutputDirOption = None,
    device: Annotated[Device, typer.Option("--device", help="auto uses CUDA when torch sees a GPU, else the CPU.")] = Device.auto,
    update: UpdateOption = False,
    point: PointOption = None,
    format: FormatOption = Format.text,
) -> None:
    """Merge the recipe's pinned sources with mergekit into a complete, reproducible output folder."""
    from . import build_root
    from .merge import check_output, default_output
    from .merge import merge as run
    from .plugins import get_targets
    from .recipe import load_recipe
    from .sources import plan as make_plan
    from .sources import write_lock
    from .sweep import plain

    loaded = plain(load_recipe(recipe, targets=get_targets()), "merge", point)
    if output is not None:
        check_output(output.absolute())  # before sources are hashed or the lock file written
    text = format is Format.text
    with _HashBar(text) as bar:
        result_plan = make_plan(loaded, update=update, out=output or build_root(), device=device.value, on_hash=bar.update)
    write_lock(result_plan)
    out_dir = output or default_output(loaded, result_plan)
    result = run(loaded, result_plan, out_dir, device.value, console=_console(stderr=True) if text else None)
    if not text:
        emit_json({**result.to_dict(), "warnings": result_plan.warnings})
        return
    out = _console()
    for warning in result_plan.warnings:
        out.print(f"[yellow]warning[/yellow] {esc(warning)}")
    size = sum(f["size"] for f in result.files.values())
    if result.reused:
        out.print(f"reused {esc(result.out)}: its provenance.json has this merge's identity {result.provenance.merge_identity[:12]} "
                  "(merge settings and pinned sources)")
    else:
        out.print(f"merged {esc(loaded.repo_id)} into {esc(result.out)} ({size / 1e9:.2f} GB, {len(result.files)} files) "
                  f"on {esc(result.device)} in {result.seconds:.1f} s")


@app.command()
def publish(
    recipe: Annotated[Path, typer.Argument(help="Recipe file.")],
    target: Annotated[
        list[str] | None, typer.Option("--target", help="Where to publish (repeatable) [default: the recipe's publish list, else local].")
    ] = None,
    private: Annotated[bool | None, typer.Option("--private/--public", help="Visibility of a Hub repo created by this publish.")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub branch to publish to (created when missing).")] = None,
    create_pr: Annotated[bool | None, typer.Option("--create-pr", help="Open a Hub pull request instead of committing.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Do everything but the push; show what would be sent.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Publish even though the smoke test or the eval gate failed.")] = False,
    device: Annotated[Device, typer.Option("--device", help="auto uses CUDA when torch sees a GPU, else the CPU.")] = Device.auto,
    update: UpdateOption = False,
    select: Annotated[
        str | None,
        typer.Option("--select", help="A sweep's points to publish: passed, best:METRIC or best:METRIC:N [default: the recipe's select:]."),
    ] = None,
    format: FormatOption = Format.text,
) -> None:
    """Validate, plan, merge, smoke-test, render the card and publish: the whole pipeline (every point of a sweep)."""
    from .pipeline import publish_recipe
    from .plugins import get_evaluators, get_targets
    from .recipe import load_recipe

    text = format is Format.text
    err = _console(stderr=True)
    note = (lambda message: err.print(f"[dim]{esc(message)}[/dim]")) if text else (lambda message: None)
    loaded = load_recipe(recipe, targets=get_targets(), evaluators=get_evaluators())
    options = {"targets": target, "private": private, "revision": revision, "create_pr": create_pr, "dry_run": dry_run,
               "force": force, "device": device.value, "update": update, "console": err if text else None, "note": note}
    if loaded.sweep is not None:
        from .sweep import publish_family

        family = publish_family(loaded, select=select, **options)
        if not text:
            emit_json(family.to_dict())
        else:
            _print_family_outcome(family)
        if family.exit_code:
            raise typer.Exit(family.exit_code)
        return
    if select is not None:
        raise UsageError(f"--select chooses points of a family; {recipe} has no sweep: section")
    outcome = publish_recipe(loaded, **options)
    if not text:
        emit_json(outcome.to_dict())
        return
    _print_outcome(outcome)


def _print_outcome(outcome: Any) -> None:
    """What publishing one model did, for people."""
    out = _console()
    if outcome.unchanged:
        out.print(f"{esc(outcome.repo_id)} is already published from recipe {outcome.recipe_sha256[:12]} "
                  f"on {esc(', '.join(outcome.targets))}: nothing to do")
        return
    out.print(f"model: {esc(outcome.model_dir) if outcome.model_dir else 'not built here: a card-only publish keeps the weights the targets hold'}")
    out.print(f"card:  {esc(outcome.card) if outcome.card else 'rendered from the reports the targets hold'}")
    for p in outcome.plans:
        if p.up_to_date:
            out.print(f"{esc(p.target)}: {esc(p.location)} is up to date; nothing would be sent")
        else:
            out.print(f"{esc(p.target)}: would send {len(p.upload)} files ({p.upload_bytes / 1e6:.1f} MB) to {esc(p.location)}"
                      + (f" and delete {len(p.delete)}" if p.delete else ""))
            for rel in p.upload:
                out.print(f"  + {esc(rel)}")
            for rel in p.delete:
                out.print(f"  - {esc(rel)}")
    for r in outcome.results:
        verb = "published" if r.changed else "unchanged"
        out.print(f"{esc(r.target)}: {verb} {esc(r.location)}" + (f" ({esc(r.revision)})" if r.revision else "")
                  + (f", {esc(r.detail)}" if r.detail and r.changed else ""))
    for done in [*outcome.plans, *outcome.results]:
        if done.kept:
            out.print(f"{esc(done.target)}: kept {len(done.kept)} files that registry did not publish: {esc(', '.join(done.kept))}")


def _print_family_outcome(family: Any) -> None:
    """What publishing (or building) a family did: each point, then the family table and where its report is."""
    from .family import CHART_HINT, print_table
    from .reports import Family, read

    out = _console()
    for p in family.points:
        where = f" ({esc(p.model_dir)})" if p.model_dir else ""
        out.print(f"point {p.index + 1}/{len(family.points)} {esc(p.label)}  {esc(p.repo_id)}: {esc(p.state)}{where}")
        if p.selected and p.outcome is not None and not family.built_only:
            _print_outcome(p.outcome)
    if family.report:
        report = read(Family, Path(family.report).parent)
        if report is not None:
            print_table(report, out)
        out.print(f"family report: {esc(family.report)}")
        if family.chart:
            out.print(f"chart: {esc(', '.join(family.chart))}")
        else:
            out.print(esc(CHART_HINT))
    if not family.built_only and not any(p.selected for p in family.points):
        out.print(f"[red]no point of family {esc(family.family)} was selected ({esc(family.selection)}): nothing was published[/red]")


@app.command("list")
def list_models(format: FormatOption = Format.text) -> None:
    """List the models in the local registry (the newest version of each)."""
    from . import registry_home
    from .publish.local import checked_version_folder, list_latest, reconcile

    for message in reconcile():
        _console(stderr=True).print(esc(message))
    found = list_latest()
    folders = [checked_version_folder(registry_home(), entry) for entry in found]
    if format is Format.json:
        emit_json(found)
        return
    if not found:
        _console().print(f"no models in {esc(registry_home())} yet; run `registry publish RECIPE`")
        return
    from rich.table import Table

    table = Table("repo id", "version", "smoke", "family", "path")
    for entry, folder in zip(found, folders, strict=True):
        smoke = {True: "passed", False: "failed", None: "-"}[entry.get("smoke_passed")]
        family = entry.get("family") if isinstance(entry.get("family"), dict) else {}
        member = f"{family.get('name')} ({family.get('label')})" if family else "-"
        table.add_row(esc(entry["repo_id"]), esc(entry["version"]), smoke, esc(member), esc(folder))
    _console().print(table)


@app.command()
def show(
    repo_id: Annotated[str, typer.Argument(help="Repo id, as in the recipe.")],
    format: FormatOption = Format.text,
) -> None:
    """Show a model of the local registry: every version, and the newest card."""
    from . import registry_home
    from .publish.local import checked_version_folder, versions

    found = versions(None, repo_id)
    if not found:
        raise UsageError(f"'{repo_id}' is not in the local registry {registry_home()}; `registry list` shows what is")
    folders = [checked_version_folder(registry_home(), entry) for entry in found]
    if format is Format.json:
        emit_json(found)
        return
    out = _console()
    for entry, folder in zip(found, folders, strict=True):
        out.print(f"{esc(entry['version'])}  recipe {esc(entry['recipe_sha256'][:12])}  {esc(folder)}")
    card = folders[-1] / "README.md"
    if card.is_file():
        from rich.markdown import Markdown

        out.print(Markdown(shown(card.read_text(encoding="utf-8"), lines=True)))


@app.command()
def verify(
    target: Annotated[
        str, typer.Argument(help="hf:REPO[@REV], a plugin's SCHEME:REF (e.g. mlflow:MODEL/VERSION), a local-registry REPO[@VERSION], or a folder.")
    ],
    key: Annotated[Path | None, typer.Option("--key", help="PEM public key: check model.sig with it.")] = None,
    identity: Annotated[
        str | None, typer.Option("--identity", help="Check model.sig as a keyless Sigstore signature by this identity (needs the network).")
    ] = None,
    issuer: Annotated[
        str, typer.Option("--issuer", help="The OIDC issuer of --identity.")
    ] = "https://token.actions.githubusercontent.com",
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Merge again from recipe.yaml and the pinned sources; compare every file.")
    ] = False,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Recipe to rebuild from [default: the published recipe.yaml].")
    ] = None,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", help="ALIAS=PATH: a source's folder for --rebuild (repeatable) [default: as the recipe names it]."),
    ] = None,
    device: Annotated[Device, typer.Option("--device", help="Where --rebuild merges.")] = Device.cpu,
    format: FormatOption = Format.text,
) -> None:
    """Check a published model: files against provenance.json, no extra file, card and reports of this merge, signature."""
    from .verify import parse_sources
    from .verify import verify as run

    sources = parse_sources(source or [])
    if (recipe is not None or sources) and not rebuild:
        raise UsageError("--recipe and --source are for --rebuild")
    signer = (identity, issuer) if identity else None
    result = run(target, key=key, identity=signer, rebuild=rebuild, recipe=recipe, sources=sources, device=device.value)
    if format is Format.json:
        emit_json(result.to_dict())
    else:
        from rich.table import Table

        colour = {"passed": "green", "failed": "red", "unverifiable": "yellow", "skipped": "dim"}
        table = Table("check", "status", "detail")
        for c in result.checks:
            table.add_row(esc(c.name), f"[{colour[c.status]}]{c.status}[/{colour[c.status]}]", esc(c.message))
        out = _console()
        out.print(table)
        # The table wraps long lines; each problem again in one piece, for logs and grep.
        for c in result.checks:
            if c.status in ("failed", "unverifiable"):
                out.print(f"[{colour[c.status]}]{c.status}:[/{colour[c.status]}] {esc(c.message)}")
        where = f" at {result.revision}" if result.revision else ""
        out.print(f"{esc(result.target)}{esc(where)}: {result.verdict}")
    if result.exit_code:
        raise typer.Exit(result.exit_code)


sweep_app = typer.Typer(
    help="Families: a sweep recipe's points, built, listed and compared (`registry publish SWEEP.yaml` publishes them).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(sweep_app, name="sweep")


class ReportFormat(str, enum.Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


def _load_sweep(recipe: Path) -> Any:
    from .plugins import get_evaluators, get_targets
    from .recipe import load_recipe

    loaded = load_recipe(recipe, targets=get_targets(), evaluators=get_evaluators())
    if loaded.sweep is None:
        raise UsageError(f"{recipe} has no sweep: section; `registry publish {recipe}` publishes its one merge")
    return loaded


@sweep_app.command("show")
def sweep_show(
    recipe: Annotated[Path, typer.Argument(help="Sweep recipe file.")],
    format: FormatOption = Format.text,
) -> None:
    """List the points: index, weights, repo id and state (not built, merged, smoke passed/failed, published); runs nothing."""
    from .sweep import survey

    loaded = _load_sweep(recipe)
    found = survey(loaded)
    rows = [{"index": f.point.index, "label": f.point.label, "weights": f.point.weights, "repo_id": f.point.recipe.repo_id,
             "state": f.state, "model_dir": str(f.model_dir) if f.state != "not built" else None} for f in found]
    if format is Format.json:
        emit_json({"recipe": str(recipe), "family": loaded.family, "points": rows})
        return
    from rich.table import Table

    table = Table("point", "weights", "repo id", "state", title=f"family {esc(loaded.family)}")
    for row in rows:
        table.add_row(str(row["index"]), esc(row["label"]), esc(row["repo_id"]), esc(row["state"]))
    _console().print(table)


@sweep_app.command("build")
def sweep_build(
    recipe: Annotated[Path, typer.Argument(help="Sweep recipe file.")],
    point: Annotated[list[int] | None, typer.Option("--point", help="Build only this point (repeatable; 0-based) [default: all].")] = None,
    device: Annotated[Device, typer.Option("--device", help="auto uses CUDA when torch sees a GPU, else the CPU.")] = Device.auto,
    update: UpdateOption = False,
    format: FormatOption = Format.text,
) -> None:
    """Merge, smoke-test (and evaluate) points without publishing; a later `registry publish` reuses their build folders."""
    from .sweep import build_points

    loaded = _load_sweep(recipe)
    text = format is Format.text
    err = _console(stderr=True)
    note = (lambda message: err.print(f"[dim]{esc(message)}[/dim]")) if text else (lambda message: None)
    outcome = build_points(loaded, point, update=update, device=device.value, console=err if text else None, note=note)
    if text:
        _print_family_outcome(outcome)
    else:
        emit_json(outcome.to_dict())
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)


@sweep_app.command("report")
def sweep_report(
    recipe: Annotated[Path, typer.Argument(help="Sweep recipe file.")],
    format: Annotated[ReportFormat, typer.Option("--format", help="text (a table), json (family.json) or markdown.")] = ReportFormat.text,
) -> None:
    """The family table from the reports at hand (build folders, local registry); runs nothing."""
    from .family import build_family, markdown_table, print_table
    from .sweep import survey

    loaded = _load_sweep(recipe)
    family = build_family(loaded, [f.reports for f in survey(loaded)])
    if format is ReportFormat.json:
        from .reports import data

        emit_json(data(family))
    elif format is ReportFormat.markdown:
        write(markdown_table(family))
    else:
        print_table(family, _console())


ci_app = typer.Typer(
    help="For CI: the recipes a change touches (a job matrix) and the pull request summary.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(ci_app, name="ci")

BaseOption = Annotated[
    str | None,
    typer.Option("--base", help="Compare HEAD with its merge base with this ref [default: origin/$GITHUB_BASE_REF, else origin/main or main]."),
]
MaxSourceOption = Annotated[
    float, typer.Option("--max-source-gb", min=0.0, help="Dry-run a non-example recipe only when its sources total at most this many GB.")
]


@ci_app.command("changed")
def ci_changed(
    base: BaseOption = None,
    examples: Annotated[bool, typer.Option("--examples/--no-examples", help="Include recipes under recipes/examples/.")] = True,
    max_source_gb: MaxSourceOption = 2.0,
    format: FormatOption = Format.text,
) -> None:
    """The recipes a change touches, as a job matrix; writes $GITHUB_OUTPUT and $GITHUB_STEP_SUMMARY when set."""
    from .ci import GB, changes_markdown, changes_outputs, compute_changes, write_outputs, write_step_summary

    changes = compute_changes(base, examples=examples, max_source_bytes=int(max_source_gb * GB))
    write_outputs(changes_outputs(changes))
    write_step_summary(changes_markdown(changes))
    if format is Format.json:
        emit_json(changes.to_dict())
        return
    out = _console()
    out.print(f"{len(changes.recipes)} recipe(s) changed since {changes.base_sha[:12]} (merge base of {esc(changes.base)} and HEAD)")
    for r in changes.recipes:
        runs = ", ".join(name for name, on in (("plan", r.plan), ("dry run", r.dry_run)) if on) or "validate only"
        family = f"  family {esc(r.family)}, {len(r.points)} points" if r.points else ""
        out.print(f"  {esc(r.recipe)}  {esc('; '.join(r.reasons))}  \\[{runs}]{family}")
    for path in changes.deleted:
        out.print(f"  {esc(path)}  deleted")


@ci_app.command("point")
def ci_point(
    recipe: Annotated[Path, typer.Argument(help="Sweep recipe file.")],
    point: Annotated[int, typer.Option("--point", help="The point (0-based; `registry sweep show` lists them).")],
    format: FormatOption = Format.text,
) -> None:
    """A sweep point's build folder, repo id and state (what its CI job uploads); writes $GITHUB_OUTPUT when set."""
    from .ci import point_build, write_outputs

    found = point_build(recipe, point)
    write_outputs(found)
    if format is Format.json:
        emit_json(found)
    else:
        _console().print(f"point {found['point']} {esc(found['label'])}: {esc(found['repo_id'])}, {esc(found['state'])}, in {esc(found['folder'])}")


@ci_app.command("summary")
def ci_summary(
    recipes: Annotated[list[str] | None, typer.Argument(help="Recipe files [default: those the change touches].")] = None,
    base: BaseOption = None,
    reports: Annotated[
        Path | None,
        typer.Option(
            "--reports",
            help="Folder of the dry runs' reports: provenance.json and smoke.json in report-<recipe slug>/ (the workflow's artifacts).",
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Also write the Markdown to this file.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1024, help="Most UTF-8 bytes of Markdown (GitHub comments take 65,536 characters).")] = 64_512,
    max_source_gb: MaxSourceOption = 2.0,
    format: FormatOption = Format.text,
) -> None:
    """Markdown for the pull request: validation, merge settings against the base, dry run, card preview."""
    from .ci import GB, build_summary, write_outputs, write_step_summary

    summary = build_summary(recipes, base=base, reports=reports, limit=limit, max_source_bytes=int(max_source_gb * GB))
    if output is not None:
        try:
            output.write_text(summary.markdown, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{output}: cannot write the summary: {exc.strerror or exc}") from None
    write_step_summary(summary.markdown)
    write_outputs({"summary": summary.markdown, "invalid": str(sum(not r.valid for r in summary.recipes))})
    if format is Format.json:
        emit_json(summary.to_dict())
    else:
        write(summary.markdown)


def _report(exc: RegistryError) -> None:
    err = _console(stderr=True)
    # Messages quote user text (file names, repo ids, values), escaped here so that none can start a line.
    if isinstance(exc, RecipeError):
        lines = [str(p) for p in exc.problems]
    else:
        lines = str(exc).split("\n") if exc.multiline else [str(exc)]
    for line in lines if any(lines) else [type(exc).__name__]:
        err.print(f"[bold red]error:[/bold red] {esc(line)}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `registry` console script."""
    debug = os.environ.get("REGISTRY_DEBUG") == "1"
    # torch's CPU allocator asks for transparent huge pages for tensors of 2 MB and more: a merge
    # allocates gigabytes of short-lived float32 buffers, and 4 KB pages cost a page fault each
    # (0.5 to 1 s of a 380M-parameter merge on two cores). THP_MEM_ALLOC_ENABLE=0 turns it off.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        if _wants_plugin_commands(argv):
            from .plugins import get_plugin_manager

            get_plugin_manager().hook.register_commands(cli=app)
        # Typer reports usage errors itself (exit 2); everything else reaches the handlers below.
        app(args=argv, prog_name="registry")
    except RegistryError as exc:
        if debug:
            raise
        _report(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        _report(RegistryError(f"internal error: {type(exc).__name__}: {exc}", "set REGISTRY_DEBUG=1 for the traceback"))
        sys.exit(1)
    finally:
        if argv is None:
            # The process is about to exit. Its final garbage collections would walk every object torch,
            # transformers and mergekit created (over a second after a merge) only to free memory the
            # OS takes back anyway; frozen objects are skipped. Finalizers and atexit handlers still run.
            gc.freeze()


def _wants_plugin_commands(argv: list[str] | None) -> bool:
    """Plugins can add commands; loading them costs start-up time, so only when one may be asked for."""
    args = sys.argv[1:] if argv is None else argv
    command = next((a for a in args if not a.startswith("-")), None)
    builtin = {c.name or c.callback.__name__ for c in app.registered_commands} | {g.name for g in app.registered_groups}
    return command is None or command not in builtin
