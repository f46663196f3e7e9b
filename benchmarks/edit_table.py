"""What each kind of recipe edit redoes, measured: `registry publish` of the toy example to the Hub test server.

    python benchmarks/edit_table.py

Starts the Hub test server (registry/testing/hub.py) in this process, publishes a scratch copy of
recipes/examples/toy_cos_fmt.yaml with `--target hf`, then edits it one way at a time and publishes
again, each time as a whole `registry publish` process run with `-X importtime`. For each edit it
prints what was redone (merge / smoke / card / upload: the files whose content changed on the Hub),
whether mergekit was imported, and the bytes the server received: LFS uploads, commit payloads, and
every request body together.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from registry.testing.hub import HubServer  # noqa: E402

RECIPE = "recipes/examples/toy_cos_fmt.yaml"
USER, TOKEN = "alice", "hf_alice_edit_table_token"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp, HubServer(
        Path(tmp) / "hub", tokens={TOKEN: USER}, orgs={"registry-examples": {USER: "write"}}
    ) as hub:
        work = Path(tmp) / "repo"
        shutil.copytree(ROOT / "recipes", work / "recipes", ignore=shutil.ignore_patterns("*.lock.json"))
        shutil.copytree(ROOT / "tests" / "fixtures" / "toy", work / "tests" / "fixtures" / "toy")
        recipe = work / RECIPE
        env = {**os.environ, "REGISTRY_HOME": str(Path(tmp) / "home"), "PYTHONPATH": str(ROOT),
               **hub.client_env(TOKEN, home=Path(tmp) / "hf-home")}
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        repo_id = next(line.split(":", 1)[1].strip() for line in recipe.read_text().splitlines() if line.startswith("repo_id:"))

        def remote() -> dict[str, str]:
            try:
                info = api.model_info(repo_id, files_metadata=True)
            except Exception:
                return {}
            return {s.rfilename: s.lfs.sha256 if s.lfs else s.blob_id for s in info.siblings if s.rfilename != ".gitattributes"}

        def edit(old: str, new: str) -> None:
            text = recipe.read_text()
            assert old in text, old
            recipe.write_text(text.replace(old, new, 1))

        def scale_source() -> None:
            from safetensors.torch import load_file, save_file

            path = work / "tests" / "fixtures" / "toy" / "ft_cos" / "model.safetensors"
            tensors = load_file(path)
            name = sorted(tensors)[0]
            tensors[name] = tensors[name] * 1.5
            save_file(tensors, path, metadata={"format": "pt"})

        def template() -> None:
            folder = work / "templates"
            folder.mkdir(exist_ok=True)
            default = (ROOT / "templates" / "model_card.md.j2").read_text()
            (folder / "model_card.md.j2").write_text(default + "\nMaintained by the registry team.\n")

        steps = [
            ("first publish", lambda: None, ()),
            ("nothing (re-publish)", lambda: None, ()),
            ("summary", lambda: edit("summary: Linear merge", "summary: Edited linear merge"), ()),
            ("template", template, ()),
            ("tag", lambda: edit("tags: [toy, example]", "tags: [toy, example, edited]"), ()),
            ("license", lambda: edit("license: mit", "license: apache-2.0"), ()),
            ("template, no build folder", lambda: (shutil.rmtree(Path(tmp) / "home" / "build"),
                                                   (work / "templates" / "model_card.md.j2").write_text(
                                                       (ROOT / "templates" / "model_card.md.j2").read_text() + "\nBy the platform team.\n")), ()),
            ("smoke threshold (build gone)", lambda: edit("    lengths: [256, 512]", "    lengths: [256, 512]\n  parity: {nll_margin: 0.5}"), ()),
            ("smoke threshold", lambda: edit("nll_margin: 0.5", "nll_margin: 0.6"), ()),
            ("merge weight", lambda: edit("weight: 0.3}", "weight: 0.4}"), ()),
            ("source content", scale_source, ("--update",)),
        ]
        rows = []
        for name, change, args in steps:
            change()
            before = remote()
            hub.clear_requests()
            started = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "-X", "importtime", "-m", "registry", "publish", RECIPE, "--target", "hf", "--format", "json", *args],
                cwd=work, env=env, capture_output=True, text=True,
            )
            seconds = time.perf_counter() - started
            if run.returncode != 0:
                print(run.stderr[-2000:], file=sys.stderr)
                return 1
            outcome = json.loads(run.stdout)
            imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
            after = remote()
            files = sorted(rel for rel in before.keys() | after.keys() if before.get(rel) != after.get(rel))
            smoke = outcome.get("smoke") or {}
            rows.append({
                "edit": name,
                "merge": "no" if outcome["unchanged"] else {"merged": "yes", "reused": "reused", "skipped": "no"}[outcome["merge"]],
                "smoke": "no" if outcome["unchanged"] or smoke.get("reused") else "yes",
                "card": "yes" if "README.md" in files else "no",
                "upload": ", ".join(files) if len(files) <= 3 else f"{len(files)} files",
                "mergekit": "yes" if "mergekit" in imported else "no",
                "lfs": hub.bytes_received(r"^PUT "),
                "commit": hub.bytes_received(r"/commit/"),
                "total": hub.bytes_received(),
                "s": seconds,
            })
    header = ("edit", "merge", "smoke", "card", "upload (files changed on the Hub)", "mergekit imported",
              "LFS bytes", "commit bytes", "all request bytes", "seconds")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['edit']} | {r['merge']} | {r['smoke']} | {r['card']} | {r['upload'] or '-'} | {r['mergekit']} | "
              f"{r['lfs']:,} | {r['commit']:,} | {r['total']:,} | {r['s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
