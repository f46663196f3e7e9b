"""What each kind of recipe edit redoes, on the Hub test server and the local registry, run as users run it.

The toy example is published once, then edited one way at a time: card text (template, summary, tag,
label, license) re-publishes the card alone (no merge, mergekit never imported, no weight byte sent);
a smoke threshold re-runs the smoke test only; a weight or a source's content merges again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from registry.testing.fixtures import HUB_ORG, HUB_TOKEN, hub_client

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "recipes" / "examples" / "toy_cos_fmt.yaml"
HEAVY = {"torch", "transformers", "mergekit"}


class Edits:
    """A scratch copy of the toy example (its sources too, so one can be edited) published to one target."""

    def __init__(self, root: Path, target: str, hub_server=None):
        self.root, self.target, self.hub = root, target, hub_server
        shutil.copytree(ROOT / "tests" / "fixtures" / "toy" / "ft_cos", root / "sources" / "ft_cos")
        shutil.copytree(ROOT / "tests" / "fixtures" / "toy" / "ft_fmt", root / "sources" / "ft_fmt")
        self.recipe = root / "toy.yaml"
        text = EXAMPLE.read_text().replace("../../tests/fixtures/toy", "./sources")
        self.recipe.write_text(text.replace("repo_id: registry-examples/", f"repo_id: {HUB_ORG}/"))
        self.home = root / ".registry"

    def edit(self, old: str, new: str) -> None:
        text = self.recipe.read_text()
        assert old in text, old
        self.recipe.write_text(text.replace(old, new, 1))

    def publish(self, *args: str) -> tuple[dict, set[str]]:
        """The outcome (--format json) and the top-level modules the process imported."""
        env = {**os.environ, "REGISTRY_HOME": str(self.home)}
        if self.hub is not None:
            env.update(self.hub.client_env(HUB_TOKEN))
            self.hub.clear_requests()
        run = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "registry", "publish", str(self.recipe), "--target", self.target,
             "--format", "json", *args],
            cwd=self.root, capture_output=True, text=True, timeout=600, env=env,
        )
        assert run.returncode == 0, "\n".join(line for line in run.stderr.splitlines() if not line.startswith("import time:"))
        imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in run.stderr.splitlines()
                    if line.startswith("import time:")}
        return json.loads(run.stdout), imported

    # -- what the target holds --------------------------------------------------------------------

    def snapshot(self) -> dict[str, tuple]:
        """Each published file: its content id and, locally, its inode (a hard link shares it)."""
        if self.target == "hf":
            info = hub_client(self.hub).model_info(_repo_id(self.recipe), files_metadata=True)
            return {s.rfilename: (s.lfs.sha256 if s.lfs else s.blob_id,) for s in info.siblings if s.rfilename != ".gitattributes"}
        index = json.loads((self.home / "index.json").read_text())
        latest = index["models"][-1]
        folder = self.home / latest["path"]
        return {rel: (f["sha256"], (folder / rel).stat().st_ino) for rel, f in latest["files"].items()}

    def card(self) -> str:
        """The published README.md."""
        if self.target == "hf":
            return Path(hub_client(self.hub).hf_hub_download(_repo_id(self.recipe), "README.md")).read_text()
        latest = json.loads((self.home / "index.json").read_text())["models"][-1]
        return (self.home / latest["path"] / "README.md").read_text()

    def versions(self) -> int:
        if self.target == "hf":
            return len(hub_client(self.hub).list_repo_commits(_repo_id(self.recipe)))
        return len(json.loads((self.home / "index.json").read_text())["models"])

    def sent(self) -> dict[str, int]:
        """Bytes the Hub received in the last publish: LFS uploads and commit payloads."""
        return {"lfs": self.hub.bytes_received(r"^PUT "), "commit": self.hub.bytes_received(r"/commit/")}


def _repo_id(recipe: Path) -> str:
    return next(line.split(":", 1)[1].strip() for line in recipe.read_text().splitlines() if line.startswith("repo_id:"))


def changed(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """The files whose content differs (added or removed included)."""
    return sorted(rel for rel in before.keys() | after.keys() if (before.get(rel) or (None,))[0] != (after.get(rel) or (None,))[0])


def linked(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """The files of the new local version that are hard links to the previous version's."""
    return sorted(rel for rel in after if rel in before and after[rel][1] == before[rel][1])


def check_card_only(edits: Edits, before: dict, outcome: dict, imported: set[str], expected: list[str]) -> dict:
    after = edits.snapshot()
    assert (outcome["merge"], outcome["smoke"]["reused"], outcome["results"][0]["changed"]) == ("skipped", True, True)
    assert not imported & HEAVY
    assert changed(before, after) == expected
    if edits.target == "hf":
        assert edits.sent()["lfs"] == 0
        assert edits.hub.count(r"/lfs/objects/batch") == 0
    else:
        weights = sorted(rel for rel in after if rel not in expected)
        assert linked(before, after) == weights
    return after


