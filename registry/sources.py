"""The plan stage: pin every source of a recipe and check they can be merged, before reading a weight.

A Hub source is pinned to the commit sha its revision points at; a local source to the sha256 of its
weight files. The pins go to a lock file beside the recipe (`cos_fmt.yaml` -> `cos_fmt.lock.json`), so
a later plan or merge notices a checkpoint that changed underneath it. Compatibility is judged from
`config.json`, tokenizer files and safetensors headers only: no tensor data is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .errors import SourceError
from .files import replace_atomically, sha256_file
from .machine import Estimate, estimate_resources
from .machine import check_resources as _check_resources
from .recipe import ModelRef, Recipe, WeightFilter, env_names, parse_ref
from .yamldoc import Loc

LOCK_FORMAT = 1
# Files that define how text becomes token ids: they must agree, or ids mean different things.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json",
)
# Small files worth comparing or carrying over, but not a reason to refuse a merge.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# Every file a merge reads from a source folder besides the weights, or carries into the merged model:
# mergekit copies the tokenizer files, templates and generation_config.json of the donor verbatim (and
# its tagalong preprocessor configs), transformers reads the rest. Each must be a regular file inside
# the folder, so a link cannot publish /proc/self/environ or a file from elsewhere on the machine.
CARRIED_FILES = (
    "config.json", "generation_config.json", *TOKENIZER_FILES, *TEMPLATE_FILES,
    "preprocessor_config.json", "video_preprocessor_config.json",
)
# Filesystems whose files are views of the machine, never checkpoint data.
SYSTEM_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
# The tensor-to-shard map of a sharded checkpoint.
SHARD_INDEX = "model.safetensors.index.json"
# Config keys that decide whether two checkpoints share an architecture.
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads")
# Bytes per element of each safetensors dtype (the sub-byte F4/F6 types are not merged, so not listed).
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}
# Ancestry: fine-tunes of one base differ by a fraction of their weights' norm (||b - a|| / ||a|| is 0.23
# between the two toy fine-tunes, which were trained hard, 0.12-0.22 from their base, 0.02 for the test
# families); independently initialised weights differ by about sqrt(2) (1.34-1.51 from a toy fine-tune
# to a fresh initialisation of its config). A source further than this from the donor is refused
# unless the recipe sets allow_unrelated: true.
MAX_RELATIVE_DISTANCE = 0.5
# What plan reads to measure it: the first bytes of a few 2-D tensors spread over the layers.
ANCESTRY_TENSORS = 4
ANCESTRY_SAMPLE_BYTES = 4 << 20
# A safetensors header beyond this is corrupt, not large: real ones are a few hundred KB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_HEX40 = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as its safetensors header describes it."""

    dtype: str
    shape: tuple[int, ...]
    # Where its bytes lie, for a local file (shard name, byte offset of its data in that file): plan reads a
    # few tensors to check that the sources are related. Not part of what makes two tensors alike.
    file: str | None = field(default=None, compare=False)
    offset: int = field(default=0, compare=False)

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass(frozen=True)
class FileInfo:
    """A weight file: its size and sha256 (None for a Hub file whose hash the Hub did not give)."""

    size: int
    sha256: str | None = None


@dataclass
class PinnedSource:
    """One model of the merge, resolved, inspected and pinned."""

    name: str  # MergeInput.key: the alias, the Hub reference, or model_N; never a path
    kind: Literal["local", "hub"]
    model: str  # as written in the recipe (environment references unexpanded)
    loc: Loc  # where the recipe names it, for errors
    path: Path | None  # local folder; for a Hub source, the downloaded snapshot once fetched
    repo_id: str | None = None
    requested_revision: str | None = None
    revision: str | None = None  # Hub: the commit sha
    content_sha256: str | None = None  # local: see content_sha256()
    files: dict[str, FileInfo] = field(default_factory=dict)
    label: str | None = None
    hub_id: str | None = None
    weight: float | list[WeightFilter] | None = None
    license: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    tokenizer: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    carried: dict[str, str] = field(default_factory=dict)  # CARRIED_FILES present: file name -> sha256
    status: Literal["new", "locked", "updated"] = "new"

    @property
    def weight_bytes(self) -> int:
        """Total size of the weight files."""
        return sum(f.size for name, f in self.files.items() if name.endswith(".safetensors"))

    @property
    def pin(self) -> str:
        """The commit sha (Hub) or content sha256 (local) this source is pinned to."""
        return (self.revision if self.kind == "hub" else self.content_sha256) or ""

    def provenance(self) -> dict[str, Any]:
        """The source's entry in provenance.json: pins and labels, never a local path."""
        weight: Any = self.weight
        if isinstance(weight, list):
            weight = [w.model_dump() for w in weight]
        return {
            "kind": self.kind,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "content_sha256": self.content_sha256,
            "label": self.label,
            "hub_id": self.hub_id,
            "weight": weight,
        }


@dataclass(frozen=True)
class Check:
    """One compatibility or policy check of the plan."""

    name: str
    status: Literal["passed", "warning", "failed"]
    message: str


