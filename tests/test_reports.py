"""The typed reports between stages: round trip, and one clear line for a bad file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from registry import reports
from registry.reports import CheckEntry, FileRecord, Provenance, ReportError, Smoke, SourcePin

PROVENANCE = Provenance(
    merge_identity="a" * 64, merge_method="linear", normalize=True,
    dtype="bfloat16", config_donor="cos", device="cpu",
    sources={"cos": SourcePin(kind="local", content_sha256="c" * 64, weight=0.3),
             "fmt": SourcePin(kind="hub", repo_id="team/fmt", revision="d" * 40, weight=0.7)},
    files={"model.safetensors": FileRecord(sha256="e" * 64, size=10)},
    versions={"registry": "0.1.0", "mergekit": "0.1.5"},
)


def test_reports_round_trip_through_their_files(tmp_path: Path):
    smoke = Smoke(passed=False, device="cpu", merge_identity="a" * 64, smoke_identity="f" * 64,
                  checks=[CheckEntry(name="short", status="failed", reason="repeats", details={"nll": float("nan")})])
    reports.write(PROVENANCE, tmp_path)
    reports.write(smoke, tmp_path)
    assert reports.read(Provenance, tmp_path) == PROVENANCE
    back = reports.read(Smoke, tmp_path)
    assert back.failed()[0].reason == "repeats"
    assert back.checks[0].details == {"nll": None}  # non-finite numbers are written as null
    assert sorted(p.name for p in tmp_path.iterdir()) == ["provenance.json", "smoke.json"]  # no temporary left behind


def test_a_missing_report_is_none(tmp_path: Path):
    assert reports.read(Smoke, tmp_path) is None


def test_the_old_file_survives_for_a_hard_link_to_it(tmp_path: Path):
    reports.write(PROVENANCE, tmp_path)
    published = tmp_path / "published.json"
    os.link(tmp_path / "provenance.json", published)
    reports.write(PROVENANCE.model_copy(update={"device": "cuda"}), tmp_path)
    assert json.loads(published.read_text())["device"] == "cpu"
    assert reports.read(Provenance, tmp_path).device == "cuda"


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format": 1}', "unknown provenance.json format 1 (this registry reads format 2)"),
    ('{"passed": true}', "unknown provenance.json format null (this registry reads format 2)"),
    (json.dumps({**PROVENANCE.model_dump(mode="json"), "files": {"a": {"sha256": "x"}}}), "files.a.size: Field required"),
    (json.dumps({**PROVENANCE.model_dump(mode="json"), "dtpye": "x"}), "dtpye: Extra inputs are not permitted"),
])
def test_a_bad_report_is_one_line_naming_the_file(tmp_path: Path, content: str, message: str):
    (tmp_path / "provenance.json").write_text(content)
    with pytest.raises(ReportError) as info:
        reports.read(Provenance, tmp_path)
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'provenance.json'}: {message}")
    assert "\n" not in text
    assert info.value.hint == "run `registry merge` again to rewrite it"
    assert reports.read_current(Provenance, tmp_path) is None


def test_a_report_that_is_a_symlink_is_refused(tmp_path: Path):
    (tmp_path / "elsewhere.json").write_text(reports.dumps(PROVENANCE))
    (tmp_path / "provenance.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ReportError, match="not a regular file"):
        reports.read(Provenance, tmp_path)


# ---------------------------------------------------------------------------------------------
# The commands that read reports: a bad one is one line naming the file, exit 1, no traceback

TOY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "examples" / "toy_cos_fmt.yaml"
STAGE = {"provenance.json": "merge", "smoke.json": "smoke"}
CURRENT = {"provenance.json": Provenance.FORMAT, "smoke.json": reports.Smoke.FORMAT}
# {now}: the format this registry writes for the file, {newer}: the one after it.
BAD = {
    "corrupt": ('{{"format": {now}, "passed": tru', "not valid JSON (Expecting value: line 1 column 25 (char 24))"),
    "unknown format": ('{{"format": 1, "passed": true}}', "unknown {file} format 1 (this registry reads format {now})"),
    "newer format": ('{{"format": {newer}, "passed": true}}', "unknown {file} format {newer} (this registry reads format {now})"),
    "incomplete": ('{{"format": {now}}}', None),
}


def _bad(folder: Path, file: str, bad: str) -> str:
    """Write a bad `file` into `folder`; the message the command must print for it."""
    content, message = BAD[bad]
    path = folder / file
    path.unlink(missing_ok=True)  # a published file is a hard link to the build's: replace, never edit
    path.write_text(content.format(now=CURRENT[file], newer=CURRENT[file] + 1))
    if message is None:  # the first field a report of this kind requires
        message = {"provenance.json": "merge_identity: Field required", "smoke.json": "passed: Field required"}[file]
    return (f"error: {path}: {message.format(file=file, now=CURRENT[file], newer=CURRENT[file] + 1)} "
            f"(run `registry {STAGE[file]}` again to rewrite it)\n")


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    from registry.cli import main

    with pytest.raises(SystemExit) as info:
        main(list(argv))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("file", sorted(STAGE))
def test_registry_card_names_a_bad_report_of_the_model_folder(tmp_path: Path, capsys, monkeypatch, file: str, bad: str):
    monkeypatch.delenv("REGISTRY_DEBUG", raising=False)
    reports.write(PROVENANCE, tmp_path)
    expected = _bad(tmp_path, file, bad)
    assert _cli(capsys, "card", str(TOY_RECIPE), "--model-dir", str(tmp_path)) == (1, "", expected)


@pytest.mark.parametrize("bad", sorted(BAD))
def test_registry_smoke_names_a_bad_provenance_before_loading_anything(tmp_path: Path, capsys, monkeypatch, bad: str):
    monkeypatch.delenv("REGISTRY_DEBUG", raising=False)
    (tmp_path / "config.json").write_text("{}")
    expected = _bad(tmp_path, "provenance.json", bad)
    assert _cli(capsys, "smoke", str(tmp_path), "--device", "cpu") == (1, "", expected)
    assert not (tmp_path / "smoke.json").exists()


# A report an older registry wrote (format 1) is no error for the catalog: test_catalog shows it with a note.
@pytest.mark.parametrize("bad", sorted(set(BAD) - {"unknown format"}))
@pytest.mark.parametrize("file", sorted(STAGE))
def test_registry_catalog_build_names_a_bad_report_in_the_local_registry(tmp_path: Path, capsys, monkeypatch, file: str, bad: str):
    from registry.publish import Bundle, bundle_files
    from registry.publish.local import LocalOptions, LocalTarget

    monkeypatch.delenv("REGISTRY_DEBUG", raising=False)
    home, model = tmp_path / "home", tmp_path / "model"
    monkeypatch.setenv("REGISTRY_HOME", str(home))
    model.mkdir()
    smoke = Smoke(passed=True, device="cpu", checks=[CheckEntry(name="short", status="passed", reason="answered")])
    card = "---\nregistry:\n  recipe_sha256: " + "b" * 64 + "\n---\n\n# tiny\n"
    (model / "README.md").write_text(card)
    reports.write(PROVENANCE, model)
    reports.write(smoke, model)
    bundle = Bundle("team/tiny", "b" * 64, {}, bundle_files(model), PROVENANCE, smoke, card)
    published = Path(LocalTarget(home).publish(bundle, LocalOptions()).location)
    expected = _bad(published, file, bad)
    assert _cli(capsys, "catalog", "build", "-o", str(tmp_path / "site")) == (1, "", expected)
    assert reports.read(Provenance, model) == PROVENANCE and reports.read(Smoke, model) == smoke  # the build's are intact
