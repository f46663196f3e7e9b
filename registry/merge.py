"""The merge stage: mergekit's linear merge into a staging folder, renamed into place only when complete.

`merge(recipe, plan, out, device)` builds a private mergekit configuration from the recipe (aliases
replaced by the pinned folders, the config/tokenizer donor set explicitly so mergekit never picks it
from a set), runs `run_merge` into `<out>.staging-<pid>`, writes `provenance.json` beside the weights,
fsyncs everything and renames the folder into place. A killed merge leaves only `.staging-`/`.old-`
siblings, which the next run removes; a finished merge whose provenance matches is reused.

For tests, REGISTRY_TEST_STOP_AT=<point> makes the process stop itself (SIGSTOP) at a named point
("shard": a shard was written to staging; "rename": just before staging is renamed into place;
"renamed": just after), so a test can SIGKILL it at a known moment.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import importlib
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from . import __version__, registry_home
from .errors import MergeError, RegistryError, UsageError
from .files import sha256_file
from .machine import WRITE_THREADS, check_resources, estimate_resources, output_dtype, pick_device
from .sources import Plan, fetch

if TYPE_CHECKING:
    from rich.console import Console

    from .recipe import Recipe

PROVENANCE = "provenance.json"
PROVENANCE_FORMAT = 1
# Files the merged model needs beside the weights, taken from the donor when mergekit leaves them out
# (it drops generation_config.json when it rebuilds the tokenizer).
CARRY_FILES = ("generation_config.json", "chat_template.jinja")


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
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        _remove_stale(out)
        found = read_provenance(out)
        if matches(found, recipe, plan, out):
            return MergeResult(out, True, found.get("device", "cpu"), time.perf_counter() - started, found)
        if out.exists() and found is None and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"{out} exists and is not a registry merge output; choose another folder with -o or remove it")
        device = pick_device(device)
        est = estimate_resources(recipe, plan.sources, plan.donor, out, device, shard_bytes)
        check_resources(est)
        paths = {s.name: fetch(s) for s in plan.sources}
        staging = out.with_name(f"{out.name}.staging-{os.getpid()}")
        try:
            provenance = _merge_into(staging, recipe, plan, paths, device, console, est.shard_bytes)
            _install(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return MergeResult(out, False, device, time.perf_counter() - started, provenance)


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


def _remove_stale(out: Path) -> None:
    # Under the lock, any staging or set-aside folder belongs to a merge that died.
    for pattern in (f"{out.name}.staging-*", f"{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


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


def _merge_into(staging: Path, recipe: Recipe, plan: Plan, paths: dict[str, Path], device: str,
                console: Console | None, shard_bytes: int) -> dict[str, Any]:
    import yaml

    _import_mergekit()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = mergekit_config(recipe, plan, paths)
    options = MergeOptions(
        device=device,
        read_to_gpu=device == "cuda",
        out_shard_size=shard_bytes,
        async_write=True,
        write_threads=WRITE_THREADS,
        copy_tokenizer=True,
        write_model_card=False,
        quiet=console is None,
    )
    shard_hashes: dict[str, tuple[str, int]] = {}
    try:
        # run_merge mutates the configuration it is given: it gets its own.
        with _mergekit_hooks(console, shard_hashes, options.write_threads), _quiet_transformers():
            run_merge(MergeConfiguration.model_validate(config), str(staging), options,
                      config_source=yaml.safe_dump(config, sort_keys=False))
    except RegistryError:
        raise
    except Exception as exc:
        raise MergeError(f"mergekit failed while merging {recipe.repo_id}: {type(exc).__name__}: {exc}") from exc
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


class _DeferredModule(types.ModuleType):
    """A module imported when one of its attributes is first read."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            # Module introspection (inspect.getmodule reads __file__ of every module) must not import it.
            raise AttributeError(attr)
        return getattr(importlib.import_module(self.__name__), attr)