@dataclass
class Plan:
    """Pinned sources, the checks they passed, resource estimates and the lock file to write."""

    recipe_sha256: str
    repo_id: str
    sources: list[PinnedSource]
    donor: str
    tokenizer_source: str | None
    checks: list[Check]
    estimate: Estimate | None
    lock_path: Path | None
    lock: dict[str, Any]
    lock_changed: bool

    @property
    def warnings(self) -> list[str]:
        """Messages of the checks that passed with a warning."""
        return [c.message for c in self.checks if c.status == "warning"]

    def source(self, name: str) -> PinnedSource:
        """The source called `name`."""
        for src in self.sources:
            if src.name == name:
                return src
        raise KeyError(name)

    def for_recipe(self, recipe: Recipe) -> Plan:
        """This plan for another point of the same family: the same pins, checks and estimate, that recipe's weights.

        A family's points differ only in their merge weights, which pinning, the compatibility checks and
        the resource estimate do not read; so a sweep pins and hashes its sources once.
        """
        weights = {item.key: item.weight for item in recipe.inputs()}
        sources = [replace(src, weight=weights[src.name]) if src.name in weights else src for src in self.sources]
        return replace(self, recipe_sha256=recipe.sha256, repo_id=recipe.repo_id, sources=sources)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (for `registry plan --format json`)."""
        return {
            "recipe_sha256": self.recipe_sha256,
            "repo_id": self.repo_id,
            "donor": self.donor,
            "tokenizer_source": self.tokenizer_source,
            "sources": {
                s.name: {
                    **s.provenance(),
                    "model": s.model,
                    "requested_revision": s.requested_revision,
                    "license": s.license,
                    "status": s.status,
                    "weight_bytes": s.weight_bytes,
                    "model_type": s.config.get("model_type"),
                    "tensors": len(s.tensors),
                }
                for s in self.sources
            },
            "checks": [asdict(c) for c in self.checks],
            "estimate": asdict(self.estimate) if self.estimate else None,
            "lock": str(self.lock_path) if self.lock_path else None,
            "lock_changed": self.lock_changed,
        }


# ---------------------------------------------------------------------------------------------
# The plan


def plan(
    recipe: Recipe,
    *,
    update: bool = False,
    out: Path | None = None,
    device: str = "auto",
    check_resources: bool = True,
    on_hash: Callable[[int, int], None] | None = None,
) -> Plan:
    """Resolve, inspect and pin every source of `recipe`; raise SourceError when they cannot be merged.

    `update` accepts local sources whose content changed since the lock file was written and re-resolves
    Hub revisions; `out` and `device` are what the resource estimate is made for (MergeError when the
    disk or memory cannot hold the merge); `on_hash(done, total)` reports hashing progress in bytes.
    """
    base_dir = recipe.path.parent if recipe.path else Path.cwd()
    lock_path = lock_path_for(recipe)
    old_lock = read_lock(lock_path) if lock_path else {}
    old_entries = old_lock.get("sources", {})

    sources = [_declare(recipe, i) for i in range(len(recipe.merge.models))]
    problems = []
    for src in sources:
        try:
            if src.kind == "local":
                src.path = expand_path(recipe, src, base_dir)
                _inspect_dir(recipe, src, src.path)
            else:
                _inspect_hub(recipe, src, old_entries.get(src.name), update)
        except SourceError as exc:
            problems.append(str(exc))
    if problems:
        raise SourceError("\n".join(problems))

    donor = _donor(recipe, sources)
    tokenizer_source = _tokenizer_setting(recipe, sources)
    checks = compatibility_checks(recipe, sources, donor, tokenizer_source)
    failed = [c for c in checks if c.status == "failed"]
    if failed:
        raise SourceError("\n".join(c.message for c in failed))

    estimate = None
    if out is not None or check_resources:
        from . import build_root

        # Before the pins are known the build folder is not named yet; its filesystem is the build root's.
        estimate = estimate_resources(recipe, sources, donor, out or build_root(), device)
        if check_resources:
            _check_resources(estimate)

    _hash_local_sources([s for s in sources if s.kind == "local"], on_hash)
    checks.extend(_lock_checks(recipe, sources, old_entries, update))
    failed = [c for c in checks if c.status == "failed"]
    if failed:
        raise SourceError("\n".join(c.message for c in failed))

    lock = {"format": LOCK_FORMAT, "sources": {s.name: lock_entry(s) for s in sources}}
    return Plan(
        recipe_sha256=recipe.sha256,
        repo_id=recipe.repo_id,
        sources=sources,
        donor=donor,
        tokenizer_source=tokenizer_source,
        checks=checks,
        estimate=estimate,
        lock_path=lock_path,
        lock=lock,
        lock_changed=lock != old_lock,
    )


def _declare(recipe: Recipe, index: int) -> PinnedSource:
    entry = recipe.merge.models[index]
    declared = recipe.sources.get(entry.model)
    loc: Loc = ("sources", entry.model, "model") if declared else ("merge", "models", index, "model")
    text = declared.model if declared else entry.model
    ref = parse_ref(text)  # validated when the recipe was loaded
    if declared and declared.revision:
        ref = ModelRef(ref.kind, ref.value, declared.revision)
    weight = entry.parameters.weight if entry.parameters else None
    return PinnedSource(
        name=recipe.inputs()[index].key,
        kind=ref.kind,
        model=text,
        loc=loc,
        path=None,
        repo_id=ref.value if ref.kind == "hub" else None,
        requested_revision=ref.revision,
        label=declared.label if declared else None,
        hub_id=declared.hub_id if declared else None,
        weight=weight,
    )


def _error(recipe: Recipe, src: PinnedSource | Loc, message: str) -> SourceError:
    loc = src.loc if isinstance(src, PinnedSource) else src
    return SourceError(str(recipe.problem(loc, message)))


def expand_path(recipe: Recipe, src: PinnedSource, base_dir: Path) -> Path:
    """The folder a local source names: ${VAR} from the environment, ~, relative to the recipe's folder."""
    for name in env_names(src.model):
        if not os.environ.get(name):
            state = "is empty" if name in os.environ else "is not set"
            raise _error(recipe, src, f"environment variable {name} {state}; export {name}=/path/to/the/folder it stands for")
    return expand_local(src.model, base_dir)


