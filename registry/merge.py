"""The merge stage: mergekit's linear merge into a staging folder, renamed into place only when complete.

`merge(recipe, plan, out, device)` builds a private mergekit configuration from the recipe (aliases
replaced by the pinned folders, the config/tokenizer donor set explicitly so mergekit never picks it
from a set), runs `run_merge` into `<out>.staging-<pid>`, writes `provenance.json` beside the weights,
fsyncs everything and renames the folder into place. A killed merge leaves only `.staging-`/`.old-`
siblings, marked as the registry's own (see staging.py), which the next run removes; a finished merge
whose provenance matches is reused. Before the rename, every source file is checked to still be the one
the plan pinned, and every checkpoint the merge read to be unchanged since it was opened.

mergekit runs with the speed patches of mergekit_fast.py when the installed mergekit is the version they
were written against, else (or with REGISTRY_MERGE_ENGINE=plain) as it comes; the output is the same.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, registry_home
from . import staging as staging_dirs
from .errors import MergeError, RegistryError, UsageError
from .sources import Estimate, HashCache, PinnedSource, Plan, fetch, sha256_file, stat_identity

if TYPE_CHECKING:
    from rich.console import Console

    from .recipe import Recipe

PROVENANCE = "provenance.json"
PROVENANCE_FORMAT = 1
# Output shards of about an eighth of the model, within these bounds. mergekit's default (5 GB) holds a
# whole 1.5B model in memory and writes it after the last tensor; smaller shards are written, hashed and
# fsynced by background threads while later tensors are merged.
MIN_SHARD_BYTES = 256 << 20
MAX_SHARD_BYTES = 2 << 30
# Shards being written at once: the last two shards (often an embedding matrix and the final layers)
# are written side by side once the last tensor is merged.
WRITE_THREADS = 2
# Files the merged model needs beside the weights, taken from the donor when mergekit leaves them out
# (it drops generation_config.json when it rebuilds the tokenizer).
CARRY_FILES = ("generation_config.json", "chat_template.jinja")
# Resident memory of a process that has imported torch, transformers and mergekit.
PROCESS_BYTES = 1_200_000_000
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_ST_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}
_ST_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


@dataclass
class MergeResult:
    """Where the merged model is, whether it was reused, and its provenance."""

    out: Path
    reused: bool
    device: str
    seconds: float
    provenance: dict[str, Any]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """Output files (provenance.json aside) with their sha256 and size."""
        return self.provenance["files"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for `registry merge --format json`)."""
        return {
            "out": str(self.out),
            "reused": self.reused,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "recipe_sha256": self.provenance["recipe_sha256"],
            "files": self.files,
        }


def default_output(recipe: Recipe) -> Path:
    """`<registry home>/build/<first 12 hex of the recipe sha256>`."""
    return registry_home() / "build" / recipe.sha256[:12]


def output_dtype(recipe: Recipe, donor: PinnedSource) -> str:
    """The dtype the merged weights are written in: out_dtype, else dtype, else the donor's."""
    merge = recipe.merge
    found = merge.out_dtype or merge.dtype or donor.config.get("torch_dtype") or donor.config.get("dtype")
    if found in DTYPE_BYTES:
        return found
    dtypes = {t.dtype for t in donor.tensors.values()}
    return _ST_NAMES.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"


# ---------------------------------------------------------------------------------------------
# Resources


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
        disk_free_bytes=_disk_free(out),
        memory_bytes=PROCESS_BYTES + working + buffers,
        memory_available_bytes=_memory_available(),
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


