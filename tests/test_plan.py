"""`registry plan`: pinning local and Hub sources, compatibility checks, the lock file, resource refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from models import build_family, copy_non_weights, edit_json, fine_tune, rewrite_tensors

from registry.errors import MergeError, SourceError
from registry.machine import check_resources, estimate_resources
from registry.recipe import load_recipe
from registry.sources import (
    FileInfo,
    PinnedSource,
    TensorInfo,
    plan,
    read_safetensors_header,
    write_lock,
)

RECIPE = """\
repo_id: team/tiny-merge
license: {license}
sources:
  a:
    model: {a}
    label: fine-tune A
  b:
    model: {b}
merge:
  merge_method: linear
  models:
    - model: a
      parameters: {{weight: 0.3}}
    - model: b
      parameters: {{weight: 0.7}}
  dtype: bfloat16
{extra}"""


def write_recipe(folder: Path, a: str = "./a", b: str = "./b", *, extra: str = "", license: str = "mit", name: str = "tiny.yaml") -> Path:
    path = folder / name
    path.write_text(RECIPE.format(a=a, b=b, extra=extra, license=license))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def family_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("family")
    build_family(root)
    return root


@pytest.fixture
def work(tmp_path: Path, family_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A recipe folder with copies of the fine-tunes `a` and `b`, and a private registry home."""
    for name in ("a", "b"):
        shutil.copytree(family_root / name, tmp_path / name)
    monkeypatch.setenv("REGISTRY_HOME", str(tmp_path / "home"))
    return tmp_path


def test_local_sources_are_pinned_to_a_hash_of_their_weights_and_locked(work: Path) -> None:
    recipe = load_recipe(write_recipe(work))
    p = plan(recipe)

    expected = {}
    for name in ("a", "b"):
        digest = sha256(work / name / "model.safetensors")
        listing = f"{digest}  model.safetensors\n"
        expected[name] = {
            "kind": "local",
            "model": f"./{name}",
            "content_sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "files": {"model.safetensors": digest},
        }
    assert p.lock == {"format": 1, "sources": expected}
    assert [(s.name, s.status, s.path) for s in p.sources] == [("a", "new", work / "a"), ("b", "new", work / "b")]
    assert p.donor == "a"
    assert [(c.name, c.status, c.message) for c in p.checks] == [
        ("tensors", "passed", "'b' has the same 27 tensors as 'a'"),
        ("tokenizer", "passed", "tokenizer files are identical"),
        ("ancestry", "passed", ("'b' is close to 'a' in weight space: relative distance ||b - a|| / ||a|| = 0.0234 "
                                "over 4 sampled tensors (from 0.0223 to 0.0237)")),
    ]
    assert write_lock(p) is True
    lock = work / "tiny.lock.json"
    assert json.loads(lock.read_text()) == p.lock
    assert str(work) not in lock.read_text()

    again = plan(load_recipe(work / "tiny.yaml"))
    assert [s.status for s in again.sources] == ["locked", "locked"]
    assert again.lock_changed is False
    assert write_lock(again) is False


def test_unaliased_local_sources_are_named_model_n_never_by_path(work: Path) -> None:
    path = work / "bare.yaml"
    path.write_text(
        "merge_method: linear\nmodels:\n"
        f"  - {{model: {work / 'a'}, parameters: {{weight: 0.3}}}}\n"
        "  - {model: ./b, parameters: {weight: 0.7}}\n"
    )
    p = plan(load_recipe(path))
    assert [s.name for s in p.sources] == ["model_1", "model_2"]
    recorded = json.dumps({s.name: s.provenance() for s in p.sources})
    assert str(work) not in recorded and "./b" not in recorded


