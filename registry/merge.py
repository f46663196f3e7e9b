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
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, build_root
from . import staging as staging_dirs
from .errors import MergeError, RegistryError, UsageError
from .files import fsync_path, sha256_file
from .identity import merge_identity
from .machine import WRITE_THREADS, check_resources, estimate_resources, output_dtype, pick_device
from .reports import PROVENANCE_FILE, Provenance, SourcePin, read_current
from .reports import write as write_report
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
                console: Console | None, shard_bytes: int) -> Provenance:
    import yaml

    check_carried_files(plan, paths)
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
    check_carried_files(plan, paths)  # nothing was swapped while mergekit copied them
    provenance = _provenance(recipe, plan, staging, device, shard_hashes)
    write_report(provenance, staging)
    for f in staging.iterdir():
        fsync_path(f)
    fsync_path(staging)
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


def _provenance(recipe: Recipe, plan: Plan, staging: Path, device: str, shard_hashes: dict[str, tuple[str, int]]) -> Provenance:
    from importlib.metadata import version

    files = {}
    for f in sorted(staging.iterdir(), key=lambda p: p.name):
        if f.name == staging_dirs.MARKER:
            continue
        known = shard_hashes.get(f.name)
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
    fsync_path(out.parent)
    if old is not None:
        old.remove()
