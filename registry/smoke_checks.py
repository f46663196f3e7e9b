"""The built-in smoke checks, registered through the same `register_smoke_checks` hook as plugins'.

Each check runs what it needs through the SmokeContext (registry/smoke.py) and judges it; the
judgement is a CheckResult whose reason says, in one line, what passed or what went wrong.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .smoke import CheckResult, SmokeCheck, SmokeContext

# registry.smoke is imported by each check when it runs, never when the plugin is registered: every
# command loads the plugins, and `registry validate` must not pay for the smoke machinery.


def weights_check(ctx: SmokeContext) -> CheckResult:
    """Every merged tensor equals the recipe's weighted sum of the sources and is finite."""
    from .smoke import CheckResult, check_weights

    if not ctx.config.weights.enabled:
        return CheckResult("weights", "skipped", "disabled in the recipe (smoke.weights.enabled: false)")
    sources = ctx.sources()
    if not sources:
        return CheckResult("weights", "skipped", "no recipe or provenance.json names the sources; pass --recipe")
    changed = [s for s in sources if s.changed]
    if changed and ctx.strict:
        names = ("source " if len(changed) == 1 else "sources ") + ", ".join(f"'{s.name}'" for s in changed)
        return CheckResult(
            "weights", "failed",
            f"{names} changed since the merge (the sha256 of the weights is not the one in provenance.json), "
            "so the merge cannot be checked against it; restore the source, or accept its new weights with "
            "`registry publish --update`",
            {"changed": [s.name for s in changed]},
        )
    missing = [s for s in sources if s.path is None]
    if missing:
        return CheckResult("weights", "skipped", _not_at_hand(missing))
    ctx.note("comparing every tensor with the weighted sum of the sources")
    return check_weights(
        ctx.model_dir, sources, normalize=ctx.normalize(), merge_dtype=ctx.merge_dtype(),
        tolerance=ctx.config.weights.tolerance,
    )


def short_check(ctx: SmokeContext) -> CheckResult:
    """The short greedy generation: finite, spread-out logits and non-empty, non-degenerate text."""
    from .smoke import CheckResult, NoChatTemplate, run_short

    cfg = ctx.config.short
    try:
        run = run_short(ctx.model, ctx.tokenizer, cfg)
    except NoChatTemplate as exc:
        return CheckResult("short", "failed", exc.message)
    ctx.short = run
    details = {
        "finite": run.finite,
        "first_logit_std": run.logit_std,
        "repeated_ngrams": round(run.repeated_ngrams, 4),
        "longest_run": run.longest_run,
        "new_tokens": run.new_tokens,
        "stopped": run.stopped,
    }
    if not run.finite:
        return CheckResult("short", "failed", "logits are not finite (NaN or inf) in the short generation", details)
    if run.logit_std < cfg.min_logit_std:
        return CheckResult(
            "short", "failed",
            f"logits collapsed: their spread at the first step (std {run.logit_std:.3g}) is under min_logit_std {cfg.min_logit_std}",
            details,
        )
    if not run.output.strip():
        return CheckResult("short", "failed", f"the generation decoded to empty text ({run.new_tokens} tokens)", details)
    max_ngrams, max_run = cfg.max_repeated_ngrams, cfg.max_token_run
    if run.repeated_ngrams > max_ngrams or run.longest_run > max_run:
        # Greedy reasoning models repeat too: the bar rises to the parents' level when they are at hand, but
        # only as far as the parent that repeats least, so a parent that loops (an untrained one) lifts nothing.
        parents = {name: p.short for name, p in ctx.parents().items() if p.short} if _parents_at_hand(ctx) else {}
        if parents:
            details["parents"] = {n: {"repeated_ngrams": round(p.repeated_ngrams, 4), "longest_run": p.longest_run}
                                  for n, p in parents.items()}
            max_ngrams = max(max_ngrams, min(p.repeated_ngrams for p in parents.values()))
            max_run = max(max_run, min(p.longest_run for p in parents.values()))
        if run.repeated_ngrams > max_ngrams or run.longest_run > max_run:
            than = (" (more than the parent that repeats least)" if len(parents) > 1 else " (more than the parent)") if parents else ""
            return CheckResult(
                "short", "failed",
                f"degenerate output{than}: {run.repeated_ngrams:.0%} of {cfg.ngram}-grams repeat "
                f"(limit {max_ngrams:.0%}), longest run of one token {run.longest_run} (limit {max_run})",
                details,
            )
    stop = "stopped on EOS" if run.stopped == "eos" else f"hit max_new_tokens ({cfg.max_new_tokens})"
    return CheckResult("short", "passed", f"{run.new_tokens} tokens, {stop}", details)


