"""Model cards: the reviewed reference card, team templates, plugin sections, and nothing leaked."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry.card import (
    card_context,
    front_matter,
    human_number,
    human_percent,
    human_seconds,
    human_size,
    md,
    metadata_problems,
    read_reports,
    render_card,
    write_card,
)
from registry.errors import CardError, ReportError
from registry.hookspecs import hookimpl
from registry.identity import smoke_identity
from registry.leaks import find_leaks
from registry.plugins import get_plugin_manager
from registry.recipe import load_recipe, parse_recipe
from registry.reports import Provenance, Smoke, SourcePin

HERE = Path(__file__).parent
ROOT = HERE.parent
COS_FMT = ROOT / "recipes" / "cos_fmt.yaml"
REFERENCE_DIR = HERE / "fixtures" / "cards" / "cos_fmt"
REFERENCE = (REFERENCE_DIR / "README.md").read_text(encoding="utf-8")
HEAVY = ("torch", "transformers", "mergekit", "huggingface_hub", "safetensors")

# The recipe behind the reference model's published card, sources as the paths that card leaked.
LEAKED_PATHS = (
    "/local/scratch/zli2/checkpoints/cos_MRL4096_ROLLOUT4_LR1e-6/global_step_50/actor/huggingface",
    "/local/scratch/zli2/checkpoints/fmt_MRL4096_ROLLOUT4/global_step_50/actor/huggingface",
)


def recipe_text(cos: str = "${CHECKPOINTS}/cos", fmt: str = "${CHECKPOINTS}/fmt", *, cos_label: str = "GRPO, cosine reward",
                summary: str = "A test merge", extra: str = "") -> str:
    return f"""\
repo_id: team/test-merge
summary: {json.dumps(summary)}
license: mit
{extra}
sources:
  cos: {{model: {json.dumps(cos)}, label: {json.dumps(cos_label)}}}
  fmt: {{model: {json.dumps(fmt)}, label: "GRPO, format reward"}}
merge:
  merge_method: linear
  models:
    - {{model: cos, parameters: {{weight: 0.3}}}}
    - {{model: fmt, parameters: {{weight: 0.7}}}}
  dtype: bfloat16
