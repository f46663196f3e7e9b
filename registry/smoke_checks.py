"""The built-in smoke checks, registered through the same `register_smoke_checks` hook as plugins'.

Each check declares the measurements it judges (registry/smoke.py MEASUREMENTS), receives them
complete and immutable as keyword arguments, and returns a CheckResult whose reason says, in one
line, what passed or what went wrong. Checks measure nothing themselves.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .recipe import ParitySmoke
    from .smoke import CheckResult, LongRun, Parents, ParityRow, ShortRun, SmokeCheck, SmokeSettings, SourceModel, WeightComparison

# registry.smoke is imported by each check when it runs, never when the plugin is registered: every
# command loads the plugins, and `registry validate` must not pay for the smoke machinery.


def weights_check(settings: SmokeSettings, sources: tuple[SourceModel, ...], weights: WeightComparison | None) -> CheckResult:
    """Every merged tensor equals the recipe's weighted sum of the sources and is finite."""
    from .smoke import CheckResult

    if not settings.config.weights.enabled:
        return CheckResult("weights", "skipped", "disabled in the recipe (smoke.weights.enabled: false)")
    if not sources:
        return CheckResult("weights", "skipped", "no recipe or provenance.json names the sources; pass --recipe")
    changed = [s for s in sources if s.changed]
    if changed and settings.strict:
        names = ("source " if len(changed) == 1 else "sources ") + ", ".join(f"'{s.name}'" for s in changed)
        return CheckResult(
            "weights", "failed",
            f"{names} changed since the merge (the sha256 of the weights is not the one in provenance.json), "
            "so the merge cannot be checked against it; restore the source, or accept its new weights with "
            "`registry publish --update`",
            {"changed": [s.name for s in changed]},
        )
    missing = [s for s in sources if s.path is None]
    if missing or weights is None:
        return CheckResult("weights", "skipped", _not_at_hand(missing))
    details = {
        "sources": list(weights.sources),
        "normalize": weights.normalize,
        "tensors_checked": weights.tensors_checked,
        "mismatched": [dict(m) for m in weights.mismatched],
        "non_finite": list(weights.non_finite),
        "skipped": [dict(m) for m in weights.skipped],
    }
    if weights.non_finite:
        return CheckResult(
            "weights", "failed",
            f"{len(weights.non_finite)} of {weights.tensors} merged tensors hold NaN or inf (first: {weights.non_finite[0]})",
            details,
        )
    if weights.mismatched:
        first = weights.mismatched[0]
        what = first.get("reason") or f"{first['elements']} elements off by up to {first['max_abs_error']:.3g}"
        return CheckResult(
            "weights", "failed",
            f"{len(weights.mismatched)} of {weights.tensors} merged tensors differ from the recipe's weighted sum of the sources "
            f"(first: {first['tensor']}, {what})",
            details,
        )
    note = f"; {len(weights.skipped)} not comparable" if weights.skipped else ""
    return CheckResult(
        "weights", "passed",
        f"{weights.tensors_checked} tensors equal the recipe's weighted sum of {len(weights.sources)} sources{note}", details,
    )


def short_check(settings: SmokeSettings, short: ShortRun, parents: Parents) -> CheckResult:
    """The short greedy generation: finite, spread-out logits and non-empty, non-degenerate text."""
    from .smoke import CheckResult

    cfg, run = settings.config.short, short
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
        # With parity disabled no parent runs, and the absolute bar applies.
        texts = {p.name: p.short for p in parents.evaluated if p.short}
        if texts:
            details["parents"] = {n: {"repeated_ngrams": round(p.repeated_ngrams, 4), "longest_run": p.longest_run}
                                  for n, p in texts.items()}
            max_ngrams = max(max_ngrams, min(p.repeated_ngrams for p in texts.values()))
            max_run = max(max_run, min(p.longest_run for p in texts.values()))
        if run.repeated_ngrams > max_ngrams or run.longest_run > max_run:
            than = (" (more than the parent that repeats least)" if len(texts) > 1 else " (more than the parent)") if texts else ""
            return CheckResult(
                "short", "failed",
                f"degenerate output{than}: {run.repeated_ngrams:.0%} of {cfg.ngram}-grams repeat "
                f"(limit {max_ngrams:.0%}), longest run of one token {run.longest_run} (limit {max_run})",
                details,
            )
    stop = "stopped on EOS" if run.stopped == "eos" else f"hit max_new_tokens ({cfg.max_new_tokens})"
    return CheckResult("short", "passed", f"{run.new_tokens} tokens, {stop}", details)