def test_paths_expand_environment_home_and_the_recipe_folder(work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (work / "recipes").mkdir()
    monkeypatch.setenv("TINY_CHECKPOINTS", str(work))
    monkeypatch.setenv("HOME", str(work))
    monkeypatch.chdir(tmp_path)  # relative paths follow the recipe's folder, not the current one
    recipe = load_recipe(write_recipe(work / "recipes", a="${TINY_CHECKPOINTS}/a", b="~/b"))
    assert [s.path for s in plan(recipe).sources] == [work / "a", work / "b"]

    relative = load_recipe(write_recipe(work / "recipes", a="../a", b="../b", name="rel.yaml"))
    assert [s.path for s in plan(relative).sources] == [work / "a", work / "b"]


def test_unset_environment_variable(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TINY_UNSET", raising=False)
    path = write_recipe(work, a="${TINY_UNSET}/a")
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value) == (
        f"{path}:5:12: sources.a.model: environment variable TINY_UNSET is not set; "
        "export TINY_UNSET=/path/to/the/folder it stands for"
    )


def test_missing_path_and_missing_config(work: Path) -> None:
    path = write_recipe(work, b="./nowhere")
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value) == f"{path}:8:12: sources.b.model: source 'b': {work / 'nowhere'} does not exist"

    (work / "b" / "config.json").unlink()
    path = write_recipe(work)
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value) == (
        f"{path}:8:12: sources.b.model: source 'b': no config.json in {work / 'b'}; name the folder of a Hugging Face checkpoint"
    )


def test_bin_only_checkpoint_says_how_to_convert(work: Path) -> None:
    (work / "b" / "model.safetensors").rename(work / "b" / "pytorch_model.bin")
    path = write_recipe(work)
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    b = work / "b"
    assert str(err.value) == (
        f"{path}:8:12: sources.b.model: source 'b': ./b has only PyTorch .bin weights; convert it to safetensors first: "
        f"python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{b}').save_pretrained('{b}-safetensors')\" "
        "and point the recipe there"
    )


def test_truncated_safetensors_file(work: Path) -> None:
    weights = work / "b" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    path = write_recipe(work)
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value).startswith(f"{path}:8:12: sources.b.model: source 'b': {weights}: truncated: tensor ")
    assert str(err.value).endswith("; copy the file again")


# Two tensors laid end to end: a (F32 [2, 2], bytes 0-16) and b (BF16 [4], bytes 16-24).
GOOD_HEADER = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
               "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}
BAD = "corrupt safetensors header: tensor"
KNOWN_DTYPES = "F64, F32, BF16, F16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL, F8_E4M3, F8_E5M2, F8_E8M0, C64"
HEADER_LIES = {
    "begin_after_end": ({"a": {"data_offsets": [16, 0]}}, 24, f"{BAD} a begins at byte 16, after its end at byte 0"),
    "overlap": ({"b": {"data_offsets": [8, 16]}}, 24, f"{BAD} b (bytes 8-16) overlaps tensor a (ends at byte 16)"),
    "gap": ({"b": {"data_offsets": [18, 26]}}, 26, f"{BAD} b starts at byte 18, but tensor a ends at byte 16"),
    "not_from_byte_0": ({"a": {"data_offsets": [4, 20]}, "b": {"data_offsets": [20, 28]}}, 28,
                        f"{BAD} a starts at byte 4, but the data starts at byte 0"),
    "size_not_dtype_times_shape": ({"a": {"shape": [2, 3]}}, 24, f"{BAD} a spans 16 bytes, but F32 of shape [2, 3] takes 24"),
    "unknown_dtype": ({"a": {"dtype": "F99"}}, 24,
                      f"{BAD} a has unknown dtype \"F99\"; known: {KNOWN_DTYPES}"),
    "dtype_not_a_string": ({"a": {"dtype": 4}}, 24, f"{BAD} a has unknown dtype 4; known: {KNOWN_DTYPES}"),
    "negative_offsets": ({"a": {"data_offsets": [-16, 0]}}, 24, f"{BAD} a has negative data_offsets [-16, 0]"),
    "string_offsets": ({"a": {"data_offsets": ["0", "16"]}}, 24,
                       f"{BAD} a has data_offsets [\"0\", \"16\"], which is not a list of two integers [begin, end]"),
    "float_offsets": ({"a": {"data_offsets": [0.0, 16.0]}}, 24,
                      f"{BAD} a has data_offsets [0.0, 16.0], which is not a list of two integers [begin, end]"),
    "bool_offsets": ({"a": {"data_offsets": [False, 16]}}, 24,
                     f"{BAD} a has data_offsets [false, 16], which is not a list of two integers [begin, end]"),
    "three_offsets": ({"a": {"data_offsets": [0, 8, 16]}}, 24,
                      f"{BAD} a has data_offsets [0, 8, 16], which is not a list of two integers [begin, end]"),
    "offsets_not_a_list": ({"a": {"data_offsets": "0-16"}}, 24,
                           f"{BAD} a has data_offsets \"0-16\", which is not a list of two integers [begin, end]"),
    "string_shape": ({"a": {"shape": ["2", 2]}}, 24, f"{BAD} a has shape [\"2\", 2], which is not a list of non-negative integers"),
    "float_shape": ({"a": {"shape": [2.0, 2]}}, 24, f"{BAD} a has shape [2.0, 2], which is not a list of non-negative integers"),
    "bool_shape": ({"a": {"shape": [True, 4]}}, 24, f"{BAD} a has shape [true, 4], which is not a list of non-negative integers"),
    "negative_shape": ({"a": {"shape": [-2, -2]}}, 24, f"{BAD} a has shape [-2, -2], which is not a list of non-negative integers"),
    "shape_not_a_list": ({"a": {"shape": 4}}, 24, f"{BAD} a has shape 4, which is not a list of non-negative integers"),
    "missing_dtype": ({"a": {"dtype": None}}, 24, f"{BAD} a must have dtype, shape and data_offsets"),
    "entry_not_a_mapping": ({"a": [1, 2]}, 24, f"{BAD} a must have dtype, shape and data_offsets"),
    "data_after_the_last_tensor": ({}, 30, "corrupt safetensors header: the tensors end at byte 24 of the data, which has 30"),
    "truncated": ({}, 20, "truncated: tensor b ends at byte 24 of the data, which has 20; copy the file again"),
}


