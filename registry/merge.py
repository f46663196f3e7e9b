"""The merge stage: mergekit's linear merge into a staging folder, renamed into place only when complete.

`merge(recipe, plan, out, device)` builds a private mergekit configuration from the recipe (aliases
replaced by the pinned folders, the config/tokenizer donor set explicitly so mergekit never picks it
from a set), runs `run_merge` into `<out>.staging-<pid>`, writes `provenance.json` beside the weights,
fsyncs everything and renames the folder into place. A killed merge leaves only `.staging-`/`.old-`
siblings, marked as the registry's own (see staging.py), which the next run removes; a finished merge
whose provenance matches is reused. Before the rename, every source file is checked to still be the one
the plan pinned, and every checkpoint the merge read to be unchanged since it was opened.

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

from . import __version__, build_root
from . import staging as staging_dirs
from .errors import MergeError, RegistryError, UsageError
from .files import sha256_file
from .identity import merge_identity
from .machine import WRITE_THREADS, check_resources, estimate_resources, output_dtype, pick_device
from .reports import PROVENANCE_FILE, Provenance, SourcePin, read_current, write as write_report
from .sources import HashCache, PinnedSource, Plan, check_carried_files, fetch, stat_identity

if TYPE_CHECKING:
    from rich.console import Console

    from .recipe import Recipe

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
    provenance: Provenance

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """Output files (provenance.json aside) with their sha256 and size."""
        return {name: f.model_dump() for name, f in self.provenance.files.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for `registry merge --format json`)."""
        return {
            "out": str(self.out),
            "reused": self.reused,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "merge_identity": self.provenance.merge_identity,
            "files": self.files,
        }


def default_output(recipe: Recipe, plan: Plan) -> Path:
    """`<build root>/<first 12 hex of the merge identity>`: text edits keep the folder, weight edits change it."""
    return build_root() / merge_identity(recipe, plan)[:12]


# ---------------------------------------------------------------------------------------------
# Finished outputs


def source_pin(src: PinnedSource) -> SourcePin:
    """A source as provenance records it: its pin and weight (labels are the card's, paths never leave)."""
    weight: Any = src.weight
    if isinstance(weight, list):
        weight = [w.model_dump() for w in weight]
    return SourcePin(kind=src.kind, repo_id=src.repo_id, revision=src.revision, content_sha256=src.content_sha256,
                     weight=weight)