def expand_local(text: str, base_dir: Path) -> Path:
    """A local source's folder as written in a recipe: ${VAR} (all set) from the environment, ~, and
    relative to `base_dir` (the recipe's folder)."""
    path = Path(re.sub(r"\$\{([^}]*)\}", lambda m: os.environ[m[1]], text)).expanduser()
    return Path(os.path.abspath(path if path.is_absolute() else base_dir / path))


# ---------------------------------------------------------------------------------------------
# Inspecting a checkpoint folder: config, tokenizer, safetensors headers


def _inspect_dir(recipe: Recipe, src: PinnedSource, path: Path, *, hub_files: bool = False) -> None:
    shown = src.model if not hub_files else f"{src.repo_id}@{src.revision}"
    if not path.exists():
        raise _error(recipe, src, f"source '{src.name}': {path} does not exist")
    if not path.is_dir():
        raise _error(recipe, src, f"source '{src.name}': {path} is not a folder; name the checkpoint folder holding config.json")
    config_file = path / "config.json"
    for name in CARRIED_FILES:
        problem = source_file_problem(path, name)
        if problem:
            raise _error(recipe, src, f"source '{src.name}': {problem}")
    if not config_file.is_file():
        raise _error(recipe, src, f"source '{src.name}': no config.json in {path}; name the folder of a Hugging Face checkpoint")
    try:
        src.config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _error(recipe, src, f"source '{src.name}': cannot read {config_file}: {exc}") from None
    archs = src.config.get("architectures") if isinstance(src.config, dict) else None
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str)):
        raise _error(recipe, src, f"source '{src.name}': {config_file} must name exactly one architecture "
                                  f"(e.g. \"architectures\": [\"Qwen2ForCausalLM\"]); mergekit picks tensor names from it")
    weight_files = _weight_files(recipe, src, path, shown)
    for name in weight_files:
        problem = source_file_problem(path, name, weights=True)
        if problem:
            raise _error(recipe, src, f"source '{src.name}': {problem}")
    tensors: dict[str, TensorInfo] = {}
    for name in weight_files:
        if name.endswith(".safetensors"):
            for key, info in read_safetensors_header(path / name, recipe, src).items():
                tensors[key] = info
    src.tensors = tensors
    if not src.files:
        src.files = {name: FileInfo((path / name).stat().st_size) for name in weight_files}
    src.carried = {name: sha256_file(path / name) for name in CARRIED_FILES if (path / name).is_file()}
    src.tokenizer = {name: digest for name, digest in src.carried.items() if name in (*TOKENIZER_FILES, *TEMPLATE_FILES)}


def source_file_problem(folder: Path, name: str, *, weights: bool = False) -> str | None:
    """Why the file `name` of a source folder must not be read or carried over, or None (also when absent).

    Files carried into the merged model must resolve to a regular file inside the folder or in the Hub's
    cache; weights, which are merged and never copied, may lie elsewhere but must be regular files too.
    """
    path = folder / name
    if not os.path.lexists(path):
        return None
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # a loop of links
        return f"{name} is a link that cannot be resolved; replace it with the file itself"
    try:
        st = target.stat()
    except OSError:
        return f"{name} is a link to {target}, which does not exist; replace it with the file itself"
    if any(target.is_relative_to(root) for root in SYSTEM_ROOTS):
        return f"{name} is a link to {target}, a system file, not checkpoint data; replace it with the file itself"
    if not stat.S_ISREG(st.st_mode):
        return f"{name} is not a regular file ({_file_kind(st.st_mode)}); replace it with the file itself"
    if not weights and not (target.is_relative_to(folder.resolve()) or _is_hub_blob(target)):
        return f"{name} is a link to {target}, outside the source folder; copy the file into the folder instead of linking it"
    return None


def _is_hub_blob(path: Path) -> bool:
    # huggingface_hub's cache (and `--local-dir` downloads that link into it): models--OWNER--NAME/blobs/<hash>.
    return path.parent.name == "blobs" and path.parent.parent.name.startswith("models--")


def check_carried_files(plan: Plan, paths: dict[str, Path]) -> None:
    """Raise SourceError unless every source folder's carried files are still safe and as `plan` hashed them.

    The merge calls this before and after mergekit copies them, so what is copied is what plan checked.
    """
    problems = []
    for src in plan.sources:
        folder = paths[src.name]
        for name in CARRIED_FILES:
            problem = source_file_problem(folder, name)
            present = (folder / name).is_file()
            if problem is None and name in src.carried:
                if not present:
                    problem = f"{name} was removed since plan"
                elif sha256_file(folder / name) != src.carried[name]:
                    problem = f"{name} changed since plan"
            elif problem is None and present and src.kind == "local":
                problem = f"{name} appeared since plan"
            if problem:
                problems.append(f"source '{src.name}': {problem}; plan and merge again")
    if problems:
        raise SourceError("\n".join(problems))