def long_check(settings: SmokeSettings, long: tuple[LongRun, ...]) -> CheckResult:
    """The needle-in-a-haystack prompts: finite logits everywhere; retrieval judged by parity (or min_retrieved)."""
    from .smoke import CheckResult

    cfg = settings.config.long
    ran = [r for r in long if r.status != "skipped"]
    skipped = len(long) - len(ran)
    details = {"ran": len(ran), "skipped": skipped}
    bad = [r for r in ran if not r.finite]
    if bad:
        return CheckResult("long", "failed", f"logits are not finite at {bad[0].tokens} tokens (depth {bad[0].depth:g})", details)
    if not ran:
        first = long[0].reason if long else "no lengths to run"
        return CheckResult("long", "skipped", f"every prompt was skipped: {first}", details)
    hits = sum(r.status == "retrieved" for r in ran)
    longest = max(r.tokens for r in ran)
    note = f", {skipped} skipped" if skipped else ""
    summary = f"retrieved {hits} of {len(ran)} pass keys at up to {longest} tokens{note}"
    if hits / len(ran) < cfg.min_retrieved:
        return CheckResult("long", "failed", f"{summary}; min_retrieved is {cfg.min_retrieved:.0%}", details)
    return CheckResult("long", "passed", summary, details)


def parity_check(
    settings: SmokeSettings, sources: tuple[SourceModel, ...], parents: Parents, parity: tuple[ParityRow, ...],
) -> CheckResult:
    """The merge against each parent: fails when it is clearly worse than all of them, or far worse than the better one."""
    from .smoke import CheckResult

    cfg = settings.config.parity
    if not cfg.enabled:
        return CheckResult("parity", "skipped", "disabled in the recipe (smoke.parity.enabled: false)")
    if not sources:
        return CheckResult("parity", "skipped", "no recipe or provenance.json names the parents; pass --recipe")
    if not parity:
        return CheckResult("parity", "skipped", _not_at_hand(parents.unavailable))
    # Retrieval is compared only where the merge and every parent ran: `cells` of them.
    merged, rows = parity[0], parity[1:]
    merged_nll, merged_hits, cells = merged.nll, merged.long_retrieved, merged.long_total
    details = {"nll_margin": cfg.nll_margin, "retrieval_margin": cfg.retrieval_margin,
               "best_nll_margin": cfg.best_nll_margin, "best_retrieval_share": cfg.best_retrieval_share,
               "max_kl": cfg.max_kl, "min_top1_agreement": cfg.min_top1_agreement,
               "kl": {r.model: r.kl for r in rows}, "top1_agreement": {r.model: r.top1_agreement for r in rows},
               "not_compared": {p.name: p.not_compared for p in parents.evaluated if p.not_compared},
               "missing": [s.name for s in parents.unavailable]}
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
    compared = [r for r in rows if r.kl is not None]
    distance = ""
    if compared:
        distance = (f"; KL {', '.join(f'{r.model} {_num(r.kl)}' for r in compared)}, top-1 agreement "
                    + ", ".join(f"{r.model} {_share(r.top1_agreement)}" for r in compared))
        far = far_from_parents(cfg, rows)
        if far:
            return CheckResult("parity", "failed", far, details)
    retrieval = ""
    if cells:
        worst_frac = min(r.long_retrieved for r in rows) / cells
        parent_hits = ", ".join(f"{r.model} {r.long_retrieved}" for r in rows)
        retrieval = f"; retrieved {merged_hits} of {cells} pass keys ({parent_hits})"
        if merged_hits / cells < worst_frac - cfg.retrieval_margin:
            return CheckResult(
                "parity", "failed",
                f"retrieved {merged_hits} of {cells} pass keys, worse than {both} ({parent_hits}) "
                f"by more than retrieval_margin {cfg.retrieval_margin:.0%}",
                details,
            )
        # A capability the better parent has fully, or every parent has, is not expected to vanish in the merge.
        top = max(rows, key=lambda r: r.long_retrieved)
        expected = top.long_retrieved == cells or min(r.long_retrieved for r in rows) > 0
        if expected and merged_hits < cfg.best_retrieval_share * top.long_retrieved:
            return CheckResult(
                "parity", "failed",
                f"retrieved {merged_hits} of {cells} pass keys, under best_retrieval_share "
                f"{cfg.best_retrieval_share:.0%} of the better parent '{top.model}' ({parent_hits})",
                details,
            )
    missing = f"; {_not_at_hand(parents.unavailable)}" if parents.unavailable else ""
    return CheckResult("parity", "passed", f"NLL {_num(merged_nll)} ({parent_nlls}){distance}{retrieval}{missing}", details)


