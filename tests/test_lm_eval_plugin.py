"""The registry-lm-eval plugin, pip-installed from plugins/registry-lm-eval and found only through its
entry point, scoring the toy (tests/fixtures/toy) and merges of it with the real lm-evaluation-harness,
offline, on the pass-key task in the plugin's test folder (plugins/registry-lm-eval/tests/tasks)."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import registered_through_entry_point

from registry.errors import RegistryError
from registry.evaluate import EvalRequest, Evaluator
from registry.reports import MetricScore, TaskScores

ROOT = Path(__file__).parent.parent
PLUGIN = ROOT / "plugins" / "registry-lm-eval"
TASKS = PLUGIN / "tests" / "tasks"
TOY = ROOT / "tests" / "fixtures" / "toy"

# Every one of the 10 keys retrieved: what the toy's parents and their good merge score.
ALL_KEYS = {"toy_passkey": TaskScores(version="1.0", samples=10, metrics={"exact_match,key": MetricScore(value=1.0, stderr=0.0)})}


# ---------------------------------------------------------------------------------------------
# The plugin, installed like a third-party package


@pytest.fixture(scope="module")
def evaluator_cls(lm_eval_site):
    """The `lm-eval` evaluator class, found through the `registry` entry point of the installed distribution."""
    return registered_through_entry_point(lm_eval_site, "lm-eval", "registry-lm-eval", "register_evaluators")


@pytest.fixture(scope="module")
def plugin(evaluator_cls):
    """The installed plugin's evaluator module (its helpers: backend choice, results conversion)."""
    return sys.modules[evaluator_cls.__module__]


def request(evaluator_cls, model: Path, *, tasks: tuple[str, ...] = ("toy_passkey",), limit: int | None = None,
            generation: dict | None = None, recipe_dir: Path = PLUGIN, **options) -> EvalRequest:
    """A CPU evaluation of `model` with the plugin's test tasks (include_path relative to the plugin folder)."""
    opts = evaluator_cls.Options.model_validate({"include_path": "tests/tasks", **options})
    return EvalRequest(model_dir=model, tasks=tasks, limit=limit, generation=generation or {}, batch_size=1,
                       device="cpu", options=opts, recipe_dir=recipe_dir)


# ---------------------------------------------------------------------------------------------
# The toy's parents, their good 0.3/0.7 merge and broken merges