def write_raw_safetensors(path: Path, header: dict, data_bytes: int) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(data_bytes))


@pytest.mark.parametrize("lie", sorted(HEADER_LIES))
def test_every_lie_of_a_safetensors_header_gets_its_own_message(tmp_path: Path, lie: str) -> None:
    changes, data_bytes, expected = HEADER_LIES[lie]
    header = json.loads(json.dumps(GOOD_HEADER))
    for name, fields in changes.items():
        if isinstance(fields, dict):
            header[name].update(fields)
            header[name] = {k: v for k, v in header[name].items() if v is not None}
        else:
            header[name] = fields
    file = tmp_path / "model.safetensors"
    write_raw_safetensors(file, header, data_bytes)
    with pytest.raises(SourceError) as err:
        read_safetensors_header(file)
    assert str(err.value) == f"{file}: {expected}"


def test_the_unchanged_header_of_those_lies_is_read(tmp_path: Path) -> None:
    write_raw_safetensors(tmp_path / "model.safetensors", GOOD_HEADER, 24)
    assert read_safetensors_header(tmp_path / "model.safetensors") == {"a": TensorInfo("F32", (2, 2)), "b": TensorInfo("BF16", (4,))}


@pytest.mark.parametrize("kind", ["device", "fifo", "folder"])
def test_a_weight_file_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path: Path, kind: str) -> None:
    file = tmp_path / "model.safetensors"
    if kind == "device":
        file.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(file)  # opening it for reading would block forever
    else:
        file.mkdir()
    with pytest.raises(SourceError) as err:
        read_safetensors_header(file)
    shown = {"device": "a character device", "fifo": "a FIFO", "folder": "a folder"}[kind]
    assert str(err.value) == f"{file}: not a regular file ({shown}); a weight file must be an ordinary file"