def _import_mergekit() -> None:
    """Import mergekit, with peft deferred and the garbage collector paused.

    mergekit.common imports peft at module level, only to apply LoRA adapters (`model+lora`), which the
    configurations built here never name; importing it pulls transformers' generation code and a dozen
    model implementations, about half a second of every merge. While mergekit.common is imported, a
    stand-in takes peft's place in sys.modules; mergekit keeps it (and gets the real peft through it if
    it ever needs it), and any later `import peft` imports the real one.

    Importing mergekit, torch and transformers creates some 600,000 objects that live as long as the
    process. The collector would walk them over and over while they are created (about 0.6 s), and
    again in every later collection: it is paused during the import, and they are frozen (gc.freeze)
    out of all later collections.
    """
    if "mergekit.merge" in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        if "mergekit.common" not in sys.modules and "peft" not in sys.modules and importlib.util.find_spec("peft"):
            stand_in = _DeferredModule("peft")
            sys.modules["peft"] = stand_in
            try:
                import mergekit.common  # noqa: F401
            finally:
                if sys.modules.get("peft") is stand_in:
                    del sys.modules["peft"]
        import mergekit.config  # noqa: F401
        import mergekit.merge  # noqa: F401
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _provenance(recipe: Recipe, plan: Plan, staging: Path, device: str, shard_hashes: dict[str, tuple[str, int]]) -> dict[str, Any]:
    from importlib.metadata import version

    files = {}
    for f in sorted(staging.iterdir(), key=lambda p: p.name):
        known = shard_hashes.get(_shard_origin(f.name, staging))
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


def _shard_origin(name: str, staging: Path) -> str:
    """The name mergekit's writer gave a shard before its final rename (model-3.safetensors)."""
    if name == "model.safetensors":
        return "model-1.safetensors"
    m = re.fullmatch(r"model-(\d+)-of-\d+\.safetensors", name)
    return f"model-{int(m[1])}.safetensors" if m else name


@contextmanager
def _mergekit_hooks(console: Console | None, shard_hashes: dict[str, tuple[str, int]], write_threads: int) -> Iterator[None]:
    """Route mergekit's tqdm bars to rich, read checkpoints with SafetensorsReader and write shards with
    write_safetensors (hashed and fsynced on the way), each as soon as it is full, by `write_threads` threads."""
    import mergekit.graph
    import mergekit.merge
    import mergekit.tokenizer.build
    from mergekit.io.loader import TensorLoader
    from mergekit.io.tasks import LoaderCache
    from mergekit.io.tensor_writer import TensorWriter

    modules = (mergekit.merge, mergekit.graph, mergekit.tokenizer.build)
    saved = [m.tqdm for m in modules]
    original_save = TensorWriter._save_st
    original_save_tensor = TensorWriter.save_tensor
    original_init = TensorWriter.__init__
    original_get = TensorLoader.__dict__["get"]

    def open_shard(cls: Any, shard_path: str, use_lazy_unpickle: bool = False, device: str | None = None) -> Any:
        if shard_path.lower().endswith(".safetensors"):
            return SafetensorsReader(Path(shard_path))
        return original_get.__func__(cls, shard_path, use_lazy_unpickle, device)

    def save_shard(self: Any, shard_data: dict[str, Any], shard_path: str) -> None:
        path = Path(shard_path)
        shard_hashes[path.name] = write_safetensors(path, shard_data)
        _stop_here("shard")

    def init_writer(self: Any, *args: Any, **kwargs: Any) -> None:
        # mergekit 0.1.5 drops MergeOptions.write_threads on the way to its writer (always one thread).
        original_init(self, *args, **{**kwargs, "max_write_threads": write_threads})

    def save_tensor(self: Any, name: str, tensor: Any, clone: bool = False) -> None:
        # mergekit hands a full shard to the writer only when the next tensor does not fit: a shard
        # holding one large tensor (embeddings, lm_head) would wait for the next tensor's merge. The
        # shards are the same; each is written as soon as it is full.
        original_save_tensor(self, name, tensor, clone)
        with self._lock:
            if self.max_shard_size > 0 and self.current_shard_size >= self.max_shard_size:
                self._flush_current_shard()

    progress = None
    if console is not None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        progress = Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console)
    bars = _RichTqdm(progress)
    # mergekit keeps a process-wide cache of open checkpoints, keyed by path: a later merge in this
    # process must not see files of an earlier one that have since changed.
    LoaderCache.loaders.clear()
    try:
        for m in modules:
            m.tqdm = bars
        TensorWriter._save_st = save_shard
        TensorWriter.save_tensor = save_tensor
        TensorWriter.__init__ = init_writer
        TensorLoader.get = classmethod(open_shard)
        if progress is not None:
            with progress:
                yield
        else:
            yield
    finally:
        TensorLoader.get = original_get
        TensorWriter._save_st = original_save
        TensorWriter.save_tensor = original_save_tensor
        TensorWriter.__init__ = original_init
        for m, value in zip(modules, saved):
            m.tqdm = value
        LoaderCache.loaders.clear()


