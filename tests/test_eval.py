"""Evaluation: the eval: section, `registry eval`, and the eval stage of `registry publish`.

The evaluator is tests/evaluators.py's pass-key evaluator, registered through the plugin manager: a
real one (transformers generation on the toy), standing in for the lm-eval plugin, which the core
never imports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from evaluators import PassKeyEvaluator, registered

from registry import reports
from registry.errors import EvalError, PublishError, RecipeError
from registry.recipe import parse_recipe
from registry.reports import Eval, MetricScore, TaskScores

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "tests" / "fixtures" / "toy"

EVAL = """\
eval:
  evaluator: passkey
  tasks: [passkey]
  limit: 6
  generation: {max_gen_toks: 8}
  options: {tokens: 256}
  gate:
    - {task: passkey, metric: exact_match, max_drop: 0.2}
"""

# Smoke settings under which the 1/-1 merge passes (short output is not judged, parity and the weight
# check are off), so the eval gate alone decides.
LENIENT_SMOKE = """\
smoke:
  short: {max_new_tokens: 4, min_logit_std: 0.000001, max_repeated_ngrams: 1.0}
  long: {lengths: [128], depths: [0.5]}
  parity: {enabled: false}
  weights: {enabled: false}
"""


def toy_recipe(folder: Path, *, weights=(0.3, 0.7), normalize=True, smoke=LENIENT_SMOKE, eval_section=EVAL,
               summary="Toy merge", repo_id="team/toy") -> Path:
    for name in ("cos", "fmt"):
        if not (folder / "models" / name).exists():
            shutil.copytree(TOY / f"ft_{name}", folder / "models" / name)
    path = folder / "toy.yaml"
    path.write_text(
        f"repo_id: {repo_id}\nsummary: {summary}\nsources:\n  cos: {{model: ./models/cos}}\n  fmt: {{model: ./models/fmt}}\n"
        "merge:\n  merge_method: linear\n  models:\n"
        f"    - {{model: cos, parameters: {{weight: {weights[0]}}}}}\n    - {{model: fmt, parameters: {{weight: {weights[1]}}}}}\n"
        f"  parameters: {{normalize: {str(normalize).lower()}}}\n  dtype: bfloat16\n" + smoke + eval_section
    )
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_HOME", str(tmp_path / ".registry"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / ".registry"


def scores(value: float, stderr: float | None, samples: int = 6) -> dict[str, TaskScores]:
    return {"passkey": TaskScores(version="1", samples=samples, metrics={"exact_match": MetricScore(value=value, stderr=stderr)})}


# ---------------------------------------------------------------------------------------------
# The recipe's eval: section


def test_eval_options_are_checked_by_the_evaluator_with_file_line_errors():
    text = "repo_id: t/t\nmerge:\n  merge_method: linear\n  models:\n    - {model: a/b, parameters: {weight: 1}}\n" \
           "    - {model: a/c, parameters: {weight: 1}}\neval:\n  evaluator: passkey\n  tasks: [passkey]\n" \
           "  options:\n    tokens: 10\n    colour: red\n  gate:\n    - {task: pass_key, metric: exact_match, max_drop: 0.1}\n"
    with pytest.raises(RecipeError) as refused:
        parse_recipe(text, "r.yaml", evaluators={"passkey": PassKeyEvaluator})
    assert str(refused.value).splitlines() == [
        "r.yaml:11:13: eval.options.tokens: tokens should be greater than or equal to 64, got 10",
        "r.yaml:12:5: eval.options.colour: unknown key 'colour'",
        "r.yaml:14:14: eval.gate[0].task: gate task 'pass_key' (did you mean 'passkey'?) is not one of eval.tasks: passkey",
    ]
    recipe = parse_recipe(text.replace("tokens: 10", "tokens: 128").replace("    colour: red\n", "").replace("pass_key,", "passkey,"),
                          evaluators={"passkey": PassKeyEvaluator})
    assert recipe.eval.validated_options == PassKeyEvaluator.Options(tokens=128)


def test_a_recipe_with_eval_and_no_evaluator_plugin_is_one_line_naming_the_package(tmp_path):
    recipe = toy_recipe(tmp_path, eval_section="eval:\n  tasks: [aime24]\n")
    run = subprocess.run([sys.executable, "-m", "registry", "validate", str(recipe)], capture_output=True, text=True,
                         env={**os.environ, "REGISTRY_LOAD_PLUGINS": ""}, cwd=tmp_path)
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"error {recipe}:19:3: eval.evaluator: unknown evaluator 'lm-eval': it is provided by the plugin package "
        "'registry-lm-eval' (pip install ./plugins/registry-lm-eval)",
        "1 of 1 recipe invalid",
    ]
    with pytest.raises(RecipeError) as refused:
        parse_recipe(recipe.read_text().replace("tasks:", "evaluator: lmeval\n  tasks:"), "toy.yaml", evaluators={})
    assert str(refused.value) == "toy.yaml:19:14: eval.evaluator: unknown evaluator 'lmeval' (did you mean 'lm-eval'?); none is installed"


def test_eval_settings_change_no_merge_identity_and_every_score_setting_changes_the_eval_identity(tmp_path, home):
    from registry.evaluate import eval_id_for
    from registry.identity import merge_identity, smoke_identity
    from registry.recipe import load_recipe
    from registry.sources import plan

    def ids(text: str) -> tuple[str, str, str | None]:
        path = tmp_path / "r.yaml"
        path.write_text(text)
        recipe = load_recipe(path, evaluators={"passkey": PassKeyEvaluator})
        merge_id = merge_identity(recipe, plan(recipe, check_resources=False))
        return merge_id, smoke_identity(merge_id, recipe), eval_id_for(merge_id, recipe, PassKeyEvaluator) if recipe.eval else None

    base = toy_recipe(tmp_path).read_text()
    merge_id, smoke_id, eval_id = ids(base)
    assert ids(base.split("eval:")[0])[:2] == (merge_id, smoke_id)
    assert ids(base.replace("max_drop: 0.2", "max_drop: 0.05")) == (merge_id, smoke_id, eval_id)  # the gate is judged from scores
    for old, new in (("limit: 6", "limit: 7"), ("max_gen_toks: 8", "max_gen_toks: 9"), ("tokens: 256", "tokens: 512"),
                     ("tasks: [passkey]", "tasks: [passkey]\n  batch_size: 2")):
        changed = ids(base.replace(old, new))
        assert changed[:2] == (merge_id, smoke_id) and changed[2] != eval_id, old


# ---------------------------------------------------------------------------------------------
# The gate


def test_the_gate_compares_with_the_better_parent():
    from registry.evaluate import judge_gate
    from registry.recipe import GateRule

    rule = GateRule(task="passkey", metric="exact_match", max_drop=0.1)
    parents = {"cos": scores(0.5, 0.2), "fmt": scores(0.9, 0.1)}
    [ok] = judge_gate([rule], scores(0.85, 0.1), parents)
    assert (ok.passed, ok.parent, ok.parent_value, ok.reason) == (
        True, "fmt", 0.9, "0.85 against fmt's 0.9: 0.05 worse, within the allowed 0.1")
    [bad] = judge_gate([rule], scores(0.7, 0.1), parents)
    assert (bad.passed, bad.reason) == (False, "0.7 against fmt's 0.9: 0.2 worse, over the allowed 0.1")
    [lower] = judge_gate([GateRule(task="passkey", metric="exact_match", max_drop=0.1, lower_is_better=True)], scores(0.7, 0.1), parents)
    assert (lower.passed, lower.parent, lower.reason) == (False, "cos", "0.7 against cos's 0.5: 0.2 worse, over the allowed 0.1")
    [none] = judge_gate([GateRule(task="passkey", metric="acc", max_drop=0.1)], scores(0.7, 0.1), parents)
    assert (none.passed, none.reason) == (False, "the merge has no acc score on passkey (it has exact_match)")
    [alone] = judge_gate([rule], scores(0.7, 0.1), {}, {"cos": "its folder (with config.json) was not found"})
    assert (alone.passed, alone.reason) == (
        False, "no parent has a exact_match score on passkey to compare with (cos: its folder (with config.json) was not found)")


# ---------------------------------------------------------------------------------------------
# `registry publish` with an eval: section, end to end on the toy


def _version_folder(outcome) -> Path:
    [result] = outcome.results
    return Path(result.location)


def test_publish_scores_the_merge_and_its_parents_publishes_eval_json_and_never_scores_twice(tmp_path, home):
    from huggingface_hub import ModelCard

    from registry.pipeline import publish

    recipe = toy_recipe(tmp_path)
    with registered() as evaluator:
        first = publish(recipe, targets=["local"], device="cpu")
        assert first.eval == {"passed": True, "reused": False, "evaluated": ["merged", "cos", "fmt"], "failed": []}
        assert [Path(call.model_dir).name for call in evaluator.calls] == [Path(first.model_dir).name, "cos", "fmt"]
        assert [(c.tasks, c.limit, dict(c.generation), c.device) for c in evaluator.calls] == [(("passkey",), 6, {"max_gen_toks": 8}, "cpu")] * 3
        folder = _version_folder(first)
        report = reports.read(Eval, folder)
        assert report == reports.read(Eval, Path(first.model_dir))
        assert (report.evaluator, report.evaluator_version, report.device, report.limit) == ("passkey", "1", "cpu", 6)
        assert report.tasks == scores(1.0, 0.0)
        assert report.parents == {"cos": scores(1.0, 0.0), "fmt": scores(1.0, 0.0)}
        assert [(g.task, g.metric, g.passed, g.reason) for g in report.gate] == [
            ("passkey", "exact_match", True, "1 against cos's 1: as good, within the allowed 0.2")]
        assert report.merge_identity == reports.read(reports.Provenance, folder).merge_identity

        card = (folder / "README.md").read_text()
        assert (
            "| Task | Metric | Merged | `cos` | `fmt` |\n|---|---|---:|---:|---:|\n"
            "| `passkey` | `exact_match` | 1 ± 0 | 1 ± 0 | 1 ± 0 |\n"
        ) in card
        # The Hub's model-index, parsed back by huggingface_hub itself.
        data = ModelCard.load(folder / "README.md").data
        assert data.model_name == "toy"
        assert [(r.task_type, r.dataset_type, r.dataset_name, r.metric_type, r.metric_value) for r in data.eval_results] == [
            ("text-generation", "passkey", "passkey", "exact_match", 1.0)]

        # Unchanged model and settings: nothing is evaluated, nothing published.
        again = publish(recipe, targets=["local"], device="cpu")
        assert again.unchanged and len(evaluator.calls) == 3

        # A text edit publishes the card alone, with the eval report as it was.
        recipe.write_text(recipe.read_text().replace("summary: Toy merge", "summary: Edited toy merge"))
        edited = publish(recipe, targets=["local"], device="cpu")
        assert (edited.merge, edited.eval) == ("skipped", {"passed": True, "reused": True, "evaluated": [], "failed": []})
        assert len(evaluator.calls) == 3
        assert reports.read(Eval, _version_folder(edited)) == report

        # Another merge of the same parents: only the merge is scored; the parents' scores come from their cache.
        other = toy_recipe(tmp_path / "other", weights=(0.6, 0.4))
        second = publish(other, targets=["local"], device="cpu")
        assert second.eval == {"passed": True, "reused": False, "evaluated": ["merged"], "failed": []}
        assert len(evaluator.calls) == 4
        assert reports.read(Eval, _version_folder(second)).parents == report.parents


def test_a_broken_merge_scores_zero_and_its_gate_stops_the_publish_unless_forced(tmp_path, home):
    from registry.pipeline import publish

    # 1 and -1 without normalize: the difference of the two fine-tunes, which retrieves nothing.
    recipe = toy_recipe(tmp_path, weights=(1.0, -1.0), normalize=False)
    with registered() as evaluator:
        with pytest.raises(PublishError) as refused:
            publish(recipe, targets=["local"], device="cpu")
        assert str(refused.value) == (
            "eval gate failed (passkey exact_match: 0 against cos's 1: 1 worse, over the allowed 0.2); "
            "nothing was published (fix the recipe, or publish anyway with --force)")
        assert not (home / "models").exists()

        forced = publish(recipe, targets=["local"], device="cpu", force=True)
        assert forced.smoke["passed"] is True
        assert forced.eval == {"passed": False, "reused": True, "evaluated": [], "failed": ["passkey:exact_match"]}
        assert len(evaluator.calls) == 3  # the merge and both parents, once
        report = reports.read(Eval, _version_folder(forced))
        assert (report.passed, report.tasks, report.parents["fmt"]) == (False, scores(0.0, 0.0), scores(1.0, 0.0))
        card = (_version_folder(forced) / "README.md").read_text()
        assert "> **Warning:** this model failed its evaluation gate; see the evaluation below." in card
        assert "| `passkey` | `exact_match` | **failed** | 0 against cos's 1: 1 worse, over the allowed 0.2 |" in card


def test_eval_json_goes_to_the_hub_and_a_card_edit_reuses_it_from_there(tmp_path, home, hub_server, monkeypatch):
    from registry.pipeline import publish
    from registry.testing.fixtures import HUB_ORG, HUB_TOKEN, hub_client

    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    recipe = toy_recipe(tmp_path, repo_id=f"{HUB_ORG}/toy-scored")
    with registered() as evaluator:
        first = publish(recipe, targets=["hf"], device="cpu")
        assert first.eval["evaluated"] == ["merged", "cos", "fmt"]
        api = hub_client(hub_server)
        files = api.list_repo_files(f"{HUB_ORG}/toy-scored")
        assert "eval.json" in files and "smoke.json" in files
        on_hub = reports.parse(Eval, Path(api.hf_hub_download(f"{HUB_ORG}/toy-scored", "eval.json")).read_text(), "hub")
        assert on_hub == reports.read(Eval, Path(first.model_dir))

        # No build folder (a fresh CI runner): the card is re-rendered from the reports the Hub holds.
        shutil.rmtree(home / "build")
        recipe.write_text(recipe.read_text().replace("summary: Toy merge", "summary: Edited toy merge"))
        edited = publish(recipe, targets=["hf"], device="cpu")
        assert (edited.merge, edited.model_dir) == ("skipped", None)
        assert edited.eval == {"passed": True, "reused": True, "evaluated": [], "failed": []}
        assert len(evaluator.calls) == 3
        card = Path(api.hf_hub_download(f"{HUB_ORG}/toy-scored", "README.md")).read_text()
        assert "Edited toy merge" in card and "| `passkey` | `exact_match` | 1 ± 0 | 1 ± 0 | 1 ± 0 |" in card


# ---------------------------------------------------------------------------------------------
# `registry eval`


def test_cli_eval_writes_eval_json_reuses_it_and_judges_an_edited_gate_again(tmp_path, home, capsys):
    from registry.cli import main

    recipe = toy_recipe(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(TOY / "base", model)
    args = ["eval", str(model), "--recipe", str(recipe), "--device", "cpu", "--format", "json"]
    with registered() as evaluator:
        with pytest.raises(SystemExit) as done:
            main(args)
        assert done.value.code == 0
        printed = json.loads(capsys.readouterr().out)
        assert (printed["reused"], printed["evaluated"], printed["missing"]) == (False, ["merged", "cos", "fmt"], {})
        assert printed["report"] == json.loads((model / "eval.json").read_text())
        assert printed["report"]["merge_identity"] is None and printed["report"]["tasks"] == {
            "passkey": {"version": "1", "samples": 6, "metrics": {"exact_match": {"value": 1.0, "stderr": 0.0}}}}

        with pytest.raises(SystemExit) as done:
            main(args[:-2])
        assert done.value.code == 0 and len(evaluator.calls) == 3
        out = capsys.readouterr().out
        assert "passkey │ exact_match │ 1 ± 0  │ 1 ± 0 │ 1 ± 0" in out
        assert "gate passkey exact_match: passed (1 against cos's 1: as good, within the allowed 0.2)" in out

        # `registry card --model-dir` shows what `registry eval` wrote there.
        with pytest.raises(SystemExit) as done:
            main(["card", str(recipe), "--model-dir", str(model), "--format", "json"])
        card = json.loads(capsys.readouterr().out)
        assert (done.value.code, card["eval"]) == (0, True)
        assert card["metadata"]["model-index"] == [{"name": "toy", "results": [{
            "task": {"type": "text-generation", "name": "Text Generation"}, "dataset": {"name": "passkey", "type": "passkey"},
            "metrics": [{"type": "exact_match", "value": 1.0, "name": "exact_match"}]}]}]

        # The gate is judged from the scores: editing it re-judges, it does not re-evaluate.
        recipe.write_text(recipe.read_text().replace("metric: exact_match", "metric: accuracy"))
        with pytest.raises(SystemExit) as done:
            main(args)
        assert done.value.code == 1 and len(evaluator.calls) == 3
        printed = json.loads(capsys.readouterr().out)
        assert printed["reused"] is True
        assert [(g["passed"], g["reason"]) for g in printed["report"]["gate"]] == [
            (False, "the merge has no accuracy score on passkey (it has exact_match)")]
        assert reports.read(Eval, model).passed is False

        with pytest.raises(SystemExit) as done:
            main(["eval", str(model)])
        assert done.value.code == 2
        assert capsys.readouterr().err.strip() == (
            f"error: {model} holds no recipe.yaml; name the recipe with its eval: section: --recipe RECIPE")


def test_an_evaluator_failure_is_one_line_naming_the_evaluator_and_the_model(tmp_path, home):
    from registry.evaluate import run_eval
    from registry.recipe import load_recipe

    recipe = toy_recipe(tmp_path, eval_section=EVAL.replace("tasks: [passkey]", "tasks: [passkey, gsm8k]").replace(
        "    - {task: passkey, metric: exact_match, max_drop: 0.2}\n", "").replace("  gate:\n", ""))
    model = tmp_path / "model"
    shutil.copytree(TOY / "base", model)
    with registered() as evaluator, pytest.raises(EvalError) as failed:
        run_eval(model, load_recipe(recipe, evaluators={"passkey": evaluator}), evaluator, device="cpu")
    assert str(failed.value) == "unknown task 'gsm8k'; this evaluator has 'passkey'"
    assert not (model / "eval.json").exists()