TOY = Path(__file__).parent / "fixtures" / "toy"


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A recipe folder with copies of the toy fine-tunes as `a` and `b`."""
    shutil.copytree(TOY / "ft_cos", tmp_path / "a")
    shutil.copytree(TOY / "ft_fmt", tmp_path / "b")
    monkeypatch.setenv("REGISTRY_HOME", str(tmp_path / "home"))
    return tmp_path


def _outside(toy: Path) -> Path:
    (toy / "elsewhere").mkdir(exist_ok=True)
    (toy / "elsewhere" / "notes.txt").write_text("HF_TOKEN=hf_secret\n")
    return toy / "elsewhere" / "notes.txt"


# name -> (file replaced, how, the problem plan reports after "source 'a': ")
LINKED_FILES = {
    "proc_environ": ("chat_template.jinja", lambda toy, f: f.symlink_to("/proc/self/environ"),
                     lambda toy: f"chat_template.jinja is a link to {Path('/proc/self/environ').resolve()}, a system file, "
                                 "not checkpoint data; replace it with the file itself"),
    "outside_file": ("chat_template.jinja", lambda toy, f: f.symlink_to(_outside(toy)),
                     lambda toy: f"chat_template.jinja is a link to {toy / 'elsewhere' / 'notes.txt'}, outside the source "
                                 "folder; copy the file into the folder instead of linking it"),
    "relative_escape": ("tokenizer_config.json", lambda toy, f: (_outside(toy), f.symlink_to("../elsewhere/notes.txt")),
                        lambda toy: f"tokenizer_config.json is a link to {toy / 'elsewhere' / 'notes.txt'}, outside the source "
                                    "folder; copy the file into the folder instead of linking it"),
    "generation_config": ("generation_config.json", lambda toy, f: f.symlink_to(_outside(toy)),
                          lambda toy: f"generation_config.json is a link to {toy / 'elsewhere' / 'notes.txt'}, outside the "
                                      "source folder; copy the file into the folder instead of linking it"),
    "fifo": ("chat_template.jinja", lambda toy, f: os.mkfifo(f),
             lambda toy: "chat_template.jinja is not a regular file (a FIFO); replace it with the file itself"),
    "fifo_config": ("config.json", lambda toy, f: os.mkfifo(f),
                    lambda toy: "config.json is not a regular file (a FIFO); replace it with the file itself"),
    "dangling": ("tokenizer.json", lambda toy, f: f.symlink_to(toy / "a" / "gone.json"),
                 lambda toy: f"tokenizer.json is a link to {toy / 'a' / 'gone.json'}, which does not exist; replace it with the file itself"),
    "device": ("special_tokens_map.json", lambda toy, f: f.symlink_to("/dev/null"),
               lambda toy: "special_tokens_map.json is a link to /dev/null, a system file, not checkpoint data; replace it with the file itself"),
    "link_loop": ("chat_template.jinja", lambda toy, f: f.symlink_to(f),
                  lambda toy: "chat_template.jinja is a link that cannot be resolved; replace it with the file itself"),
    "weights_to_dev_zero": ("model.safetensors", lambda toy, f: f.symlink_to("/dev/zero"),
                            lambda toy: "model.safetensors is a link to /dev/zero, a system file, not checkpoint data; "
                                        "replace it with the file itself"),
}


@pytest.mark.parametrize("case", sorted(LINKED_FILES))
def test_a_source_file_linked_outside_its_folder_or_to_a_device_is_refused(toy: Path, case: str) -> None:
    name, make, expected = LINKED_FILES[case]
    target = toy / "a" / name
    target.unlink(missing_ok=True)
    make(toy, target)
    path = write_recipe(toy)
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path), check_resources=False)
    assert str(err.value) == f"{path}:5:12: sources.a.model: source 'a': {expected(toy)}"


def test_links_that_stay_inside_the_folder_or_weights_kept_elsewhere_are_accepted(toy: Path) -> None:
    (toy / "a" / "templates").mkdir()
    (toy / "a" / "chat_template.jinja").rename(toy / "a" / "templates" / "chat.jinja")
    (toy / "a" / "chat_template.jinja").symlink_to("templates/chat.jinja")
    (toy / "store").mkdir()
    (toy / "b" / "model.safetensors").rename(toy / "store" / "b.safetensors")  # weights are merged, never copied
    (toy / "b" / "model.safetensors").symlink_to(toy / "store" / "b.safetensors")
    p = plan(load_recipe(write_recipe(toy)), check_resources=False)
    assert p.source("a").carried["chat_template.jinja"] == sha256(TOY / "ft_cos" / "chat_template.jinja")
    assert sorted(p.source("a").carried) == ["chat_template.jinja", "config.json", "generation_config.json",
                                             "tokenizer.json", "tokenizer_config.json"]


def test_the_merge_refuses_a_carried_file_swapped_after_plan(toy: Path) -> None:
    from registry.merge import merge

    p = plan(load_recipe(write_recipe(toy)), check_resources=False)
    template = toy / "a" / "chat_template.jinja"
    template.unlink()
    template.symlink_to("/proc/self/environ")
    (toy / "b" / "generation_config.json").write_text("{}")
    with pytest.raises(SourceError) as err:
        merge(load_recipe(toy / "tiny.yaml"), p, toy / "out", device="cpu")
    assert str(err.value) == (
        f"source 'a': chat_template.jinja is a link to {Path('/proc/self/environ').resolve()}, a system file, not checkpoint "
        "data; replace it with the file itself; plan and merge again\n"
        "source 'b': generation_config.json changed since plan; plan and merge again"
    )
    assert not (toy / "out").exists()


def test_sources_without_tokenizer_files_need_a_tokenizer_source(toy: Path) -> None:
    for name in ("a", "b"):
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (toy / name / file).unlink()
    path = write_recipe(toy)
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path), check_resources=False)
    lacks = ("has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json with merges.txt); copy the tokenizer files "
             "of the model it was trained from into its folder, or set merge.tokenizer_source to a source that has them")
    assert str(err.value) == f"{path}:5:12: sources.a.model: source 'a' {lacks}\n{path}:8:12: sources.b.model: source 'b' {lacks}"

    # A tokenizer source that has the files is enough; one that lacks them is refused.
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOY / "ft_fmt" / file, toy / "b" / file)
    assert plan(load_recipe(write_recipe(toy, extra="  tokenizer_source: b\n")), check_resources=False).tokenizer_source == "b"
    path = write_recipe(toy, extra="  tokenizer_source: a\n")
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path), check_resources=False)
    assert str(err.value) == f"{path}:5:12: sources.a.model: source 'a' {lacks}"


@pytest.fixture(scope="session")
def untrained_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy's config, tokenizer and template with freshly initialised (seeded) weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("untrained")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TOY / "ft_fmt")).to(torch.bfloat16).save_pretrained(out / "saved")
    copy_non_weights(TOY / "ft_fmt", out / "model")
    shutil.copy(out / "saved" / "model.safetensors", out / "model" / "model.safetensors")
    return out / "model"


UNRELATED_NUMBERS = "relative distance ||b - a|| / ||a|| = 1.34 over 4 sampled tensors (from 1.27 to 1.35)"


def test_a_parent_that_is_not_a_relative_is_refused_with_the_measured_distance(toy: Path, untrained_toy: Path) -> None:
    shutil.rmtree(toy / "b")
    shutil.copytree(untrained_toy, toy / "b")
    path = write_recipe(toy)
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path), check_resources=False)
    assert str(err.value) == (
        f"{path}:8:12: sources.b.model: source 'b' does not look like a relative of 'a': {UNRELATED_NUMBERS}, over the "
        "limit of 0.5 (fine-tunes of one base are far below it, unrelated weights near 1.4); merge fine-tunes of the same "
        "base model, or set allow_unrelated: true in the recipe if you mean it"
    )

    allowed = write_recipe(toy, extra="allow_unrelated: true\n")
    p = plan(load_recipe(allowed), check_resources=False)
    assert p.warnings == [(f"'b' is not a close relative of 'a' ({UNRELATED_NUMBERS}, over the limit of 0.5); "
                           "merged anyway because allow_unrelated is true")]


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("ft_cos", "ft_fmt", "= 0.235 over 4 sampled tensors (from 0.176 to 0.256)"),
    ("base", "ft_cos", "= 0.117 over 4 sampled tensors (from 0.0944 to 0.126)"),
    ("base", "ft_fmt", "= 0.219 over 4 sampled tensors (from 0.162 to 0.238)"),
])
def test_the_toy_fine_tunes_and_their_base_are_relatives(toy: Path, a: str, b: str, expected: str) -> None:
    for name, folder in (("a", a), ("b", b)):
        shutil.rmtree(toy / name)
        shutil.copytree(TOY / folder, toy / name)
    p = plan(load_recipe(write_recipe(toy)), check_resources=False)
    assert [c.message for c in p.checks if c.name == "ancestry"] == [
        f"'b' is close to 'a' in weight space: relative distance ||b - a|| / ||a|| {expected}"]


def test_a_changed_source_is_refused_until_update(work: Path, family_root: Path) -> None:
    path = write_recipe(work)
    first = plan(load_recipe(path))
    write_lock(first)
    old = first.source("b").content_sha256

    fine_tune(family_root / "base", work / "b", seed=99)  # same names and shapes, new values
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    new = plan(load_recipe(path), update=True)
    assert str(err.value) == (
        f"{path}:8:12: sources.b.model: source 'b' changed since it was pinned in tiny.lock.json "
        f"(model.safetensors: content sha256 {old[:12]} -> {new.source('b').content_sha256[:12]}); "
        "rerun with --update to accept the new weights"
    )
    assert [s.status for s in new.sources] == ["locked", "updated"]
    assert new.checks[-1].message == "'b' changed since it was pinned (model.safetensors); pin updated"
    assert write_lock(new) is True
    assert plan(load_recipe(path)).source("b").status == "locked"


def test_hash_cache_notices_a_rewrite_of_the_same_size(work: Path) -> None:
    path = write_recipe(work)
    first = plan(load_recipe(path)).source("a").content_sha256
    weights = work / "a" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only ctime moves
    second = plan(load_recipe(path)).source("a")
    assert second.files["model.safetensors"].sha256 == sha256(weights)
    assert second.content_sha256 != first


def test_tokenizer_mismatch_names_the_files(work: Path) -> None:
    edit_json(work / "b" / "tokenizer_config.json", model_max_length=99)
    path = write_recipe(work)
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value) == (
        f"{path}:8:12: sources.b.model: source 'b' has a different tokenizer than 'a' (tokenizer_config.json differ); "
        "set merge.tokenizer_source to the source whose tokenizer the merge should use"
    )
    p = plan(load_recipe(write_recipe(work, extra="  tokenizer_source: a\n")))
    assert p.tokenizer_source == "a"
    assert ("tokenizer", "warning", ("tokenizer files differ between 'a' and 'b' (tokenizer_config.json); "
            "mergekit builds the tokenizer from tokenizer source 'a'")) in [(c.name, c.status, c.message) for c in p.checks]


def test_vocab_size_mismatch(work: Path) -> None:
    rewrite_tensors(work / "a", work / "b", reshape="model.embed_tokens.weight")
    edit_json(work / "b" / "config.json", vocab_size=159)
    path = write_recipe(work)
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value) == f"{path}:8:12: sources.b.model: source 'b' cannot be merged with 'a': vocab_size is 159, 'a' has 160"


def test_shape_mismatch_and_missing_tensor(work: Path) -> None:
    rewrite_tensors(work / "a", work / "b", reshape="model.layers.1.mlp.up_proj.weight")
    path = write_recipe(work)
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value) == (
        f"{path}:8:12: sources.b.model: source 'b': tensor model.layers.1.mlp.up_proj.weight has shape [63, 32], "
        "'a' has [64, 32]; the models cannot be merged"
    )
    rewrite_tensors(work / "a", work / "b", drop="model.layers.0.self_attn.q_proj.bias")
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value) == (
        f"{path}:8:12: sources.b.model: source 'b' lacks tensor model.layers.0.self_attn.q_proj.bias; "
        "the checkpoints do not have the same architecture"
    )


def test_base_model_picks_the_donor_and_must_be_merged(work: Path) -> None:
    assert plan(load_recipe(write_recipe(work, extra="  base_model: b\n"))).donor == "b"
    (work / "c").symlink_to(work / "a")
    path = write_recipe(work, extra="  base_model: ./c\n")
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value) == (
        f"{path}:17:15: merge.base_model: base_model './c' is not one of merge.models; for a linear merge it only "
        "picks the config and tokenizer donor, so name one of the models"
    )


def write_sparse_checkpoint(folder: Path, like: Path, rows: int, cols: int) -> None:
    """A checkpoint whose single huge tensor exists only in its header: the file is sparse."""
    copy_non_weights(like, folder)
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [0, 2 * rows * cols]}}).encode()
    header += b" " * (-len(header) % 8)
    with (folder / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2 * rows * cols)


def test_refuses_early_when_disk_or_memory_cannot_hold_the_merge(work: Path, family_root: Path) -> None:
    rows, cols = 1 << 19, 1 << 20  # 2**39 bf16 values in a file that uses no disk
    for name in ("a", "b"):
        shutil.rmtree(work / name)
        write_sparse_checkpoint(work / name, family_root / "a", rows, cols)
    recipe = load_recipe(write_recipe(work))
    # Before the pins are known the merge's folder has no name yet: the estimate names the build root.
    out = work / "home" / "build"
    with pytest.raises(MergeError) as err:
        plan(recipe)
    free = shutil.disk_usage(work).free
    # embed_tokens, and lm_head, which mergekit writes for tied embeddings: 2.2 TB
    assert str(err.value) == (
        f"not enough disk for the merge: it writes 2.20 TB to {out} and that filesystem has {free / 1e9:.2f} GB free; "
        "free some space or choose another output folder with -o"
    )
    assert not out.exists()
    assert read_safetensors_header(work / "a" / "model.safetensors") == {"model.embed_tokens.weight": TensorInfo("BF16", (rows, cols))}

    # The memory check, on the same real estimate, as if the disk were large enough.
    sources = [
        PinnedSource(name, "local", f"./{name}", ("sources", name, "model"), work / name,
                     tensors=read_safetensors_header(work / name / "model.safetensors"))
        for name in ("a", "b")
    ]
    est = estimate_resources(recipe, sources, "a", out)
    # process + 2 bf16 inputs, the float32 accumulator and the bf16 result of the largest tensor
    # + the shard being filled and the two being written
    assert est.shard_bytes == 2 << 30  # the largest shard size, for a model this large
    assert est.memory_bytes == 1_200_000_000 + rows * cols * (2 * 2 + 4 + 2) + 3 * est.shard_bytes
    with pytest.raises(MergeError) as err:
        check_resources(dataclasses.replace(est, disk_free_bytes=None))
    assert str(err.value) == (
        f"not enough memory for the merge: it needs about {est.memory_bytes / 1e12:.2f} TB (the largest tensor, "
        f"model.embed_tokens.weight, and output buffers) and {est.memory_available_bytes / 1e9:.2f} GB is available; "
        "close other programs or merge on a machine with more memory"
    )


# ---------------------------------------------------------------------------------------------
# Hub sources, against the local Hub server (real huggingface_hub client, real HTTP)


def push(api, folder: Path, repo_id: str, license: str | None = "apache-2.0") -> str:
    """Upload a checkpoint folder (and a card declaring `license`) as one commit; its sha."""
    api.create_repo(repo_id, exist_ok=True)
    if license is not None:
        (folder / "README.md").write_text(f"---\nlicense: {license}\n---\n# {repo_id}\n")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="upload")
    return info.oid


def test_hub_source_is_pinned_to_the_commit_the_hub_reports(work: Path, hub_server, hub_api) -> None:
    sha = push(hub_api, work / "a", "alice/tiny-a")
    assert hub_api.model_info("alice/tiny-a").sha == sha
    path = write_recipe(work, a="alice/tiny-a", license="mit")
    p = plan(load_recipe(path))

    a = p.source("a")
    assert (a.kind, a.repo_id, a.requested_revision, a.revision, a.license, a.status) == (
        "hub", "alice/tiny-a", None, sha, "apache-2.0", "new")
    assert a.tensors == p.source("b").tensors
    assert a.files["model.safetensors"] == FileInfo((work / "a" / "model.safetensors").stat().st_size, sha256(work / "a" / "model.safetensors"))
    assert ("license", "warning", ("'a' (alice/tiny-a) is licensed 'apache-2.0' but the recipe says 'mit'; "
            "check that the parent's license allows it")) in [(c.name, c.status, c.message) for c in p.checks]
    assert ("ancestry", "warning", "'b' and 'a' were not compared in weight space: plan reads no weights of 'a' from the Hub") in [
        (c.name, c.status, c.message) for c in p.checks]
    assert p.lock["sources"]["a"] == {"kind": "hub", "model": "alice/tiny-a", "revision": None, "commit": sha}
    write_lock(p)
    # Planning downloaded config and tokenizer files, and read the weights' header with a range request only.
    from huggingface_hub import constants

    cached = sorted(p.name for p in Path(constants.HF_HUB_CACHE).rglob("*") if p.is_file() and "snapshots" in p.parts)
    assert cached == ["chat_template.jinja", "config.json", "tokenizer.json", "tokenizer_config.json"]

    # main moves on: the lock keeps the pinned commit until --update.
    (work / "a" / "extra.txt").write_text("new commit\n")
    newer = push(hub_api, work / "a", "alice/tiny-a")
    assert newer != sha
    assert plan(load_recipe(path)).source("a").revision == sha
    updated = plan(load_recipe(path), update=True).source("a")
    assert (updated.revision, updated.status) == (newer, "updated")


def test_hub_revision_is_honoured(work: Path, hub_server, hub_api) -> None:
    first = push(hub_api, work / "a", "alice/tiny-a", license="mit")
    hub_api.create_branch("alice/tiny-a", branch="v1", revision=first)
    (work / "a" / "extra.txt").write_text("new commit\n")
    push(hub_api, work / "a", "alice/tiny-a", license="mit")
    for model, extra in (("alice/tiny-a@v1", ""), ("alice/tiny-a", "    revision: v1\n")):
        text = RECIPE.format(a=model, b="./b", extra="", license="mit").replace("    model: alice/tiny-a\n", f"    model: {model}\n{extra}")
        (work / "rev.yaml").write_text(text)
        a = plan(load_recipe(work / "rev.yaml")).source("a")
        assert (a.requested_revision, a.revision) == ("v1", first)


def test_hub_errors_are_one_line_with_what_to_do(work: Path, hub_server, hub_api, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    path = write_recipe(work, a="alice/nothing-here")
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value) == (
        f"{path}:5:12: sources.a.model: source 'a': alice/nothing-here not found on {hub_server.endpoint} "
        "(a private repo needs HF_TOKEN or `hf auth login`)"
    )
    push(hub_api, work / "a", "alice/tiny-a")
    path = write_recipe(work, a="alice/tiny-a@no-such-branch")
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value) == (
        f"{path}:5:12: sources.a.model: source 'a': revision 'no-such-branch' not found in alice/tiny-a; "
        "name an existing branch, tag or commit"
    )

    path = write_recipe(work, a="alice/tiny-a")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value) == (
        f"{path}:5:12: sources.a.model: source 'a': cannot pin alice/tiny-a: HF_HUB_OFFLINE is set, so the Hub cannot be asked; "
        "unset HF_HUB_OFFLINE, or use a local path"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    hub_server.inject(r"^GET /api/models/alice/tiny-a", "drop", times=10)
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value).startswith(
        f"{path}:5:12: sources.a.model: source 'a': cannot pin alice/tiny-a: the Hub at {hub_server.endpoint} cannot be reached (")
    assert str(err.value).endswith("); check the network, or use a local path")


def test_private_hub_source_is_pinned_with_the_users_token(work: Path, hub_server, hub_api, monkeypatch: pytest.MonkeyPatch) -> None:
    from registry.testing.fixtures import HUB_TOKEN

    hub_api.create_repo("alice/private-a", private=True)
    sha = hub_api.upload_folder(folder_path=str(work / "a"), repo_id="alice/private-a").oid
    path = write_recipe(work, a="alice/private-a")
    with pytest.raises(SourceError) as err:
        plan(load_recipe(path))
    assert str(err.value) == (
        f"{path}:5:12: sources.a.model: source 'a': alice/private-a not found on {hub_server.endpoint} "
        "(a private repo needs HF_TOKEN or `hf auth login`)"
    )
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    assert plan(load_recipe(path)).source("a").revision == sha