_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


class SafetensorsReader:
    """Reads tensors from a safetensors file, in place of safe_open: each tensor maps only its own bytes.

    safe_open maps the whole file, and every page a merge reads then counts towards the process's
    resident memory until the end (1.5 GB of a 3.3 GB peak for two 380M-parameter inputs). Here each
    tensor is a private mapping of its byte range, unmapped when mergekit drops the tensor: reading
    stays zero-copy and only the tensors in use are resident.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            length = int.from_bytes(os.pread(self.fd, 8, 0), "little")
            self.header = json.loads(os.pread(self.fd, length, 8))
            self.size = os.fstat(self.fd).st_size
        except (OSError, ValueError):
            os.close(self.fd)
            raise
        self.header.pop("__metadata__", None)
        self.base = 8 + length

    def keys(self) -> list[str]:
        """Names of the tensors in the file."""
        return list(self.header)

    def get_tensor(self, name: str) -> Any:
        """The tensor `name`, backed by a private (copy-on-write) mapping of its bytes."""
        import mmap
        import warnings

        import torch

        info = self.header[name]
        dtype = getattr(torch, _TORCH_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        if self.base + end > self.size:
            raise MergeError(f"{self.path} is shorter than its header says; the checkpoint changed or is truncated")
        start = self.base + begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(self.fd, self.base + end - aligned, offset=aligned, access=mmap.ACCESS_COPY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns that the tensor shares the buffer: that is the point
            flat = torch.frombuffer(mapping, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start - aligned)
        return flat.reshape(info["shape"])

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)


_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


# safetensors' Dtype enum order, which save_file sorts by (descending) before names.
_ST_RANK = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")


def write_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> tuple[str, int]:
    """Write `tensors` as a safetensors file, fsynced; return its sha256 and size.

    Tensor bytes go from memory to the file once, where safetensors' save_file copies every tensor
    to a bytes object first, and a second thread hashes them while they are written (both release
    the GIL), where hashing afterwards would read the file back.
    The layout is save_file's (dtypes in its order, then names), so the bytes are the same as its.
    """
    import torch

    dtypes = {name: _ST_DTYPES[str(t.dtype).removeprefix("torch.")] for name, t in tensors.items()}
    order = sorted(tensors, key=lambda name: (-_ST_RANK.index(dtypes[name]), name))
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": dtypes[name], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    head = len(blob).to_bytes(8, "little") + blob
    digest = hashlib.sha256()
    pending: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()

    def hash_in_order() -> None:
        while (chunk := pending.get()) is not None:
            digest.update(chunk)

    hasher = threading.Thread(target=hash_in_order, name="registry-sha256", daemon=True)
    hasher.start()
    try:
        with path.open("wb", buffering=0) as f:
            pending.put(memoryview(head))
            f.write(head)
            for name in order:
                t = tensors[name]
                if t.numel() == 0:
                    continue
                data = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                pending.put(data)
                while data:
                    data = data[f.write(data):]
            os.fsync(f.fileno())
    finally:
        pending.put(None)
        hasher.join()
    return digest.hexdigest(), len(head) + offset


_BAR_NAMES = {"Warmup loader cache": "opening sources", "Executing graph": "merging tensors",
              "Building tokenizer permutations": "tokenizer"}


class _RichTqdm:
    """Stands in for the `tqdm` module inside mergekit: `tqdm.tqdm(...)` becomes a rich progress task."""

    def __init__(self, progress: Any):
        self.progress = progress

    def tqdm(self, iterable: Any = None, desc: str | None = None, total: int | None = None, disable: bool = False, **_: Any) -> _Bar:
        """A bar over `iterable` (or `total` steps)."""
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        task = None
        if self.progress is not None and not disable:
            task = self.progress.add_task(_BAR_NAMES.get(desc or "", desc or "working"), total=total)
        return _Bar(self.progress, task, iterable)


class _Bar:
    def __init__(self, progress: Any, task: Any, iterable: Any):
        self.progress, self.task, self.iterable = progress, task, iterable

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


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


def _install(staging: Path, out: Path) -> None:
    """Rename the complete staging folder to `out`, setting aside (then removing) a previous output."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    _stop_here("rename")
    os.rename(staging, out)
    _fsync(out.parent)
    _stop_here("renamed")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _stop_here(point: str) -> None:
    if os.environ.get("REGISTRY_TEST_STOP_AT") == point:
        os.kill(os.getpid(), signal.SIGSTOP)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