def _weight_files(recipe: Recipe, src: PinnedSource, path: Path, shown: str) -> list[str]:
    index = path / SHARD_INDEX
    if os.path.lexists(index):
        problem = source_file_problem(path, SHARD_INDEX, weights=True)
        if problem:
            raise _error(recipe, src, f"source '{src.name}': {problem}")
        try:
            shards = index_shards(index)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _error(recipe, src, f"source '{src.name}': cannot read {index}: {exc}") from None
        odd = [s for s in shards if not isinstance(s, str) or Path(s).name != s or s in (".", "..")]
        if odd:
            raise _error(recipe, src, f"source '{src.name}': {index.name} lists {json.dumps(odd[0])}, which is not a file name in {path}; "
                                      "shards lie beside the index")
        missing = [s for s in shards if not os.path.lexists(path / s)]
        if missing:
            raise _error(
                recipe, src, f"source '{src.name}': {index.name} lists {missing[0]}, which is not in {path}; the download or copy is incomplete"
            )
        return [index.name, *shards]
    if os.path.lexists(path / "model.safetensors"):
        return ["model.safetensors"]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise _error(
            recipe, src,
            f"source '{src.name}': {shown} has only PyTorch .bin weights; convert it to safetensors first: "
            f"python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" and point the recipe there",
        )
    if any(path.glob("*.safetensors")):
        raise _error(recipe, src, f"source '{src.name}': {path} has .safetensors shards but no model.safetensors.index.json; restore the index file")
    raise _error(recipe, src, f"source '{src.name}': no model weights (model.safetensors) in {path}")


def index_shards(index: Path) -> list[str]:
    """The shard files a model.safetensors.index.json maps tensors to, sorted."""
    return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))


def weight_file_names(path: Path) -> list[str]:
    """The files that hold a checkpoint folder's weights: the shard index and the shards it lists, else model.safetensors."""
    index = path / SHARD_INDEX
    return [index.name, *index_shards(index)] if index.is_file() else ["model.safetensors"]


def folder_content_sha256(path: Path) -> str | None:
    """The content sha256 `plan` pins for the checkpoint folder `path`; None when its weights cannot be read."""
    try:
        names = weight_file_names(path)
        digests = hash_files([path / name for name in names])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return content_sha256({file.name: digest for file, digest in digests.items()})