def long_check(ctx: SmokeContext) -> CheckResult:
    """The needle-in-a-haystack prompts: finite logits everywhere; retrieval judged by parity (or min_retrieved)."""
    from .smoke import CheckResult, run_long

    cfg = ctx.config.long
    ctx.long = run_long(ctx.model, ctx.tokenizer, cfg, ctx.device, progress=ctx.note, model_name=f"the model in {ctx.model_dir}")
    ran = [r for r in ctx.long if r.status != "skipped"]
    skipped = len(ctx.long) - len(ran)
    details = {"ran": len(ran), "skipped": skipped}
    bad = [r for r in ran if not r.finite]
    if bad:
        return CheckResult("long", "failed", f"logits are not finite at {bad[0].tokens} tokens (depth {bad[0].depth:g})", details)
    if not ran:
        first = ctx.long[0].reason if ctx.long else "no lengths to run"
        return CheckResult("long", "skipped", f"every prompt was skipped: {first}", details)
    hits = sum(r.status == "retrieved" for r in ran)
    longest = max(r.tokens for r in ran)
    note = f", {skipped} skipped" if skipped else ""
    summary = f"retrieved {hits} of {len(ran)} pass keys at up to {longest} tokens{note}"
    if hits / len(ran) < cfg.min_retrieved:
        return CheckResult("long", "failed", f"{summary}; min_retrieved is {cfg.min_retrieved:.0%}", details)
    return CheckResult("long", "passed", summary, details)