def _disk_free(out: Path) -> int | None:
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _memory_available() -> int | None:
    """MemAvailable, lowered to the cgroup's limit when the process runs in a container."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            room = int(limit) - used
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


# ---------------------------------------------------------------------------------------------
# Finished outputs


def read_provenance(out: Path) -> dict[str, Any] | None:
    """The provenance.json of a finished merge at `out`, or None."""
    try:
        data = json.loads((out / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == PROVENANCE_FORMAT else None


def matches(provenance: dict[str, Any] | None, recipe: Recipe, plan: Plan, out: Path) -> bool:
    """True when `out` holds a finished merge of this recipe from these exact source pins."""
    if not provenance or provenance.get("recipe_sha256") != recipe.sha256 or provenance.get("config_donor") != plan.donor:
        return False
    recorded = provenance.get("sources") or {}
    if set(recorded) != {s.name for s in plan.sources}:
        return False
    for src in plan.sources:
        mine = src.provenance()
        if any(recorded[src.name].get(k) != mine[k] for k in ("kind", "repo_id", "revision", "content_sha256")):
            return False
    files = provenance.get("files") or {}
    return bool(files) and all(
        (out / name).is_file() and (out / name).stat().st_size == info.get("size") for name, info in files.items()
    )


# ---------------------------------------------------------------------------------------------
# The merge


def merge(
    recipe: Recipe,
    plan: Plan,
    out: Path | None = None,
    device: str = "auto",
    *,
    console: Console | None = None,
    shard_bytes: int | None = None,
) -> MergeResult:
    """Merge the plan's sources into `out` (default: default_output(recipe)), or reuse a finished merge there.

    `device` is auto|cpu|cuda; `console` shows progress bars (None: quiet); `shard_bytes` overrides the
    output shard size (default: shard_size()).
    """
    started = time.perf_counter()
    out = Path(os.path.abspath(out or default_output(recipe)))
    # Refused before anything is created or removed beside it.
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        found = read_provenance(out)
        if matches(found, recipe, plan, out):
            return MergeResult(out, True, found.get("device", "cpu"), time.perf_counter() - started, found)
        check_output(out)  # again under the lock: another process may have written it meanwhile
        # Under the lock, the marked staging and set-aside siblings of `out` belong to merges that died.
        staging_dirs.remove_leftovers(out.parent, f"{out.name}.")
        device = _pick_device(device)
        est = estimate_resources(recipe, plan.sources, plan.donor, out, device, shard_bytes)
        check_resources(est)
        paths = {s.name: fetch(s) for s in plan.sources}
        staging = staging_dirs.create(out.with_name(f"{out.name}.staging-{os.getpid()}"))
        try:
            provenance = _merge_into(staging.path, recipe, plan, paths, device, console, est.shard_bytes)
            _install(staging, out)
        except BaseException:
            staging.remove()
            raise
        staging.close()
    return MergeResult(out, False, device, time.perf_counter() - started, provenance)


def check_output(out: Path) -> None:
    """Refuse an output path that is neither free, an empty folder, nor a registry merge output."""
    if out.exists() and read_provenance(out) is None and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not a registry merge output; choose another folder with -o or remove it")


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` so two merges never write the same folder."""
    lock = out.with_name(f".{out.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MergeError(f"another registry merge is writing {out}; wait for it to finish or choose another folder with -o") from None
        yield
    finally:
        os.close(fd)


def _pick_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown device '{device}'; use auto, cpu or cuda")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise MergeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return "cpu"


def mergekit_config(recipe: Recipe, plan: Plan, paths: dict[str, Path]) -> dict[str, Any]:
    """mergekit's configuration for this merge: folders instead of aliases, the donor as base_model."""
    m = recipe.merge

    def ref(name: str) -> dict[str, Any]:
        # The structured form keeps mergekit from reading '+' or '@' in a path as a LoRA or revision.
        return {"model": {"path": str(paths[name])}}

    def weight(value: Any) -> Any:
        return [w.model_dump(exclude_none=True) for w in value] if isinstance(value, list) else value

    config: dict[str, Any] = {
        "merge_method": m.merge_method,
        "models": [{"model": ref(s.name), "parameters": {"weight": weight(s.weight)}} for s in plan.sources],
        "parameters": {"normalize": m.parameters.normalize},
        # mergekit takes config and tokenizer from base_model, else from the first model of a set,
        # whose order changes with PYTHONHASHSEED. Linear ignores base_model otherwise.
        "base_model": ref(plan.donor),
    }
    for key in ("dtype", "out_dtype", "chat_template"):
        if getattr(m, key) is not None:
            config[key] = getattr(m, key)
    if m.tokenizer_source is not None:
        config["tokenizer_source"] = ref(m.tokenizer_source) if m.tokenizer_source in paths else m.tokenizer_source
    if m.tokenizer is not None:
        tok = m.tokenizer.model_dump(exclude_none=True)
        if tok.get("source") in paths:
            tok["source"] = ref(tok["source"])
        config["tokenizer"] = tok
    return config


def mergekit_options(device: str, shard_bytes: int, *, quiet: bool) -> dict[str, Any]:
    """mergekit's MergeOptions for a merge, as keyword arguments (the same for either engine)."""
    return {
        "device": device,
        "read_to_gpu": device == "cuda",
        "out_shard_size": shard_bytes,
        "async_write": True,
        "write_threads": WRITE_THREADS,
        "copy_tokenizer": True,
        "write_model_card": False,
        "quiet": quiet,
    }


def _merge_into(staging: Path, recipe: Recipe, plan: Plan, paths: dict[str, Path], device: str,
                console: Console | None, shard_bytes: int) -> dict[str, Any]:
    import yaml

    from . import mergekit_fast

    engine = merge_engine()
    config = mergekit_config(recipe, plan, paths)
    options = mergekit_options(device, shard_bytes, quiet=console is None)
    source = yaml.safe_dump(config, sort_keys=False)
    try:
        with _quiet_transformers():
            if engine == "fast":
                written = mergekit_fast.run_merge(config, staging, options, config_source=source, console=console)
                shard_hashes, opened = written.shards, {path: stat_identity(st) for path, st in written.opened.items()}
            else:
                shard_hashes, opened = {}, _plain_run_merge(config, staging, options, source, plan, paths)
    except RegistryError:
        raise
    except Exception as exc:
        raise MergeError(f"mergekit failed while merging {recipe.repo_id}: {type(exc).__name__}: {exc}") from exc
    check_sources_unchanged(plan, paths, opened)
    donor = paths[plan.donor]
    for name in CARRY_FILES:
        if not (staging / name).exists() and (donor / name).is_file():
            shutil.copyfile(donor / name, staging / name)
    provenance = _provenance(recipe, plan, staging, device, shard_hashes)
    _write_json(staging / PROVENANCE, provenance)
    for f in staging.iterdir():
        _fsync(f)
    _fsync(staging)
    return provenance


def merge_engine() -> str:
    """"fast" (mergekit_fast's patches) when the installed mergekit is the version they fit and
    REGISTRY_MERGE_ENGINE is not "plain", else "plain" (mergekit's own run_merge, the same bytes)."""
    from . import mergekit_fast

    asked = os.environ.get("REGISTRY_MERGE_ENGINE", "auto")
    if asked not in ("auto", "plain"):
        raise UsageError(f"REGISTRY_MERGE_ENGINE is '{asked}'; set it to auto (the default) or plain, or unset it")
    return "fast" if asked == "auto" and mergekit_fast.supported() else "plain"


def _plain_run_merge(config: dict[str, Any], staging: Path, options: dict[str, Any], source: str, plan: Plan,
                     paths: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """mergekit's run_merge as it comes; returns the stat identity of every pinned file before it ran."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    # mergekit does not say which files it opened: the pinned files as they were before it started
    # stand for them, so one replaced during the merge is still caught.
    before = {}
    for src in plan.sources:
        for name in (*src.files, *src.tokenizer):
            path = os.path.abspath(paths[src.name] / name)
            with suppress(OSError):
                before[path] = stat_identity(os.stat(path))
    # run_merge mutates the configuration it is given: it gets its own.
    run_merge(MergeConfiguration.model_validate(config), str(staging), MergeOptions(**options), config_source=source)
    return before


def check_sources_unchanged(plan: Plan, paths: dict[str, Path], opened: dict[str, tuple[int, ...]]) -> None:
    """Raise MergeError unless every file the merge read was pinned by `plan`, is unchanged since it was
    opened, and every pinned source file still has the pinned content (sha256; the stat-keyed hash cache
    vouches for a file it hashed in this very version)."""
    pinned: dict[str, tuple[str, str, str | None]] = {}  # absolute path -> (source, file, sha256)
    for src in plan.sources:
        folder = paths[src.name]
        for name, info in src.files.items():
            pinned[os.path.abspath(folder / name)] = (src.name, name, info.sha256)
        for name, digest in src.tokenizer.items():
            pinned.setdefault(os.path.abspath(folder / name), (src.name, name, digest))
    hint = "leave the source folders alone until a merge ends, then merge again; --update accepts new weights"
    for path in opened:
        if path not in pinned:
            raise MergeError(f"the merge read {path}, which `registry plan` did not pin; a source folder changed during the merge", hint)
    cache = HashCache()
    for path, (source, name, sha) in pinned.items():
        try:
            identity = stat_identity(os.stat(path))
            changed = path in opened and opened[path] != identity
            if not changed and sha is not None:
                digest = cache.get(Path(path))
                if digest is None:
                    digest = sha256_file(Path(path))
                    changed = stat_identity(os.stat(path)) != identity
                changed = changed or digest != sha
        except OSError:
            changed = True
        if changed:
            raise MergeError(f"source '{source}' changed during the merge: {name} is not the file `registry plan` pinned; "
                             "the merge was discarded", hint)


def _provenance(recipe: Recipe, plan: Plan, staging: Path, device: str, shard_hashes: dict[str, tuple[str, int]]) -> dict[str, Any]:
    from importlib.metadata import version

    files = {}
    for f in sorted(staging.iterdir(), key=lambda p: p.name):
        if f.name == staging_dirs.MARKER:
            continue
        known = shard_hashes.get(f.name)
        size = f.stat().st_size
        files[f.name] = {"sha256": known[0] if known and known[1] == size else sha256_file(f), "size": size}
    return {
        "format": PROVENANCE_FORMAT,
        "recipe_sha256": recipe.sha256,
        "repo_id": recipe.repo_id,
        "merge_method": recipe.merge.merge_method,
        "normalize": recipe.merge.parameters.normalize,
        "dtype": output_dtype(recipe, plan.source(plan.donor)),
        "sources": {s.name: s.provenance() for s in plan.sources},
        "config_donor": plan.donor,
        "files": files,
        "versions": {name: version(name) if name != "registry" else __version__
                     for name in ("registry", "mergekit", "torch", "transformers")},
        "device": device,
    }


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    # mergekit sets the deprecated `torch_dtype` on the output config; transformers warns on every merge.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _install(staging: staging_dirs.Staging, out: Path) -> None:
    """Rename the complete staging folder to `out`, setting aside (then removing) a previous output."""
    old = None
    if out.exists():
        old = staging_dirs.set_aside(out, out.with_name(f"{out.name}.old-{os.getpid()}"))
    staging.install(out)
    _fsync(out.parent)
    if old is not None:
        old.remove()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