def read_safetensors_header(file: Path, recipe: Recipe | None = None, src: PinnedSource | None = None) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes from a safetensors file's header, checked against the file's size
    as completely as the safetensors format allows; no tensor data is read."""

    def fail(message: str) -> SourceError:
        text = f"{file}: {message}"
        if recipe is not None and src is not None:
            return _error(recipe, src, f"source '{src.name}': {text}")
        return SourceError(text)

    try:
        st = file.stat()
        if not stat.S_ISREG(st.st_mode):
            # Opening a FIFO would block, and a device reads as an endless or empty stream.
            raise fail(f"not a regular file ({_file_kind(st.st_mode)}); a weight file must be an ordinary file")
        size = st.st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise fail("not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise fail(f"corrupt safetensors header (claims {length} bytes; file has {size})")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from None
    except ValueError:
        raise fail("corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise fail("corrupt safetensors header")
    data_bytes = size - 8 - length
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, value in header.items():
        if key == "__metadata__":
            continue
        problem = _tensor_entry_problem(key, value, data_bytes)
        if problem:
            raise fail(problem)
        begin, end = value["data_offsets"]
        spans.append((begin, end, key))
        out[key] = TensorInfo(value["dtype"], tuple(value["shape"]), file.name, 8 + length + begin)
    # safetensors lays tensors end to end from byte 0 of the data: no gap, no overlap, nothing after.
    at, previous = 0, None
    for begin, end, key in sorted(spans):
        if begin < at:
            raise fail(f"corrupt safetensors header: tensor {key} (bytes {begin}-{end}) overlaps tensor {previous} (ends at byte {at})")
        if begin > at:
            where = f"tensor {previous} ends at byte {at}" if previous else "the data starts at byte 0"
            raise fail(f"corrupt safetensors header: tensor {key} starts at byte {begin}, but {where}")
        at, previous = end, key
    if at != data_bytes:
        raise fail(f"corrupt safetensors header: the tensors end at byte {at} of the data, which has {data_bytes}")
    return out


def _tensor_entry_problem(key: str, value: Any, data_bytes: int) -> str | None:
    """Why the header entry of tensor `key` is impossible in a file with `data_bytes` of data, or None."""
    bad = f"corrupt safetensors header: tensor {key}"
    if not isinstance(value, dict) or not {"dtype", "shape", "data_offsets"} <= set(value):
        return f"{bad} must have dtype, shape and data_offsets"
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        return f"{bad} has unknown dtype {json.dumps(dtype)}; known: {', '.join(DTYPE_BYTES)}"
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        return f"{bad} has shape {json.dumps(shape)}, which is not a list of non-negative integers"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        return f"{bad} has data_offsets {json.dumps(offsets)}, which is not a list of two integers [begin, end]"
    begin, end = offsets
    if begin < 0 or end < 0:
        return f"{bad} has negative data_offsets {json.dumps(offsets)}"
    if begin > end:
        return f"{bad} begins at byte {begin}, after its end at byte {end}"
    if end > data_bytes:
        return f"truncated: tensor {key} ends at byte {end} of the data, which has {data_bytes}; copy the file again"
    need = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != need:
        return f"{bad} spans {end - begin} bytes, but {dtype} of shape {json.dumps(shape)} takes {need}"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not an ordinary file"


# ---------------------------------------------------------------------------------------------
# Hub sources


def _hub_api():
    from huggingface_hub import HfApi

    return HfApi()


def _hub_error(recipe: Recipe, src: PinnedSource, exc: BaseException) -> SourceError:
    from huggingface_hub import constants

    from .hub_errors import describe

    where = f"{src.repo_id}@{src.requested_revision}" if src.requested_revision else src.repo_id
    name = f"source '{src.name}'"
    failure = describe(exc, src.repo_id, src.requested_revision, constants.ENDPOINT)
    if failure is None:
        return _error(recipe, src, f"{name}: pinning {where} failed: {type(exc).__name__}: {exc}")
    if failure.kind in ("gated", "no_repo", "no_revision", "no_file"):
        return _error(recipe, src, f"{name}: {failure.message}")
    instead = ", or use a local path" if failure.kind in ("offline", "transport", "busy") else ""
    return _error(recipe, src, f"{name}: cannot pin {where}: {failure.message}{instead}")


def _inspect_hub(recipe: Recipe, src: PinnedSource, locked: dict[str, Any] | None, update: bool) -> None:
    """Pin a Hub source to a commit and read its config, tokenizer files and safetensors headers."""
    from huggingface_hub import constants

    reuse = (
        not update and locked is not None and locked.get("kind") == "hub" and locked.get("model") == src.model
        and locked.get("revision") == src.requested_revision and _HEX40.fullmatch(str(locked.get("commit", "")))
    )
    if constants.HF_HUB_OFFLINE:
        # Offline, a pinned commit already in the local cache is as good as asking the Hub.
        if reuse:
            path = _cached_snapshot(src.repo_id, locked["commit"])
            if path is not None:
                src.revision = locked["commit"]
                src.status = "locked"
                _inspect_dir(recipe, src, path, hub_files=True)
                return
        from huggingface_hub.errors import OfflineModeIsEnabled

        raise _hub_error(recipe, src, OfflineModeIsEnabled("offline"))

    api = _hub_api()
    revision = locked["commit"] if reuse else src.requested_revision
    try:
        info = api.model_info(src.repo_id, revision=revision, files_metadata=True)
    except Exception as exc:  # every failure becomes one line saying what to do
        raise _hub_error(recipe, src, exc) from None
    src.revision = info.sha
    if reuse or (locked and locked.get("model") == src.model and locked.get("commit") == info.sha):
        src.status = "locked"
    else:
        src.status = "updated" if locked and locked.get("model") == src.model else "new"
    card = info.card_data.to_dict() if info.card_data is not None else {}
    src.license = card.get("license")
    siblings = {s.rfilename: s for s in info.siblings or []}
    if "config.json" not in siblings:
        raise _error(recipe, src, f"source '{src.name}': {src.repo_id}@{info.sha[:12]} has no config.json; name a Hugging Face checkpoint")
    if not any(n.endswith(".safetensors") for n in siblings):
        if any(n.endswith(".bin") for n in siblings):
            raise _error(
                recipe, src,
                f"source '{src.name}': {src.repo_id} has only PyTorch .bin weights; convert it to safetensors "
                f"(download it, then save_pretrained() with transformers) and use the converted folder as a local source",
            )
        raise _error(recipe, src, f"source '{src.name}': {src.repo_id}@{info.sha[:12]} has no .safetensors weights")
    src.files = {
        name: FileInfo(s.size or 0, s.lfs.sha256 if s.lfs else None)
        for name, s in sorted(siblings.items())
        if name.endswith(".safetensors") or name == SHARD_INDEX
    }
    try:
        from huggingface_hub import hf_hub_download

        small = ["config.json", *(n for n in (*TOKENIZER_FILES, *TEMPLATE_FILES) if n in siblings)]
        local = {n: Path(hf_hub_download(src.repo_id, n, revision=info.sha)) for n in small}
        meta = api.get_safetensors_metadata(src.repo_id, revision=info.sha)
    except Exception as exc:
        raise _hub_error(recipe, src, exc) from None
    src.config = json.loads(local["config.json"].read_text(encoding="utf-8"))
    src.carried = {n: sha256_file(p) for n, p in local.items()}
    src.tokenizer = {n: digest for n, digest in src.carried.items() if n != "config.json"}
    src.tensors = {
        key: TensorInfo(t.dtype, tuple(t.shape))
        for file_meta in meta.files_metadata.values()
        for key, t in file_meta.tensors.items()
    }


def _cached_snapshot(repo_id: str, commit: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=commit, local_files_only=True))
    except Exception:  # not cached
        return None


def fetch(src: PinnedSource) -> Path:
    """The local folder of a source: a Hub source is downloaded at its pinned commit (cached)."""
    if src.kind == "local":
        assert src.path is not None
        return src.path
    if src.path is not None:
        return src.path
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            src.repo_id, revision=src.revision,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"],
        )
    except Exception as exc:
        kinds = {c.__name__ for c in type(exc).__mro__}
        raise SourceError(f"source '{src.name}': downloading {src.repo_id}@{src.revision} failed ({type(exc).__name__}: {exc}); "
                          + ("check the network and retry" if kinds & {"TransportError", "OSError"} else "retry, or pin another revision")) from None
    src.path = Path(path)
    return src.path


# ---------------------------------------------------------------------------------------------
# Compatibility


def _donor(recipe: Recipe, sources: list[PinnedSource]) -> str:
    names = [s.name for s in sources]
    base = recipe.merge.base_model
    if base is None:
        return names[0]
    if base not in names:
        raise _error(recipe, ("merge", "base_model"),
                     f"base_model '{base}' is not one of merge.models; for a linear merge it only picks the config and tokenizer donor, "
                     "so name one of the models")
    return base


def _tokenizer_setting(recipe: Recipe, sources: list[PinnedSource]) -> str | None:
    merge = recipe.merge
    if merge.tokenizer_source is not None:
        setting, loc = merge.tokenizer_source, ("merge", "tokenizer_source")
    elif merge.tokenizer is not None:
        setting, loc = merge.tokenizer.source, ("merge", "tokenizer", "source")
    else:
        return None
    names = [s.name for s in sources]
    if setting not in ("union", "base", *names):
        raise _error(recipe, loc, f"tokenizer source '{setting}' must be one of merge.models ({', '.join(names)}), 'union' or 'base'")
    return setting


def compatibility_checks(recipe: Recipe, sources: list[PinnedSource], donor: str, tokenizer_source: str | None) -> list[Check]:
    """Architecture, sizes, tensor names and shapes, tokenizer files and licenses of `sources` against the donor."""
    ref = next(s for s in sources if s.name == donor)
    checks: list[Check] = []
    # Where the merged model's tokenizer comes from: without one, every prompt encodes to nothing.
    needs = {None: sources, "union": sources, "base": [ref]}.get(tokenizer_source) or [s for s in sources if s.name == tokenizer_source]
    for src in needs:
        if not _has_tokenizer(src):
            checks.append(Check("tokenizer", "failed", str(recipe.problem(
                src.loc, f"source '{src.name}' has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json with merges.txt); "
                         "copy the tokenizer files of the model it was trained from into its folder, "
                         "or set merge.tokenizer_source to a source that has them"))))
    if checks:
        return checks
    vocab_free = tokenizer_source is not None  # mergekit rebuilds embeddings to the chosen tokenizer
    for other in sources:
        if other is ref:
            continue
        problems = []
        for key in ("model_type", "architectures", *SHAPE_KEYS, *(() if vocab_free else ("vocab_size",))):
            mine, theirs = ref.config.get(key), other.config.get(key)
            if mine != theirs:
                problems.append(f"{key} is {json.dumps(theirs)}, '{ref.name}' has {json.dumps(mine)}")
        if problems:
            checks.append(Check("config", "failed", str(recipe.problem(
                other.loc, f"source '{other.name}' cannot be merged with '{ref.name}': " + "; ".join(problems)))))
            continue
        tensors = _tensor_check(recipe, ref, other, vocab_free)
        checks.append(tensors)
        checks.append(_tokenizer_check(recipe, ref, other, tokenizer_source))
        if tensors.status == "passed":
            checks.append(_ancestry_check(recipe, ref, other))
    checks.extend(_license_checks(recipe, sources))
    return checks


def _has_tokenizer(src: PinnedSource) -> bool:
    files = set(src.tokenizer)
    return bool(files & {"tokenizer.json", "tokenizer.model"}) or {"vocab.json", "merges.txt"} <= files


def _tensor_check(recipe: Recipe, ref: PinnedSource, other: PinnedSource, vocab_free: bool) -> Check:
    missing = sorted(set(ref.tensors) - set(other.tensors))
    extra = sorted(set(other.tensors) - set(ref.tensors))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks tensor {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if extra:
            parts.append(f"has tensor {extra[0]}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "") + f" that '{ref.name}' does not")
        return Check("tensors", "failed", str(recipe.problem(
            other.loc, f"source '{other.name}' {' and '.join(parts)}; the checkpoints do not have the same architecture")))
    for key in sorted(ref.tensors):
        a, b = ref.tensors[key].shape, other.tensors[key].shape
        if a == b or (vocab_free and a[1:] == b[1:] and _is_vocab_tensor(key)):
            continue
        return Check("tensors", "failed", str(recipe.problem(
            other.loc, f"source '{other.name}': tensor {key} has shape {list(b)}, '{ref.name}' has {list(a)}; the models cannot be merged")))
    return Check("tensors", "passed", f"'{other.name}' has the same {len(ref.tensors)} tensors as '{ref.name}'")


def _ancestry_check(recipe: Recipe, ref: PinnedSource, other: PinnedSource) -> Check:
    """Refuse `other` when its weights are far from `ref`'s: merging unrelated models yields noise."""
    measured = relative_distance(ref, other)
    if measured is None:
        remote = [s.name for s in (ref, other) if s.kind == "hub"]
        return Check("ancestry", "warning", f"'{other.name}' and '{ref.name}' were not compared in weight space: "
                                            f"plan reads no weights of '{remote[0] if remote else other.name}' from the Hub")
    distance, per_tensor = measured
    if not per_tensor:
        return Check("ancestry", "warning", f"'{other.name}' and '{ref.name}' have no floating-point matrices to compare in weight space")
    numbers = (f"relative distance ||{other.name} - {ref.name}|| / ||{ref.name}|| = {distance:.3g} over {len(per_tensor)} sampled "
               f"tensors (from {min(per_tensor.values()):.3g} to {max(per_tensor.values()):.3g})")
    if distance <= MAX_RELATIVE_DISTANCE:
        return Check("ancestry", "passed", f"'{other.name}' is close to '{ref.name}' in weight space: {numbers}")
    if recipe.allow_unrelated:
        return Check("ancestry", "warning", f"'{other.name}' is not a close relative of '{ref.name}' ({numbers}, over the "
                                            f"limit of {MAX_RELATIVE_DISTANCE}); merged anyway because allow_unrelated is true")
    return Check("ancestry", "failed", str(recipe.problem(other.loc, (
        f"source '{other.name}' does not look like a relative of '{ref.name}': {numbers}, over the limit of "
        f"{MAX_RELATIVE_DISTANCE} (fine-tunes of one base are far below it, unrelated weights near 1.4); merge fine-tunes "
        "of the same base model, or set allow_unrelated: true in the recipe if you mean it"))))


