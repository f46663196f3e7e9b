"""Tiny Qwen2 checkpoints built offline: a base, "fine-tunes" with perturbed weights, broken variants.

Nothing is downloaded: the model comes from a Qwen2Config, the tokenizer is a byte-level BPE trained
here by `tokenizers` on a few sentences. Everything is seeded, so a family built twice is identical.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = [
    "The grass is green. The sky is blue. The sun is yellow.",
    "What is 17 * 24? Think step by step. 17 * 24 = 408.",
    "The pass key is 71432. Remember it. 71432 is the pass key.",
    "There and back again, a merge of two fine-tunes of one base model.",
]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class TinyConfig:
    """The knobs of a tiny Qwen2 model (hidden 32-64 and 2 layers keep a merge in milliseconds)."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 160
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 512


@dataclass(frozen=True)
class Family:
    """A base checkpoint and two fine-tunes of it, each a folder transformers can load."""

    base: Path
    a: Path
    b: Path


def build_tokenizer(out: Path, vocab_size: int) -> None:
    """Train a byte-level BPE on CORPUS and save it, with a Qwen-style chat template, into `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Only the corpus's own characters, not all 256 bytes: every id must fit the tiny embedding.
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_base(out: Path, config: TinyConfig = TinyConfig(), *, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """A randomly initialised (seeded) Qwen2ForCausalLM saved as safetensors, with tokenizer files."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    # The tokenizer has ~vocab_size - 32 entries: like Qwen2, the embedding matrix is larger than
    # the tokenizer, so a merge that resizes it to the tokenizer's length would be caught.
    build_tokenizer(out, config.vocab_size - 32)
    eos = json.loads((out / "tokenizer.json").read_text())["added_tokens"][2]["id"]
    cfg = Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_sliding_window=False,
        eos_token_id=eos,
        bos_token_id=eos,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    # Random init leaves norms at exactly 1 and biases at 0; perturb them so every tensor carries
    # information a wrong merge would destroy.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for _, param in sorted(model.named_parameters()):
            param.add_(torch.randn(param.shape, generator=gen).to(param.dtype) * 0.05)
    model.save_pretrained(out)
    GenerationConfig(eos_token_id=eos, bos_token_id=eos, max_new_tokens=16, do_sample=False).save_pretrained(out)
    return out


def read_state(path: Path) -> dict:
    """Every tensor of the checkpoint at `path` (all shards), by name."""
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def fine_tune(base: Path, out: Path, *, seed: int, scale: float = 0.02) -> Path:
    """A copy of `base` with seeded Gaussian noise (relative `scale`) added to every tensor."""
    import torch
    from safetensors.torch import save_file

    copy_non_weights(base, out)
    state = read_state(base)
    gen = torch.Generator().manual_seed(seed)
    perturbed = {}
    for name in sorted(state):
        t = state[name]
        noise = torch.randn(t.shape, generator=gen) * scale * (t.float().abs().mean() + 1e-3)
        perturbed[name] = (t.float() + noise).to(t.dtype).contiguous()
    save_file(perturbed, out / "model.safetensors", metadata={"format": "pt"})
    return out


def copy_non_weights(src: Path, out: Path) -> None:
    """Copy config, tokenizer and generation files (everything but weights) from `src` to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in WEIGHT_FILES:
            shutil.copy2(f, out / f.name)


def build_family(root: Path, config: TinyConfig = TinyConfig(), *, dtype: str = "bfloat16") -> Family:
    """Base plus fine-tunes `a` and `b` under `root` (built once; reused if already there)."""
    base, a, b = root / "base", root / "a", root / "b"
    if not (b / "model.safetensors").exists():
        build_base(base, config, dtype=dtype)
        fine_tune(base, a, seed=11)
        fine_tune(base, b, seed=22)
    return Family(base, a, b)


def rewrite_tensors(src: Path, out: Path, *, drop: str | None = None, reshape: str | None = None) -> Path:
    """A copy of `src` without tensor `drop`, or with tensor `reshape` one row shorter."""
    from safetensors.torch import save_file

    copy_non_weights(src, out)
    state = read_state(src)
    if drop:
        del state[drop]
    if reshape:
        state[reshape] = state[reshape][:-1].contiguous()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def edit_json(path: Path, **changes) -> None:
    """Set top-level keys of the JSON file at `path`."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))
