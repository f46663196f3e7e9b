"""mergekit, made faster: every patch of mergekit's internals, for the one version they were written against.

registry merges with mergekit's `run_merge`. With mergekit MERGEKIT_VERSION, `run_merge()` here runs it
with these patches in place (see docs/architecture.md, "Merge speed"):

- mergekit is imported with its unused `import peft` deferred and the garbage collector paused;
- checkpoints are read through per-tensor mappings (SafetensorsReader) instead of safe_open;
- each output shard is written as soon as it is full, by the writer threads asked for (0.1.5 drops
  MergeOptions.write_threads), with write_safetensors: hashed while written, and fsynced;
- mergekit's tqdm bars become rich progress bars.

They reach into private classes and methods of mergekit, so they apply only to the version they were
read against (`supported()`); with any other version merge.py runs mergekit's plain `run_merge`. The
output is the same, byte for byte (tests/test_merge.py compares the two).
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import importlib.util
import json
import os
import queue
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from .errors import MergeError

if TYPE_CHECKING:
    from rich.console import Console

# The mergekit release whose internals the patches below were written against.
MERGEKIT_VERSION = "0.1.5"


def supported() -> bool:
    """True when the installed mergekit is MERGEKIT_VERSION, the one these patches fit."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit") == MERGEKIT_VERSION
    except PackageNotFoundError:
        return False


@dataclass
class Written:
    """What a patched merge saw: the sha256 and size of each shard, and the checkpoints it opened."""

    # By the shard's final name (model.safetensors, model-00001-of-00003.safetensors).
    shards: dict[str, tuple[str, int]]
    # Every checkpoint file as it was opened (its os.stat), by absolute path.
    opened: dict[str, os.stat_result]


def run_merge(config: dict[str, Any], out: Path, options: dict[str, Any], *, config_source: str,
              console: Console | None = None) -> Written:
    """mergekit's run_merge of `config` into `out` with MergeOptions(**options), with the patches in place."""
    import_mergekit()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    merge_options = MergeOptions(**options)
    shards: dict[str, tuple[str, int]] = {}
    opened: dict[str, os.stat_result] = {}
    with patched(console, shards, merge_options.write_threads, opened):
        # run_merge mutates the configuration it is given: it gets its own.
        mergekit_run_merge(MergeConfiguration.model_validate(config), str(out), merge_options, config_source=config_source)
    return Written({_final_name(name, len(shards)): digest for name, digest in shards.items()}, opened)


def _final_name(name: str, total: int) -> str:
    """The name mergekit's writer gives shard `model-<i>.safetensors` once all `total` are written."""
    index = int(name.removeprefix("model-").removesuffix(".safetensors"))
    return "model.safetensors" if total == 1 else f"model-{index:05d}-of-{total:05d}.safetensors"


class _DeferredModule(types.ModuleType):
    """A module imported when one of its attributes is first read."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            # Module introspection (inspect.getmodule reads __file__ of every module) must not import it.
            raise AttributeError(attr)
        return getattr(importlib.import_module(self.__name__), attr)


def import_mergekit() -> None:
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
                import mergekit.common
            finally:
                if sys.modules.get("peft") is stand_in:
                    del sys.modules["peft"]
        import mergekit.config
        import mergekit.merge  # noqa: F401
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


@contextmanager
def patched(console: Console | None, shard_hashes: dict[str, tuple[str, int]], write_threads: int,
            opened: dict[str, os.stat_result] | None = None) -> Iterator[None]:
    """Route mergekit's tqdm bars to rich, read checkpoints with SafetensorsReader and write shards with
    write_safetensors (hashed and fsynced on the way), each as soon as it is full, by `write_threads` threads.

    `opened` receives the os.stat of every checkpoint file as it was opened, by absolute path."""
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
            reader = SafetensorsReader(Path(shard_path))
            if opened is not None:
                opened[os.path.abspath(shard_path)] = reader.stat
            return reader
        return original_get.__func__(cls, shard_path, use_lazy_unpickle, device)

    def save_shard(self: Any, shard_data: dict[str, Any], shard_path: str) -> None:
        path = Path(shard_path)
        shard_hashes[path.name] = write_safetensors(path, shard_data)

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
        for m, value in zip(modules, saved, strict=True):
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
            # The file actually read, whatever is at its path later.
            self.stat = os.fstat(self.fd)
            self.size = self.stat.st_size
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