def relative_distance(a: PinnedSource, b: PinnedSource) -> tuple[float, dict[str, float]] | None:
    """||b - a|| / ||a|| over the first bytes of a few 2-D tensors, pooled and per tensor; None when either
    source's weights are not on this machine (a Hub source before the merge)."""
    names = _ancestry_sample(a, b)
    if names is None:
        return None
    import numpy as np

    diff_sq = norm_sq = 0.0
    per_tensor = {}
    for name in names:
        x, y = _read_sample(a, name), _read_sample(b, name)
        d, n = float(np.dot(y - x, y - x)), float(np.dot(x, x))
        per_tensor[name] = _ratio(d, n)
        diff_sq, norm_sq = diff_sq + d, norm_sq + n
    return _ratio(diff_sq, norm_sq), per_tensor


def _ratio(diff_sq: float, norm_sq: float) -> float:
    if norm_sq == 0:
        return 0.0 if diff_sq == 0 else math.inf
    return math.sqrt(diff_sq / norm_sq)


_SAMPLE_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def _ancestry_sample(a: PinnedSource, b: PinnedSource) -> list[str] | None:
    if a.path is None or b.path is None or any(info.file is None for src in (a, b) for info in src.tensors.values()):
        return None  # a Hub source, known from the Hub's metadata only
    matrices = sorted(
        name for name, info in a.tensors.items()
        if len(info.shape) == 2 and info.dtype in _SAMPLE_DTYPES and b.tensors.get(name) == info and info.numel > 0
    )
    # The layers' matrices say most about training; embeddings only when there is nothing else.
    names = [n for n in matrices if not _is_vocab_tensor(n)] or matrices
    if len(names) <= ANCESTRY_TENSORS:
        return names
    step = (len(names) - 1) / (ANCESTRY_TENSORS - 1)
    return [names[round(i * step)] for i in range(ANCESTRY_TENSORS)]


