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