"""


def provenance_of(sources: dict[str, SourcePin], **fields) -> Provenance:
    """A provenance report with these sources; the other merge facts are placeholders unless given."""
    return Provenance(**{"merge_identity": "a" * 64, "merge_method": "linear", "dtype": "bfloat16", "config_donor": "cos",
                         "files": {}, "versions": {}, "device": "cpu", **fields}, sources=sources)


def smoke_of(**fields) -> Smoke:
    """A smoke report made without a recipe (no identities), from smoke.json-shaped data."""
    return Smoke.model_validate({"passed": True, "device": "cpu", "checks": [], **fields})


def render(text: str, **kwargs) -> str:
    kwargs.setdefault("template_dirs", ())
    return render_card(parse_recipe(text, "test.yaml"), **kwargs)


def section(card: str, title: str) -> str:
    """The body of the `## title` section (up to the next `## `)."""
    start = card.index(f"\n## {title}\n") + len(f"\n## {title}\n")
    end = card.find("\n## ", start)
    return card[start : end if end != -1 else len(card)].strip("\n")


@pytest.fixture
def plugins():
    """Register plugin objects in memory for one test."""
    pm = get_plugin_manager()
    added = []

    def register(plugin):
        pm.register(plugin)
        added.append(plugin)

    yield register
    for plugin in added:
        pm.unregister(plugin)


@pytest.fixture
def reference_reports():
    return read_reports(REFERENCE_DIR)


# ---------------------------------------------------------------------------------------------
# The reference card


def test_reference_card_matches_the_reviewed_file(reference_reports):
    provenance, smoke = reference_reports
    assert render_card(load_recipe(COS_FMT), provenance, smoke, template_dirs=()) == REFERENCE


def test_reference_card_parses_back_with_huggingface_hub():
    from huggingface_hub import ModelCard

    card = ModelCard(REFERENCE)
    assert card.data.to_dict() == {
        "base_model": ["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": "mit",
        "tags": ["merge", "mergekit", "linear", "open-rs", "grpo", "reasoning"],
        "registry": {
            "recipe_sha256": load_recipe(COS_FMT).sha256,
            "merge_identity": "d1c26791d33ecfcf53eae6d279eaadc4aa32b01aa681f1deb494ffa527a8c47f",
            "version": "0.1.0",
            "sources": {"cos": {"label": "GRPO, cosine reward, step 50"}, "fmt": {"label": "GRPO, format reward, step 50"}},
        },
    }
    assert metadata_problems(card.data.to_dict()) == []
    assert card.text.startswith("\n# merge_linear_cos0.3fmt0.7_MRL4096_ROLLOUT4_LR1e-6\n")


def test_cli_prints_the_reference_card_fast_and_without_torch():
    env = {**os.environ, "REGISTRY_LOAD_PLUGINS": ""}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from registry.cli import main; main()",
         "card", str(COS_FMT), "--model-dir", str(REFERENCE_DIR)],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == REFERENCE
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert sorted(m for m in imported if m.split(".")[0] in HEAVY) == []
    assert "jinja2.sandbox" in imported  # the import log is complete, so the check above means something
    # Interpreter start, typer, pydantic and jinja2 included; about 0.5 s on an idle two-core machine.
    assert elapsed < 2.0, f"registry card took {elapsed:.2f} s"


def test_cli_writes_the_card_and_reports_json(tmp_path):
    out = tmp_path / "README.md"
    cmd = ["card", str(COS_FMT), "--model-dir", str(REFERENCE_DIR), "-o", str(out)]
    result = subprocess.run([sys.executable, "-c", "from registry.cli import main; main()", *cmd],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {out} for Zachary1150/merge_linear_cos0.3fmt0.7_MRL4096_ROLLOUT4_LR1e-6 (provenance.json, smoke.json)\n"
    assert out.read_text(encoding="utf-8") == REFERENCE
    assert not list(tmp_path.glob(".*.tmp"))

    result = subprocess.run([sys.executable, "-c", "from registry.cli import main; main()",
                             "card", str(COS_FMT), "--format", "json"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["repo_id"] == "Zachary1150/merge_linear_cos0.3fmt0.7_MRL4096_ROLLOUT4_LR1e-6"
    assert (data["output"], data["provenance"], data["smoke"]) == (None, False, False)
    assert data["metadata"]["base_model"] == ["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"]
    assert data["card"].startswith("---\nbase_model:\n- deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B\n")


def test_signed_card_records_the_key_fingerprint_and_links_the_signature(reference_reports):
    provenance, smoke = reference_reports
    fingerprint = "ab" * 32
    signed = render_card(load_recipe(COS_FMT), provenance, smoke, template_dirs=(), signing_key=fingerprint)
    # Only the front matter's registry block and the provenance section change.
    added = [line for line in signed.splitlines() if line not in REFERENCE.splitlines()]
    assert added == [
        f"  signing_key: {fingerprint}",
        f"- **Signed:** [`model.sig`](model.sig), by the key with SHA-256 fingerprint `{fingerprint}`",
    ]
    assert front_matter(signed)["registry"]["signing_key"] == fingerprint


def test_sections_without_data_say_so():
    card = render(recipe_text())
    assert section(card, "Smoke tests") == "No smoke-test report was found for this model: it has not been checked to load or generate."
    assert section(card, "Provenance") == (
        "- **Recipe sha256:** `" + parse_recipe(recipe_text(), "t.yaml").sha256 + "`\n"
        "- **Recipe:** [`recipe.yaml`](recipe.yaml), its sources pinned in [`recipe.lock.json`](recipe.lock.json)\n\n"
        "No provenance report was found: the file hashes and tool versions of these weights are not recorded here."
    )
    assert "| `cos` | GRPO, cosine reward | local checkpoint, not on the Hub | not recorded |" in card
    assert "- It has no smoke-test report: nothing here shows that it loads or generates." in card
    # No Hub parent and no ancestor: no base_model at all, rather than a made-up one.
    assert "base_model" not in front_matter(card)


# ---------------------------------------------------------------------------------------------
# Templates and plugins


def test_team_template_extends_the_default(tmp_path, reference_reports):
    (tmp_path / "model_card.md.j2").write_text(
        '{% extends "default:model_card.md.j2" %}\n'
        "{% block limitations %}\n"
        "{{ super() -}}\n"
        "- Internal use only: ask the merges channel before deploying {{ name }}.\n"
        "{% endblock %}\n"
    )
    card = render_card(load_recipe(COS_FMT), *reference_reports, template_dirs=[tmp_path])
    anchor = "- Its parents are not published: they are identified here by label and weight hash only.\n"
    extra = "- Internal use only: ask the merges channel before deploying merge_linear_cos0.3fmt0.7_MRL4096_ROLLOUT4_LR1e-6.\n"
    assert card == REFERENCE.replace(anchor, anchor + extra)


def test_template_search_order_is_team_then_plugins_then_default(tmp_path, plugins):
    team, plugin_dir = tmp_path / "team", tmp_path / "plugin"
    for folder, who in ((team, "team"), (plugin_dir, "plugin")):
        folder.mkdir()
        (folder / "model_card.md.j2").write_text(
            '{% extends "default:model_card.md.j2" %}{% block title %}\n\n# ' + who + " card\n{% endblock %}"
        )

    class TemplatePlugin:
        @hookimpl
        def register_template_dirs(self):
            return [plugin_dir]

    plugins(TemplatePlugin())
    recipe = parse_recipe(recipe_text(), "t.yaml")
    from registry.templating import template_dirs

    assert template_dirs(team) == [team, plugin_dir]
    assert "\n# team card\n" in render_card(recipe, template_dirs=template_dirs(team))
    assert "\n# plugin card\n" in render_card(recipe, template_dirs=[plugin_dir])
    assert "\n# test-merge\n" in render_card(recipe, template_dirs=[])


def test_plugin_sections_come_before_provenance(plugins):
    seen = {}

    class EvalPlugin:
        @hookimpl
        def card_sections(self, recipe, result):
            seen["args"] = (recipe.repo_id, result)
            return [("Evaluation", "| task | score |\n|---|---:|\n| gsm8k | 71.2 |")]

    class QuietPlugin:
        @hookimpl
        def card_sections(self, recipe, result):
            return None

    plugins(EvalPlugin())
    plugins(QuietPlugin())
    smoke = smoke_of()
    card = render(recipe_text(), smoke=smoke)
    assert seen["args"] == ("team/test-merge", {"provenance": None, "smoke": smoke})
    assert "\n## Evaluation\n\n| task | score |\n|---|---:|\n| gsm8k | 71.2 |\n\n## Provenance\n" in card


def test_template_errors_name_the_template_line(tmp_path):
    (tmp_path / "model_card.md.j2").write_text("---\n{{ front_matter }}---\n\n{{ no_such_field }}\n")
    with pytest.raises(CardError) as err:
        render(recipe_text(), template_dirs=[tmp_path])
    assert str(err.value).endswith("model_card.md.j2:4: 'no_such_field' is undefined (fix the template)")

    (tmp_path / "model_card.md.j2").write_text("{% block x %}\n")
    with pytest.raises(CardError) as err:
        render(recipe_text(), template_dirs=[tmp_path])
    assert "model_card.md.j2:1: template syntax error: Unexpected end of template." in str(err.value)


def test_template_without_registry_metadata_is_refused(tmp_path):
    (tmp_path / "model_card.md.j2").write_text("---\nlicense: mit\n---\n\n# {{ name }}\n")
    with pytest.raises(CardError) as err:
        render(recipe_text(), template_dirs=[tmp_path])
    sha = parse_recipe(recipe_text(), "t.yaml").sha256
    assert str(err.value) == (
        f"card metadata for team/test-merge lacks registry.recipe_sha256 {sha[:12]}…, which publishing compares "
        "(keep the default template's front matter block)"
    )


# ---------------------------------------------------------------------------------------------
# Metadata


def test_hub_parents_are_base_models_with_pinned_links():
    text = """\
