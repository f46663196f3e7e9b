"""`registry merge`: exact merged tensors, pinned donor, provenance, atomic output under SIGKILL, reproducibility."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from models import build_family, edit_json, read_state, rewrite_tensors

from registry.cli import main
from registry.identity import merge_identity
from registry.merge import merge
from registry.recipe import load_recipe
from registry.reports import Provenance, SourcePin, read
from registry.sources import fetch, plan

# mergekit imports numpy.core, which numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")
REGISTRY = str(Path(sys.executable).with_name("registry"))
TOY = Path(__file__).parent / "fixtures" / "toy"
RECIPE = """\
repo_id: team/tiny-merge
license: mit
sources:
  a: {{model: {a}, label: fine-tune A}}
  b: {{model: {b}}}
merge:
  merge_method: linear
  models:
    - model: a
      parameters: {{weight: {wa}}}
    - model: b
      parameters: {{weight: {wb}}}
  dtype: bfloat16
{extra}"""


def read_provenance(out: Path) -> Provenance:
    found = read(Provenance, out)
    assert found is not None, f"no provenance.json in {out}"
    return found


def write_recipe(path: Path, a: Path | str, b: Path | str, wa: object = 0.3, wb: object = 0.7, extra: str = "") -> Path:
    path.write_text(RECIPE.format(a=a, b=b, wa=json.dumps(wa), wb=json.dumps(wb), extra=extra))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weight_for(weight: object, name: str) -> float:
    """mergekit's rule, restated: the first {filter, value} whose filter is in the name (or absent) wins."""
    if isinstance(weight, list):
        return next(w["value"] for w in weight if "filter" not in w or w["filter"] in name)
    return float(weight)


def bf16_steps(x: torch.Tensor, y: torch.Tensor) -> int:
    """Largest distance between two bf16 tensors in representable steps (units in the last place)."""
    xi, yi = x.view(torch.int16).int(), y.view(torch.int16).int()
    same_sign = x.signbit() == y.signbit()
    # Sign and magnitude: across zero, the steps down to zero on each side add up.
    steps = torch.where(same_sign, (xi - yi).abs(), (xi & 0x7FFF) + (yi & 0x7FFF))
    return int(steps.max())


