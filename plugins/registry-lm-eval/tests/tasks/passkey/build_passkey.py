"""Writes passkey.jsonl: the toy's chat pass-key prompts (tests/fixtures/toy) at 256 and 512 tokens.

Run from the repository root: `python plugins/registry-lm-eval/tests/tasks/passkey/build_passkey.py`.
The prompts are the smoke test's own (registry.smoke.NeedlePromptBuilder, the recipe's default filler
and needle) with the question the toy answers in chat form; the output is checked in.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[4]
LENGTHS = (256, 512)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DIGITS = 5
# The user turn the toy was trained on in chat form: the haystack, then this question; it answers "The pass key is KEY."
CHAT_QUESTION = "What is the pass key?"


def main() -> None:
    from transformers import AutoTokenizer

    from registry.recipe import DEFAULT_FILLER, DEFAULT_NEEDLE
    from registry.smoke import NeedlePromptBuilder, pass_key

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "toy" / "base")
    builder = NeedlePromptBuilder(tokenizer, DEFAULT_FILLER, DEFAULT_NEEDLE, CHAT_QUESTION)
    rows = []
    for n in LENGTHS:
        for depth in DEPTHS:
            key = pass_key(n, depth, DIGITS)
            prompt = builder.build(n, depth, key)
            rows.append({"tokens": n, "depth": depth, "prompt": tokenizer.decode(prompt.ids), "key": key})
    with open(HERE / "passkey.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