repo_id: team/hub-merge
license: other
license_name: research-only
license_link: https://example.com/license
ancestor: deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
tags: [reasoning, merge]
sources:
  a: {model: open-r1/OpenR1-Qwen-1.5B, label: "Open R1"}
  b: {model: ./checkpoints/b, hub_id: team/b-published, label: "Ours"}
merge:
  merge_method: linear
  models:
    - {model: a, parameters: {weight: [{filter: self_attn, value: 0.2}, {value: 0.5}]}}
    - {model: b, parameters: {weight: 0.5}}
    - {model: Qwen/Qwen2.5-1.5B@main, parameters: {weight: 0.1}}
"""
    recipe = parse_recipe(text, "t.yaml")
    sha = "0123456789abcdef0123456789abcdef01234567"
    provenance = provenance_of({
        "a": SourcePin(kind="hub", repo_id="open-r1/OpenR1-Qwen-1.5B", revision=sha,
                       weight=[{"filter": "self_attn", "value": 0.2}, {"value": 0.5}]),
        "b": SourcePin(kind="local", content_sha256="b" * 64, weight=0.5),
        # Recorded without a commit: the card says it is not pinned rather than invent one.
        "Qwen/Qwen2.5-1.5B@main": SourcePin(kind="hub", repo_id="Qwen/Qwen2.5-1.5B", weight=0.1),
    }, config_donor="a")
    card = render_card(recipe, provenance, None, template_dirs=())
    meta = front_matter(card)
    assert meta["base_model"] == ["open-r1/OpenR1-Qwen-1.5B", "team/b-published", "Qwen/Qwen2.5-1.5B"]
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "research-only", "https://example.com/license")
    assert meta["tags"] == ["merge", "mergekit", "linear", "reasoning"]
    assert metadata_problems(meta) == []
    rows = [line for line in section(card, "Source models").splitlines() if line.startswith("| `")]
    assert rows == [
        "| `a` | Open R1 | [open-r1/OpenR1-Qwen-1.5B](https://huggingface.co/open-r1/OpenR1-Qwen-1.5B) | "
        f"commit [`{sha}`](https://huggingface.co/open-r1/OpenR1-Qwen-1.5B/tree/{sha}) |",
        "| `b` | Ours | local checkpoint, published as [team/b-published](https://huggingface.co/team/b-published) | "
        "weights sha256 `" + "b" * 64 + "` |",
        "| `Qwen/Qwen2.5-1.5B@main` | none | [Qwen/Qwen2.5-1.5B](https://huggingface.co/Qwen/Qwen2.5-1.5B) | `main`, not pinned to a commit |",
    ]
    assert "| `a` | Open R1 | 0.2 for self\\_attn; 0.5 otherwise |" in card
    assert "- Some of its parents" not in card and "- Its parents are not published" not in card
    assert "./checkpoints" not in card and "checkpoints/b" not in card


@pytest.mark.parametrize(
    "meta, problem",
    [
        ({"base_model": ["owner/name", "no-namespace"]}, "base_model: 'no-namespace' is not a Hub repo id: expected 'owner/name'"),
        ({"base_model": "a/b", "base_model_relation": "merged"}, "base_model_relation: 'merged' is not one of adapter, merge, quantized, finetune"),
        ({"base_model_relation": "merge"}, "base_model_relation without base_model"),
        ({"license": "MIT"}, "license: 'MIT' is not a Hub license id"),
        ({"license": "other", "license_name": "x"}, "license: 'other' needs license_name and license_link"),
        ({"tags": "merge"}, "tags must be a list of strings"),
    ],
)
def test_metadata_checks_mirror_the_hub(meta, problem):
    assert metadata_problems(meta) == [problem]


@pytest.mark.parametrize("edits, message", [
    ([("weight: 0.3", "weight: 0.4")], "its weight of cos is 0.3, this recipe's is 0.4"),
    ([("model: fmt,", "model: other,"), ("  fmt: {model", "  other: {model")], "its sources are cos, fmt, this recipe merges cos, other"),
])
def test_provenance_of_another_merge_is_refused(reference_reports, edits, message):
    provenance, _ = reference_reports
    text = recipe_text()
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    assert render(recipe_text(), provenance=provenance)  # the same merge settings: accepted
    with pytest.raises(CardError) as err:
        render(text, provenance=provenance)
    assert str(err.value) == f"provenance.json was written for another merge: {message} (re-run `registry merge`)"


def test_smoke_report_of_another_merge_or_other_settings_is_refused(reference_reports):
    provenance, smoke = reference_reports
    recipe = load_recipe(COS_FMT)
    assert smoke.smoke_identity == smoke_identity(provenance.merge_identity, recipe)
    other_merge = smoke.model_copy(update={"merge_identity": "f" * 64})
    with pytest.raises(CardError) as err:
        render_card(recipe, provenance, other_merge, template_dirs=())
    assert str(err.value) == (
        f"smoke.json was made for another merge (merge identity ffffffffffff…, provenance.json has {provenance.merge_identity[:12]}…) "
        "(re-run `registry smoke`)"
    )
    stricter = recipe.model_copy(update={"smoke": recipe.smoke.model_copy(update={"parity": recipe.smoke.parity.model_copy(
        update={"nll_margin": 0.1})})})
    with pytest.raises(CardError) as err:
        render_card(stricter, provenance, smoke, template_dirs=())
    assert str(err.value) == (
        "smoke.json was made with other smoke settings than Zachary1150/merge_linear_cos0.3fmt0.7_MRL4096_ROLLOUT4_LR1e-6's "
        "(re-run `registry smoke`)"
    )


def test_unreadable_report_names_file_and_position(tmp_path):
    (tmp_path / "smoke.json").write_text('{"format": 2,\n "passed": tru}\n')
    with pytest.raises(ReportError) as err:
        read_reports(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'smoke.json'}: not valid JSON (Expecting value: line 2 column 12 (char 25)) "
        "(run `registry smoke` again to rewrite it)"
    )


@pytest.mark.parametrize("show, value, shown", [
    # Times: two significant digits, in s below a minute, then min, then h; rounding may carry into the next unit.
    (human_seconds, 0, "0 s"),
    (human_seconds, 0.0043219, "0.0043 s"),
    (human_seconds, 0.05, "0.050 s"),
    (human_seconds, 0.4321987, "0.43 s"),
    (human_seconds, 9.96, "10 s"),
    (human_seconds, 12.3456789, "12 s"),
    (human_seconds, 59.4, "59 s"),
    (human_seconds, 59.7, "1.0 min"),
    (human_seconds, 77.73219, "1.3 min"),
    (human_seconds, 599.0, "10 min"),
    (human_seconds, 3599.0, "1.0 h"),
    (human_seconds, 9000.0, "2.5 h"),
    (human_seconds, float("nan"), "n/a"),
    # Sizes: binary units, three significant digits.
    (human_size, 0, "0 B"),
    (human_size, 1023, "1023 B"),
    (human_size, 1024, "1.00 KiB"),
    (human_size, 123456, "121 KiB"),
    (human_size, 1024 * 1024 - 1, "1.00 MiB"),
    (human_size, 123456789, "118 MiB"),
    (human_size, 3725541376, "3.47 GiB"),
    (human_size, 3 * 1024**4 + 12345, "3.00 TiB"),
    # Fractions as percentages, three significant digits; an NLL with three decimals.
    (human_percent, 0.5, "50%"),
    (human_percent, 1 / 3, "33.3%"),
    (human_percent, 0.125, "12.5%"),
    (human_percent, 1.0, "100%"),
    (human_number, 0.30213456789, "0.302"),
    (human_number, 1.9999999, "2.000"),
])
def test_numbers_are_shown_rounded_for_people(show, value, shown):
    assert show(value) == shown


def test_a_card_shows_measured_floats_rounded():
    smoke = smoke_of(
        long=[
            {"tokens": 4096, "depth": 1 / 3, "status": "retrieved", "seconds": 0.4321987, "peak_memory_bytes": 3725541376},
            {"tokens": 32768, "depth": 0.5, "status": "retrieved", "seconds": 12.3456789, "peak_memory_bytes": 123456789},
            {"tokens": 131072, "depth": 0.9, "status": "retrieved", "seconds": 77.73219, "peak_memory_bytes": 9512345678},
        ],
        parity=[{"model": "merged", "nll": 0.30213456789, "long_retrieved": 3, "long_total": 3},
                {"model": "cos", "nll": 1.9999999, "long_retrieved": 2, "long_total": 3, "kl": 0.12345678, "top1_agreement": 11 / 12}],
    )
    recipe = recipe_text().replace("weight: 0.3}", "weight: 0.30000000000000004}")
    card = render(recipe, smoke=smoke)
    body = section(card, "Smoke tests")
    assert (
        "| Context tokens | Depth | Result | Time | Peak memory |\n"
        "|---:|---:|---|---:|---:|\n"
        "| 4,096 | 33.3% | retrieved | 0.43 s | 3.47 GiB |\n"
        "| 32,768 | 50% | retrieved | 12 s | 118 MiB |\n"
        "| 131,072 | 90% | retrieved | 1.3 min | 8.86 GiB |\n"
    ) in body
    assert "| **merged** | 0.302 |  |  | 3 of 3 |\n| `cos` | 2.000 | 0.123 | 91.7% | 2 of 3 |" in body
    assert "| `cos` | GRPO, cosine reward | 0.3 |\n| `fmt` | GRPO, format reward | 0.7 |" in section(card, "Merge details")
    # Nothing shown with more decimals than a reader needs (the recipe's own YAML block aside, which is verbatim data).
    shown = card.replace(section(card, "Configuration"), "")
    assert re.findall(r"\d\.\d{4,}", shown) == []


def test_failed_smoke_is_shown_as_failed(tmp_path):
    smoke = smoke_of(**{
        "passed": False, "device": "cpu",
        "checks": [{"name": "long", "status": "failed", "reason": "pass key missed at 512 tokens", "details": {}}],
        "short": {"prompt": "Hi", "output": "```\n| not a table |\n```", "new_tokens": 5, "stopped": "eos"},
        "long": [
            {"tokens": 256, "depth": 0.5, "status": "retrieved", "reason": None, "finite": True, "seconds": 0.05, "peak_memory_bytes": 1_500_000},
            {"tokens": 512, "depth": 0.5, "status": "missed", "reason": None, "finite": False, "seconds": 0.1, "peak_memory_bytes": 2_000_000},
            {
                "tokens": 131072, "depth": 0.5, "status": "skipped", "reason": "longer than cpu_max_tokens 8192",
                "finite": None, "seconds": None, "peak_memory_bytes": None,
            },
        ],
        "parity": [
            {"model": "merged", "nll": 5.5, "long_retrieved": 1, "long_total": 2},
            {"model": "cos", "nll": None, "long_retrieved": 0, "long_total": 0},
        ],
    })
    card = render(recipe_text(), smoke=smoke)
    assert "\n> **Warning:** this model failed its smoke tests; see the smoke tests below.\n" in card
    body = section(card, "Smoke tests")
    assert body.startswith("**Failed** on cpu.\n\n| Check | Result | Notes |\n|---|---|---|\n| long | failed | pass key missed at 512 tokens |\n")
    assert "Output (5 new tokens, ended by the model):\n\n````text\n```\n| not a table |\n```\n````\n" in body
    assert (
        "| 256 | 50% | retrieved | 0.050 s | 1.43 MiB |\n"
        "| 512 | 50% | missed (non-finite logits) | 0.10 s | 1.91 MiB |\n"
        "| 131,072 | 50% | skipped: longer than cpu\\_max\\_tokens 8192 | n/a | n/a |\n"
    ) in body
    assert "| **merged** | 5.500 |  |  | 1 of 2 |\n| `cos` | n/a | n/a | n/a | n/a |" in body
    assert "- It failed its smoke tests (see above).\n- Long-context retrieval was checked up to 256 tokens.\n" in card


# ---------------------------------------------------------------------------------------------
# Nothing leaks


def test_reference_models_leaked_paths_stay_out(tmp_path):
    # The reference model's card listed its sources as /local/scratch paths, in prose and in the
    # mergekit configuration. The same merge, written as a bare mergekit config and as a recipe:
    bare = tmp_path / "cos_fmt_mergekit.yaml"
    bare.write_text(
        "models:\n"
        f"  - model: {LEAKED_PATHS[0]}\n    parameters:\n      weight: 0.3\n"
        f"  - model: {LEAKED_PATHS[1]}\n    parameters:\n      weight: 0.7\n"
        "merge_method: linear\nparameters:\n  normalize: true\ndtype: bfloat16\n"
    )
    bare_recipe = load_recipe(bare)
    # Reports name a source without an alias by its reference as written: here, the path itself.
    provenance = provenance_of(
        {path: SourcePin(kind="local", content_sha256=digit * 64, weight=w) for path, digit, w in zip(LEAKED_PATHS, "ab", (0.3, 0.7), strict=True)},
        config_donor=LEAKED_PATHS[0],
    )
    smoke = smoke_of(parity=[{"model": model, "nll": nll, "long_retrieved": 0, "long_total": 0}
                             for model, nll in (("merged", 2.0), (LEAKED_PATHS[0], 2.1), ("elsewhere", 2.2))])
    card = render_card(bare_recipe, provenance, smoke, template_dirs=())
    assert "```yaml\nmerge_method: linear\nmodels:\n- model: model_1\n  parameters:\n    weight: 0.3\n- model: model_2\n" in card
    assert "| `model_1` | none | local checkpoint, not on the Hub | weights sha256 `" + "a" * 64 + "` |" in card
    assert "| `model_2` | none | local checkpoint, not on the Hub | weights sha256 `" + "b" * 64 + "` |" in card
    assert "- **Configuration and tokenizer from:** `model_1`\n" in card
    assert "| **merged** | 2.000 |  |  | n/a |\n| `model_1` | 2.100 | n/a | n/a | n/a |\n| `(unknown model)` | 2.200 | n/a | n/a | n/a |\n" in card

    recipe = load_recipe(COS_FMT).model_copy(deep=True)
    recipe.sources["cos"].model, recipe.sources["fmt"].model = LEAKED_PATHS
    provenance, smoke = read_reports(REFERENCE_DIR)
    recipe_card = render_card(recipe, provenance, smoke, template_dirs=())
    for text in (card, recipe_card):
        for piece in ("/local", "scratch", "zli2", "global_step_50", "actor/huggingface", "MRL4096"):
            assert piece not in text.replace("merge_linear_cos0.3fmt0.7_MRL4096", "")
        assert find_leaks(text) == []


@pytest.mark.parametrize(
    "path",
    [
        "C:\\Users\\zach\\ckpt\\cos",
        "D:/zach/ckpt/cos",
        "\\\\fileserver\\zach\\ckpt\\cos",
        "~/ckpt/zach/cos",
        "~zach/ckpt/cos",
        "${CHECKPOINTS}/zach/ckpt/cos",
        "/home/zach/ckpt/cos",
        "./zach/ckpt/cos",
    ],
)
def test_source_paths_never_enter_the_card(path):
    card = render(recipe_text(cos=path))
    assert "zach" not in card and "ckpt" not in card and "fileserver" not in card
    context = json.dumps(card_context(parse_recipe(recipe_text(cos=path), "t.yaml")))
    assert "zach" not in context


@pytest.mark.parametrize(
    "label, found",
    [
        # The label shows in the front matter (registry.sources) first, then in two tables.
        ("from /local/scratch/zach/cos", "line 14:19 (front matter) contains an absolute path '/local/scratch/zach/cos' (2 more)"),
        ("copied from /home", "line 14:26 (front matter) contains an absolute path '/home' (2 more)"),
        ("C:\\Users\\zach\\cos", "line 14:14 (front matter) contains a Windows path 'C:\\Users\\zach\\cos' (2 more)"),
        # Read as Markdown, the front matter's `\\server` is one escaped backslash: the table catches it.
        ("\\\\server\\share\\cos", "line 32:11 (Merge details) contains a network (UNC) path '\\\\server\\share\\cos' (1 more)"),
        ("~/ckpt/cos", "line 14:14 (front matter) contains a home-relative path '~/ckpt/cos' (2 more)"),
        ("${CHECKPOINTS}/cos", "line 14:14 (front matter) contains an environment reference '${CHECKPOINTS}' (2 more)"),
        ("$HOME/cos", "line 14:14 (front matter) contains an environment reference '$HOME/' (2 more)"),
        ("hf_" + "a1B2" * 9, "line 14:14 (front matter) contains a Hugging Face token (hf_…) (2 more)"),
    ],
)
def test_path_or_secret_in_a_label_refuses_the_card(label, found):
    with pytest.raises(CardError) as err:
        render(recipe_text(cos_label=label))
    message = str(err.value)
    assert message == f"card for team/test-merge not written: {found} (remove it from the recipe, report or template it came from)"
    assert "a1B2a1B2" not in message


def test_environment_secret_refuses_the_card_without_printing_it(monkeypatch, tmp_path):
    token = "hf_" + "Zq9" * 12
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    with pytest.raises(CardError) as err:
        render(recipe_text(summary=f"token {token} oops"))
    assert str(err.value) == (
        "card for team/test-merge not written: line 21:7 (title) contains the value of environment variable HF_TOKEN "
        "(remove it from the recipe, report or template it came from)"
    )
    with pytest.raises(CardError) as err:
        render(recipe_text(cos_label="key 0123456789abcdef"))
    assert "contains the value of environment variable WANDB_API_KEY" in str(err.value)

    # Through the command line: one line on stderr, exit 1, no file, no token.
    recipe = tmp_path / "leaky.yaml"
    recipe.write_text(recipe_text(cos_label=f"trained with {token}"))
    out = tmp_path / "README.md"
    proc = subprocess.run(
        [sys.executable, "-c", "from registry.cli import main; main()", "card", str(recipe), "-o", str(out)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_TOKEN": token},
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (
        "error: card for team/test-merge not written: line 14:27 (front matter) contains the value of environment "
        "variable HF_TOKEN (2 more) (remove it from the recipe, report or template it came from)\n"
    )
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_path_valued_environment_variable_is_named():
    leaks = find_leaks("built in /srv/team-x/merges today\n", {"MERGE_ROOT": "/srv/team-x/merges/"})
    assert [str(leak) for leak in leaks] == ["line 1:10 (title) contains the value of environment variable MERGE_ROOT (a path)"]


def test_scan_does_not_flag_what_a_card_legitimately_holds():
    text = (
        "See [x](https://huggingface.co/org/model/tree/abc) and https://github.com/arcee-ai/mergekit.\n"
        "17/24 and 9 of 9, 3/3 retrieved; </think> and a/b/c and `model.safetensors`; ratio 1 / 2.\n"
        "weights sha256 `c859d0fccb81299280957a9eb1ab30414a12e232c4f0767bf7aa277d6870d2a1`; {{ 7*7 }} $5 cost.\n"
    )
    assert find_leaks(text, {}) == []
    assert find_leaks(REFERENCE) == []


def test_template_code_in_recipe_text_renders_literally():
    label = "{{ 7*7 }} {% for x in range(3) %}x{% endfor %}"
    card = render(recipe_text(cos_label=label, summary="{{ config.__class__ }} {# c #}"))
    assert "| `cos` | {{ 7\\*7 }} {% for x in range(3) %}x{% endfor %} | 0.3 |" in card
    assert "\n{{ config.\\_\\_class\\_\\_ }} {\\# c \\#}\n" in card
    assert "49" not in card and "xxx" not in card


def test_markdown_in_labels_cannot_break_the_layout():
    from markdown_it import MarkdownIt

    label = "a|b *c* _d_ <e> `f` [g](h) & # ~ \\ $x$"
    summary = "1. not a list <script>x</script>"
    card = render(recipe_text(cos_label=label, summary=summary))
    page = MarkdownIt("commonmark").enable("table").render(card.split("\n---\n", 1)[1])
    assert f"<td>{html.escape(label, quote=False)}</td>" in page
    assert f"<p>{html.escape(summary, quote=False)}</p>" in page
    assert "<script>" not in page and "<ol" not in page
    assert md("- x") == "\\- x" and md("0.3") == "0.3"


def test_write_card_writes_nothing_when_refused(tmp_path):
    out = tmp_path / "README.md"
    out.write_text("previous card\n")
    with pytest.raises(CardError):
        write_card(parse_recipe(recipe_text(cos_label="/home/zach/x"), "t.yaml"), out, template_dirs=())
    assert out.read_text() == "previous card\n"
    write_card(parse_recipe(recipe_text(), "t.yaml"), out, template_dirs=())
    assert out.read_text().startswith("---\nlibrary_name: transformers\n")


# ---------------------------------------------------------------------------------------------
# The usage snippet works


@pytest.mark.slow
def test_usage_snippet_runs_against_a_tiny_model(tmp_path, capsys):
    import torch
    from models import TinyConfig, build_base
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The byte-level tokenizer has 259 entries: the embedding must be at least that large.
    model_dir = build_base(tmp_path / "model", TinyConfig(vocab_size=320), dtype="float32")
    card = render(recipe_text(extra="smoke: {short: {prompt: 'The sky is', max_new_tokens: 6}}"))
    snippet = section(card, "Usage").removeprefix("```python\n").removesuffix("\n```")
    assert 'model_id = "team/test-merge"\n' in snippet
    exec(compile(snippet.replace('"team/test-merge"', repr(str(model_dir))), "usage", "exec"), {})
    printed = capsys.readouterr().out

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tokenizer("<|im_start|>user\nThe sky is<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(ids[0, prompt["input_ids"].shape[-1]:], skip_special_tokens=True)
    assert printed == expected + "\n"


def test_card_on_stdout_shows_control_characters_escaped_and_starts_no_workflow_command(tmp_path):
    text = recipe_text(summary="::error file=README.md::pwned", cos_label="GRPO \x9b31m cosine")
    (tmp_path / "r.yaml").write_text(text, encoding="utf-8")
    card = render(text)
    assert "\n::error file=README.md::pwned\n" in card and "\x9b" in card  # the card itself keeps the text as written

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "registry", "card", "r.yaml", *args], capture_output=True, text=True,
                              cwd=tmp_path, env={**os.environ, "REGISTRY_LOAD_PLUGINS": ""})

    run = cli()
    assert (run.returncode, run.stderr) == (0, "")
    # On the terminal or in a CI log: the summary line made inert, Markdown renders "\:" as ":".
    assert run.stdout == card.replace("\n::error file=", "\n\\::error file=").replace("\x9b", "\\x9b")
    run = cli("--format", "json")
    assert json.loads(run.stdout)["card"] == card
    assert "\x9b" not in run.stdout
    run = cli("-o", "[draft] README\x1b.md")
    assert run.stdout == "wrote [draft] README\\x1b.md for team/test-merge (no reports)\n"
    assert (tmp_path / "[draft] README\x1b.md").read_text(encoding="utf-8") == card