def _toy_recipe(folder: Path, weights: tuple[float, float], normalize: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(
        "repo_id: registry-tests/toy-eval\n"
        "sources:\n"
        f"  cos: {{model: {TOY / 'ft_cos'}}}\n"
        f"  fmt: {{model: {TOY / 'ft_fmt'}}}\n"
        "merge:\n"
        "  merge_method: linear\n"
        "  models:\n"
        f"    - {{model: cos, parameters: {{weight: {weights[0]}}}}}\n"
        f"    - {{model: fmt, parameters: {{weight: {weights[1]}}}}}\n"
        f"  parameters: {{normalize: {str(normalize).lower()}}}\n"
        "  dtype: bfloat16\n"
    )
    return path


def _merge(recipe_path: Path, out: Path) -> Path:
    """The recipe merged by registry's own merge stage (mergekit underneath)."""
    from registry.merge import merge
    from registry.recipe import load_recipe
    from registry.sources import plan

    recipe = load_recipe(recipe_path)
    return merge(recipe, plan(recipe, out=out.parent, device="cpu"), out, "cpu").out


@pytest.fixture(scope="module")
def shuffled_merge(tmp_path_factory) -> Path:
    """The 0.3/0.7 merge with its embedding rows shuffled: a broken merge no recipe can express.

    The good merge, its parents and the 1/-1 merge are scored through `registry publish` below.
    """
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("toy-eval")
    good = _merge(_toy_recipe(root / "good-recipe", (0.3, 0.7), normalize=True), root / "merge")
    shuffled = root / "shuffled"
    shutil.copytree(good, shuffled)
    tensors = load_file(str(good / "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = embed[torch.randperm(len(embed), generator=torch.Generator().manual_seed(0))].contiguous()
    save_file(tensors, str(shuffled / "model.safetensors"), metadata={"format": "pt"})
    return shuffled


# ---------------------------------------------------------------------------------------------
# The evaluator


def test_the_entry_point_registers_the_lm_eval_evaluator(evaluator_cls):
    evaluator = evaluator_cls()
    assert isinstance(evaluator, Evaluator)
    assert (evaluator_cls.name, evaluator_cls.package) == ("lm-eval", "registry-lm-eval")
    assert evaluator.version() == version("lm-eval")
    assert evaluator_cls.Options().model_dump() == {
        "backend": "auto", "include_path": [], "apply_chat_template": True, "fewshot_as_multiturn": True,
        "num_fewshot": None, "system_instruction": None, "dtype": "auto", "max_length": None, "think_end_token": None,
        "model_args": {}, "metadata": {}, "bootstrap_iters": 100000, "confirm_run_unsafe_code": False,
    }


def test_the_parents_retrieve_every_key(evaluator_cls):
    evaluator = evaluator_cls()
    assert evaluator.evaluate(request(evaluator_cls, TOY / "ft_cos")) == ALL_KEYS
    assert evaluator.evaluate(request(evaluator_cls, TOY / "ft_fmt")) == ALL_KEYS


def test_a_merge_with_shuffled_embedding_rows_scores_near_zero(evaluator_cls, shuffled_merge):
    [(task, result)] = evaluator_cls().evaluate(request(evaluator_cls, shuffled_merge)).items()
    assert (task, result.version, result.samples, list(result.metrics)) == ("toy_passkey", "1.0", 10, ["exact_match,key"])
    score = result.metrics["exact_match,key"]
    assert score.value <= 0.1
    # lm-eval's standard error of a mean over 10 samples: sqrt(p(1-p)/9).
    assert score.stderr == pytest.approx((score.value * (1 - score.value) / 9) ** 0.5)


def test_limit_and_generation_settings_reach_lm_eval(evaluator_cls):
    evaluator = evaluator_cls()
    # Three prompts; two new tokens cut "The pass key is 22134." before the key.
    short = evaluator.evaluate(request(evaluator_cls, TOY / "ft_cos", limit=3, generation={"max_gen_toks": 2}))
    assert short == {"toy_passkey": TaskScores(version="1.0", samples=3, metrics={"exact_match,key": MetricScore(value=0.0, stderr=0.0)})}


def test_a_group_reports_its_tasks_and_its_aggregate(evaluator_cls):
    result = evaluator_cls().evaluate(request(evaluator_cls, TOY / "ft_fmt", tasks=("toy_passkey_lengths",), limit=2))
    exact = {"exact_match,key": MetricScore(value=1.0, stderr=0.0)}
    assert result == {
        "toy_passkey_256": TaskScores(version="1.0", samples=2, metrics=exact),
        "toy_passkey_512": TaskScores(version="1.0", samples=2, metrics=exact),
        "toy_passkey_lengths": TaskScores(version="2.0", samples=4, metrics=exact),
    }


def test_evaluation_makes_no_network_connection(lm_eval_site):
    """A fresh process whose every socket connection and DNS lookup fails loudly (audit hook) scores the toy."""
    code = f"""
import sys
from pathlib import Path
attempts = []
def refuse(event, args):
    if event in ("socket.connect", "socket.getaddrinfo"):
        attempts.append((event, repr(args)[:200]))
        raise OSError("network refused by the test")
sys.addaudithook(refuse)
from registry.evaluate import EvalRequest
from registry_lm_eval.evaluator import LmEvalEvaluator
opts = LmEvalEvaluator.Options.model_validate({{"include_path": [{str(TASKS)!r}]}})
scores = LmEvalEvaluator().evaluate(EvalRequest(model_dir=Path({str(TOY / "ft_cos")!r}), tasks=("toy_passkey",), limit=2,
    generation={{}}, batch_size=1, device="cpu", options=opts))
print(scores["toy_passkey"].metrics["exact_match,key"].value, attempts)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(lm_eval_site)])
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == "1.0 []"


def test_offline_variables_are_set_only_while_evaluating_and_only_when_unset(plugin, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with plugin.offline():
        assert (os.environ["HF_DATASETS_OFFLINE"], os.environ["HF_HUB_OFFLINE"]) == ("1", "0")
    assert "HF_DATASETS_OFFLINE" not in os.environ and os.environ["HF_HUB_OFFLINE"] == "0"


# ---------------------------------------------------------------------------------------------
# Errors and settings


def test_an_unknown_task_is_one_error_naming_it(evaluator_cls):
    with pytest.raises(RegistryError) as err:
        evaluator_cls().evaluate(request(evaluator_cls, TOY / "ft_cos", tasks=("toy_passkey", "no_such_task")))
    assert str(err.value) == (
        f"no task named 'no_such_task' in lm-eval {version('lm-eval')} or {TASKS.resolve()}"
        " (list the known ones with `lm-eval ls tasks`, or add your task folder to the evaluator's include_path)"
    )


def test_a_missing_include_path_is_one_error_resolved_against_the_recipe(evaluator_cls, tmp_path):
    with pytest.raises(RegistryError) as err:
        evaluator_cls().evaluate(request(evaluator_cls, TOY / "ft_cos", recipe_dir=tmp_path, include_path=["tasks"]))
    assert str(err.value) == (
        f"eval include_path 'tasks' is not a folder (looked for {tmp_path / 'tasks'})"
        " (give a folder of lm-eval task YAMLs, relative to the recipe's folder)"
    )


@pytest.mark.parametrize(("options", "message"), [
    ({"backend": "tgi"}, "backend: Input should be 'auto', 'hf' or 'vllm'"),
    ({"apply_chat_template": "yes"}, "apply_chat_template: Input should be a valid boolean"),
    ({"num_fewshot": -1}, "num_fewshot: Input should be greater than or equal to 0"),
    ({"include_path": ["tasks", " "]}, "include_path: Value error, include_path entries must not be empty"),
    ({"model_args": {"pretrained": "org/other"}},
     "model_args: Value error, model_args.pretrained is set by registry: the model folder is the one being evaluated"),
    ({"model_args": {"seed": 1}},
     "model_args: Value error, model_args.seed is set by registry: set `seed` in the eval section's generation settings"),
    ({"chat_template": True}, "chat_template: Extra inputs are not permitted"),
])
def test_options_are_strict(evaluator_cls, options, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        evaluator_cls.Options.model_validate(options)
    [error] = err.value.errors()
    assert f"{'.'.join(str(p) for p in error['loc'][:1])}: {error['msg']}" == message


def test_one_include_path_may_be_a_string(evaluator_cls):
    assert evaluator_cls.Options.model_validate({"include_path": "tasks"}).include_path == ["tasks"]


def test_the_backend_is_hf_on_cpu_and_vllm_only_where_it_can_run(plugin):
    assert importlib.util.find_spec("vllm") is None  # the test install has no vLLM
    assert plugin.choose_backend("auto", "cpu") == "hf"
    assert plugin.choose_backend("auto", "cuda") == "hf"
    assert plugin.choose_backend("hf", "cuda") == "hf"
    with pytest.raises(RegistryError) as err:
        plugin.choose_backend("vllm", "cuda")
    assert str(err.value) == "the eval backend is vllm but vllm is not installed (pip install vllm on a GPU machine, or set backend: hf)"


def test_model_args_name_the_folder_by_absolute_path_and_map_options_per_backend(plugin, evaluator_cls):
    options = evaluator_cls.Options.model_validate(
        {"dtype": "bfloat16", "max_length": 32768, "think_end_token": "</think>", "model_args": {"gpu_memory_utilization": 0.8}})
    folder = Path("tests/fixtures/toy/ft_cos")
    assert plugin.model_args("hf", folder, options, 7) == {
        "pretrained": str(folder.resolve()), "dtype": "bfloat16", "max_length": 32768, "think_end_token": "</think>",
        "gpu_memory_utilization": 0.8}
    assert plugin.model_args("vllm", folder, options, 7) == {
        "pretrained": str(folder.resolve()), "dtype": "bfloat16", "max_model_len": 32768, "think_end_token": "</think>",
        "seed": 7, "gpu_memory_utilization": 0.8}


@pytest.mark.parametrize(("generation", "expected"), [
    ({"temperature": 0.6, "top_p": 0.95, "max_gen_toks": 32768, "seed": 0},
     ({"temperature": 0.6, "top_p": 0.95, "max_gen_toks": 32768, "do_sample": True}, 0)),
    ({"temperature": 0.0, "max_new_tokens": 64}, ({"temperature": 0.0, "max_gen_toks": 64, "do_sample": False}, None)),
    ({"temperature": 0.6, "do_sample": False}, ({"temperature": 0.6, "do_sample": False}, None)),
    ({}, ({}, None)),
])
def test_generation_settings_become_lm_eval_gen_kwargs(plugin, generation, expected):
    assert plugin.generation_kwargs(generation) == expected


def test_lm_eval_results_become_task_scores(plugin):
    """The layout simple_evaluate returns: `metric,filter` keys, `_stderr` entries ("N/A" when none), groups without n-samples."""
    results = {
        "results": {
            "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.0125,
                      "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": 0.0138},
            "ifeval": {"alias": "ifeval", "prompt_level_strict_acc,none": 0.3, "prompt_level_strict_acc_stderr,none": "N/A",
                       "inst_level_loose_acc,none": float("nan"), "sample_len": 541},
            "mmlu": {"alias": "mmlu", "acc,none": 0.6, "acc_stderr,none": 0.004, "name": "mmlu"},
            "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.5, "acc_stderr,none": 0.04},
            "mmlu_astronomy": {"alias": " - astronomy", "acc,none": 0.7, "acc_stderr,none": 0.03},
        },
        "group_subtasks": {"mmlu": ["mmlu_anatomy", "mmlu_astronomy"], "gsm8k": [], "ifeval": []},
        "versions": {"gsm8k": 3.0, "ifeval": 4.0, "mmlu": 2, "mmlu_anatomy": 1.0, "mmlu_astronomy": "N/A"},
        "n-samples": {"gsm8k": {"original": 1319, "effective": 100}, "ifeval": {"original": 541, "effective": 541},
                      "mmlu_anatomy": {"original": 135, "effective": 135}, "mmlu_astronomy": {"original": 152, "effective": 152}},
    }
    assert plugin.task_scores(results) == {
        "gsm8k": TaskScores(version="3.0", samples=100, metrics={
            "exact_match,strict-match": MetricScore(value=0.25, stderr=0.0125),
            "exact_match,flexible-extract": MetricScore(value=0.5, stderr=0.0138)}),
        "ifeval": TaskScores(version="4.0", samples=541, metrics={
            "prompt_level_strict_acc": MetricScore(value=0.3, stderr=None),
            "inst_level_loose_acc": MetricScore(value=None, stderr=None)}),
        "mmlu": TaskScores(version="2", samples=287, metrics={"acc": MetricScore(value=0.6, stderr=0.004)}),
        "mmlu_anatomy": TaskScores(version="1.0", samples=135, metrics={"acc": MetricScore(value=0.5, stderr=0.04)}),
        "mmlu_astronomy": TaskScores(version=None, samples=152, metrics={"acc": MetricScore(value=0.7, stderr=0.03)}),
    }


def test_the_reference_tasks_exist_in_the_installed_lm_eval(plugin):
    """The reference eval settings (README) name aime24 and minerva_math500: both ship with the lm-eval the plugin requires."""
    manager = plugin.task_manager((str(TASKS.resolve()),), "{}")  # the one the other tests built
    assert manager.match_tasks(["aime24", "minerva_math500"]) == ["aime24", "minerva_math500"]


def test_the_task_dataset_is_the_toys_chat_pass_key_prompts():
    rows = [json.loads(line) for line in (TASKS / "passkey" / "passkey.jsonl").read_text().splitlines()]
    assert [(r["tokens"], r["depth"]) for r in rows] == [(n, d) for n in (256, 512) for d in (0.1, 0.3, 0.5, 0.7, 0.9)]
    from transformers import AutoTokenizer

    from registry.smoke import pass_key

    tok = AutoTokenizer.from_pretrained(TOY / "base")
    for row in rows:
        assert row["key"] == pass_key(row["tokens"], row["depth"], 5)
        assert row["prompt"].count(row["key"]) == 2 and row["prompt"].endswith(" What is the pass key?")
        assert len(tok(row["prompt"], add_special_tokens=False)["input_ids"]) == row["tokens"]


# ---------------------------------------------------------------------------------------------
# `registry publish` and `registry validate` with the installed plugin, in processes of their own

# Smoke settings under which the 1/-1 merge passes (short output not judged, parity and weights off),
# so that the eval gate alone decides.
LENIENT_SMOKE = """\
smoke:
  short: {max_new_tokens: 4, min_logit_std: 0.000001, max_repeated_ngrams: 1.0}
  long: {lengths: [128], depths: [0.5]}
  parity: {enabled: false}
  weights: {enabled: false}
"""
EVAL = """\
eval:
  evaluator: lm-eval
  tasks: [toy_passkey]
  options: {include_path: evals, dtype: bfloat16}
  gate:
    - {task: toy_passkey, metric: "exact_match,key", max_drop: 0.2}
"""


def publish_recipe(folder: Path, *, weights=(0.3, 0.7), normalize=True, summary="Toy merge") -> Path:
    """A toy recipe with an eval: section, beside a copy of the plugin's task folder (include_path: evals)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "evals").exists():
        shutil.copytree(TASKS, folder / "evals")
    path = folder / "toy.yaml"
    path.write_text(
        f"repo_id: team/toy\nsummary: {summary}\nsources:\n  cos: {{model: {TOY / 'ft_cos'}}}\n  fmt: {{model: {TOY / 'ft_fmt'}}}\n"
        "merge:\n  merge_method: linear\n  models:\n"
        f"    - {{model: cos, parameters: {{weight: {weights[0]}}}}}\n    - {{model: fmt, parameters: {{weight: {weights[1]}}}}}\n"
        f"  parameters: {{normalize: {str(normalize).lower()}}}\n  dtype: bfloat16\n" + LENIENT_SMOKE + EVAL
    )
    return path


def registry_cli(*args: str, site: Path | None, home: Path) -> subprocess.CompletedProcess:
    """`python -m registry ARGS` with the plugin's folder on the path (or not), a scratch registry home, offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REGISTRY_LOAD_PLUGINS") and not k.startswith("HF_")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT)] + ([str(site)] if site else [])), REGISTRY_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "registry", *args], capture_output=True, text=True, cwd=home.parent, env=env, timeout=900)


def test_publish_scores_the_merge_and_both_parents_into_eval_json_and_the_card_and_reuses_them(lm_eval_site, tmp_path):
    from huggingface_hub import ModelCard

    from registry import reports

    home = tmp_path / ".registry"
    recipe = publish_recipe(tmp_path / "recipes")
    first = registry_cli("publish", str(recipe), "--target", "local", "--device", "cpu", "--format", "json", site=lm_eval_site, home=home)
    assert first.returncode == 0, first.stderr[-3000:]
    outcome = json.loads(first.stdout)
    assert outcome["eval"] == {"passed": True, "reused": False, "evaluated": ["merged", "cos", "fmt"], "failed": []}
    [result] = outcome["results"]
    folder = Path(result["location"])
    report = reports.read(reports.Eval, folder)
    assert (report.evaluator, report.evaluator_version, report.device, report.limit) == ("lm-eval", version("lm-eval"), "cpu", None)
    assert report.tasks == ALL_KEYS
    assert report.parents == {"cos": ALL_KEYS, "fmt": ALL_KEYS}
    assert [(g.metric, g.passed, g.reason) for g in report.gate] == [
        ("exact_match,key", True, "1 against cos's 1: as good, within the allowed 0.2")]

    card = (folder / "README.md").read_text()
    assert ("| Task | Metric | Merged | `cos` | `fmt` |\n|---|---|---:|---:|---:|\n"
            "| `toy_passkey` | `exact_match,key` | 1 ± 0 | 1 ± 0 | 1 ± 0 |\n") in card
    assert f"Scored with `lm-eval` `{version('lm-eval')}` on cpu; each parent with the same settings" in card
    data = ModelCard.load(folder / "README.md").data
    assert data.model_name == "toy"
    assert [(r.task_type, r.dataset_type, r.dataset_name, r.metric_type, r.metric_value) for r in data.eval_results] == [
        ("text-generation", "toy_passkey", "toy_passkey", "exact_match,key", 1.0)]

    # A summary edit re-publishes the card with the scores as they were: nothing is evaluated again.
    recipe.write_text(recipe.read_text().replace("summary: Toy merge", "summary: Edited toy merge"))
    second = registry_cli("publish", str(recipe), "--target", "local", "--device", "cpu", "--format", "json", site=lm_eval_site, home=home)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(second.stdout)
    assert (again["merge"], again["eval"]) == ("skipped", {"passed": True, "reused": True, "evaluated": [], "failed": []})
    assert reports.read(reports.Eval, Path(again["results"][0]["location"])) == report

    # A broken merge of the same parents (1/-1, no normalize): only it is scored (the parents' scores are
    # cached by their pins), it retrieves almost nothing and its gate stops the publish.
    broken = publish_recipe(tmp_path / "broken", weights=(1.0, -1.0), normalize=False)
    refused = registry_cli("publish", str(broken), "--target", "local", "--device", "cpu", site=lm_eval_site, home=home)
    assert refused.returncode == 1, refused.stderr[-3000:]
    [line] = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert re.fullmatch(
        r"error: eval gate failed \(toy_passkey exact_match,key: (0|0\.1) against cos's 1: (1|0\.9) worse, over the allowed 0\.2\); "
        r"nothing was published \(fix the recipe, or publish anyway with --force\)", line), line
    assert "parent cos: scores reused" in refused.stderr and "parent fmt: scores reused" in refused.stderr
    versions = {folder.name, Path(again["results"][0]["location"]).name}
    assert {p.name for p in folder.parent.iterdir()} == versions


def test_validate_checks_the_plugins_options_and_names_the_package_when_it_is_missing(lm_eval_site, tmp_path):
    recipe = publish_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("dtype: bfloat16}", "dtype: bf16, chat_template: true}"))
    home = tmp_path / ".registry"
    run = registry_cli("validate", str(recipe), site=lm_eval_site, home=home)
    assert run.returncode == 1
    line = recipe.read_text().splitlines().index("  options: {include_path: evals, dtype: bf16, chat_template: true}") + 1
    assert (run.stdout + run.stderr).splitlines() == [
        f"error {recipe}:{line}:41: eval.options.dtype: unknown dtype 'bf16' (did you mean 'bfloat16'?); expected one of float32, float16, bfloat16",
        f"error {recipe}:{line}:47: eval.options.chat_template: unknown key 'chat_template' (did you mean 'apply_chat_template'?)",
        "1 of 1 recipe invalid",
    ]

    missing = registry_cli("validate", str(publish_recipe(tmp_path / "ok")), site=None, home=home)
    assert missing.returncode == 1
    assert (missing.stdout + missing.stderr).splitlines()[0].endswith(
        ":19:14: eval.evaluator: unknown evaluator 'lm-eval': it is provided by the plugin package 'registry-lm-eval' "
        "(pip install ./plugins/registry-lm-eval)")


def test_a_task_needing_an_lm_eval_extra_names_the_extra(evaluator_cls):
    """minerva_math500 (the reference recipe's) imports sympy and math-verify, which the plugin's `math` extra installs."""
    with pytest.raises(RegistryError) as err:
        evaluator_cls().evaluate(request(evaluator_cls, TOY / "ft_cos", tasks=("minerva_math500",), limit=1))
    assert str(err.value) == (
        "lm-eval could not load minerva_math500: `sympy`, `math_verify` and `antlr4-python3-runtime==4.11` are required for "
        "generating translation task prompt templates (install the extra it needs: pip install 'registry-lm-eval[math]' for "
        "the minerva_math tasks, else the lm-eval extra its message names)")


def test_a_dataset_missing_from_the_cache_is_one_error_saying_evaluation_is_offline(evaluator_cls, monkeypatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RegistryError) as err:
        evaluator_cls().evaluate(request(evaluator_cls, TOY / "ft_cos", tasks=("toy_hub_dataset",)))
    assert str(err.value) == (
        "lm-eval could not load a dataset of toy_hub_dataset: Couldn't reach 'registry-tests/no-such-dataset' on the Hub "
        "(OfflineModeIsEnabled) (evaluation runs offline; download the dataset once with HF_DATASETS_OFFLINE=0 "
        "HF_HUB_OFFLINE=0 set, then run again)")


def test_loading_the_plugin_imports_neither_lm_eval_nor_torch(lm_eval_site):
    """`registry validate` loads every plugin to check options: the plugin's modules import lm_eval and torch only to evaluate."""
    code = ("import sys, registry_lm_eval, registry_lm_eval.evaluator; "
            "print([m for m in ('lm_eval', 'torch', 'transformers', 'datasets') if m in sys.modules])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(lm_eval_site)])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert (run.returncode, run.stdout) == (0, "[]\n"), run.stderr