def matches(provenance: Provenance | None, recipe: Recipe, plan: Plan, out: Path) -> bool:
    """True when `out` holds a finished merge with this merge identity from these exact source pins."""
    if provenance is None or provenance.merge_identity != merge_identity(recipe, plan) or provenance.config_donor != plan.donor:
        return False
    recorded = provenance.sources
    if set(recorded) != {s.name for s in plan.sources}:
        return False
    for src in plan.sources:
        mine, theirs = source_pin(src), recorded[src.name]
        if any(getattr(theirs, k) != getattr(mine, k) for k in ("kind", "repo_id", "revision", "content_sha256")):
            return False
    files = provenance.files
    return bool(files) and all(
        (out / name).is_file() and (out / name).stat().st_size == info.size for name, info in files.items()
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
    """Merge the plan's sources into `out` (default: default_output(recipe, plan)), or reuse a finished merge there.

    `device` is auto|cpu|cuda; `console` shows progress bars (None: quiet); `shard_bytes` overrides the
    output shard size (default: shard_size()).
    """
    started = time.perf_counter()
    out = Path(os.path.abspath(out or default_output(recipe, plan)))
    # Refused before anything is created or removed beside it.
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        found = read_current(Provenance, out)
        if matches(found, recipe, plan, out):
            return MergeResult(out, True, found.device, time.perf_counter() - started, found)
        check_output(out)  # again under the lock: another process may have written it meanwhile
        # Under the lock, the marked staging and set-aside siblings of `out` belong to merges that died.
        staging_dirs.remove_leftovers(out.parent, f"{out.name}.")
        device = pick_device(device)
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
    if out.exists() and not (out / PROVENANCE_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
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
                console: Console | None, shard_bytes: int) -> Provenance:
    import yaml

    check_carried_files(plan, paths)
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
    opened: dict[str, tuple[int, ...]] = {}
    try:
        # run_merge mutates the configuration it is given: it gets its own.
        with _mergekit_hooks(console, shard_hashes, options.write_threads, opened), _quiet_transformers():
            run_merge(MergeConfiguration.model_validate(config), str(staging), options,
                      config_source=yaml.safe_dump(config, sort_keys=False))
    except RegistryError:
        raise
    except Exception as exc:
        raise MergeError(f"mergekit failed while merging {recipe.repo_id}: {type(exc).__name__}: {exc}") from exc
    check_sources_unchanged(plan, paths, opened)
    donor = paths[plan.donor]
    for name in CARRY_FILES:
        if not (staging / name).exists() and (donor / name).is_file():
            shutil.copyfile(donor / name, staging / name)
    check_carried_files(plan, paths)  # nothing was swapped while mergekit copied them
    provenance = _provenance(recipe, plan, staging, device, shard_hashes)
    write_report(provenance, staging)
    for f in staging.iterdir():
        _fsync(f)
    _fsync(staging)
    return provenance


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


def _provenance(recipe: Recipe, plan: Plan, staging: Path, device: str, shard_hashes: dict[str, tuple[str, int]]) -> Provenance:
    from importlib.metadata import version

    files = {}
    for f in sorted(staging.iterdir(), key=lambda p: p.name):
        if f.name == staging_dirs.MARKER:
            continue
        known = shard_hashes.get(_shard_origin(f.name, staging))
        size = f.stat().st_size
        files[f.name] = {"sha256": known[0] if known and known[1] == size else sha256_file(f), "size": size}
    return Provenance(
        merge_identity=merge_identity(recipe, plan),
        merge_method=recipe.merge.merge_method,
        normalize=recipe.merge.parameters.normalize,
        dtype=output_dtype(recipe, plan.source(plan.donor)),
        sources={s.name: source_pin(s) for s in plan.sources},
        config_donor=plan.donor,
        files=files,
        versions={name: version(name) if name != "registry" else __version__
                  for name in ("registry", "mergekit", "torch", "transformers")},
        device=device,
    )


def _shard_origin(name: str, staging: Path) -> str:
    """The name mergekit's writer gave a shard before its final rename (model-3.safetensors)."""
    if name == "model.safetensors":
        return "model-1.safetensors"
    m = re.fullmatch(r"model-(\d+)-of-\d+\.safetensors", name)
    return f"model-{int(m[1])}.safetensors" if m else name


@contextmanager
def _mergekit_hooks(console: Console | None, shard_hashes: dict[str, tuple[str, int]], write_threads: int,
                    opened: dict[str, tuple[int, ...]] | None = None) -> Iterator[None]:
    """Route mergekit's tqdm bars to rich, read checkpoints with SafetensorsReader and write shards with
    write_safetensors (hashed and fsynced on the way), each as soon as it is full, by `write_threads` threads.

    `opened` receives the stat identity of every checkpoint file as it was opened, by absolute path."""
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
                opened[os.path.abspath(shard_path)] = reader.identity
            return reader
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
            st = os.fstat(self.fd)
            self.size = st.st_size
            # The file actually read, whatever is at its path later.
            self.identity = stat_identity(st)
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


def _install(staging: staging_dirs.Staging, out: Path) -> None:
    """Rename the complete staging folder to `out`, setting aside (then removing) a previous output."""
    old = None
    if out.exists():
        old = staging_dirs.set_aside(out, out.with_name(f"{out.name}.old-{os.getpid()}"))
    _stop_here("rename")
    staging.install(out)
    _fsync(out.parent)
    _stop_here("renamed")
    if old is not None:
        old.remove()


def _stop_here(point: str) -> None:
    if os.environ.get("REGISTRY_TEST_STOP_AT") == point:
        os.kill(os.getpid(), signal.SIGSTOP)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