def _read_sample(src: PinnedSource, name: str):
    """The first ANCESTRY_SAMPLE_BYTES of tensor `name` as float64 (read straight from its file)."""
    import numpy as np

    info = src.tensors[name]
    assert src.path is not None and info.file is not None
    width = DTYPE_BYTES[info.dtype]
    count = min(info.numel, ANCESTRY_SAMPLE_BYTES // width)
    with (src.path / info.file).open("rb") as f:
        f.seek(info.offset)
        data = f.read(count * width)
    raw = np.frombuffer(data, dtype=_SAMPLE_DTYPES[info.dtype])
    if info.dtype == "BF16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float64)


def _is_vocab_tensor(name: str) -> bool:
    return "embed_tokens" in name or name.startswith("lm_head") or "wte" in name


def _tokenizer_check(recipe: Recipe, ref: PinnedSource, other: PinnedSource, tokenizer_source: str | None) -> Check:
    differ = sorted(n for n in set(ref.tokenizer) | set(other.tokenizer)
                    if n in TOKENIZER_FILES and ref.tokenizer.get(n) != other.tokenizer.get(n))
    if not differ:
        templates = [n for n in TEMPLATE_FILES if ref.tokenizer.get(n) != other.tokenizer.get(n)]
        if templates:
            return Check(
                "tokenizer", "warning", f"'{other.name}' has a different {templates[0]} than '{ref.name}'; the merged model uses '{ref.name}''s"
            )
        return Check("tokenizer", "passed", "tokenizer files are identical")
    listing = ", ".join(differ)
    if tokenizer_source is not None:
        return Check("tokenizer", "warning", f"tokenizer files differ between '{ref.name}' and '{other.name}' ({listing}); "
                     f"mergekit builds the tokenizer from tokenizer source '{tokenizer_source}'")
    return Check("tokenizer", "failed", str(recipe.problem(
        other.loc, f"source '{other.name}' has a different tokenizer than '{ref.name}' ({listing} differ); "
                   "set merge.tokenizer_source to the source whose tokenizer the merge should use")))


def _license_checks(recipe: Recipe, sources: list[PinnedSource]) -> list[Check]:
    checks = []
    for src in sources:
        if src.kind != "hub":
            continue
        if src.license is None:
            checks.append(
                Check("license", "warning", f"'{src.name}' ({src.repo_id}) declares no license; check that you may redistribute a merge of it")
            )
        elif recipe.license is not None and src.license != recipe.license:
            checks.append(Check("license", "warning", f"'{src.name}' ({src.repo_id}) is licensed '{src.license}' but the recipe says "
                                f"'{recipe.license}'; check that the parent's license allows it"))
        else:
            checks.append(Check("license", "passed", f"'{src.name}' ({src.repo_id}) is licensed '{src.license}'"))
    return checks


# ---------------------------------------------------------------------------------------------
# Content hashes


def content_sha256(files: dict[str, str]) -> str:
    """sha256 of a `sha256sum`-style listing ("<hex>  <name>\\n", sorted by name) of the weight files."""
    listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def cache_dir() -> Path:
    """Where registry keeps caches: $REGISTRY_HOME/cache, else $XDG_CACHE_HOME/registry or ~/.cache/registry."""
    if os.environ.get("REGISTRY_HOME"):
        return Path(os.environ["REGISTRY_HOME"]) / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "registry"


def stat_identity(st: os.stat_result) -> tuple[int, ...]:
    """What tells one version of a file from another without reading it: size, mtime, ctime, inode, device."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class HashCache:
    """sha256 of files keyed by path and stat (size, mtime, ctime, inode), as git's index does.

    Rewriting a file changes its ctime, which no user tool can set back, so a stale entry is never used.
    """

    def __init__(self, file: Path | None = None):
        self.file = file or cache_dir() / "file-hashes.json"
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    @staticmethod
    def _key(st: os.stat_result) -> list[int]:
        return list(stat_identity(st))

    def get(self, path: Path) -> str | None:
        """The cached sha256 of `path`, if the file has not changed since it was hashed."""
        entry = self.entries.get(str(path))
        if entry and entry.get("stat") == self._key(path.stat()):
            return entry["sha256"]
        return None

    def put(self, path: Path, st: os.stat_result, digest: str) -> None:
        """Remember `digest` for `path` as it was when `st` was taken."""
        self.entries[str(path)] = {"stat": self._key(st), "sha256": digest}
        self.dirty = True

    def save(self) -> None:
        """Write the cache (atomically; a failure to write only costs a rehash next time)."""
        if not self.dirty:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(self.file, json.dumps(self.entries, sort_keys=True).encode("utf-8"))
        except OSError:
            pass


def hash_files(paths: list[Path], on_hash: Callable[[int, int], None] | None = None) -> dict[Path, str]:
    """sha256 of each file, from the stat-keyed cache where unchanged, else read in parallel."""
    cache = HashCache()
    result: dict[Path, str] = {}
    todo = []
    for path in paths:
        digest = cache.get(path)
        if digest is None:
            todo.append(path)
        else:
            result[path] = digest
    total = sum(p.stat().st_size for p in todo)
    done = 0

    def work(path: Path) -> tuple[Path, os.stat_result, str]:
        st = path.stat()
        return path, st, sha256_file(path)

    # hashlib releases the GIL on large buffers, so threads hash files on every core.
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        for path, st, digest in pool.map(work, todo):
            if path.stat().st_mtime_ns == st.st_mtime_ns:
                cache.put(path, st, digest)
            result[path] = digest
            done += st.st_size
            if on_hash:
                on_hash(done, total)
    cache.save()
    return result


def _hash_local_sources(sources: list[PinnedSource], on_hash: Callable[[int, int], None] | None) -> None:
    wanted = [s.path / name for s in sources for name in s.files if s.path is not None]
    digests = hash_files(wanted, on_hash)
    for src in sources:
        assert src.path is not None
        hashes = {name: digests[src.path / name] for name in src.files}
        src.files = {name: FileInfo(info.size, hashes[name]) for name, info in src.files.items()}
        src.content_sha256 = content_sha256(hashes)


# ---------------------------------------------------------------------------------------------
# The lock file


def lock_path_for(recipe: Recipe) -> Path | None:
    """`recipes/cos_fmt.lock.json` for `recipes/cos_fmt.yaml`; None for a recipe not read from a file."""
    if recipe.path is None:
        return None
    return recipe.path.with_name(f"{recipe.path.stem}.lock.json")


def read_lock(path: Path) -> dict[str, Any]:
    """The lock file's content; {} when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SourceError(f"{path}: cannot read the lock file: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SourceError(f"{path}: the lock file is not valid JSON ({exc}); delete it and run `registry plan` to pin the sources again") from None
    if not isinstance(data, dict) or data.get("format") != LOCK_FORMAT or not isinstance(data.get("sources"), dict):
        raise SourceError(f"{path}: not a registry lock file of format {LOCK_FORMAT}; delete it and run `registry plan` to pin the sources again")
    return data


def lock_entry(src: PinnedSource) -> dict[str, Any]:
    """A source's pin as stored in the lock file (the model as written, never an expanded path)."""
    if src.kind == "hub":
        return {"kind": "hub", "model": src.model, "revision": src.requested_revision, "commit": src.revision}
    return {
        "kind": "local",
        "model": src.model,
        "content_sha256": src.content_sha256,
        "files": {name: info.sha256 for name, info in sorted(src.files.items())},
    }


def _lock_checks(recipe: Recipe, sources: list[PinnedSource], old: dict[str, Any], update: bool) -> list[Check]:
    checks = []
    lock_path = lock_path_for(recipe)
    lock_name = lock_path.name if lock_path else "the lock file"
    for src in sources:
        if src.kind != "local":
            continue
        entry = old.get(src.name)
        if not entry or entry.get("kind") != "local" or entry.get("model") != src.model:
            src.status = "new"
            continue
        if entry.get("content_sha256") == src.content_sha256:
            src.status = "locked"
            continue
        was = entry.get("files") or {}
        changed = sorted(n for n in set(was) | set(src.files) if was.get(n) != (src.files[n].sha256 if n in src.files else None))
        what = f"{changed[0]}" + (f" and {len(changed) - 1} more" if len(changed) > 1 else "") if changed else "its files"
        if update:
            src.status = "updated"
            checks.append(Check("lock", "warning", f"'{src.name}' changed since it was pinned ({what}); pin updated"))
        else:
            checks.append(Check("lock", "failed", str(recipe.problem(
                src.loc,
                f"source '{src.name}' changed since it was pinned in {lock_name} "
                f"({what}: content sha256 {str(entry.get('content_sha256'))[:12]} -> {src.content_sha256[:12]}); "
                "rerun with --update to accept the new weights"))))
    return checks


def write_lock(p: Plan) -> bool:
    """Write the plan's pins to its lock file when they changed; True when the file was written."""
    if p.lock_path is None or not p.lock_changed:
        return False
    text = json.dumps(p.lock, indent=2, sort_keys=True) + "\n"
    try:
        replace_atomically(p.lock_path, text.encode("utf-8"))
    except OSError as exc:
        raise SourceError(f"{p.lock_path}: cannot write the lock file: {exc.strerror}") from None
    p.lock_changed = False
    return True

