"""Publishing a family: the `hf` target's Collection on the Hub test server (driven by the real client),
and the `local` target's index recording each point's family, with the family's own folder."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from registry.errors import PublishError
from registry.family import PointReports, build_family, family_files
from registry.publish import Bundle, PublishResult, bundle_files
from registry.publish.hf import HfOptions, HfTarget, family_note
from registry.publish.local import LocalTarget, list_families, list_latest, read_index
from registry.recipe import parse_recipe
from registry.reports import CheckEntry, Family, ParityEntry, Provenance, Smoke, dumps, read, write
from registry.testing.fixtures import HUB_ORG, HUB_TOKEN, OTHER_TOKEN, READ_TOKEN, hub_client

SWEEP = """\
repo_id: {org}/toy-a{{a}}-b{{b}}
sources:
  a: {{model: org/a}}
  b: {{model: org/b}}
merge:
  merge_method: linear
  models:
    - model: a
    - model: b
  parameters: {{normalize: true}}
sweep:
  family: toy-a-b
  grid:
    a: [0, 0.25, 0.5, 0.75, 1]
    b: 1 - a
"""
PINS = {
    "a": {"kind": "hub", "repo_id": "org/a", "revision": "a" * 40, "content_sha256": None},
    "b": {"kind": "hub", "repo_id": "org/b", "revision": "b" * 40, "content_sha256": None},
}
# NLL of each point on the fixed text, by the weight of `a`, and of the parents.
NLL = {0.0: 0.324, 0.25: 0.311, 0.5: 0.305, 0.75: 0.301, 1.0: 0.296}
TITLE = "toy-a-b"


def sweep(org: str = HUB_ORG):
    return parse_recipe(SWEEP.format(org=org))


def point_model(folder: Path, point) -> Path:
    """A finished point as merge, smoke and card leave it (stand-in weights), with the NLL smoke measured."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = point.recipe
    blob = hashlib.sha256(recipe.sha256.encode()).digest() * 64
    (folder / "model.safetensors").write_bytes(blob)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    files = {n: {"sha256": hashlib.sha256((folder / n).read_bytes()).hexdigest(), "size": (folder / n).stat().st_size}
             for n in ("model.safetensors", "config.json")}
    merge_id = hashlib.sha256(blob).hexdigest()
    write(Provenance(merge_identity=merge_id, merge_method="linear", dtype="bfloat16", sources=PINS, config_donor="a",
                     files=files, versions={"registry": "0.1.0"}, device="cpu"), folder)
    parity = [ParityEntry(model="merged", nll=NLL[point.weights["a"]], long_retrieved=6, long_total=6),
              ParityEntry(model="a", nll=NLL[1.0], long_retrieved=6, long_total=6),
              ParityEntry(model="b", nll=NLL[0.0], long_retrieved=6, long_total=6)]
    write(Smoke(merge_identity=merge_id, passed=True, device="cpu",
                checks=[CheckEntry(name="short", status="passed", reason="answered")], parity=parity), folder)
    (folder / "README.md").write_text(
        f"---\nbase_model:\n- org/a\n- org/b\nbase_model_relation: merge\nlicense: mit\n"
        f"registry:\n  recipe_sha256: {recipe.sha256}\n  merge_identity: {merge_id}\n---\n\n# {recipe.repo_id}\n"
    )
    return folder


def publish_points(target, tmp_path: Path, recipe, which: list[int], options) -> tuple[list[PointReports], list[PublishResult]]:
    """Publish the chosen points through the real target; every point's reports, and the results of those published."""
    reports, results = [], []
    for point in recipe.points():
        folder = point_model(tmp_path / f"point-{point.index}", point)
        if point.index in which:
            bundle = Bundle(point.recipe.repo_id, point.recipe.sha256, PINS, bundle_files(folder), read(Provenance, folder),
                            read(Smoke, folder), (folder / "README.md").read_text())
            results.append(target.publish(bundle, options))
        reports.append(PointReports(point, read(Provenance, folder), read(Smoke, folder),
                                    published=(f"{target.name}:{point.recipe.repo_id}",) if point.index in which else ()))
    return reports, results


