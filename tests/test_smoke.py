"""Smoke tests on real models: a random tiny Qwen2 for the mechanics, the trained toy for behaviour.

The toy (tests/fixtures/toy, ~0.5M parameters) really retrieves pass keys; its two fine-tunes are
merged here with mergekit's run_merge, and broken merges are derived from that merge with torch.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from models import CHAT_TEMPLATE

from registry.errors import RegistryError, SmokeError
from registry.plugins import get_smoke_checks
from registry.recipe import LongSmoke, ShortSmoke, SmokeConfig, load_recipe, parse_recipe
from registry.reports import Provenance, SourcePin
from registry.smoke import (
    CheckResult,
    NeedlePromptBuilder,
    PeakMemory,
    SmokeCheck,
    estimate_long_memory,
    load_model,
    longest_token_run,
    pass_key,
    prefill,
    repeated_ngram_fraction,
    run_long,
    run_smoke,
)
from registry.smoke_checks import builtin_checks

TOY = Path(__file__).parent / "fixtures" / "toy"


@pytest.fixture(scope="module", autouse=True)
def registry_home(tmp_path_factory):
    """The parents' measurement cache (under the build root) is this module's own, empty at its start."""
    home = tmp_path_factory.mktemp("registry-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REGISTRY_HOME", str(home))
        yield home
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


# ---------------------------------------------------------------------------------------------
# A random tiny Qwen2 with a locally trained tokenizer (mechanics only: it retrieves nothing)


def _tokenizer(out: Path, *, bos: bool = False, chat: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([FILLER, NEEDLE.replace("{key}", "12345"), QUESTION, "What is 17 * 24?"] * 3, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<s>" if bos else None)
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _random_model(out: Path, *, vocab: int = 300, hidden: int = 32, layers: int = 2, fill: float | None = None,
                  max_positions: int = 2048) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    if fill is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(fill)
    model.to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    _tokenizer(out)
    return _random_model(out)


@pytest.fixture(scope="module")
def tiny_loaded(tiny):
    return load_model(tiny, "cpu")


# ---------------------------------------------------------------------------------------------
# The prompt builder


@pytest.mark.parametrize("bos", [False, True])
def test_needle_prompt_has_exactly_n_tokens_and_the_needle_at_depth(tmp_path, bos):
    tok = _tokenizer(tmp_path, bos=bos)
    builder = NeedlePromptBuilder(tok, FILLER, NEEDLE, QUESTION)
    needle_len = len(tok(" " + NEEDLE.replace("{key}", "40917"), add_special_tokens=False)["input_ids"])
    question = tok(" " + QUESTION, add_special_tokens=False)["input_ids"]
    sentence = max(len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in FILLER.split(". "))
    for n in (64, 100, 257, 1000, 4096):
        for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
            prompt = builder.build(n, depth, "40917")
            assert len(prompt.ids) == n
            assert prompt.ids[-len(question):] == question
            assert (prompt.ids[0] == tok.bos_token_id) is bos
            text = tok.decode(prompt.ids, skip_special_tokens=True)
            assert text.count("The pass key is 40917. Remember it. 40917 is the pass key.") == 1
            assert text.startswith("The grass is green. ") or (prompt.needle_start == bos and text.startswith("The pass key is"))
            assert "key.The" not in text
            # The needle sits at a sentence boundary within one sentence of the requested depth.
            haystack = n - needle_len - len(question) - bos
            assert abs((prompt.needle_start - bos) - depth * haystack) <= sentence


def test_needle_prompt_too_short_for_the_needle_is_an_error(tiny_loaded):
    _, tok = tiny_loaded
    builder = NeedlePromptBuilder(tok, FILLER, NEEDLE, QUESTION)
    with pytest.raises(SmokeError, match=r"^a pass-key prompt needs at least \d+ tokens with this tokenizer, got 10$"):
        builder.build(10, 0.5, "12345")


def _digits_tokenizer(out: Path):
    """A BPE tokenizer that knows only digits and the chat tokens, with no unknown token: letters encode to nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE({**{t: i for i, t in enumerate(specials)}, **{str(d): 3 + d for d in range(10)}}, []))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _within(seconds: float, call):
    """call() in a thread: its exception or result, or a failure (not a hung test) when it is still running."""
    import threading

    outcome: dict = {}

    def target():
        try:
            outcome["result"] = call()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s: a prompt-building loop has no bound"
    return outcome


@pytest.mark.parametrize(("filler", "question", "what"), [
    (FILLER, QUESTION, "filler"),  # no letter is in the vocabulary
    ("The grass is green.", "1 2 3", "filler"),
    ("1. 2 3. 4 5 6.", QUESTION, "question"),
])
def test_a_tokenizer_that_encodes_the_prompt_text_to_nothing_is_a_clear_error_not_a_hang(tmp_path, filler, question, what):
    _digits_tokenizer(tmp_path)
    _random_model(tmp_path)
    config = SmokeConfig(short=ShortSmoke(max_new_tokens=2),
                         long=LongSmoke(lengths=[128], depths=[0.5], max_new_tokens=2, filler=filler, question=question))
    outcome = _within(120, lambda: _run(tmp_path, config))
    error = outcome.get("error")
    assert isinstance(error, SmokeError), outcome
    assert str(error) == (
        f"the tokenizer of the model in {tmp_path} encodes the long-context {what} to no tokens, so no pass-key prompt "
        f"can be built; check the model's tokenizer files, or set smoke.long.{what} to text it encodes"
    )
    # The same through the builder, for any caller, with the default name.
    outcome = _within(60, lambda: NeedlePromptBuilder(load_model(tmp_path, "cpu")[1], filler, NEEDLE, question).build(128, 0.5, "12345"))
    assert str(outcome.get("error")).startswith(f"the tokenizer of the model encodes the long-context {what} to no tokens")


def test_pass_keys_are_fixed_per_length_and_depth():
    assert pass_key(512, 0.5, 5) == pass_key(512, 0.5, 5)
    assert len({pass_key(n, d, 5) for n in (256, 512) for d in (0.1, 0.5, 0.9)}) == 6
    assert re.fullmatch(r"[1-9]\d{6}", pass_key(1024, 0.1, 7))


def test_degeneracy_measures():
    assert repeated_ngram_fraction([1, 2, 3, 4, 5, 6], 2) == 0.0
    assert repeated_ngram_fraction([1, 2, 1, 2, 1, 2], 2) == pytest.approx(3 / 5)
    assert repeated_ngram_fraction([1, 2], 4) == 0.0
    assert longest_token_run([5, 7, 7, 7, 2, 7, 7]) == 3
    assert longest_token_run([]) == 0


# ---------------------------------------------------------------------------------------------
# The long-context forward: one position of logits, bounded memory, skips instead of crashes


