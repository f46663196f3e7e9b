"""`registry mlflow ...`: look at what the mlflow target registered."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from registry.cli import Format, FormatOption, emit_json

mlflow_app = typer.Typer(
    help="Inspect the models the mlflow target registered in an MLflow Model Registry.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@mlflow_app.command("versions")
def versions(
    model: Annotated[
        str, typer.Argument(help="A registered model name, or a recipe file (its mlflow publish entry names the model).")
    ],
    registry_uri: Annotated[
        str | None,
        typer.Option("--registry-uri", help="The MLflow registry [default: the recipe's, else MLFLOW_REGISTRY_URI, else MLFLOW_TRACKING_URI]."),
    ] = None,
    format: FormatOption = Format.text,
) -> None:
    """List a registered model's versions: recipe hash, smoke result, aliases, source."""
    from .target import MlflowOptions, list_versions, model_name, redact, resolve_uris

    options, name = MlflowOptions(), model
    if model.endswith((".yaml", ".yml")) and Path(model).is_file():
        from registry.plugins import get_targets
        from registry.recipe import load_recipe

        recipe = load_recipe(model, targets=get_targets())
        spec = next((s for s in recipe.publish if s.target == "mlflow"), None)
        options = spec.options if spec is not None else MlflowOptions()
        name = model_name(options, recipe.repo_id)
    if registry_uri is not None:
        options = options.model_copy(update={"registry_uri": registry_uri})
    found = list_versions(options, name)
    if format is Format.json:
        emit_json({"model": name, "registry_uri": redact(resolve_uris(options)[0]), "versions": found})
        return
    from rich.table import Table

    from registry.output import console, esc

    table = Table("version", "recipe", "smoke", "aliases", "source", title=esc(name))
    for v in found:
        table.add_row(*(esc(cell) for cell in (
            v["version"], (v["recipe_sha256"] or "-")[:12], v["smoke"] or "-", ", ".join(v["aliases"]), v["source"],
        )))
    console().print(table)