def expected_tensors(a: Path, b: Path, wa: object, wb: object) -> tuple[dict, dict]:
    """The normalized weighted sum of every tensor, computed here in float32 (multiply-accumulate, then
    divide) and in float64, each rounded once to bfloat16."""
    sa, sb = read_state(a), read_state(b)
    fp32, fp64 = {}, {}
    for name in sa:
        w = torch.tensor([weight_for(wa, name), weight_for(wb, name)], dtype=torch.float32)
        # torch.addcmul may fuse multiply and add (one rounding); a separate product and sum would
        # round twice and differ from it in the last float32 bit, and so sometimes in bf16.
        acc = torch.zeros(sa[name].shape, dtype=torch.float32)
        acc.addcmul_(sa[name].float(), w[0])
        acc.addcmul_(sb[name].float(), w[1])
        fp32[name] = (acc / w.sum()).to(torch.bfloat16)
        w64 = w.double()
        fp64[name] = ((sa[name].double() * w64[0] + sb[name].double() * w64[1]) / w64.sum()).to(torch.bfloat16)
    return fp32, fp64


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    return build_family(tmp_path_factory.mktemp("family"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REGISTRY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize(
    "wa, wb",
    [
        (0.3, 0.7),
        ([{"filter": "mlp", "value": 0.9}, {"filter": "self_attn.q_proj", "value": 0.05}, {"value": 0.3}], 0.7),
        ([{"filter": "embed_tokens", "value": 2.0}, {"value": 1.0}], [{"filter": "layers.1", "value": 0.25}, {"value": 3.0}]),
    ],
    ids=["scalar", "filtered", "weights-not-summing-to-1"],
)
def test_every_merged_tensor_is_the_normalized_weighted_sum(family, tmp_path: Path, home: Path, wa, wb) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", family.a, family.b, wa, wb))
    result = merge(recipe, plan(recipe), tmp_path / "out", "cpu", shard_bytes=20_000)

    out = result.out
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    merged = read_state(out)
    fp32, fp64 = expected_tensors(family.a, family.b, wa, wb)
    assert sorted(merged) == sorted(fp32)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        # Bit-exact against float32 accumulate-then-divide, rounded once to bf16 ...
        assert torch.equal(tensor, fp32[name]), name
        # ... and within 1 bf16 ulp of the exactly (float64) computed value.
        assert bf16_steps(tensor, fp64[name]) <= 1, name


def test_output_carries_donor_files_and_provenance(family, tmp_path: Path, home: Path) -> None:
    b = rewrite_tensors(family.b, tmp_path / "b")
    edit_json(b / "generation_config.json", max_new_tokens=17)  # tells the donor's file from a's
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", family.a, b, extra="  base_model: b\n"))
    p = plan(recipe)
    result = merge(recipe, p, None, "cpu")

    out = home / "build" / merge_identity(recipe, p)[:12]
    assert result.out == out and result.reused is False
    assert sorted(f.name for f in out.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "provenance.json",
        "tokenizer.json", "tokenizer_config.json",
    ]
    for name in ("chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (b / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    donor = json.loads((b / "config.json").read_text())
    assert {k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "eos_token_id")} == {
        k: donor[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "eos_token_id")}

    provenance = json.loads((out / "provenance.json").read_text())
    text = (out / "provenance.json").read_text()
    assert str(tmp_path) not in text and str(family.a.parent) not in text and os.environ.get("USER", "\0") not in text
    files = {f.name: {"sha256": sha256(f), "size": f.stat().st_size} for f in sorted(out.iterdir()) if f.name != "provenance.json"}
    import transformers

    assert provenance == {
        "format": 2,
        "merge_identity": merge_identity(recipe, p),
        "merge_method": "linear",
        "normalize": True,
        "dtype": "bfloat16",
        "sources": {
            "a": {"kind": "local", "repo_id": None, "revision": None, "content_sha256": p.source("a").content_sha256,
                  "weight": 0.3},
            "b": {"kind": "local", "repo_id": None, "revision": None, "content_sha256": p.source("b").content_sha256,
                  "weight": 0.7},
        },
        "config_donor": "b",
        "files": files,
        "versions": {"registry": "0.1.0", "mergekit": "0.1.5", "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "device": "cpu",
    }

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = merge(recipe, plan(recipe), None, "cpu")
    assert again.reused is True and (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_text_edits_reuse_the_build_folder_and_a_weight_edit_gets_its_own(family, tmp_path: Path, home: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", family.a, family.b)
    recipe = load_recipe(path)
    first = merge(recipe, plan(recipe), None, "cpu")
    mtime = (first.out / "model.safetensors").stat().st_mtime_ns
    path.write_text(path.read_text().replace("license: mit", "license: apache-2.0\nsummary: Edited\ntags: [edited]")
                    .replace("label: fine-tune A", "label: renamed"))
    edited = load_recipe(path)
    assert edited.sha256 != recipe.sha256
    again = merge(edited, plan(edited), None, "cpu")
    assert (again.out, again.reused) == (first.out, True)
    assert (first.out / "model.safetensors").stat().st_mtime_ns == mtime

    reweighted = load_recipe(write_recipe(path, family.a, family.b, 0.4, 0.6))
    third = merge(reweighted, plan(reweighted), None, "cpu")
    assert third.reused is False and third.out.parent == first.out.parent and third.out != first.out
    assert read_provenance(first.out).merge_identity == again.provenance.merge_identity != third.provenance.merge_identity


def test_cli_reuses_a_finished_merge_and_says_so(family, tmp_path: Path, home: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_recipe(tmp_path / "r.yaml", family.a, family.b)
    with pytest.raises(SystemExit) as code:
        main(["merge", str(path), "-o", str(tmp_path / "out"), "--device", "cpu", "--format", "json"])
    assert code.value.code == 0
    first = json.loads(capsys.readouterr().out)
    assert first["reused"] is False and first["out"] == str(tmp_path / "out")
    assert json.loads((tmp_path / "r.lock.json").read_text())["sources"]["a"]["model"] == str(family.a)

    with pytest.raises(SystemExit) as code:
        main(["merge", str(path), "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert code.value.code == 0
    assert capsys.readouterr().out == (
        f"reused {tmp_path / 'out'}: its provenance.json has this merge's identity {first['merge_identity'][:12]} "
        "(merge settings and pinned sources)\n"
    )


def test_a_hub_source_is_merged_at_its_pinned_commit(family, tmp_path: Path, home: Path, hub_server, hub_api) -> None:
    hub_api.create_repo("alice/tiny-a")
    sha = hub_api.upload_folder(folder_path=str(family.a), repo_id="alice/tiny-a").oid
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", "alice/tiny-a", family.b))
    p = plan(recipe)
    # main moves on after planning: the merge still reads the pinned commit.
    hub_api.upload_folder(folder_path=str(family.b), repo_id="alice/tiny-a")
    result = merge(recipe, p, tmp_path / "out", "cpu")

    fp32, _ = expected_tensors(family.a, family.b, 0.3, 0.7)
    merged = read_state(result.out)
    assert sorted(merged) == sorted(fp32) and all(torch.equal(merged[k], fp32[k]) for k in fp32)
    assert result.provenance.sources["a"] == SourcePin(kind="hub", repo_id="alice/tiny-a", revision=sha, weight=0.3)
    assert str(tmp_path) not in (result.out / "provenance.json").read_text()  # the snapshot lies under tmp_path


def test_tokenizer_source_is_passed_to_mergekit_and_generation_config_kept(family, tmp_path: Path, home: Path) -> None:
    b = rewrite_tensors(family.b, tmp_path / "b")
    edit_json(b / "tokenizer_config.json", model_max_length=4096)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", family.a, b, extra="  tokenizer_source: b\n"))
    p = plan(recipe)
    assert [c.message for c in p.checks if c.name == "tokenizer"] == [
        "tokenizer files differ between 'a' and 'b' (tokenizer_config.json); mergekit builds the tokenizer from tokenizer source 'b'"]
    out = merge(recipe, p, tmp_path / "out", "cpu").out

    # mergekit rebuilt the embeddings to the tokenizer's length and dropped generation_config.json; we carry it.
    vocab = len(json.loads((b / "tokenizer.json").read_text())["model"]["vocab"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab < 160
    assert read_state(out)["model.embed_tokens.weight"].shape == (vocab, 32)
    assert (out / "generation_config.json").read_bytes() == (family.a / "generation_config.json").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 4096


def test_shards_are_byte_identical_to_safetensors_save_file(tmp_path: Path) -> None:
    from safetensors.torch import save

    from registry.mergekit_fast import write_safetensors

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=gen).to(torch.bfloat16), "a.bias": torch.randn(7, generator=gen),
        "c": torch.randn(2, 2, generator=gen).to(torch.float16), "z.norm": torch.randn(4, generator=gen).to(torch.bfloat16),
        "scalar": torch.tensor(3.0), "ids": torch.arange(5), "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=gen).t(),
    }
    digest, size = write_safetensors(tmp_path / "x.safetensors", tensors)
    expected = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    assert (tmp_path / "x.safetensors").read_bytes() == expected
    assert (digest, size) == (hashlib.sha256(expected).hexdigest(), len(expected))


# ---------------------------------------------------------------------------------------------
# The fast path (mergekit_fast's patches) and mergekit's plain run_merge write the same bytes

ENGINE_CASES = {
    # sources, weights, recipe lines, output shard size (None: one shard)
    "tiny-sharded": ("a", "b", 0.3, 0.7, "", 20_000),
    "tiny-filtered-float32": ("a", "b", [{"filter": "mlp", "value": 0.9}, {"value": 0.3}], 0.7, "  out_dtype: float32\n", 50_000),
    "tiny-tokenizer-source": ("a", "b-tokenizer", 0.5, 0.5, "  tokenizer_source: b\n", None),
    "toy": ("ft_cos", "ft_fmt", 0.3, 0.7, "", None),
    "toy-sharded": ("ft_cos", "ft_fmt", 2.0, 1.0, "  base_model: b\n", 150_000),
}


def engine_sources(family, tmp_path: Path, a: str, b: str) -> tuple[Path, Path]:
    if a.startswith("ft_"):
        return TOY / a, TOY / b
    if b == "b-tokenizer":
        tok = rewrite_tensors(family.b, tmp_path / "b")
        edit_json(tok / "tokenizer_config.json", model_max_length=4096)
        return family.a, tok
    return family.a, family.b


def files_of(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_the_plain_mergekit_path_writes_the_same_bytes_as_the_fast_path(family, tmp_path: Path, home: Path,
                                                                         monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    from registry import mergekit_fast

    a, b, wa, wb, extra, shard_bytes = ENGINE_CASES[case]
    a, b = engine_sources(family, tmp_path, a, b)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", a, b, wa, wb, extra))
    pinned = plan(recipe)
    # The fast path applies to the installed mergekit; if this fails, mergekit changed: check the patches
    # in registry/mergekit_fast.py against the new version, then update MERGEKIT_VERSION.
    assert mergekit_fast.supported()
    runs = []
    real = mergekit_fast.run_merge
    monkeypatch.setattr(mergekit_fast, "run_merge", lambda *args, **kwargs: runs.append(args[1]) or real(*args, **kwargs))

    fast = merge(recipe, pinned, tmp_path / "fast", "cpu", shard_bytes=shard_bytes).out
    monkeypatch.setenv("REGISTRY_MERGE_ENGINE", "plain")
    plain = merge(recipe, pinned, tmp_path / "plain", "cpu", shard_bytes=shard_bytes).out

    assert [p.name for p in runs] == [f"fast.staging-{os.getpid()}"]  # the plain merge did not use the patches
    written = files_of(fast)
    shards = [name for name in written if name.endswith(".safetensors")]
    assert len(shards) > 2 if shard_bytes else shards == ["model.safetensors"]
    assert written == files_of(plain)  # every file, provenance.json and its sha256 of each file included
    assert json.loads(written["provenance.json"])["files"] == {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in written.items() if name != "provenance.json"}


@pytest.mark.parametrize("shard_bytes", [20_000, 10**9])
def test_the_fast_path_hashes_each_shard_while_writing_it(family, tmp_path: Path, home: Path, shard_bytes: int) -> None:
    from registry.merge import mergekit_config, mergekit_options
    from registry.mergekit_fast import run_merge

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", family.a, family.b))
    pinned = plan(recipe)
    paths = {s.name: fetch(s) for s in pinned.sources}
    out = tmp_path / "out"
    written = run_merge(mergekit_config(recipe, pinned, paths), out, mergekit_options("cpu", shard_bytes, quiet=True), config_source="")

    shards = sorted(out.glob("*.safetensors"))
    assert [f.name for f in shards] == (["model.safetensors"] if shard_bytes == 10**9 else [f.name for f in shards if "-of-" in f.name])
    assert len(shards) > 2 or shard_bytes == 10**9
    assert written.shards == {f.name: (sha256(f), f.stat().st_size) for f in shards}
    assert {path: (st.st_ino, st.st_size) for path, st in written.opened.items()} == {
        str(folder / "model.safetensors"): ((folder / "model.safetensors").stat().st_ino, (folder / "model.safetensors").stat().st_size)
        for folder in (family.a, family.b)}


def test_the_merge_engine_is_fast_only_for_the_mergekit_version_it_was_written_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from registry import mergekit_fast
    from registry.errors import UsageError
    from registry.merge import merge_engine

    monkeypatch.delenv("REGISTRY_MERGE_ENGINE", raising=False)
    assert merge_engine() == "fast"
    monkeypatch.setenv("REGISTRY_MERGE_ENGINE", "plain")
    assert merge_engine() == "plain"
    monkeypatch.setenv("REGISTRY_MERGE_ENGINE", "auto")
    assert merge_engine() == "fast"
    monkeypatch.setattr(mergekit_fast, "MERGEKIT_VERSION", "0.1.4")  # as if another mergekit were installed
    assert merge_engine() == "plain"
    monkeypatch.setenv("REGISTRY_MERGE_ENGINE", "fastest")
    with pytest.raises(UsageError) as exc:
        merge_engine()
    assert str(exc.value) == "REGISTRY_MERGE_ENGINE is 'fastest'; set it to auto (the default) or plain, or unset it"


@pytest.mark.parametrize("broken", ["tokenizer", "vocab", "shape", "missing"])
def test_incompatible_sources_fail_before_any_weight_is_written(family, tmp_path: Path, home: Path, broken: str,
                                                                capsys: pytest.CaptureFixture) -> None:
    b = tmp_path / "b"
    if broken == "tokenizer":
        rewrite_tensors(family.b, b)
        tok = json.loads((b / "tokenizer.json").read_text())
        tok["added_tokens"][1]["content"] = "<|start|>"
        (b / "tokenizer.json").write_text(json.dumps(tok))
        expected = (
            "source 'b' has a different tokenizer than 'a' (tokenizer.json differ); "
            "set merge.tokenizer_source to the source whose tokenizer the merge should use"
        )
    elif broken == "vocab":
        rewrite_tensors(family.b, b, reshape="model.embed_tokens.weight")
        edit_json(b / "config.json", vocab_size=159)
        expected = "source 'b' cannot be merged with 'a': vocab_size is 159, 'a' has 160"
    elif broken == "shape":
        rewrite_tensors(family.b, b, reshape="model.layers.0.self_attn.k_proj.weight")
        expected = "source 'b': tensor model.layers.0.self_attn.k_proj.weight has shape [15, 32], 'a' has [16, 32]; the models cannot be merged"
    else:
        rewrite_tensors(family.b, b, drop="lm_head.weight")
        expected = "source 'b' lacks tensor lm_head.weight; the checkpoints do not have the same architecture"
    path = write_recipe(tmp_path / "r.yaml", family.a, b)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as code:
        main(["merge", str(path), "-o", str(out)])
    assert code.value.code == 1
    assert capsys.readouterr().err == f"error: {path}:5:14: sources.b.model: {expected}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "r.yaml"]


# ---------------------------------------------------------------------------------------------
# Whole processes: SIGKILL at known points, and PYTHONHASHSEED


def looks_like_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


# `registry merge` in a process that stops itself (SIGSTOP) at a named point of the real code, so a test
# can SIGKILL it (or change its sources) at a known moment: "shard", once the first shard is written to
# staging; "rename", just before staging is renamed into place; "renamed", just after.
STOPPING = """\
import os, signal, sys
import safetensors.torch
import registry.mergekit_fast
from registry.cli import main

point, out = sys.argv[1], os.path.abspath(sys.argv[2])
shards = []

def stop():
    os.kill(os.getpid(), signal.SIGSTOP)

def after_shard(write):
    def wrapper(*args, **kwargs):
        result = write(*args, **kwargs)
        shards.append(args[0])
        if point == "shard" and len(shards) == 1:
            stop()
        return result
    return wrapper

def around_install(move):
    def wrapper(src, dst, *args, **kwargs):
        installing = os.path.abspath(dst) == out and ".staging-" in os.path.basename(src)
        if installing and point == "rename":
            stop()
        result = move(src, dst, *args, **kwargs)
        if installing and point == "renamed":
            stop()
        return result
    return wrapper

# These only decide when the process stops: the fast path writes shards with write_safetensors,
# mergekit's own with safetensors' save_file.
registry.mergekit_fast.write_safetensors = after_shard(registry.mergekit_fast.write_safetensors)
safetensors.torch.save_file = after_shard(safetensors.torch.save_file)
os.replace, os.rename = around_install(os.replace), around_install(os.rename)
sys.argv = ["registry", *sys.argv[3:]]
main()
"""


def wait_stopped(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `proc` has stopped itself (SIGSTOP at its stop point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"registry merge exited ({proc.returncode}) before its stop point: {proc.stderr.read()}")
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.02)
    raise AssertionError("registry merge never reached its stop point")


def start(recipe: Path, out: Path, home: Path, seed: int, stop_at: str | None = None, engine: str = "auto") -> subprocess.Popen:
    """`registry merge RECIPE -o OUT` in a process of its own, stopping itself at `stop_at`."""
    env = {**os.environ, "REGISTRY_HOME": str(home), "PYTHONHASHSEED": str(seed), "REGISTRY_MERGE_ENGINE": engine}
    args = ["merge", str(recipe), "-o", str(out), "--device", "cpu", "--format", "json"]
    command = [sys.executable, "-c", STOPPING, stop_at, str(out), *args] if stop_at else [REGISTRY, *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return json.loads(stdout)


def snapshot(root: Path) -> dict[str, list[str]]:
    """Every folder under `root` with its files (not recursing into the checkpoints)."""
    return {p.name: sorted(f.name for f in p.iterdir()) for p in sorted(root.iterdir()) if p.is_dir()}


@pytest.fixture(scope="module")
def killed(family, tmp_path_factory: pytest.TempPathFactory):
    """Runs `registry merge` processes (the two chains concurrently) and records what each left behind.

    A (PYTHONHASHSEED=1): killed once its first shard is in staging; rerun and killed just after its
    rename; run a third time, which must find the merge finished.
    B (PYTHONHASHSEED=2): replacing a finished merge of another recipe, killed just before staging is
    renamed into place; rerun to completion.
    """
    root = tmp_path_factory.mktemp("kill")
    home = root / "home"
    r1 = write_recipe(root / "r1.yaml", family.a, family.b)
    r2 = write_recipe(root / "r2.yaml", family.a, family.b, 0.5, 0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REGISTRY_HOME", str(home))
        for path, out in ((r1, root / "ref"), (r2, root / "outB")):
            recipe = load_recipe(path)
            merge(recipe, plan(recipe), out, "cpu")

    def kill(name: str, proc: subprocess.Popen) -> None:
        wait_stopped(proc)
        seen[name] = snapshot(root)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        seen[f"{name} killed"] = snapshot(root)

    seen: dict[str, dict[str, list[str]]] = {}
    a = start(r1, root / "outA", home, 1, "shard")
    b = start(r1, root / "outB", home, 2, "rename")
    kill("A at shard", a)
    a = start(r1, root / "outA", home, 1, "renamed")
    kill("B at rename", b)
    b = start(r1, root / "outB", home, 2)
    kill("A at renamed", a)
    results = {"A": finish(start(r1, root / "outA", home, 3)), "B": finish(b)}
    return root, seen, results


def test_sigkill_once_a_shard_is_in_staging_leaves_no_model_and_a_rerun_completes(killed) -> None:
    root, seen, _ = killed
    at_kill = seen["A at shard"]
    staging = [name for name in at_kill if name.startswith("outA.staging-")]
    # Marked as the registry's own, which is what lets the rerun remove it.
    assert len(staging) == 1 and at_kill[staging[0]] == [".registry-staging", "model-1.safetensors"]
    assert "outA" not in at_kill and "outA" not in seen["A at shard killed"]
    assert looks_like_model(root / "outA") and not [n for n in snapshot(root) if n.startswith("outA.")]
    assert read_provenance(root / "outA").merge_identity == read_provenance(root / "ref").merge_identity


def test_sigkill_before_the_final_rename_leaves_no_model_and_a_rerun_completes(killed) -> None:
    root, seen, results = killed
    at_kill = seen["B at rename"]
    # The previous output (recipe r2) was set aside; the new one is complete but still named staging.
    assert "outB" not in at_kill and "outB" not in seen["B at rename killed"]
    assert [n.split("-")[0] for n in sorted(at_kill) if n.startswith("outB.")] == ["outB.old", "outB.staging"]
    assert all(".registry-staging" in at_kill[n] for n in at_kill if n.startswith("outB."))
    assert results["B"]["reused"] is False
    assert not [n for n in snapshot(root) if n.startswith("outB.")]
    assert read_provenance(root / "outB").merge_identity == read_provenance(root / "ref").merge_identity


def test_sigkill_after_the_rename_leaves_a_complete_model_that_is_reused(killed) -> None:
    root, seen, results = killed
    assert "outA" in seen["A at renamed"] and looks_like_model(root / "outA")
    assert results["A"]["reused"] is True
    provenance = read_provenance(root / "outA")
    assert all(sha256(root / "outA" / name) == info.sha256 for name, info in provenance.files.items())


def test_outputs_are_bit_identical_under_any_hash_seed(killed) -> None:
    root, _, _ = killed
    ref = read_provenance(root / "ref").files
    # outA: PYTHONHASHSEED=1; outB: PYTHONHASHSEED=2; ref: this test process's seed.
    for out in ("outA", "outB"):
        assert read_provenance(root / out).files == ref
        assert {f.name: sha256(f) for f in (root / out).glob("*.safetensors")} == {
            f.name: sha256(f) for f in (root / "ref").glob("*.safetensors")}
    assert sorted(name for name in snapshot(root) if looks_like_model(root / name)) == ["outA", "outB", "ref"]


def test_each_shard_is_written_as_soon_as_it_is_full_by_the_threads_asked_for(tmp_path: Path) -> None:
    from mergekit.io.tensor_writer import TensorWriter

    from registry.mergekit_fast import patched

    def tensor(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)  # 2 bytes each

    hashes: dict[str, tuple[str, int]] = {}
    with patched(None, hashes, write_threads=2):
        writer = TensorWriter(str(tmp_path / "a"), max_shard_size=100, use_async=True, max_write_threads=1)
        assert writer._executor._max_workers == 2  # mergekit 0.1.5 would use one thread
        writer.finalize()

        writer = TensorWriter(str(tmp_path / "b"), max_shard_size=100)
        writer.save_tensor("big", tensor(80))  # 160 bytes: a shard of its own, written at once
        assert sorted(os.listdir(tmp_path / "b")) == ["model-1.safetensors"]
        writer.save_tensor("x", tensor(20))
        writer.save_tensor("y", tensor(20))
        assert sorted(os.listdir(tmp_path / "b")) == ["model-1.safetensors"]  # 80 of 100 bytes
        writer.save_tensor("z", tensor(10))  # full: written
        assert sorted(os.listdir(tmp_path / "b")) == ["model-1.safetensors", "model-2.safetensors"]
        writer.save_tensor("w", tensor(10))
        writer.finalize()
    # The same shards as mergekit's own rule (a shard is closed when the next tensor does not fit).
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == {"big": "model-00001-of-00003.safetensors", "x": "model-00002-of-00003.safetensors",
                     "y": "model-00002-of-00003.safetensors", "z": "model-00002-of-00003.safetensors",
                     "w": "model-00003-of-00003.safetensors"}
    assert set(hashes) == {"model-1.safetensors", "model-2.safetensors", "model-3.safetensors"}
    assert TensorWriter.save_tensor.__module__ == "mergekit.io.tensor_writer"  # hooks removed on exit


def test_a_merge_imports_mergekit_without_peft_which_still_loads_on_use(tmp_path: Path) -> None:
    code = (
        "import gc, sys\n"
        "from registry.mergekit_fast import import_mergekit\n"
        "import_mergekit()\n"
        "import mergekit.common, mergekit.merge\n"
        "assert 'peft' not in sys.modules and gc.isenabled() and gc.get_freeze_count() > 100_000\n"
        "assert mergekit.common.peft.PeftModel.__name__ == 'PeftModel'\n"
        "import peft\n"
        "assert peft.PeftModel is mergekit.common.peft.PeftModel\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


# ---------------------------------------------------------------------------------------------
# What a merge may remove beside its output: only its own marked leftovers


def tree(root: Path) -> dict[str, bytes | str | None]:
    """Every path under `root` with its bytes (a link: its target; a folder: None)."""
    return {p.relative_to(root).as_posix(): os.readlink(p) if p.is_symlink() else None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("taken", ["folder", "file"])
def test_a_refused_output_leaves_the_users_neighbours_untouched(family, tmp_path: Path, home: Path, capsys, taken: str) -> None:
    path = write_recipe(tmp_path / "r.yaml", family.a, family.b)
    work = tmp_path / "work"
    out = work / "DIR"
    if taken == "folder":
        out.mkdir(parents=True)
        (out / "thesis.tex").write_text("mine\n")
    else:
        work.mkdir()
        out.write_text("mine\n")
    for name in ("DIR.old-backup", "DIR.staging-x", "DIR.old-1", "DIR.staging-2"):
        (work / name / "sub").mkdir(parents=True)
        (work / name / "notes.txt").write_text(f"{name}\n")
        (work / name / "sub" / "data.bin").write_bytes(os.urandom(64))
    before = tree(work)

    with pytest.raises(SystemExit) as code:
        main(["merge", str(path), "-o", str(out), "--device", "cpu"])
    assert tree(work) == before  # byte for byte, and nothing added (not even a lock file)
    assert code.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {out} exists and is not a registry merge output; choose another folder with -o or remove it\n")


def test_only_marked_leftovers_of_dead_merges_are_removed(family, tmp_path: Path, home: Path) -> None:
    from registry import staging

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", family.a, family.b))
    out = tmp_path / "out"
    # What a killed merge leaves: its staging folder, marked, with no process holding the marker.
    dead = staging.create(tmp_path / "out.staging-4242")
    (dead.path / "model-1.safetensors").write_bytes(b"partial")
    dead.close()
    dead_old = staging.create(tmp_path / "out.old-4243")
    dead_old.close()
    # Same names, not the registry's: no marker, a marker naming another folder, a marker that is a link.
    (tmp_path / "out.staging-1").mkdir()
    (tmp_path / "out.staging-1" / "model-1.safetensors").write_bytes(b"mine")
    copied = staging.create(tmp_path / "elsewhere")
    copied.close()
    os.rename(copied.path, tmp_path / "out.old-2")  # a leftover the user moved: its marker names 'elsewhere'
    (tmp_path / "out.staging-3").mkdir()
    (tmp_path / "marker").write_text(json.dumps({"folder": "out.staging-3"}))
    (tmp_path / "out.staging-3" / ".registry-staging").symlink_to(tmp_path / "marker")
    # A merge still running (it holds its marker).
    live = staging.create(tmp_path / "out.staging-5")
    kept = {name: tree(tmp_path / name) for name in ("out.staging-1", "out.old-2", "out.staging-3", "out.staging-5")}

    merge(recipe, plan(recipe), out, "cpu")
    live.close()

    assert sorted(p.name for p in tmp_path.glob("out.*")) == sorted(kept)
    assert {name: tree(tmp_path / name) for name in kept} == kept
    assert not (out / ".registry-staging").exists() and looks_like_model(out)


# ---------------------------------------------------------------------------------------------
# The merge reads what was pinned


def swap(x: Path, y: Path, how: str) -> None:
    """Exchange the contents of files `x` and `y`: by renaming, or by rewriting each in place (its mtime kept)."""
    if how == "rename":
        tmp = x.with_name(x.name + ".swap")
        os.rename(x, tmp)
        os.rename(y, x)
        os.rename(tmp, y)
        return
    data_x, data_y = x.read_bytes(), y.read_bytes()
    for path, data in ((x, data_y), (y, data_x)):
        st = path.stat()
        path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def copies(family, tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the fine-tunes a and b that a test may change."""
    import shutil

    return shutil.copytree(family.a, tmp_path / "cos"), shutil.copytree(family.b, tmp_path / "fmt")


@pytest.mark.parametrize("how", ["rename", "rewrite-keeping-mtime"])
@pytest.mark.parametrize("cache", ["cache", "no-cache"])
def test_weights_swapped_after_planning_are_refused_and_nothing_is_written(copies, tmp_path: Path, home: Path,
                                                                           how: str, cache: str) -> None:
    from registry.errors import MergeError

    cos, fmt = copies
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", cos, fmt))
    pinned = plan(recipe)
    swap(cos / "model.safetensors", fmt / "model.safetensors", how)
    if cache == "no-cache":
        (home / "cache" / "file-hashes.json").unlink()
    with pytest.raises(MergeError) as exc:
        merge(recipe, pinned, tmp_path / "out", "cpu")
    assert str(exc.value) == (
        "source 'a' changed during the merge: model.safetensors is not the file `registry plan` pinned; the merge was "
        "discarded (leave the source folders alone until a merge ends, then merge again; --update accepts new weights)"
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


@pytest.mark.parametrize("engine", ["auto", "plain"])
def test_weights_swapped_while_the_merge_runs_are_refused(copies, tmp_path: Path, engine: str) -> None:
    cos, fmt = copies
    home = tmp_path / "home"
    path = write_recipe(tmp_path / "r.yaml", cos, fmt)
    proc = start(path, tmp_path / "out", home, 1, "shard", engine)
    wait_stopped(proc)  # the sources are open and read; a shard is written
    swap(cos / "model.safetensors", fmt / "model.safetensors", "rename")
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=300)
    assert (proc.returncode, stdout) == (1, "")
    assert stderr == (
        "error: source 'a' changed during the merge: model.safetensors is not the file `registry plan` pinned; the merge "
        "was discarded (leave the source folders alone until a merge ends, then merge again; --update accepts new weights)\n"
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]
