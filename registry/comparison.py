"""A merge's next-token distributions against its parents', and the parents' measurements cached by pin.

KL divergence and top-1 agreement are computed over the next-token distributions at every position
of the comparison prompts (`comparison_prompts`): the parity text (the fixed text whose NLL is
compared) and the short prompt as the chat template gives it. KL is KL(parent || merge): the mean
over positions of sum_v p_parent(v) * (log p_parent(v) - log p_merge(v)), in nats, from float32
log-softmax of the full logits. Identical log-probs give exactly 0 and agreement exactly 1.

A parent's measurements (NLL, short generation, pass-key prompts, log-probs) depend only on its
weights (its pin) and the smoke settings that shape them, so they are cached under
`build_root()/parents/<pin12>-<settings12>/parent.safetensors`: a family of merges of the same
parents runs each parent once. The cache is written atomically; an entry that cannot be read, or
that does not match its key, is measured again, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ReportError
from .reports import ParentMeasurements, dumps, parse

if TYPE_CHECKING:
    from .recipe import SmokeConfig

PARENTS_DIR = "parents"
LOGPROBS = "logprobs"
_METADATA_KEY = "registry"
# Bumped when what a cached measurement means changes, so older entries are measured again.
_CACHE_SCHEME = "registry-parent-measurements-1"
# Positions kept per prompt: the log-probs held are positions x vocabulary float32 (152k tokens: 0.6 MB a position),
# and a few hundred positions are enough to tell a broken merge from a good one.
MAX_PROMPT_TOKENS = 512


def comparison_prompts(tokenizer: Any, parity_text: str, short_prompt: str) -> list[list[int]]:
    """The prompts KL and top-1 agreement are computed over: the parity text, then the short prompt as the chat template gives it.

    Each is cut to its first MAX_PROMPT_TOKENS tokens.
    """
    prompts = [list(tokenizer(parity_text)["input_ids"])]
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": short_prompt}], add_generation_prompt=True, tokenize=True, return_dict=True)
        prompts.append(list(encoded["input_ids"]))
    else:
        prompts.append(list(tokenizer(short_prompt)["input_ids"]))
    return [p[:MAX_PROMPT_TOKENS] for p in prompts if p]


def next_token_logprobs(model: Any, prompts: list[list[int]]) -> Any:
    """Next-token log-probs at every position of `prompts`: one float32 CPU tensor [positions, vocab]."""
    import torch

    device = next(model.parameters()).device
    rows = []
    with torch.inference_mode():
        for ids in prompts:
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
            rows.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(rows)


@dataclass(frozen=True)
class Agreement:
    """KL(parent || merge) in nats per position and the share of positions with the same top token, or why not compared."""

    kl: float | None
    top1: float | None
    reason: str | None = None


def compare_logprobs(parent: Any, merged: Any, parent_prompts: Any = None, merged_prompts: Any = None) -> Agreement:
    """KL(parent || merged) and top-1 agreement of two [positions, vocab] log-prob tensors of the same prompts."""
    import torch

    if parent_prompts is not None and merged_prompts is not None and [list(p) for p in parent_prompts] != [
            list(p) for p in merged_prompts]:
        return Agreement(None, None, "its tokenizer encodes the comparison prompts differently")
    if parent.shape != merged.shape:
        return Agreement(None, None, f"its vocabulary ({parent.shape[-1]} tokens) differs from the merge's ({merged.shape[-1]})")
    p = parent.exp()
    # p * (log p - log q) is 0 where p is 0, whatever q is; NaN anywhere else stays NaN.
    terms = torch.where(p == 0, torch.zeros_like(p), p * (parent - merged))
    kl = float(terms.sum(dim=-1).mean())
    top1 = float((parent.argmax(dim=-1) == merged.argmax(dim=-1)).double().mean())
    return Agreement(kl, top1)


# ---------------------------------------------------------------------------------------------
# The cache


def parent_settings_hash(config: SmokeConfig, parity_text: str, device: str) -> str:
    """The hash of what shapes a parent's measurements: the smoke settings (not the pass/fail bars), the device, torch and transformers."""
    from importlib.metadata import PackageNotFoundError, version

    settings = config.model_dump(mode="json")
    # Bars that judge, and lists of prompts (each prompt is cached on its own), do not change a measurement.
    settings.pop("weights", None)
    settings["parity"] = {"text": parity_text}
    for key in ("min_logit_std", "max_repeated_ngrams", "max_token_run"):
        settings["short"].pop(key, None)
    for key in ("lengths", "depths", "context_tokens", "cpu_max_tokens", "min_retrieved", "memory_fraction"):
        settings["long"].pop(key, None)
    versions = {}
    for package in ("torch", "transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    text = json.dumps([_CACHE_SCHEME, settings, device, versions], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_folder(pin: str, settings_hash: str, root: Path | None = None) -> Path:
    """Where a parent's measurements under these settings are cached."""
    from . import build_root

    return (root or build_root()) / PARENTS_DIR / f"{pin[:12]}-{settings_hash[:12]}"


def read_cache(pin: str, settings_hash: str, root: Path | None = None) -> tuple[ParentMeasurements, Any] | None:
    """(measurements, log-probs or None) cached for this pin and these settings; None when absent or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = cache_folder(pin, settings_hash, root) / ParentMeasurements.FILE
    try:
        data = path.read_bytes()
        metadata = _metadata(data)
        measured = parse(ParentMeasurements, metadata[_METADATA_KEY], str(path))
        tensors = load(data)
    except (OSError, ValueError, KeyError, ReportError, SafetensorError):
        return None
    if measured.pin != pin or measured.settings != settings_hash:
        return None
    logprobs = tensors.get(LOGPROBS)
    if (logprobs is None) != (measured.prompts is None):
        return None
    if logprobs is not None and (logprobs.ndim != 2 or logprobs.shape[0] != sum(len(p) for p in measured.prompts or ())
                                 or str(logprobs.dtype) != "torch.float32"):
        return None
    return measured, logprobs


def write_cache(measured: ParentMeasurements, logprobs: Any, root: Path | None = None) -> Path:
    """Write a parent's measurements (and log-probs, when given) to the cache atomically; returns the file."""
    from safetensors.torch import save

    from .files import replace_atomically

    folder = cache_folder(measured.pin, measured.settings, root)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {LOGPROBS: logprobs.contiguous()} if logprobs is not None else {}
    path = folder / ParentMeasurements.FILE
    replace_atomically(path, save(tensors, metadata={_METADATA_KEY: dumps(measured)}))
    return path


def _metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors file's header (safetensors' own loader does not return it)."""
    if len(data) < 8:
        raise ValueError("too short for a safetensors file")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header larger than the file")
    header = json.loads(data[8 : 8 + size])
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("no metadata")
    return metadata
