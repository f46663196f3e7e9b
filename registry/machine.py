"""Facts about the machine a stage runs on (memory, disk, device), and whether a merge fits in them.

One home for each: the merge's resource check, the plan's estimate and the smoke test's memory budget
read the same numbers the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import MergeError, UsageError

if TYPE_CHECKING:
    from .recipe import Recipe
    from .sources import PinnedSource

# Output shards of about an eighth of the model, within these bounds. mergekit's default (5 GB) holds a
# whole 1.5B model in memory and writes it after the last tensor; smaller shards are written, hashed and
# fsynced by background threads while later tensors are merged.
MIN_SHARD_BYTES = 256 << 20
MAX_SHARD_BYTES = 2 << 30
# Shards being written at once: the last two shards (often an embedding matrix and the final layers)
# are written side by side once the last tensor is merged.
WRITE_THREADS = 2
# Resident memory of a process that has imported torch, transformers and mergekit.
PROCESS_BYTES = 1_200_000_000
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_ST_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}
_ST_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
DEVICES = ("auto", "cpu", "cuda")


# ---------------------------------------------------------------------------------------------
# Machine facts


def memory_available(device: str = "cpu", root: Path = Path("/")) -> int | None:
    """Bytes that can still be allocated: free GPU memory on 'cuda'; else MemAvailable or the cgroup's room, the smaller."""
    # cgroup v2 (memory.max - memory.current) and v1 (memory.limit_in_bytes - memory.usage_in_bytes) are
    # read where a container mounts them; `root` is the filesystem root (a test passes a fake one).
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated())
    found: list[int] = []
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not found and root == Path("/"):
        # No MemAvailable (old kernels, not Linux): free pages are a lower bound.
        with contextlib.suppress(OSError, ValueError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    cgroup = root / "sys/fs/cgroup"
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (cgroup / limit_file).read_text().strip()
            if limit == "max":  # v2: no limit
                continue
            found.append(int(limit) - int((cgroup / usage_file).read_text()))
        except (OSError, ValueError):
            continue
    return max(0, min(found)) if found else None


def disk_free(path: Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or would, once its missing parents are made)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def pick_device(device: str) -> str:
    """'auto' becomes 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without one, or an unknown name, is an error."""
    if device not in DEVICES:
        raise UsageError(f"unknown device '{device}'; use auto, cpu or cuda")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise UsageError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return "cpu"


# CPU flags (/proc/cpuinfo) of instructions that multiply bfloat16 natively: x86's AVX512-BF16 and
# AMX, ARM's BF16 extension. Without them torch converts bfloat16 to float32 and back around each
# product, and bfloat16 is slower than float32 (benchmarks/smoke_precision.py).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_bf16_flag(root: Path = Path("/")) -> str | None:
    """The CPU flag that says this CPU multiplies bfloat16 natively (e.g. avx512_bf16), or None."""
    try:
        text = (root / "proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found = set(value.split())
            return next((flag for flag in BF16_CPU_FLAGS if flag in found), None)
    return None


# ---------------------------------------------------------------------------------------------
# What a merge needs


@dataclass(frozen=True)
class Estimate:
    """What the merge needs and what the machine has, in bytes (None: unknown)."""

    output_bytes: int
    disk_free_bytes: int | None
    memory_bytes: int
    memory_available_bytes: int | None
    largest_tensor: str
    out: str
    shard_bytes: int


def output_dtype(recipe: Recipe, donor: PinnedSource) -> str:
    """The dtype the merged weights are written in: out_dtype, else dtype, else the donor's."""
    merge = recipe.merge
    found = merge.out_dtype or merge.dtype or donor.config.get("torch_dtype") or donor.config.get("dtype")
    if found in DTYPE_BYTES:
        return found
    dtypes = {t.dtype for t in donor.tensors.values()}
    return _ST_NAMES.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"


def shard_size(output_bytes: int) -> int:
    """Output shard size for a model of `output_bytes`: an eighth of it, within 256 MiB and 2 GiB."""
    return max(MIN_SHARD_BYTES, min(MAX_SHARD_BYTES, output_bytes // 8))


def estimate_resources(recipe: Recipe, sources: list[PinnedSource], donor: str, out: Path, device: str = "auto",
                       shard_bytes: int | None = None) -> Estimate:
    """Disk and memory the merge needs (from tensor shapes only) and what the machine has free."""
    ref = next(s for s in sources if s.name == donor)
    out_bytes = DTYPE_BYTES[output_dtype(recipe, ref)]
    tensors = dict(ref.tensors)
    # mergekit writes lm_head for a model with tied embeddings too (it resolves it to embed_tokens).
    if "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    weight_bytes = sum(t.numel * out_bytes for t in tensors.values())
    output_bytes = weight_bytes + 64 * 1024 * 1024  # + config, tokenizer
    shard_bytes = shard_bytes or shard_size(weight_bytes)
    largest_name, largest = max(tensors.items(), key=lambda kv: (kv[1].numel, kv[0]))
    in_bytes = DTYPE_BYTES.get(recipe.merge.dtype or "", 0) or max(_ST_BYTES.get(s.tensors[largest_name].dtype, 4) for s in sources)
    # Inputs in the merge dtype, the float32 accumulator, the result in the output dtype.
    working = largest.numel * (len(sources) * in_bytes + 4 + out_bytes)
    if device == "cuda":
        working = largest.numel * out_bytes  # the rest lives on the GPU
    buffers = min(output_bytes, (WRITE_THREADS + 1) * shard_bytes)  # the shard being filled, those being written
    return Estimate(
        output_bytes=output_bytes,
        disk_free_bytes=disk_free(out),
        memory_bytes=PROCESS_BYTES + working + buffers,
        memory_available_bytes=memory_available(),
        largest_tensor=largest_name,
        out=str(out),
        shard_bytes=shard_bytes,
    )


def check_resources(est: Estimate) -> None:
    """Raise MergeError, with the numbers, when the output disk or the memory cannot hold the merge."""
    if est.disk_free_bytes is not None and est.disk_free_bytes < est.output_bytes:
        raise MergeError(
            f"not enough disk for the merge: it writes {_gb(est.output_bytes)} to {est.out} and that filesystem has "
            f"{_gb(est.disk_free_bytes)} free; free some space or choose another output folder with -o"
        )
    if est.memory_available_bytes is not None and est.memory_available_bytes < est.memory_bytes:
        raise MergeError(
            f"not enough memory for the merge: it needs about {_gb(est.memory_bytes)} (the largest tensor, "
            f"{est.largest_tensor}, and output buffers) and {_gb(est.memory_available_bytes)} is available; "
            "close other programs or merge on a machine with more memory"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n < 1e12 else f"{n / 1e12:.2f} TB"