def repo_ids(recipe, which: list[int]) -> list[str]:
    return [p.recipe.repo_id for p in recipe.points() if p.index in which]


# ---------------------------------------------------------------------------------------------
# hf: the family as a Collection


@pytest.fixture
def hf(hub_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    return HfTarget(sleep=lambda s: None)


def collection_items(api, slug: str) -> list[tuple[str, str, str | None]]:
    return [(i.item_type, i.item_id, i.note) for i in api.get_collection(slug).items]


def test_a_family_becomes_one_collection_with_one_item_per_published_point_and_its_weights(hub_server, hf, tmp_path):
    recipe = sweep()
    reports, results = publish_points(hf, tmp_path, recipe, [0, 1, 2, 3, 4], HfOptions())
    family = build_family(recipe, reports)
    assert [r.repo_id for r in results] == repo_ids(recipe, [0, 1, 2, 3, 4])

    hub_server.clear_requests()
    result = hf.publish_family(family, results, HfOptions())
    api = hub_client(hub_server)
    (collection,) = list(api.list_collections(owner=HUB_ORG))
    assert (collection.title, collection.slug.split("/")[0], collection.private) == (TITLE, HUB_ORG, False)
    assert (result.target, result.location, result.revision) == ("hf", f"{hub_server.endpoint}/collections/{collection.slug}", collection.slug)
    assert (result.changed, result.detail) == (True, "collection created, 5 added")
    assert collection_items(api, collection.slug) == [
        ("model", f"{HUB_ORG}/toy-a0-b1", "a=0 b=1 · NLL 0.324"),
        ("model", f"{HUB_ORG}/toy-a0.25-b0.75", "a=0.25 b=0.75 · NLL 0.311"),
        ("model", f"{HUB_ORG}/toy-a0.5-b0.5", "a=0.5 b=0.5 · NLL 0.305"),
        ("model", f"{HUB_ORG}/toy-a0.75-b0.25", "a=0.75 b=0.25 · NLL 0.301"),
        ("model", f"{HUB_ORG}/toy-a1-b0", "a=1 b=0 · NLL 0.296"),
    ]
    assert api.get_collection(collection.slug).description == "Merge family: weights of a, b swept; one model per point"
    assert hub_server.count(r"^POST /api/collections$") == 1
    assert hub_server.count(r"^POST /api/collections/.*/items$") == 5

    # Again: the listing shows only 4 items of a collection, so the fifth must be read from the collection itself.
    hub_server.clear_requests()
    again = hf.publish_family(family, results, HfOptions())
    assert (again.changed, again.detail, again.revision) == (False, "collection up to date", collection.slug)
    assert hub_server.count(r"^(POST|PATCH|DELETE) ") == 0
    assert len(list(api.list_collections(owner=HUB_ORG))) == 1
    assert len(api.get_collection(collection.slug).items) == 5


def test_only_the_published_points_are_added_and_a_later_publish_adds_the_rest_without_duplicates(hub_server, hf, tmp_path):
    recipe = sweep()
    reports, results = publish_points(hf, tmp_path, recipe, [1, 3], HfOptions(private=True))
    family = build_family(recipe, reports)
    result = hf.publish_family(family, results, HfOptions(private=True))
    api = hub_client(hub_server)
    assert [i[1] for i in collection_items(api, result.revision)] == repo_ids(recipe, [1, 3])
    # Private like its points: nobody outside the namespace sees it.
    assert api.get_collection(result.revision).private
    assert list(hub_client(hub_server, OTHER_TOKEN).list_collections(owner=HUB_ORG)) == []

    reports, more = publish_points(hf, tmp_path / "more", recipe, [0, 1, 3], HfOptions(private=True))
    later = hf.publish_family(build_family(recipe, reports), more, HfOptions(private=True))
    assert (later.changed, later.detail, later.revision) == (True, "collection 1 added", result.revision)
    # Appended: items already there keep their place.
    assert [i[1] for i in collection_items(api, result.revision)] == repo_ids(recipe, [1, 3]) + repo_ids(recipe, [0])


def test_a_changed_note_is_updated_in_place(hub_server, hf, tmp_path):
    recipe = sweep()
    reports, results = publish_points(hf, tmp_path, recipe, [0, 2], HfOptions())
    family = build_family(recipe, reports)
    slug = hf.publish_family(family, results, HfOptions()).revision
    api = hub_client(hub_server)
    before = api.get_collection(slug).items

    # The smoke test ran again on point 2 and measured another NLL.
    rows = [r.model_copy(update={"nll": 0.3071}) if r.repo_id == f"{HUB_ORG}/toy-a0.5-b0.5" else r for r in family.rows]
    hub_server.clear_requests()
    changed = hf.publish_family(family.model_copy(update={"rows": rows}), results, HfOptions())
    assert (changed.changed, changed.detail) == (True, "collection 1 notes updated")
    assert hub_server.count(r"^PATCH /api/collections/.*/items/[0-9a-f]{24}$") == 1
    assert hub_server.count(r"^POST ") == 0
    after = api.get_collection(slug).items
    assert [(i.item_object_id, i.item_id, i.note) for i in after] == [
        (before[0].item_object_id, f"{HUB_ORG}/toy-a0-b1", "a=0 b=1 · NLL 0.324"),
        (before[1].item_object_id, f"{HUB_ORG}/toy-a0.5-b0.5", "a=0.5 b=0.5 · NLL 0.307"),
    ]


def test_an_existing_collection_of_that_title_is_reused_and_its_other_items_kept(hub_server, hf, tmp_path):
    recipe = sweep()
    reports, results = publish_points(hf, tmp_path, recipe, [4], HfOptions())
    api = hub_client(hub_server)
    api.create_repo(f"{HUB_ORG}/notes-model")
    mine = api.create_collection(TITLE, namespace=HUB_ORG, description="made by hand")
    api.add_collection_item(mine.slug, f"{HUB_ORG}/notes-model", "model", note="kept")
    api.create_collection("another family", namespace=HUB_ORG)

    result = hf.publish_family(build_family(recipe, reports), results, HfOptions())
    assert (result.revision, result.detail) == (mine.slug, "collection 1 added")
    assert collection_items(api, mine.slug) == [("model", f"{HUB_ORG}/notes-model", "kept"),
                                                ("model", f"{HUB_ORG}/toy-a1-b0", "a=1 b=0 · NLL 0.296")]
    assert api.get_collection(mine.slug).description == "made by hand"


def test_nothing_published_here_records_nothing(hub_server, hf, tmp_path):
    recipe = sweep()
    reports, _ = publish_points(hf, tmp_path, recipe, [], HfOptions())
    hub_server.clear_requests()
    assert hf.publish_family(build_family(recipe, reports), [], HfOptions()) is None
    assert hub_server.requests == []


@pytest.mark.parametrize("token", [READ_TOKEN, OTHER_TOKEN], ids=["read token", "not a member"])
@pytest.mark.parametrize("exists", [False, True], ids=["new collection", "existing collection"])
def test_a_token_that_may_not_write_the_namespace_is_refused_in_one_line(hub_server, hf, tmp_path, monkeypatch, token, exists):
    recipe = sweep()
    reports, results = publish_points(hf, tmp_path, recipe, [0], HfOptions())
    family = build_family(recipe, reports)
    api = hub_client(hub_server)
    if exists:
        api.create_collection(TITLE, namespace=HUB_ORG)
    monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(PublishError) as refused:
        HfTarget(sleep=lambda s: None).publish_family(family, results, HfOptions())
    assert str(refused.value) == (
        f"the token may not do this on the collection {TITLE} of {HUB_ORG} (403): "
        "use a token with access to it (`hf auth login`, HF_TOKEN)"
    )
    assert token not in str(refused.value)
    assert [(c.title, len(api.get_collection(c.slug).items)) for c in api.list_collections(owner=HUB_ORG)] == (
        [(TITLE, 0)] if exists else [])


def test_the_test_hub_answers_collection_calls_as_the_hub_does(hub_server):
    from huggingface_hub.errors import HfHubHTTPError

    api = hub_client(hub_server)
    api.create_repo(f"{HUB_ORG}/m")
    made = api.create_collection("Toy sweep: 0.3/0.7", namespace=HUB_ORG)
    assert made.slug.startswith(f"{HUB_ORG}/toy-sweep-0-3-0-7-") and len(made.slug.rpartition("-")[2]) == 24
    with pytest.raises(HfHubHTTPError) as duplicate:
        api.create_collection("Toy sweep: 0.3/0.7", namespace=HUB_ORG)
    assert duplicate.value.response.status_code == 409
    assert api.create_collection("Toy sweep: 0.3/0.7", namespace=HUB_ORG, exists_ok=True).slug == made.slug
    api.add_collection_item(made.slug, f"{HUB_ORG}/m", "model", note="n")
    for call, status in [
        (lambda: api.add_collection_item(made.slug, f"{HUB_ORG}/m", "model"), 409),
        (lambda: api.add_collection_item(made.slug, f"{HUB_ORG}/missing", "model"), 404),
        (lambda: api.add_collection_item(made.slug, f"{HUB_ORG}/m", "model", note="x" * 501), 400),
        (lambda: api.get_collection(f"{HUB_ORG}/toy-sweep-{'0' * 24}"), 404),
        (lambda: api.update_collection_item(made.slug, "0" * 24, note="x"), 404),
        (lambda: hub_client(hub_server, False).add_collection_item(made.slug, f"{HUB_ORG}/m", "model"), 401),
    ]:
        with pytest.raises(HfHubHTTPError) as failed:
            call()
        assert failed.value.response.status_code == status
    assert api.add_collection_item(made.slug, f"{HUB_ORG}/m", "model", exists_ok=True).items[0].note == "n"
    # A renamed collection keeps its id, and its old slug still answers.
    renamed = api.update_collection_metadata(made.slug, title="Renamed")
    assert renamed.slug.endswith(made.slug.rpartition("-")[2]) and api.get_collection(made.slug).title == "Renamed"
    api.delete_collection_item(made.slug, api.get_collection(made.slug).items[0].item_object_id)
    api.delete_collection(made.slug)
    api.delete_collection(made.slug, missing_ok=True)
    assert list(api.list_collections(owner=HUB_ORG)) == []


def test_a_note_stays_within_the_hubs_limit():
    recipe = sweep()
    family = build_family(recipe, [PointReports(p, None, None) for p in recipe.points()])
    row = family.points[0].model_copy(update={"label": "x" * 600, "nll": 1.0})
    note = family_note(row)
    assert len(note) == 500 and note.endswith("…")
    assert family_note(family.points[1]) == "a=0.25 b=0.75"


# ---------------------------------------------------------------------------------------------
# local: the index records the family


def test_the_local_index_records_each_points_family_and_keeps_the_family_report(tmp_path, monkeypatch, capsys):
    recipe = sweep("team")
    home = tmp_path / "home"
    target = LocalTarget(home)
    reports, results = publish_points(target, tmp_path, recipe, [0, 2, 4], target.Options())
    family = build_family(recipe, reports)

    result = target.publish_family(family, results, target.Options())
    assert result.changed and result.detail == "family toy-a-b: 3 points"
    folder = Path(result.location)
    assert folder.parent == home / "families" / TITLE and folder.name == result.revision
    assert result.revision.endswith("-" + hashlib.sha256(dumps(family).encode()).hexdigest()[:12])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == family_files(family)
    assert read(Family, folder) == family

    marks = {m["repo_id"]: m.get("family") for m in list_latest(home)}
    assert marks == {
        "team/toy-a0-b1": {"name": TITLE, "label": "a=0 b=1", "weights": {"a": 0.0, "b": 1.0}},
        "team/toy-a0.5-b0.5": {"name": TITLE, "label": "a=0.5 b=0.5", "weights": {"a": 0.5, "b": 0.5}},
        "team/toy-a1-b0": {"name": TITLE, "label": "a=1 b=0", "weights": {"a": 1.0, "b": 0.0}},
    }
    (entry,) = list_families(home)
    assert (entry["family"], entry["version"], entry["path"], entry["recipe_sha256"]) == (
        TITLE, result.revision, f"families/{TITLE}/{result.revision}", recipe.sha256)
    assert entry["points"] == [{"repo_id": r.repo_id, "version": r.revision, "label": label, "weights": weights}
                               for r, (label, weights) in zip(results, [("a=0 b=1", {"a": 0.0, "b": 1.0}),
                                                                         ("a=0.5 b=0.5", {"a": 0.5, "b": 0.5}),
                                                                         ("a=1 b=0", {"a": 1.0, "b": 0.0})], strict=True)]

    # Again, with the results the pipeline gives for points already published: nothing is written.
    index = (home / "index.json").read_bytes()
    unchanged = [PublishResult("local", "", None, changed=False, detail="already published", repo_id=r.repo_id) for r in results]
    again = target.publish_family(family, unchanged, target.Options())
    assert (again.changed, again.location, again.detail) == (False, result.location, "family already recorded")
    assert (home / "index.json").read_bytes() == index

    code, out, err = cli(["list"], home, monkeypatch, capsys)
    assert (code, err) == (0, "")
    rows = [line for line in out.splitlines() if "team/toy" in line]
    assert [(line.split()[1], "toy-a-b (a=" in line) for line in rows] == [
        ("team/toy-a0-b1", True), ("team/toy-a0.5-b0.5", True), ("team/toy-a1-b0", True)]


def test_a_killed_family_publish_is_reconciled(tmp_path, monkeypatch, capsys):
    recipe = sweep("team")
    home = tmp_path / "home"
    target = LocalTarget(home)
    reports, results = publish_points(target, tmp_path, recipe, [1, 3], target.Options())
    family = build_family(recipe, reports)
    result = target.publish_family(family, results, target.Options())
    parent = home / "families" / TITLE

    # Killed after renaming the family folder into place, before the index was replaced: the index has neither.
    index = json.loads((home / "index.json").read_text())
    del index["families"]
    for entry in index["models"]:
        entry.pop("family")
    (home / "index.json").write_text(json.dumps(index))
    # And a second publish killed while staging (its process gone, its folder still marked).
    staging = parent / f".staging-20990101T000000Z-{'0' * 12}-1"
    script = "import sys; from pathlib import Path; from registry.staging import create; create(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", script, str(staging)], check=True)
    mine = parent / ".staging-mine"
    mine.mkdir()

    code, out, err = cli(["list", "--format", "json"], home, monkeypatch, capsys)
    assert code == 0
    assert err.splitlines() == [
        f"removed families/{TITLE}/{staging.name}: left by an interrupted publish of family {TITLE}",
        f"adopted family {TITLE} {result.revision} into the index: a publish was interrupted after writing it",
    ]
    assert [m.get("family", {}).get("label") for m in json.loads(out)] == ["a=0.25 b=0.75", "a=0.75 b=0.25"]
    (entry,) = list_families(home)
    assert (entry["version"], [p["repo_id"] for p in entry["points"]]) == (result.revision, repo_ids(recipe, [1, 3]))
    assert mine.is_dir() and not staging.exists()
    assert cli(["list"], home, monkeypatch, capsys)[2] == ""
    assert read_index(home)["families"][0]["files"] == {
        name: {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)} for name, blob in sorted(family_files(family).items())}


def cli(args: list[str], home: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    from registry.cli import main

    monkeypatch.setenv("REGISTRY_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as code:
        main(args)
    out = capsys.readouterr()
    return code.value.code or 0, out.out, out.err
