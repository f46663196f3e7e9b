"""The `lm-eval` evaluator: lm-evaluation-harness's `simple_evaluate` on a local model folder, its results as TaskScores.

lm_eval and torch are imported inside the functions that run an evaluation, so validating a
recipe's options costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from registry.errors import EvalError
from registry.evaluate import EvalRequest
from registry.reports import MetricScore, TaskScores

PACKAGE = "registry-lm-eval"
LM_EVAL = "lm-eval"
# Set to "1" for the length of an evaluation unless the user set them: tasks read cached datasets only.
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
# Keys of a row in lm-eval's `results` that are not metrics.
NOT_METRICS = frozenset({"alias", "name", "sample_len", "samples", " "})
# model_args keys that registry sets from the request or from an option of their own.
RESERVED_MODEL_ARGS = {
    "pretrained": "the model folder is the one being evaluated",
    "tokenizer": "the tokenizer is the model folder's",
    "dtype": "use the `dtype` option",
    "max_length": "use the `max_length` option",
    "max_model_len": "use the `max_length` option",
    "think_end_token": "use the `think_end_token` option",
    "seed": "set `seed` in the eval section's generation settings",
    "device": "use --device or the eval section's device",
    "batch_size": "use the eval section's batch_size",
}


class LmEvalOptions(BaseModel):
    """Options of the `lm-eval` evaluator in a recipe's `eval:` section: strict, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True, defer_build=True)

    # auto: vllm when it is installed, a GPU is present and the device is not cpu; else hf.
    backend: Literal["auto", "hf", "vllm"] = "auto"
    # Folders of the team's own task YAMLs, searched after lm-eval's; relative to the recipe's folder.
    include_path: list[str] = []
    apply_chat_template: bool = True
    # With a chat template, few-shot examples as alternating user/assistant turns (lm-eval's default).
    fewshot_as_multiturn: bool = True
    num_fewshot: int | None = Field(default=None, ge=0)  # None: each task's own
    system_instruction: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: the model's config.json
    max_length: int | None = Field(default=None, gt=0)  # context length (vLLM's max_model_len); None: the model's
    # A reasoning model's end-of-thinking marker (e.g. "</think>"): only the text after it is scored.
    think_end_token: str | None = None
    # Further backend arguments, verbatim (vLLM's gpu_memory_utilization, tensor_parallel_size, ...).
    model_args: dict[str, str | int | float | bool] = {}
    # Task metadata (e.g. RULER's max_seq_lengths), passed to every task.
    metadata: dict[str, Any] = {}
    bootstrap_iters: int = Field(default=100_000, ge=0)  # for the standard error of non-mean metrics; 0: none
    confirm_run_unsafe_code: bool = False  # tasks that execute generated code (humaneval, mbpp) refuse to run without it

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("include_path")
    @classmethod
    def _not_blank(cls, value: list[str]) -> list[str]:
        if any(not p.strip() for p in value):
            raise ValueError("include_path entries must not be empty")
        return value

    @field_validator("model_args")
    @classmethod
    def _not_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in RESERVED_MODEL_ARGS:
                raise ValueError(f"model_args.{key} is set by registry: {RESERVED_MODEL_ARGS[key]}")
        return value


