"""benchmarks/reference_scale.py: the pair it builds and how it reads a publish's stages (no timing asserted)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import reference_scale as rs  # noqa: E402

TOY = ROOT / "tests" / "fixtures" / "toy"
TEXT = "What is 17 * 24? Think step by step. The pass key is 48213. Remember it."


def test_padded_tokenizer_covers_the_vocabulary_and_encodes_as_the_toy(tmp_path):
    from transformers import AutoTokenizer

    rs.write_tokenizer(tmp_path)
    padded, toy = AutoTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(TOY / "base")
    assert len(padded) == 151936
    assert padded(TEXT)["input_ids"] == toy(TEXT)["input_ids"]
    assert padded.apply_chat_template([{"role": "user", "content": TEXT}], tokenize=False) == \
        toy.apply_chat_template([{"role": "user", "content": TEXT}], tokenize=False)
    # Every id past the toy's decodes to a space and letters: never empty, never a digit of a pass key.
    extra = range(len(toy), 151936, 997)
    decoded = [padded.decode([i]) for i in extra]
    assert all(text[0] == " " and text[1:].isalpha() and text[1:].isascii() for text in decoded)
    assert len(set(decoded)) == len(decoded)
    assert padded.decode([410, 411, 151935]) == " qa qb" + padded.decode([151935])


def test_parameter_count_is_the_reference_models():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**rs.CONFIG_1_5B))
    assert rs._parameters(28) == sum(p.numel() for p in model.parameters()) == 1_777_088_000
    assert rs._parameters(2) == sum(p.numel() for n, p in model.named_parameters() if not any(f"layers.{i}." in n for i in range(2, 28)))


def test_recipe_copy_leaves_out_the_evaluation_and_overrides_only_the_smoke_block(tmp_path):
    import yaml

    same, none = rs.recipe_copy(tmp_path, None)
    without_eval = {k: v for k, v in yaml.safe_load(rs.RECIPE.read_text()).items() if k != "eval"}
    assert none is None and yaml.safe_load(same.read_text()) == without_eval
    (tmp_path / "o").mkdir()
    changed, extra = rs.recipe_copy(tmp_path / "o", "{long: {cpu_time_budget: 60}}")
    original, new = yaml.safe_load(rs.RECIPE.read_text()), yaml.safe_load(changed.read_text())
    assert extra == {"long": {"cpu_time_budget": 60}}
    assert new["smoke"]["long"] == {**original["smoke"]["long"], "cpu_time_budget": 60}
    assert {k: v for k, v in new.items() if k != "smoke"} == {k: v for k, v in original.items() if k not in ("smoke", "eval")}
    with pytest.raises(SystemExit, match="must be a YAML mapping"):
        rs.recipe_copy(tmp_path / "o", "[1, 2]")


def test_layout_puts_the_pair_where_the_recipe_points(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    placed = rs.layout(rs.RECIPE.read_text(), tmp_path / "ckpt", a, b)
    assert placed == {
        "cos": tmp_path / "ckpt/cos_MRL4096_ROLLOUT4_LR1e-6/global_step_50/actor/huggingface",
        "fmt": tmp_path / "ckpt/fmt_MRL4096_ROLLOUT4/global_step_50/actor/huggingface",
    }
    assert placed["cos"].resolve() == a and placed["fmt"].resolve() == b


@pytest.mark.slow
def test_stages_of_a_real_publish_of_the_toy(tmp_path):
    env = {**os.environ, "REGISTRY_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    pub = rs.run_publish(ROOT / "recipes" / "examples" / "toy_cos_fmt.yaml", env, tmp_path)
    rows, parts, estimate = rs.stages(pub)
    assert [r["stage"] for r in rows] == ["plan", "merge", "smoke", "card", "publish"]
    assert sum(r["wall_s"] for r in rows) == pytest.approx(pub["ended"] - pub["started"], abs=0.05)
    assert all(r["peak_rss_bytes"] > 0 for r in rows)
    merge = next(r for r in rows if r["stage"] == "merge")
    assert merge["bytes_written"] >= 1_154_272  # the merged weights, at least
    assert [p["part"] for p in parts] == [
        "set-up", "load merged, calibrate", "estimate", "merged: short, long, NLL", "free merged",
        "parent cos: load, short, NLL, long", "parent fmt: load, short, NLL, long", "weights check", "report",
    ]
    smoke = next(r for r in rows if r["stage"] == "smoke")
    assert sum(p["wall_s"] for p in parts) == pytest.approx(smoke["wall_s"], abs=0.05)
    assert estimate["line"].startswith("smoke: about ") and "on cpu" in estimate["line"]
    model_dir = Path(pub["stdout"].split("model: ", 1)[1].split("\n", 1)[0].strip())
    found = rs.smoke_findings(json.loads((model_dir / "smoke.json").read_text()))
    assert found["retrieval"] == {"merged": "6/6", "cos": "6/6", "fmt": "6/6"}
    assert found["skipped"] == [] and found["passed"] is True
    assert found["estimate"]["total_seconds"] > 0
    assert pub["ru_maxrss"] >= max(r["peak_rss_bytes"] for r in rows) * 0.9
