"""The hooks plugins implement; built-in targets and checks register through the same ones."""

from __future__ import annotations

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("registry")
hookimpl = HookimplMarker("registry")


@hookspec
def register_targets(register):
    """Register publish targets: call register(TargetClass) for each one."""


@hookspec
def register_smoke_checks(register):
    """Register smoke checks: register(SmokeCheck(name, judge, needs)); judge gets its needs (smoke.MEASUREMENTS), complete and immutable."""


@hookspec
def register_evaluators(register):
    """Register evaluators: call register(EvaluatorClass) for each one (see registry.evaluate.Evaluator)."""


@hookspec
def register_signers(register):
    """Register ways of signing a published bundle: call register(signer) with a registry.signing.Signer instance."""


@hookspec
def register_verify_sources(register):
    """Register `registry verify` target schemes: register(VerifySource(scheme, fetch)), fetch(ref, cache_dir) -> folder of the published files."""


@hookspec
def register_template_dirs():
    """Return folders of card and catalog templates that override the packaged defaults."""


@hookspec
def card_sections(recipe, result):
    """Return extra Markdown sections ((title, markdown) pairs) for a card; `result` maps provenance/smoke to their reports or None."""


@hookspec
def register_commands(cli):
    """Add subcommands to the registry command line (a typer.Typer)."""