class LmEvalEvaluator:
    """Scores a model folder with lm-evaluation-harness (hf backend on CPU or GPU, vLLM on a GPU)."""

    name: ClassVar[str] = "lm-eval"
    package: ClassVar[str] = PACKAGE
    Options: ClassVar[type[BaseModel]] = LmEvalOptions

    def version(self) -> str:
        """lm-eval's version (from its distribution metadata, without importing it)."""
        from importlib.metadata import version

        return version(LM_EVAL)

    def evaluate(self, request: EvalRequest) -> dict[str, TaskScores]:
        """Run `simple_evaluate` on the request's folder and tasks; every task and group lm-eval reports, by name."""
        options = request.options
        if not isinstance(options, LmEvalOptions):
            options = LmEvalOptions.model_validate(options.model_dump() if isinstance(options, BaseModel) else options)
        include = include_paths(options, request.recipe_dir)
        with offline():
            import lm_eval

            manager = task_manager(tuple(str(p) for p in include), json.dumps(options.metadata, sort_keys=True))
            check_tasks(request.tasks, manager, include)
            backend = choose_backend(options.backend, request.device)
            gen_kwargs, seed = generation_kwargs(request.generation)
            seeds = {} if seed is None else {
                "random_seed": seed, "numpy_random_seed": seed, "torch_random_seed": seed, "fewshot_random_seed": seed}
            try:
                results = lm_eval.simple_evaluate(
                    model=backend,
                    model_args=model_args(backend, request.model_dir, options, seed),
                    tasks=list(request.tasks),
                    task_manager=manager,
                    num_fewshot=options.num_fewshot,
                    batch_size=request.batch_size,
                    device=None if backend == "vllm" else device_for(request.device),
                    limit=request.limit,
                    gen_kwargs=gen_kwargs or None,
                    apply_chat_template=options.apply_chat_template,
                    fewshot_as_multiturn=options.fewshot_as_multiturn and options.apply_chat_template,
                    system_instruction=options.system_instruction,
                    bootstrap_iters=options.bootstrap_iters,
                    confirm_run_unsafe_code=options.confirm_run_unsafe_code,
                    metadata=options.metadata or None,
                    log_samples=False,
                    **seeds,
                )
            except ModuleNotFoundError as exc:  # a task's utils.py imports what one of lm-eval's extras installs
                first = str(exc).split(". ")[0]
                raise EvalError(f"lm-eval could not load {', '.join(request.tasks)}: {first}",
                                f"install the extra it needs: pip install '{PACKAGE}[math]' for the minerva_math tasks, "
                                "else the lm-eval extra its message names") from exc
            except ConnectionError as exc:  # what datasets raises offline for a dataset not in its cache
                raise EvalError(
                    f"lm-eval could not load a dataset of {', '.join(request.tasks)}: {exc}",
                    "evaluation runs offline; download the dataset once with HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 set, then run again",
                ) from exc
        if results is None:  # only ranks other than 0 of a multi-process run get None
            raise EvalError("lm-eval returned no results (not the main process of a distributed run)")
        return task_scores(results)


# ---------------------------------------------------------------------------------------------
# Settings for lm-eval


def include_paths(options: LmEvalOptions, recipe_dir: Path | None) -> list[Path]:
    """The include_path folders, relative ones resolved against the recipe's folder; a missing one is an EvalError."""
    base = recipe_dir or Path.cwd()
    paths = [Path(p).expanduser() if Path(p).expanduser().is_absolute() else base / p for p in options.include_path]
    for given, path in zip(options.include_path, paths, strict=True):
        if not path.is_dir():
            raise EvalError(f"eval include_path '{given}' is not a folder (looked for {path})",
                            "give a folder of lm-eval task YAMLs, relative to the recipe's folder")
    return [p.resolve() for p in paths]


@functools.lru_cache(maxsize=4)
def task_manager(include: tuple[str, ...], metadata: str) -> Any:
    """lm-eval's TaskManager over its own tasks and `include`, built once per process (indexing every task YAML takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, metadata=json.loads(metadata) or None)


def check_tasks(tasks: tuple[str, ...], manager: Any, include: list[Path]) -> None:
    """An EvalError naming the tasks neither lm-eval nor the include_path folders define."""
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f"lm-eval {_lm_eval_version()}" + (f" or {', '.join(str(p) for p in include)}" if include else "")
        raise EvalError(f"no task named {', '.join(repr(t) for t in unknown)} in {where}",
                        "list the known ones with `lm-eval ls tasks`, or add your task folder to the evaluator's include_path")


def choose_backend(backend: str, device: str) -> str:
    """`hf` or `vllm`: auto picks vllm when it is installed, the device is not cpu and a GPU is present."""
    if backend == "hf":
        return "hf"
    vllm = importlib.util.find_spec("vllm") is not None
    if backend == "vllm":
        if not vllm:
            raise EvalError("the eval backend is vllm but vllm is not installed", "pip install vllm on a GPU machine, or set backend: hf")
        if device.startswith("cpu") or not _cuda():
            raise EvalError(f"the eval backend vllm needs a GPU, and the device is {device}",
                            "run with --device cuda on a GPU machine, or set backend: hf")
        return "vllm"
    return "vllm" if vllm and not device.startswith("cpu") and _cuda() else "hf"


def device_for(device: str) -> str:
    """The torch device for the hf backend: `auto` becomes cuda when a GPU is present, else cpu."""
    if device == "auto":
        return "cuda" if _cuda() else "cpu"
    return device


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def model_args(backend: str, model_dir: Path, options: LmEvalOptions, seed: int | None) -> dict[str, Any]:
    """The backend's arguments: the folder as an absolute path, so lm-eval never reads it as a Hub repo id."""
    args: dict[str, Any] = {"pretrained": str(Path(model_dir).resolve()), "dtype": options.dtype}
    if options.max_length is not None:
        args["max_model_len" if backend == "vllm" else "max_length"] = options.max_length
    if options.think_end_token is not None:
        args["think_end_token"] = options.think_end_token
    if backend == "vllm" and seed is not None:
        args["seed"] = seed
    return {**args, **options.model_args}