def test_long_context_forward_returns_logits_for_one_position_only(tiny_loaded):
    import torch

    model, _ = tiny_loaded
    ids = [(7 * i) % 290 + 5 for i in range(300)]
    whole, _ = prefill(model, ids)
    chunked, cache = prefill(model, ids, chunk_size=64)
    assert whole.shape == (1, 1, 300)
    assert chunked.shape == (1, 1, 300)
    assert cache.get_seq_length() == 300
    full = model(input_ids=torch.tensor([ids])).logits
    assert full.shape == (1, 300, 300)
    torch.testing.assert_close(whole[0, 0], full[0, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked[0, 0], full[0, -1], rtol=1e-4, atol=1e-4)


def test_long_context_memory_does_not_grow_with_tokens_times_vocabulary(tmp_path):
    # In a fresh process: memory an earlier test freed but the allocator kept would hide an allocation from RSS.
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; "
            f"from test_smoke import measure_prefill_memory; measure_prefill_memory(Path({str(tmp_path)!r}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def measure_prefill_memory(tmp_path: Path) -> None:
    """Prefill keeps only the last position's logits; an unsliced forward is seen by the same measurement."""
    vocab, n = 32_000, 4096
    _tokenizer(tmp_path)
    model, _ = load_model(_random_model(tmp_path, vocab=vocab, hidden=16, layers=1), "cpu")
    ids = [(13 * i) % vocab for i in range(n)]
    full_logits = n * vocab * 4  # what an unsliced forward materialises: 524 MB
    from registry.smoke import _read_status

    before = _read_status("VmRSS")
    with PeakMemory("cpu") as peak:
        logits, _ = prefill(model, ids)
    assert logits.shape == (1, 1, vocab)
    assert peak.bytes - before < full_logits / 4
    # The measurement does see an [N, vocab] tensor: the same forward keeping every position's logits.
    import torch

    before = _read_status("VmRSS")
    with PeakMemory("cpu") as peak, torch.inference_mode():
        model(input_ids=torch.tensor([ids]), logits_to_keep=0)
    assert peak.bytes - before > full_logits


def test_lengths_over_cpu_max_tokens_are_skipped_with_the_reason(tiny_loaded):
    model, tok = tiny_loaded
    config = LongSmoke(lengths=[128, 256], depths=[0.5], cpu_max_tokens=128, max_new_tokens=2)
    runs = run_long(model, tok, config, "cpu")
    assert [(r.tokens, r.status) for r in runs] == [(128, runs[0].status), (256, "skipped")]
    assert runs[0].status in ("retrieved", "missed") and runs[0].finite is True and runs[0].seconds > 0
    assert runs[0].peak_memory_bytes > 0 and runs[0].estimated_memory_bytes > 0
    assert runs[1].reason == (
        "256 tokens is over cpu_max_tokens (128) on CPU; run with --device cuda or raise smoke.long.cpu_max_tokens"
    )
    assert runs[1].seconds is None and runs[1].finite is None


def test_a_length_that_cannot_fit_is_skipped_not_run(tiny_loaded):
    model, tok = tiny_loaded
    config = LongSmoke(lengths=[2048], depths=[0.5], memory_fraction=1e-9)
    [run] = run_long(model, tok, config, "cpu")
    assert run.status == "skipped"
    assert re.fullmatch(r"needs about \d+ MiB, 0 MiB can be used on cpu", run.reason)
    assert run.peak_memory_bytes is None and run.output is None


def test_lengths_default_to_powers_of_four_up_to_the_context():
    from transformers import Qwen2Config

    from registry.smoke import long_lengths

    config = Qwen2Config(max_position_embeddings=131072)
    assert long_lengths(LongSmoke(), config) == ([1024, 4096, 16384, 65536, 131072], 131072)
    assert long_lengths(LongSmoke(context_tokens=5000), config) == ([1024, 4096, 5000], 5000)
    assert long_lengths(LongSmoke(context_tokens=512), config) == ([512], 512)
    assert long_lengths(LongSmoke(lengths=[512, 256, 512]), config) == ([256, 512], 131072)


def test_memory_estimate_grows_linearly_without_chunks_and_is_bounded_by_chunking():
    from transformers import Qwen2Config

    ref = Qwen2Config(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                      intermediate_size=8960, vocab_size=151936, max_position_embeddings=131072)
    gib = 1 << 30
    kv_cache = 2 * 28 * 2 * 128 * 131072 * 2  # 3.5 GiB of keys and values in bf16
    whole = estimate_long_memory(ref, 131072, dtype_bytes=2)
    chunked = estimate_long_memory(ref, 131072, dtype_bytes=2, chunk_size=4096)
    assert kv_cache < chunked < 12 * gib < whole
    assert estimate_long_memory(ref, 65536, dtype_bytes=2) < whole / 1.9


# ---------------------------------------------------------------------------------------------
# Broken models that need no parents


def test_nan_model_fails_short_and_long_for_non_finite_logits(tmp_path):
    _tokenizer(tmp_path)
    _random_model(tmp_path, fill=float("nan"))
    config = SmokeConfig(short=ShortSmoke(max_new_tokens=4), long=LongSmoke(lengths=[128], depths=[0.5], max_new_tokens=2))
    report = _run(tmp_path, config)
    checks = {c.name: (c.status, c.reason) for c in report.checks}
    assert checks["short"] == ("failed", "logits are not finite (NaN or inf) in the short generation")
    assert checks["long"] == ("failed", "logits are not finite at 128 tokens (depth 0.5)")
    assert not report.passed
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data["passed"] is False and data["long"][0]["finite"] is False


def test_missing_chat_template_is_a_clear_failure(tmp_path):
    _tokenizer(tmp_path, chat=False)
    _random_model(tmp_path)
    report = _run(tmp_path, SmokeConfig(long=LongSmoke(lengths=[128], depths=[0.5], max_new_tokens=1)))
    short = report.checks[1]
    assert (short.name, short.status) == ("short", "failed")
    assert short.reason == (
        "the tokenizer has no chat template: add chat_template.jinja to the model folder or set merge.chat_template in the recipe"
    )
    assert report.short is None


def _run(model_dir: Path, config: SmokeConfig, **kwargs):
    recipe = parse_recipe(
        "repo_id: t/t\nmerge:\n  merge_method: linear\n  models:\n"
        "    - {model: a/b, parameters: {weight: 1}}\n    - {model: a/c, parameters: {weight: 1}}\n"
    )
    recipe.smoke = config
    # No parent is at hand (a/b, a/c are not cached): weights and parity are skipped, the rest runs.
    return run_smoke(model_dir, recipe, device="cpu", **{"checks": get_smoke_checks(), **kwargs})


# ---------------------------------------------------------------------------------------------
# Checks from plugins, the report file, the command line


def test_plugin_checks_run_after_the_built_ins_and_can_fail_the_model(tiny, monkeypatch):
    from registry.hookspecs import hookimpl
    from registry.plugins import get_plugin_manager

    def vocab_check(model):
        size = model.model.config.vocab_size
        return CheckResult("vocab", "failed" if size < 1000 else "passed", f"vocabulary of {size} tokens", {"size": size})

    class Plugin:
        @hookimpl
        def register_smoke_checks(self, register):
            register(SmokeCheck("vocab", vocab_check, ("model",)))

    pm = get_plugin_manager()
    plugin = pm.register(Plugin())
    try:
        checks = get_smoke_checks()
        assert [c.name for c in checks] == ["weights", "short", "long", "parity", "vocab"]
        config = SmokeConfig(short=ShortSmoke(max_new_tokens=2), long=LongSmoke(lengths=[128], depths=[0.5], max_new_tokens=1))
        report = _run(tiny, config)
        vocab = report.checks[-1]
        assert (vocab.name, vocab.status, vocab.reason, vocab.details["size"]) == ("vocab", "failed", "vocabulary of 300 tokens", 300)
        assert not report.passed
        data = json.loads((tiny / "smoke.json").read_text())
        assert data["checks"][-1]["name"] == "vocab" and data["checks"][-1]["status"] == "failed"

        class Twice:
            @hookimpl
            def register_smoke_checks(self, register):
                register(SmokeCheck("short", vocab_check, ("model",)))

        twice = pm.register(Twice())
        try:
            with pytest.raises(RegistryError, match=r"^smoke check 'short' is registered twice$"):
                get_smoke_checks()
        finally:
            pm.unregister(name=twice)
    finally:
        pm.unregister(name=plugin)


def test_a_plugin_check_gets_complete_immutable_measurements_whatever_its_order(tiny):
    from registry.hookspecs import hookimpl
    from registry.plugins import get_plugin_manager
    from registry.smoke import SmokeSettings

    seen = {}

    def early(settings, long):
        seen["settings"], seen["long"] = settings, long
        return CheckResult("early", "passed", f"{len(long)} prompts")

    def edit_a_run(long):
        long[0].status = "retrieved"

    def add_a_run(long):
        long.append(long[0])

    def raise_the_bar(settings):
        # Its own copy of the recipe's settings: the long check below still judges with min_retrieved 0.
        settings.config.long.min_retrieved = 1.0
        return CheckResult("raise_the_bar", "passed", "changed its copy")

    def go_strict(settings):
        settings.strict = True

    class Plugin:
        @hookimpl
        def register_smoke_checks(self, register):
            register(SmokeCheck("early", early, ("settings", "long"), order=1))
            register(SmokeCheck("edit_a_run", edit_a_run, ("long",), order=2))
            register(SmokeCheck("add_a_run", add_a_run, ("long",), order=3))
            register(SmokeCheck("raise_the_bar", raise_the_bar, ("settings",), order=4))
            register(SmokeCheck("go_strict", go_strict, ("settings",), order=5))

    pm = get_plugin_manager()
    plugin = pm.register(Plugin())
    try:
        config = SmokeConfig(short=ShortSmoke(max_new_tokens=2),
                             long=LongSmoke(lengths=[128, 256], depths=[0.5, 0.9], cpu_max_tokens=128, max_new_tokens=1))
        report = _run(tiny, config)
    finally:
        pm.unregister(name=plugin)
    verdicts = {c.name: (c.status, c.reason) for c in report.checks}
    assert list(verdicts) == ["early", "edit_a_run", "add_a_run", "raise_the_bar", "go_strict", "weights", "short", "long", "parity"]
    # Ordered first, judged over every prompt: the ones run and the ones skipped, as the report records them.
    assert verdicts["early"] == ("passed", "4 prompts")
    assert isinstance(seen["long"], tuple) and seen["long"] == tuple(report.long)
    assert [(r.tokens, r.depth, r.status != "skipped") for r in seen["long"]] == [
        (128, 0.5, True), (128, 0.9, True), (256, 0.5, False), (256, 0.9, False)]
    assert isinstance(seen["settings"], SmokeSettings) and seen["settings"].config == config
    assert verdicts["edit_a_run"] == ("failed", "the check raised FrozenInstanceError: cannot assign to field 'status'")
    assert verdicts["add_a_run"] == ("failed", "the check raised AttributeError: 'tuple' object has no attribute 'append'")
    assert verdicts["go_strict"] == ("failed", "the check raised FrozenInstanceError: cannot assign to field 'strict'")
    assert verdicts["raise_the_bar"] == ("passed", "changed its copy")
    assert verdicts["long"][0] == "passed" and config.long.min_retrieved == 0.0
    assert [r.status for r in report.long] == [r.status for r in seen["long"]]
    # No parent is at hand, so none was loaded; the merged model once, whatever number of checks ran on it.
    assert report.loaded == ("merged",)


def test_a_check_needing_what_is_not_a_measurement_is_an_error(tiny):
    check = SmokeCheck("vocab", lambda vocabulary: None, ("vocabulary",))
    with pytest.raises(SmokeError) as err:
        _run(tiny, SmokeConfig(), checks=[check])
    assert str(err.value) == (
        "smoke check 'vocab' needs 'vocabulary', which is not a measurement; "
        "it can need settings, sources, model, plan, short, long, nll, logprobs, parents, weights, parity"
    )
    # A check written against the old shared context (run(ctx)) says how to register it now.
    old_style = type("OldStyle", (), {"name": "vocab", "run": lambda self, ctx: None})()
    with pytest.raises(SmokeError) as err:
        _run(tiny, SmokeConfig(), checks=[old_style])
    assert str(err.value) == (
        "smoke check 'vocab' has no judge and needs; register SmokeCheck(name, judge, needs=(...)) with the measurements it judges"
    )


def test_smoke_json_format(tiny):
    config = SmokeConfig(short=ShortSmoke(max_new_tokens=3), long=LongSmoke(lengths=[128, 256], depths=[0.5], cpu_max_tokens=128, max_new_tokens=2))
    _run(tiny, config)
    text = (tiny / "smoke.json").read_text()
    data = json.loads(text)
    assert set(data) == {"format", "smoke_identity", "merge_identity", "passed", "device", "checks", "short", "long", "parity",
                         "dtype", "dtype_reason", "estimate", "skipped", "not_checked"}
    # A folder without provenance.json: no merge identity to key the report by.
    assert data["format"] == 3 and data["device"] == "cpu" and data["smoke_identity"] is data["merge_identity"] is None
    assert [c["name"] for c in data["checks"]] == ["weights", "short", "long", "parity"]
    assert {c["name"]: c["status"] for c in data["checks"]}["weights"] == "skipped"
    assert data["checks"][0]["reason"] == (
        "source 'a/b' is not at hand: it is not in the local Hub cache; source 'a/c' is not at hand: it is not in the local Hub cache"
    )
    assert set(data["short"]) == {"prompt", "output", "new_tokens", "stopped"}
    assert data["short"]["prompt"] == "What is 17 * 24? Think step by step." and data["short"]["new_tokens"] == 3
    assert [(r["tokens"], r["depth"], r["status"]) for r in data["long"]][1] == (256, 0.5, "skipped")
    for key in ("tokens", "depth", "status", "reason", "finite", "seconds", "peak_memory_bytes"):
        assert key in data["long"][0]
    assert data["parity"] == []
    assert str(tiny) not in text and str(Path.home()) not in text


def test_cli_smoke_writes_smoke_json_and_exits_non_zero_on_failure(tiny, tmp_path, capsys):
    from registry.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "repo_id: t/t\nmerge:\n  merge_method: linear\n  models:\n"
        "    - {model: a/b, parameters: {weight: 1}}\n    - {model: a/c, parameters: {weight: 1}}\n"
        "smoke:\n  short: {max_new_tokens: 40}\n  long: {lengths: [128], depths: [0.5], max_new_tokens: 2}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["smoke", str(tiny), "--recipe", str(recipe), "--device", "cpu", "--format", "json"])
    assert exit_info.value.code == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tiny / "smoke.json").read_text())
    # This random model only emits tokens that decode to nothing.
    assert printed["checks"][1] == {"name": "short", "status": "failed", "reason": "the generation decoded to empty text (40 tokens)",
                                    "details": printed["checks"][1]["details"]}

    with pytest.raises(SystemExit) as exit_info:
        main(["smoke", str(tiny), "--recipe", str(recipe), "--device", "cpu"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1
    assert re.search(r"│ short\s+│ failed\s+│ the generation decoded to empty text \(40 tokens\)", out)
    assert "smoke failed (short)" in out

    with pytest.raises(SystemExit) as exit_info:
        main(["smoke", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nowhere'}: no config.json here; pass the folder `registry merge` wrote"


def test_recipe_smoke_settings_are_validated(tmp_path):
    from registry.errors import RecipeError

    head = ("repo_id: t/t\nmerge:\n  merge_method: linear\n  models:\n"
            "    - {model: a/b, parameters: {weight: 1}}\n    - {model: a/c, parameters: {weight: 1}}\nsmoke:\n")
    with pytest.raises(RecipeError) as err:
        parse_recipe(head + "  long: {context_tokens: 256, lengths: [128, 512]}\n", "r.yaml")
    assert str(err.value) == "r.yaml:8:9: smoke.long: lengths [512] are over context_tokens (256)"
    with pytest.raises(RecipeError) as err:
        parse_recipe(head + "  long: {needle: 'no key'}\n  parity: {nll_margn: 1}\n", "r.yaml")
    assert str(err.value) == (
        "r.yaml:8:18: smoke.long.needle: needle must contain '{key}', where the pass key goes\n"
        "r.yaml:9:12: smoke.parity.nll_margn: unknown key 'nll_margn' (did you mean 'nll_margin'?)"
    )
    ok = parse_recipe(head + "  parity: {nll_margin: 0.5}\n  weights: {tolerance: 0.01}\n  short: {max_token_run: 8}\n")
    assert (ok.smoke.parity.nll_margin, ok.smoke.weights.tolerance, ok.smoke.short.max_token_run) == (0.5, 0.01, 8)


# ---------------------------------------------------------------------------------------------
# The trained toy, a good merge of its fine-tunes (mergekit) and broken merges derived from it

SMOKE_SETTINGS = """
smoke:
  short: {max_new_tokens: 32}
  long: {lengths: [512], depths: [0.1, 0.5, 0.9], max_new_tokens: 10}
  parity: {enabled: %s}
"""


def _toy_recipe(folder: Path, weights: tuple[float, float], normalize: bool, parity: bool = True,
                sources: tuple[tuple[str, Path], tuple[str, Path]] = (("cos", TOY / "ft_cos"), ("fmt", TOY / "ft_fmt")),
                settings: str = SMOKE_SETTINGS) -> Path:
    path = folder / "recipe.yaml"
    (a, path_a), (b, path_b) = sources
    path.write_text(
        "repo_id: registry-tests/toy-merge\n"
        "sources:\n"
        f"  {a}: {{model: {path_a}}}\n"
        f"  {b}: {{model: {path_b}}}\n"
        "merge:\n"
        "  merge_method: linear\n"
        "  models:\n"
        f"    - {{model: {a}, parameters: {{weight: {weights[0]}}}}}\n"
        f"    - {{model: {b}, parameters: {{weight: {weights[1]}}}}}\n"
        f"  parameters: {{normalize: {str(normalize).lower()}}}\n"
        "  dtype: bfloat16\n"
        + settings % str(parity).lower()
    )
    return path


def _mergekit(recipe_path: Path, out: Path) -> Path:
    """The recipe's merge run by mergekit itself, so the checks judge mergekit's real output."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    recipe = load_recipe(recipe_path)
    paths = {name: source.model for name, source in recipe.sources.items()}
    config = {
        "merge_method": "linear",
        "base_model": paths[recipe.inputs()[0].name],  # pins the config and tokenizer donor
        "models": [{"model": paths[inp.name], "parameters": {"weight": inp.weight}} for inp in recipe.inputs()],
        "parameters": {"normalize": recipe.merge.parameters.normalize},
        "dtype": recipe.merge.dtype,
    }
    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(device="cpu", copy_tokenizer=True, write_model_card=False, quiet=True))
    return out


def _rewrite(src: Path, out: Path, change) -> Path:
    """A copy of the model at `src` whose tensors pass through change(name, tensor)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: change(k, v).contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _non_ascii_tokens() -> list[int]:
    """Byte-level tokens for non-ASCII bytes: no smoke prompt contains them and the trained toy never emits them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOY / "base")
    return [i for i in range(len(tok)) if not tok.decode([i]).isascii()]


@pytest.fixture(scope="module")
def toy_merges(tmp_path_factory):
    """name -> (model folder, the recipe it claims to come from): a good 0.3/0.7 merge and broken ones."""
    import torch

    root = tmp_path_factory.mktemp("toy-merges")
    (root / "recipes-good").mkdir()
    (root / "recipes-pm").mkdir()
    good_recipe = _toy_recipe(root / "recipes-good", (0.3, 0.7), normalize=True)
    pm_recipe = _toy_recipe(root / "recipes-pm", (1.0, -1.0), normalize=False, parity=False)
    good = _mergekit(good_recipe, root / "good")
    embed = "model.embed_tokens.weight"
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor(_non_ascii_tokens())

    def shuffle_rows(name, tensor):
        if name != embed:
            return tensor
        tensor = tensor.clone()
        tensor[rows] = tensor[rows.roll(1)]
        return tensor

    return {
        "good": (good, good_recipe),
        # Validation refuses 1/-1 with normalize (a zero sum), so this one is merged without it.
        "plus_minus": (_mergekit(pm_recipe, root / "plus-minus"), pm_recipe),
        # What a zero-sum normalized merge would write; built directly since validation refuses the recipe.
        "nan": (_rewrite(good, root / "nan", lambda k, v: torch.full_like(v, float("nan"))), good_recipe),
        "shuffled_embeddings": (
            _rewrite(good, root / "shuffled", lambda k, v: v[torch.randperm(len(v), generator=generator)] if k == embed else v),
            good_recipe),
        "shuffled_unused": (_rewrite(good, root / "unused", shuffle_rows), good_recipe),
    }


def _smoke(toy_merges, name):
    folder, recipe = toy_merges[name]
    return run_smoke(folder, load_recipe(recipe), device="cpu", checks=get_smoke_checks())


def _statuses(report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def test_toy_retrieves_at_512_tokens_at_three_depths():
    model, tok = load_model(TOY / "base", "cpu")
    runs = run_long(model, tok, LongSmoke(lengths=[512], depths=[0.1, 0.5, 0.9], max_new_tokens=10), "cpu")
    assert [(r.tokens, r.depth, r.status, r.finite) for r in runs] == [
        (512, 0.1, "retrieved", True), (512, 0.5, "retrieved", True), (512, 0.9, "retrieved", True)]
    for run in runs:
        assert run.output.startswith(f" {run.key}")


@pytest.fixture(scope="module")
def good_report(toy_merges):
    return _smoke(toy_merges, "good")


def test_good_merge_of_the_toy_fine_tunes_passes_every_check(toy_merges, good_report):
    report = good_report
    assert _statuses(report) == {"weights": "passed", "short": "passed", "long": "passed", "parity": "passed"}
    assert report.passed
    assert [(r.tokens, r.depth, r.status) for r in report.long] == [
        (512, 0.1, "retrieved"), (512, 0.5, "retrieved"), (512, 0.9, "retrieved")]
    weights = report.checks[0]
    assert re.fullmatch(r"\d+ tensors equal the recipe's weighted sum of 2 sources", weights.reason)
    from safetensors import safe_open

    with safe_open(str(toy_merges["good"][0] / "model.safetensors"), framework="pt") as f:
        assert weights.details["tensors_checked"] == len(list(f.keys()))
    assert weights.details["mismatched"] == weights.details["non_finite"] == weights.details["skipped"] == []
    assert [(row.model, row.long_retrieved, row.long_total) for row in report.parity] == [
        ("merged", 3, 3), ("cos", 3, 3), ("fmt", 3, 3)]
    assert report.short.output.strip()
    assert report.short.stopped == "eos" or report.short.new_tokens == 32
    saved = json.loads((toy_merges["good"][0] / "smoke.json").read_text())
    # mergekit wrote this folder without provenance.json: there is no merge identity to key the report by.
    assert saved["passed"] is True and saved["merge_identity"] is saved["smoke_identity"] is None


def test_plus_minus_merge_without_normalize_fails_for_collapsed_logits(toy_merges):
    report = _smoke(toy_merges, "plus_minus")
    short = report.checks[1]
    assert (short.name, short.status) == ("short", "failed")
    assert re.fullmatch(
        r"logits collapsed: their spread at the first step \(std [0-9.e-]+\) is under min_logit_std 0\.05", short.reason)
    # The merge is exactly what the recipe asked for: only behaviour shows it is broken.
    assert _statuses(report)["weights"] == "passed"
    assert not report.passed


def test_nan_model_fails_for_non_finite_logits_and_weights(toy_merges):
    report = _smoke(toy_merges, "nan")
    checks = {c.name: (c.status, c.reason) for c in report.checks}
    assert checks["short"] == ("failed", "logits are not finite (NaN or inf) in the short generation")
    assert checks["long"] == ("failed", "logits are not finite at 512 tokens (depth 0.1)")
    assert checks["weights"][0] == "failed"
    assert re.fullmatch(r"(\d+) of \1 merged tensors hold NaN or inf \(first: [\w.]+\)", checks["weights"][1])
    assert checks["parity"][0] == "failed" and checks["parity"][1].startswith("NLL on the fixed text is nan nats/token")


def test_shuffled_embedding_rows_are_worse_than_both_parents(toy_merges):
    report = _smoke(toy_merges, "shuffled_embeddings")
    parity = report.checks[3]
    assert (parity.name, parity.status) == ("parity", "failed")
    assert re.fullmatch(
        r"NLL on the fixed text is [0-9.]+ nats/token, worse than both parents \(cos [0-9.]+, fmt [0-9.]+\) "
        r"by more than nll_margin 0\.2", parity.reason)
    merged, cos, fmt = report.parity
    assert merged.nll > max(cos.nll, fmt.nll) + 1.0
    assert report.checks[0].status == "failed" and "first: model.embed_tokens.weight" in report.checks[0].reason


def test_the_merged_model_is_freed_before_a_parent_loads_and_disabled_parity_loads_no_parent(toy_merges, tmp_path, monkeypatch):
    import weakref

    monkeypatch.setenv("REGISTRY_HOME", str(tmp_path))  # no parent measured yet: each one is loaded

    folder, recipe_file = toy_merges["good"]
    recipe = load_recipe(recipe_file)
    merged: list[weakref.ref] = []
    alive_when_a_parent_loads: list[bool] = []

    def keep_a_reference(model):
        merged.append(weakref.ref(model.model))
        return CheckResult("model", "passed", type(model.model).__name__)

    def note(message: str) -> None:
        if message.startswith("evaluating parent"):
            alive_when_a_parent_loads.append(merged[0]() is not None)

    checks = [*builtin_checks(), SmokeCheck("model", keep_a_reference, ("model",))]
    report = run_smoke(folder, recipe, device="cpu", write=False, checks=checks, progress=note)
    assert _statuses(report) == {"weights": "passed", "short": "passed", "long": "passed", "parity": "passed", "model": "passed"}
    assert report.loaded == ("merged", "cos", "fmt")
    # One model in memory at a time: the merged one is gone when each parent loads.
    assert alive_when_a_parent_loads == [False, False]

    recipe.smoke.parity.enabled = False
    notes: list[str] = []
    report = run_smoke(folder, recipe, device="cpu", write=False, checks=builtin_checks(), progress=notes.append)
    assert _statuses(report) == {"weights": "passed", "short": "passed", "long": "passed", "parity": "skipped"}
    assert report.checks[3].reason == "disabled in the recipe (smoke.parity.enabled: false)"
    # The weights check reads the sources' files; no parent is ever loaded as a model.
    assert report.loaded == ("merged",) and report.parity == []
    assert not [n for n in notes if "parent" in n]


def test_a_shuffled_tensor_the_prompts_never_use_is_caught_by_the_weight_check_only(toy_merges, good_report):
    good = good_report
    report = _smoke(toy_merges, "shuffled_unused")
    assert _statuses(report) == {"weights": "failed", "short": "passed", "long": "passed", "parity": "passed"}
    [mismatch] = report.checks[0].details["mismatched"]
    assert mismatch["tensor"] == "model.embed_tokens.weight" and mismatch["elements"] > 0
    assert report.checks[0].reason.startswith("1 of ") and "(first: model.embed_tokens.weight, " in report.checks[0].reason
    # Behaviour is unchanged: the same text, the same retrieval, the same NLL.
    assert report.short.output == good.short.output
    assert [r.status for r in report.long] == [r.status for r in good.long]
    assert report.parity[0].nll == pytest.approx(good.parity[0].nll, abs=1e-4)


def test_a_local_source_changed_since_the_merge_is_not_used_to_check_it(tmp_path, monkeypatch):
    from registry.smoke import merge_sources
    from registry.sources import folder_content_sha256

    monkeypatch.setenv("REGISTRY_HOME", str(tmp_path / "home"))
    for name in ("cos", "fmt"):
        shutil.copytree(TOY / f"ft_{name}", tmp_path / name)
    recipe_file = _toy_recipe(tmp_path, (0.3, 0.7), normalize=True)
    recipe_file.write_text(recipe_file.read_text().replace(str(TOY / "ft_cos"), "./cos").replace(str(TOY / "ft_fmt"), "./fmt"))
    recipe = load_recipe(recipe_file)
    # The pins `plan` wrote for the example recipe (the same files) are what is computed here.
    lock = json.loads((Path(__file__).parents[1] / "recipes" / "examples" / "toy_cos_fmt.lock.json").read_text())
    pins = {name: folder_content_sha256(tmp_path / name) for name in ("cos", "fmt")}
    assert pins == {name: lock["sources"][name]["content_sha256"] for name in ("cos", "fmt")}
    provenance = _provenance({name: SourcePin(kind="local", content_sha256=pins[name], weight=w)
                              for name, w in (("cos", 0.3), ("fmt", 0.7))})
    assert [(s.name, s.path, s.missing) for s in merge_sources(recipe, provenance)] == [
        ("cos", tmp_path / "cos", None), ("fmt", tmp_path / "fmt", None)]

    weights = tmp_path / "cos" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    assert [(s.name, s.path, s.missing) for s in merge_sources(recipe, provenance)] == [
        ("cos", None, "its weights changed since the merge (their sha256 is not the one in provenance.json)"),
        ("fmt", tmp_path / "fmt", None)]


def test_sources_resolve_from_the_recipe_folder_and_environment(tmp_path, monkeypatch):
    from registry.smoke import merge_sources, resolve_local_source

    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "models" / "a" / "config.json").write_text("{}")
    monkeypatch.setenv("CKPT", str(tmp_path / "models"))
    monkeypatch.delenv("NOPE", raising=False)
    assert resolve_local_source("${CKPT}/a", None) == ((tmp_path / "models" / "a").resolve(), None)
    assert resolve_local_source("./models/a", tmp_path) == ((tmp_path / "models" / "a").resolve(), None)
    assert resolve_local_source("${NOPE}/a", tmp_path) == (None, "environment variable NOPE is not set")
    assert resolve_local_source("./models/b", tmp_path) == (None, "its folder (with config.json) was not found")
    # Without a recipe only provenance.json is known, and it never holds a local path.
    provenance = _provenance({
        "cos": SourcePin(kind="local", weight=[{"filter": "embed", "value": 0.5}, {"value": 0.3}]),
        "fmt": SourcePin(kind="local", weight=0.7)})
    cos, fmt = merge_sources(None, provenance)
    assert (cos.name, cos.path, cos.missing) == ("cos", None, "it is a local folder: pass --recipe to locate it")
    assert [(w.filter, w.value) for w in cos.weight] == [("embed", 0.5), (None, 0.3)] and fmt.weight == 0.7


def _provenance(sources: dict[str, SourcePin]) -> Provenance:
    return Provenance(merge_identity="a" * 64, merge_method="linear", dtype="bfloat16", sources=sources, config_donor="cos",
                      files={}, versions={}, device="cpu")


def test_filtered_weights_resolve_like_mergekit():
    from registry.recipe import WeightFilter
    from registry.smoke import weight_for

    weight = [WeightFilter(filter="self_attn", value=0.2), WeightFilter(filter="mlp", value=0.6), WeightFilter(value=0.5)]
    assert weight_for(weight, "model.layers.0.self_attn.q_proj.weight") == 0.2
    assert weight_for(weight, "model.layers.0.mlp.up_proj.weight") == 0.6
    assert weight_for(weight, "model.norm.weight") == 0.5
    assert weight_for([WeightFilter(filter="mlp", value=1.0)], "model.norm.weight") is None
    assert weight_for(0.3, "anything") == 0.3


def test_repetition_is_judged_against_the_parents_when_they_are_at_hand(toy_merges, tmp_path):
    from registry.recipe import ParitySmoke
    from registry.smoke_checks import builtin_checks

    short_only = [c for c in builtin_checks() if c.name == "short"]
    # Any repeated token is "degenerate" under this bar, so the merge's own text exceeds it.
    strict = SmokeConfig(short=ShortSmoke(max_new_tokens=32, ngram=1, max_repeated_ngrams=0.0),
                         long=LongSmoke(lengths=[512], depths=[0.5]), parity=ParitySmoke(retrieval=False))
    merged = tmp_path / "merge"
    shutil.copytree(toy_merges["good"][0], merged)
    for twin in ("twin_a", "twin_b"):
        shutil.copytree(toy_merges["good"][0], tmp_path / twin)
    # No parent at hand: the absolute bar applies and the merge fails it.
    [alone] = _run(merged, strict, checks=short_only).checks
    repeated, run = alone.details["repeated_ngrams"], alone.details["longest_run"]
    assert repeated > 0
    assert (alone.status, alone.reason) == (
        "failed", f"degenerate output: {repeated:.0%} of 1-grams repeat (limit 0%), longest run of one token {run} (limit 16)")
    # Parents that repeat exactly as much (copies of the merge itself): the bar rises to their level and it passes.
    recipe = parse_recipe(
        "repo_id: t/t\nsources:\n"
        f"  a: {{model: {tmp_path / 'twin_a'}}}\n  b: {{model: {tmp_path / 'twin_b'}}}\n"
        "merge:\n  merge_method: linear\n  models:\n"
        "    - {model: a, parameters: {weight: 1}}\n    - {model: b, parameters: {weight: 1}}\n"
    )
    recipe.smoke = strict
    [judged] = run_smoke(merged, recipe, device="cpu", checks=short_only).checks
    stop = "stopped on EOS" if alone.details["stopped"] == "eos" else "hit max_new_tokens (32)"
    assert (judged.status, judged.reason) == ("passed", f"{alone.details['new_tokens']} tokens, {stop}")
    assert judged.details["parents"] == {name: {"repeated_ngrams": repeated, "longest_run": run} for name in ("a", "b")}
    # With parity disabled no parent is loaded, not even to judge repetition: the absolute bar applies.
    recipe.smoke = strict.model_copy(deep=True)
    recipe.smoke.parity.enabled = False
    notes: list[str] = []
    report = run_smoke(merged, recipe, device="cpu", checks=short_only, progress=notes.append)
    assert [(c.status, c.reason) for c in report.checks] == [(alone.status, alone.reason)]
    assert "parents" not in report.checks[0].details
    assert report.loaded == ("merged",) and not [n for n in notes if "parent" in n]
    # One parent that repeats less (ft_fmt): the bar rises only to the parent that repeats least.
    recipe = parse_recipe(
        "repo_id: t/t\nsources:\n"
        f"  a: {{model: {tmp_path / 'twin_a'}}}\n  fmt: {{model: {TOY / 'ft_fmt'}}}\n"
        "merge:\n  merge_method: linear\n  models:\n"
        "    - {model: a, parameters: {weight: 1}}\n    - {model: fmt, parameters: {weight: 1}}\n"
    )
    recipe.smoke = strict
    [judged] = run_smoke(merged, recipe, device="cpu", checks=short_only).checks
    fmt = judged.details["parents"]["fmt"]
    assert judged.details["parents"]["a"] == {"repeated_ngrams": repeated, "longest_run": run}
    assert fmt["repeated_ngrams"] < repeated  # what makes the case: ft_fmt's text repeats less than the merge's
    expected = (f"degenerate output (more than the parent that repeats least): {repeated:.0%} of 1-grams repeat "
                f"(limit {fmt['repeated_ngrams']:.0%}), longest run of one token {run} (limit {max(16, min(run, fmt['longest_run']))})")
    assert (judged.status, judged.reason) == ("failed", expected)


# ---------------------------------------------------------------------------------------------
# Verdicts against the better parent: a merge with a parent that is not a relative

# The example recipe's settings: 6 pass keys (256 and 512 tokens at three depths).
EXAMPLE_SETTINGS = """
smoke:
  short: {max_new_tokens: 32}
  long: {lengths: [256, 512]}
  parity: {enabled: %s}
"""


def _untrained(out: Path, seed: int) -> Path:
    """The toy's config, tokenizer and chat template with freshly initialised weights: no relative of the fine-tunes."""
    import torch
    from transformers import AutoConfig, Qwen2ForCausalLM

    out.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOY / "ft_cos" / name, out / name)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(AutoConfig.from_pretrained(out)).to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def unrelated_merge(tmp_path_factory):
    """ft_cos merged 0.5/0.5 by mergekit with an untrained model of the same shape (seed 4: 0 of 6 pass keys)."""
    root = tmp_path_factory.mktemp("unrelated")
    untrained = _untrained(root / "untrained", seed=4)
    recipe = _toy_recipe(root, (0.5, 0.5), normalize=True, sources=(("cos", TOY / "ft_cos"), ("rnd", untrained)),
                         settings=EXAMPLE_SETTINGS)
    return _mergekit(recipe, root / "merged"), recipe


def test_a_merge_with_an_untrained_parent_fails_against_the_better_parent(unrelated_merge):
    folder, recipe_file = unrelated_merge
    recipe = load_recipe(recipe_file)
    report = run_smoke(folder, recipe, device="cpu", write=False, checks=builtin_checks())
    # Every check but parity passes: the weights are what the recipe says, the text is not degenerate by the
    # absolute bar, and the long check judges finiteness only.
    assert _statuses(report) == {"weights": "passed", "short": "passed", "long": "passed", "parity": "failed"}
    merged, cos, rnd = report.parity
    assert [(r.model, r.long_retrieved, r.long_total) for r in report.parity] == [("merged", 0, 6), ("cos", 6, 6), ("rnd", 0, 6)]
    # Before: compared with the worse parent (rnd, ~6.2 nats), the merge's ~2.1 passed.
    assert cos.nll + 1.5 < merged.nll < rnd.nll
    assert report.checks[3].reason == (
        f"NLL on the fixed text is {merged.nll:.3f} nats/token, more than best_nll_margin 0.5 over the better parent 'cos' "
        f"(cos {cos.nll:.3f}, rnd {rnd.nll:.3f})"
    )
    # The retrieval rule on its own: cos retrieves every key, the merge none.
    recipe.smoke.parity.best_nll_margin = 100.0
    parity_only = [c for c in builtin_checks() if c.name in ("long", "parity")]
    long, parity = run_smoke(folder, recipe, device="cpu", write=False, checks=parity_only).checks
    assert (long.status, long.reason) == ("passed", "retrieved 0 of 6 pass keys at up to 512 tokens")
    assert (parity.status, parity.reason) == (
        "failed", "retrieved 0 of 6 pass keys, under best_retrieval_share 50% of the better parent 'cos' (cos 6, rnd 0)")


@pytest.mark.parametrize("weights", [(0.1, 0.9), (0.5, 0.5), (0.9, 0.1)])
def test_good_merges_at_other_weights_pass_against_the_better_parent(tmp_path, weights):
    recipe = _toy_recipe(tmp_path, weights, normalize=True)
    report = run_smoke(_mergekit(recipe, tmp_path / "merged"), load_recipe(recipe), device="cpu", write=False,
                       checks=builtin_checks())
    assert _statuses(report) == {"weights": "passed", "short": "passed", "long": "passed", "parity": "passed"}
    merged, cos, fmt = report.parity
    assert [(r.model, r.long_retrieved) for r in report.parity] == [("merged", 3), ("cos", 3), ("fmt", 3)]
    # Far inside the bar (best_nll_margin 0.5): measured 0.004-0.023 nats over the better parent.
    assert merged.nll - min(cos.nll, fmt.nll) < 0.1
    # Far inside the KL gate too (max_kl 1.0, min_top1_agreement 50%): measured 0.004-0.21 nats, 88-100%.
    assert min(cos.kl, fmt.kl) < 0.25 and max(cos.top1_agreement, fmt.top1_agreement) > 0.85


# ---------------------------------------------------------------------------------------------
# Distance to the parents: KL(parent || merge) and top-1 agreement over the comparison prompts


def test_the_parity_rows_hold_kl_to_each_parent_and_top1_agreement(toy_merges, good_report):
    from rich.console import Console

    from registry.smoke import print_report

    merged, cos, fmt = good_report.parity
    assert (merged.kl, merged.top1_agreement) == (None, None)
    # 113 positions: the parity text's 90 and the short prompt's 23 through the chat template.
    # Merged 0.3/0.7, the merge is nearer fmt (benchmarks/kl_calibration.py measures the same figures).
    assert cos.kl == pytest.approx(0.4031, abs=5e-4) and fmt.kl == pytest.approx(0.1039, abs=5e-4)
    assert (cos.top1_agreement, fmt.top1_agreement) == (95 / 113, 105 / 113)
    parity = good_report.checks[3]
    assert parity.status == "passed"
    assert parity.reason == (f"NLL {merged.nll:.3f} (cos {cos.nll:.3f}, fmt {fmt.nll:.3f}); KL cos {cos.kl:.3f}, fmt {fmt.kl:.3f}, "
                             "top-1 agreement cos 84.1%, fmt 92.9%; retrieved 3 of 3 pass keys (cos 3, fmt 3)")
    assert (parity.details["max_kl"], parity.details["min_top1_agreement"]) == (1.0, 0.5)
    saved = json.loads((toy_merges["good"][0] / "smoke.json").read_text())
    assert saved["format"] == 3
    assert [(r["model"], r["kl"], r["top1_agreement"]) for r in saved["parity"]] == [
        ("merged", None, None), ("cos", cos.kl, 95 / 113), ("fmt", fmt.kl, 105 / 113)]
    console = Console(width=120, record=True, file=open("/dev/null", "w"))  # noqa: SIM115 - closed with the console
    print_report(good_report, console)
    text = console.export_text()
    assert "parity (kl: KL(parent || merge), nats/token)" in text
    assert re.search(rf"│ merged │ {merged.nll:.3f} │\s+│\s+│ 3/3 ", text)
    assert re.search(rf"│ cos\s+│ {cos.nll:.3f} │ {cos.kl:.4f} │ 84\.1% │ 3/3 ", text)
    assert re.search(rf"│ fmt\s+│ {fmt.nll:.3f} │ {fmt.kl:.4f} │ 92\.9% │ 3/3 ", text)


@pytest.mark.parametrize(("name", "far"), [
    # 1/-1 without normalize: fluent-looking logits, far from both parents.
    ("plus_minus", r"far from both parents: KL to the nearest parent 'fmt' is 5\.\d{3} nats/token \(cos 5\.\d{3}, fmt 5\.\d{3}\), "
                   r"over max_kl 1\.0"),
    ("nan", r"far from both parents: KL to the nearest parent 'cos' is nan nats/token \(cos nan, fmt nan\), over max_kl 1\.0"),
    ("shuffled_embeddings", r"far from both parents: KL to the nearest parent 'fmt' is 7\.\d{3} nats/token "
                            r"\(cos 7\.\d{3}, fmt 7\.\d{3}\), over max_kl 1\.0"),
])
def test_every_broken_merge_the_smoke_tests_build_is_far_from_both_parents(toy_merges, name, far):
    from registry.smoke_checks import far_from_parents

    folder, recipe_file = toy_merges[name]
    recipe = load_recipe(recipe_file)
    recipe.smoke.parity.enabled = True  # the 1/-1 recipe turns parity off for the short check's own test
    report = run_smoke(folder, recipe, device="cpu", write=False, checks=[c for c in builtin_checks() if c.name == "parity"])
    assert report.checks[0].status == "failed"
    parents = report.parity[1:]
    assert re.fullmatch(far, far_from_parents(recipe.smoke.parity, parents))
    # The top-1 rule alone catches each of them too: the top token agrees at 2% of positions at most.
    assert max(r.top1_agreement for r in parents) <= 2 / 113
    lenient = recipe.smoke.parity.model_copy(update={"max_kl": math.inf})
    # A KL that is not a number fails whatever the bar.
    expected = "far from both parents: " + ("KL to the nearest parent 'cos' is nan" if name == "nan" else
                                            "the top token agrees with the closest parent")
    assert far_from_parents(lenient, parents).startswith(expected)


def _endpoint_recipe(folder: Path, weights: tuple[float, float]) -> Path:
    folder.mkdir()
    return _toy_recipe(folder, weights, normalize=True)


@pytest.mark.parametrize(("weights", "same", "other"), [((0.0, 1.0), "fmt", "cos"), ((1.0, 0.0), "cos", "fmt")])
def test_an_endpoint_of_the_family_reproduces_its_parent_exactly(tmp_path, weights, same, other):
    import torch
    from safetensors.torch import load_file

    from registry.smoke import parent_endpoints

    recipe_file = _endpoint_recipe(tmp_path / "recipe", weights)
    folder = _mergekit(recipe_file, tmp_path / "merged")
    parent = TOY / f"ft_{same}"
    merged_tensors, parent_tensors = load_file(str(folder / "model.safetensors")), load_file(str(parent / "model.safetensors"))
    assert merged_tensors.keys() == parent_tensors.keys()
    # Bit-identical: the same dtype, shape and bytes.
    for name, tensor in parent_tensors.items():
        assert merged_tensors[name].dtype == tensor.dtype == torch.bfloat16
        assert torch.equal(merged_tensors[name].view(torch.uint8), tensor.view(torch.uint8)), name
    recipe = load_recipe(recipe_file)
    report = run_smoke(folder, recipe, device="cpu", write=False, checks=builtin_checks())
    assert _statuses(report) == {"weights": "passed", "short": "passed", "long": "passed", "parity": "passed"}
    assert report.checks[0].details["mismatched"] == [] and report.checks[0].details["non_finite"] == []
    rows = {r.model: r for r in report.parity}
    merged = rows["merged"]
    # Against the parent it reproduces: KL exactly 0, agreement exactly 1, the same NLL and retrieval to the bit.
    assert (rows[same].kl, rows[same].top1_agreement) == (0.0, 1.0)
    assert rows[same].nll == merged.nll
    assert (rows[same].long_retrieved, rows[same].long_total) == (merged.long_retrieved, merged.long_total) == (3, 3)
    assert rows[other].kl > 0.7 and rows[other].top1_agreement == 93 / 113

    # The parents as the family's end points come from the cache this run left: no model is loaded.
    loaded: list[str] = []
    endpoints = {e.name: e for e in parent_endpoints(recipe, device="cpu", loaded=loaded)}
    assert loaded == [] and list(endpoints) == ["cos", "fmt"]
    end = endpoints[same]
    assert end.nll == merged.nll and end.missing is None
    assert dict(end.retrieval) == {512: (3, 3)}
    assert (end.kl[same], end.top1_agreement[same]) == (0.0, 1.0)
    # KL(other || this parent): exactly what the merge that reproduces it measured against `other`.
    assert (end.kl[other], end.top1_agreement[other]) == (rows[other].kl, rows[other].top1_agreement)
    assert endpoints[other].kl[other] == 0.0 and endpoints[other].top1_agreement[other] == 1.0



def test_a_second_merge_of_the_same_parents_loads_no_parent(toy_merges, tmp_path, monkeypatch):
    from registry.comparison import parent_settings_hash, read_cache
    from registry.reports import ParentMeasurements
    from registry.smoke import SmokeSettings

    monkeypatch.setenv("REGISTRY_HOME", str(tmp_path / "home"))
    good, recipe_file = toy_merges["good"]
    recipe = load_recipe(recipe_file)
    first = run_smoke(good, recipe, device="cpu", write=False, checks=builtin_checks())
    assert first.loaded == ("merged", "cos", "fmt")
    # Keyed by each parent's pin (the content sha256 `plan` pins) and the settings that shape its measurements.
    lock = json.loads((Path(__file__).parents[1] / "recipes" / "examples" / "toy_cos_fmt.lock.json").read_text())
    pins = {name: lock["sources"][name]["content_sha256"] for name in ("cos", "fmt")}
    # The device and the precision the run chose (float32 for the toy on CPU) shape the measurements too.
    key = parent_settings_hash(recipe.smoke, SmokeSettings(good, recipe.smoke, "cpu", False, True, "bfloat16").parity_text(),
                               f"cpu:{first.dtype}")
    cache = tmp_path / "home" / "build" / "parents"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{pin[:12]}-{key[:12]}" for pin in pins.values())
    assert [p.name for p in (cache / f"{pins['cos'][:12]}-{key[:12]}").iterdir()] == ["parent.safetensors"]

    # Another merge of the same parents (the same recipe's merge with a tensor the prompts never use shuffled).
    other, _ = toy_merges["shuffled_unused"]
    notes: list[str] = []
    second = run_smoke(other, recipe, device="cpu", write=False, checks=builtin_checks(), progress=notes.append)
    assert second.loaded == ("merged",)
    assert [n for n in notes if n.startswith("parent")] == [
        "parent 'cos': measurements from the cache", "parent 'fmt': measurements from the cache"]
    assert second.parity[1:] == first.parity[1:]  # every figure of the parents, KL included, to the bit
    assert _statuses(second) == {"weights": "failed", "short": "passed", "long": "passed", "parity": "passed"}

    # A bar that judges changes no measurement; a setting that shapes one measures the parents again.
    recipe.smoke.parity.max_kl, recipe.smoke.parity.nll_margin = 0.9, 0.3
    assert run_smoke(good, recipe, device="cpu", write=False, checks=builtin_checks()).loaded == ("merged",)
    recipe.smoke.short.max_new_tokens = 16
    assert run_smoke(good, recipe, device="cpu", write=False, checks=builtin_checks()).loaded == ("merged", "cos", "fmt")
    assert len(list(cache.iterdir())) == 4
    recipe.smoke.short.max_new_tokens = 32

    # A damaged entry is measured again and rewritten, never trusted.
    entry = cache / f"{pins['cos'][:12]}-{key[:12]}" / ParentMeasurements.FILE
    fmt_entry = cache / f"{pins['fmt'][:12]}-{key[:12]}" / ParentMeasurements.FILE
    intact = entry.read_bytes()
    for damage in (b"not safetensors", intact[: len(intact) // 2], fmt_entry.read_bytes(),  # another parent's entry
                   intact.replace(b'\\"format\\": 1', b'\\"format\\": 9')):  # the report is a JSON string in the header
        assert damage != intact
        entry.write_bytes(damage)
        assert read_cache(pins["cos"], key) is None
        again = run_smoke(good, recipe, device="cpu", write=False, checks=builtin_checks())
        assert again.loaded == ("merged", "cos")
        assert again.parity == first.parity
        assert read_cache(pins["cos"], key) is not None


def test_kl_is_parent_to_merge_exactly_zero_for_identical_distributions_and_empty_when_not_comparable():
    import torch

    from registry.comparison import Agreement, compare_logprobs

    generator = torch.Generator().manual_seed(0)
    parent = torch.log_softmax(torch.randn(6, 9, generator=generator), dim=-1)
    merged = torch.log_softmax(torch.randn(6, 9, generator=generator), dim=-1)
    assert compare_logprobs(parent, parent.clone()) == Agreement(0.0, 1.0)
    found = compare_logprobs(parent, merged)
    # The direction: KL(parent || merge), as torch's kl_div(input=log q, target=log p) computes it.
    expected = torch.nn.functional.kl_div(merged, parent, log_target=True, reduction="batchmean")
    assert found.kl == pytest.approx(float(expected), rel=1e-6)
    assert found.top1 == float((parent.argmax(-1) == merged.argmax(-1)).double().mean())
    # A token the parent rules out costs nothing; one the merge rules out and the parent does not is infinitely far.
    ruled_out = parent.clone()
    ruled_out[:, 0] = -math.inf
    assert math.isfinite(compare_logprobs(ruled_out, merged).kl)
    assert compare_logprobs(parent, ruled_out).kl == math.inf
    assert math.isnan(compare_logprobs(parent, torch.full_like(merged, math.nan)).kl)
    assert compare_logprobs(parent, merged[:, :8]) == Agreement(
        None, None, "its vocabulary (9 tokens) differs from the merge's (8)")
    assert compare_logprobs(parent, merged, ((1, 2),), ((1, 3),)) == Agreement(
        None, None, "its tokenizer encodes the comparison prompts differently")