def parity_check(ctx: SmokeContext) -> CheckResult:
    """The merge against each parent: fails when it is clearly worse than all of them, or far worse than the better one."""
    from .smoke import CheckResult, ParityRow, nll

    cfg = ctx.config.parity
    if not cfg.enabled:
        return CheckResult("parity", "skipped", "disabled in the recipe (smoke.parity.enabled: false)")
    sources = ctx.sources()
    if not sources:
        return CheckResult("parity", "skipped", "no recipe or provenance.json names the parents; pass --recipe")
    if not _parents_at_hand(ctx):
        return CheckResult("parity", "skipped", _not_at_hand(sources))
    parents = ctx.parents()
    if not parents:
        return CheckResult("parity", "skipped", _not_at_hand(sources))
    merged_nll = nll(ctx.model, ctx.tokenizer, ctx.parity_text())
    # Compare retrieval only where the merge and every parent ran.
    ran = {name: {(r.tokens, r.depth): r for r in p.long if r.status != "skipped"} for name, p in parents.items()}
    cells = [c for c in ctx.long_cells() if all(c in runs for runs in ran.values())] if cfg.retrieval else []
    merged_runs = {(r.tokens, r.depth): r for r in ctx.long}
    merged_hits = sum(merged_runs[c].status == "retrieved" for c in cells)
    ctx.parity = [ParityRow("merged", merged_nll, merged_hits, len(cells))]
    for name, p in parents.items():
        ctx.parity.append(ParityRow(name, p.nll, sum(ran[name][c].status == "retrieved" for c in cells), len(cells)))
    rows = ctx.parity[1:]
    details = {"nll_margin": cfg.nll_margin, "retrieval_margin": cfg.retrieval_margin,
               "best_nll_margin": cfg.best_nll_margin, "best_retrieval_share": cfg.best_retrieval_share,
               "missing": [s.name for s in sources if s.path is None]}
    both = "both parents" if len(rows) == 2 else ("every parent" if len(rows) > 2 else f"parent '{rows[0].model}'")
    parent_nlls = ", ".join(f"{r.model} {_num(r.nll)}" for r in rows)
    worst_nll = max((r.nll for r in rows if r.nll is not None and math.isfinite(r.nll)), default=math.inf)
    if not math.isfinite(merged_nll) or merged_nll > worst_nll + cfg.nll_margin:
        return CheckResult(
            "parity", "failed",
            f"NLL on the fixed text is {_num(merged_nll)} nats/token, worse than {both} ({parent_nlls}) "
            f"by more than nll_margin {cfg.nll_margin}",
            details,
        )
    best = min((r for r in rows if r.nll is not None and math.isfinite(r.nll)), key=lambda r: r.nll, default=None)
    if best is not None and merged_nll > best.nll + cfg.best_nll_margin:
        return CheckResult(
            "parity", "failed",
            f"NLL on the fixed text is {_num(merged_nll)} nats/token, more than best_nll_margin {cfg.best_nll_margin} "
            f"over the better parent '{best.model}' ({parent_nlls})",
            details,
        )
    retrieval = ""
    if cells:
        worst_frac = min(r.long_retrieved for r in rows) / len(cells)
        parent_hits = ", ".join(f"{r.model} {r.long_retrieved}" for r in rows)
        retrieval = f"; retrieved {merged_hits} of {len(cells)} pass keys ({parent_hits})"
        if merged_hits / len(cells) < worst_frac - cfg.retrieval_margin:
            return CheckResult(
                "parity", "failed",
                f"retrieved {merged_hits} of {len(cells)} pass keys, worse than {both} ({parent_hits}) "
                f"by more than retrieval_margin {cfg.retrieval_margin:.0%}",
                details,
            )
        # A capability the better parent has fully, or every parent has, is not expected to vanish in the merge.
        top = max(rows, key=lambda r: r.long_retrieved)
        expected = top.long_retrieved == len(cells) or min(r.long_retrieved for r in rows) > 0
        if expected and merged_hits < cfg.best_retrieval_share * top.long_retrieved:
            return CheckResult(
                "parity", "failed",
                f"retrieved {merged_hits} of {len(cells)} pass keys, under best_retrieval_share "
                f"{cfg.best_retrieval_share:.0%} of the better parent '{top.model}' ({parent_hits})",
                details,
            )
    missing = f"; {_not_at_hand([s for s in sources if s.path is None])}" if details["missing"] else ""
    return CheckResult("parity", "passed", f"NLL {_num(merged_nll)} ({parent_nlls}){retrieval}{missing}", details)


def _parents_at_hand(ctx: SmokeContext) -> bool:
    return any(s.path is not None for s in ctx.sources())


def _not_at_hand(sources) -> str:
    return "; ".join(f"source '{s.name}' is not at hand: {s.missing}" for s in sources if s.path is None)


def _num(value: float | None) -> str:
    return f"{value:.3f}" if value is not None and math.isfinite(value) else "nan"


def builtin_checks() -> tuple[SmokeCheck, ...]:
    """The built-in checks, in running order: weights, short, long, parity."""
    from .smoke import SmokeCheck

    return (
        SmokeCheck("weights", weights_check, order=10, description=weights_check.__doc__ or ""),
        SmokeCheck("short", short_check, order=20, description=short_check.__doc__ or ""),
        SmokeCheck("long", long_check, order=30, description=long_check.__doc__ or ""),
        SmokeCheck("parity", parity_check, order=40, description=parity_check.__doc__ or ""),
    )


@hookimpl
def register_smoke_checks(register):
    """Register the built-in smoke checks: weights, short, long, parity."""
    for check in builtin_checks():
        register(check)