def generation_kwargs(generation: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
    """(lm-eval gen_kwargs, seed): `max_new_tokens` read as `max_gen_toks`; sampling switched on by a temperature above 0.

    lm-eval merges gen_kwargs into each task's own settings, and tasks such as aime24 say
    `do_sample: false`: a recipe's temperature alone would then be ignored by the hf backend.
    """
    kwargs = dict(generation)
    seed = kwargs.pop("seed", None)
    if "max_new_tokens" in kwargs:
        kwargs.setdefault("max_gen_toks", kwargs.pop("max_new_tokens"))
    temperature = kwargs.get("temperature")
    if "do_sample" not in kwargs and isinstance(temperature, int | float):
        kwargs["do_sample"] = temperature > 0
    return kwargs, seed


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """HF_DATASETS_OFFLINE and HF_HUB_OFFLINE set to 1 while lm-eval runs, unless the user set them."""
    unset = [name for name in OFFLINE_VARIABLES if name not in os.environ]
    for name in unset:
        os.environ[name] = "1"
    try:
        yield
    finally:
        for name in unset:
            os.environ.pop(name, None)


def _lm_eval_version() -> str:
    return LmEvalEvaluator().version()


# ---------------------------------------------------------------------------------------------
# lm-eval's results as TaskScores


def task_scores(results: Mapping[str, Any]) -> dict[str, TaskScores]:
    """Each row of lm-eval's results (tasks and groups) as TaskScores.

    A row's keys are `metric,filter` and `metric_stderr,filter`; a metric under the `none` filter is
    named `metric`, any other `metric,filter` as lm-eval writes it (gsm8k: `exact_match,strict-match`).
    """
    versions = results.get("versions", {})
    subtasks = results.get("group_subtasks", {})
    counts = results.get("n-samples", {})
    scores = {}
    for task, row in results["results"].items():
        metrics = {}
        for key, value in row.items():
            metric, _, filter_name = key.partition(",")
            if key in NOT_METRICS or metric.endswith("_stderr") or not _number(value):
                continue
            stderr = row.get(f"{metric}_stderr,{filter_name}" if filter_name else f"{metric}_stderr")
            name = metric if filter_name in ("", "none") else f"{metric},{filter_name}"
            metrics[name] = MetricScore(value=_finite(value), stderr=_finite(stderr))
        version = versions.get(task)
        scores[task] = TaskScores(version=None if version in (None, "N/A") else str(version),
                                  samples=_samples(task, counts, subtasks), metrics=metrics)
    return scores


def _samples(task: str, counts: Mapping[str, Any], subtasks: Mapping[str, list[str]]) -> int:
    """Samples scored for a task, or for a group the sum over its tasks."""
    if task in counts:
        return int(counts[task]["effective"])
    return sum(_samples(t, counts, subtasks) for t in subtasks.get(task, []))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: Any) -> float | None:
    return float(value) if _number(value) and math.isfinite(value) else None