@pytest.fixture(params=["hf", "local"])
def edits(request, tmp_path) -> Edits:
    if request.param == "hf":
        hub_server = request.getfixturevalue("hub_server")
        return Edits(tmp_path, "hf", hub_server)
    return Edits(tmp_path, "local")


def test_each_kind_of_edit_redoes_only_what_it_changes(edits: Edits, tmp_path):
    first, _ = edits.publish()
    assert (first["merge"], first["smoke"]["reused"]) == ("merged", False)
    state = edits.snapshot()

    same, imported = edits.publish()
    assert same["unchanged"] is True and not imported & HEAVY

    # A team template: the same card plus a line.
    (tmp_path / "templates").mkdir()
    template = (ROOT / "templates" / "model_card.md.j2").read_text()
    (tmp_path / "templates" / "model_card.md.j2").write_text(template + "\nMaintained by the registry team.\n")
    # A template changes the card alone; a text field of the recipe also changes the published recipe.yaml.
    for old, new in [
        (None, None),  # the template edit above
        ("summary: Linear merge", "summary: Edited linear merge"),
        ("tags: [toy, example]", "tags: [toy, example, edited]"),
        ("label: Toy fine-tune A", "label: Edited toy fine-tune A"),
        ("license: mit", "license: apache-2.0"),
    ]:
        if old is not None:
            edits.edit(old, new)
        versions = edits.versions()
        outcome, imported = edits.publish()
        state = check_card_only(edits, state, outcome, imported, ["README.md"] if old is None else ["README.md", "recipe.yaml"])
        assert edits.versions() == versions + 1
    text = edits.card()
    assert "Maintained by the registry team." in text and "Edited linear merge" in text
    assert "license: apache-2.0" in text and "- edited" in text and "Edited toy fine-tune A" in text

    # Nothing edited since: current, on the card as now rendered.
    same, _ = edits.publish()
    assert same["unchanged"] is True

    # A fresh machine (CI on a new runner): no build folder. A template edit still re-publishes the card
    # alone, rendered from the reports the target holds.
    shutil.rmtree(edits.home / "build")
    (tmp_path / "templates" / "model_card.md.j2").write_text(template + "\nMaintained by the platform team.\n")
    outcome, imported = edits.publish()
    state = check_card_only(edits, state, outcome, imported, ["README.md"])
    assert outcome["model_dir"] is None and not (edits.home / "build").exists()

    # The build folder is back only when something needs the weights: a smoke threshold edit re-runs
    # the smoke test (merging again here, since the build is gone), then sends the report and card only.
    edits.edit("    lengths: [256, 512]", "    lengths: [256, 512]\n  parity: {nll_margin: 0.5}")
    outcome, _ = edits.publish()
    assert (outcome["merge"], outcome["smoke"]["reused"]) == ("merged", False)
    after = edits.snapshot()
    assert changed(state, after) == ["README.md", "recipe.yaml", "smoke.json"]
    if edits.target == "hf":
        assert edits.sent()["lfs"] == 0
    state = after
    # With the build folder there, another threshold edit re-runs the smoke test alone.
    edits.edit("nll_margin: 0.5", "nll_margin: 0.6")
    outcome, _ = edits.publish()
    assert (outcome["merge"], outcome["smoke"]["reused"]) == ("reused", False)
    after = edits.snapshot()
    assert changed(state, after) == ["README.md", "recipe.yaml", "smoke.json"]
    if edits.target == "hf":
        assert edits.sent()["lfs"] == 0
    else:
        assert linked(state, after) == sorted(rel for rel in after if rel not in ("README.md", "recipe.yaml", "smoke.json"))
    state = after

    # A merge weight: merged again, new weights sent.
    edits.edit("weight: 0.3}", "weight: 0.4}")
    outcome, imported = edits.publish()
    assert (outcome["merge"], outcome["smoke"]["reused"]) == ("merged", False) and "mergekit" in imported
    after = edits.snapshot()
    assert {"model.safetensors", "provenance.json", "smoke.json", "README.md"} <= set(changed(state, after))
    if edits.target == "hf":
        weights = Path(outcome["model_dir"]) / "model.safetensors"
        assert edits.sent()["lfs"] == weights.stat().st_size
    state = after

    # A source's content: merged again from the new content (accepted with --update).
    from safetensors.torch import load_file, save_file

    source = tmp_path / "sources" / "ft_cos" / "model.safetensors"
    tensors = load_file(source)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, source, metadata={"format": "pt"})
    outcome, imported = edits.publish("--update")
    assert (outcome["merge"], outcome["smoke"]["reused"]) == ("merged", False) and "mergekit" in imported
    after = edits.snapshot()
    assert {"model.safetensors", "provenance.json", "smoke.json", "README.md"} <= set(changed(state, after))