def far_from_parents(cfg: ParitySmoke, rows: tuple[ParityRow, ...]) -> str | None:
    """Why the merge is far from every parent it was compared with (KL over max_kl, top-1 agreement under min_top1_agreement), or None."""
    compared = [r for r in rows if r.kl is not None]
    if not compared:
        return None
    both = "both parents" if len(rows) == 2 else ("every parent" if len(rows) > 2 else f"parent '{rows[0].model}'")
    nearest = min(compared, key=lambda r: r.kl if math.isfinite(r.kl) else math.inf)
    if not math.isfinite(nearest.kl) or nearest.kl > cfg.max_kl:
        kls = ", ".join(f"{r.model} {_num(r.kl)}" for r in compared)
        return (f"far from {both}: KL to the nearest parent '{nearest.model}' is {_num(nearest.kl)} nats/token "
                f"({kls}), over max_kl {cfg.max_kl}")
    closest = max(compared, key=lambda r: r.top1_agreement if r.top1_agreement is not None else -1.0)
    if closest.top1_agreement is None or closest.top1_agreement < cfg.min_top1_agreement:
        agreements = ", ".join(f"{r.model} {_share(r.top1_agreement)}" for r in compared)
        return (f"far from {both}: the top token agrees with the closest parent '{closest.model}' at "
                f"{_share(closest.top1_agreement)} of positions ({agreements}), under min_top1_agreement "
                f"{cfg.min_top1_agreement:.0%}")
    return None


def _not_at_hand(sources: tuple[SourceModel, ...] | list[SourceModel]) -> str:
    return "; ".join(f"source '{s.name}' is not at hand: {s.missing}" for s in sources if s.path is None)


def _num(value: float | None) -> str:
    return f"{value:.3f}" if value is not None and math.isfinite(value) else "nan"


def _share(value: float | None) -> str:
    return f"{value:.1%}" if value is not None and math.isfinite(value) else "nan"


def builtin_checks() -> tuple[SmokeCheck, ...]:
    """The built-in checks, each with the measurements it judges; `order` places its row in smoke.json."""
    from .smoke import SmokeCheck

    return (
        SmokeCheck("weights", weights_check, ("settings", "sources", "weights"), order=10, description=weights_check.__doc__ or ""),
        SmokeCheck("short", short_check, ("settings", "short", "parents"), order=20, description=short_check.__doc__ or ""),
        SmokeCheck("long", long_check, ("settings", "long"), order=30, description=long_check.__doc__ or ""),
        SmokeCheck("parity", parity_check, ("settings", "sources", "parents", "parity"), order=40,
                   description=parity_check.__doc__ or ""),
    )


@hookimpl
def register_smoke_checks(register):
    """Register the built-in smoke checks: weights, short, long, parity."""
    for check in builtin_checks():
        register(check)
