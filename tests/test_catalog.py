"""The catalog: models published into a local registry (and to the local Hub) become a static site,
checked in real headless Chromium: listing, search and filters, lineage both ways, no script from card text."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
import yaml

from registry.card import NUMBER_FILTERS, card_environment
from registry.catalog import (
    MARKER,
    CatalogError,
    CatalogModel,
    build_site,
    html_environment,
    make_server,
    read_local,
    read_models,
    render_markdown,
    split_front_matter,
)
from registry.errors import ReportError
from registry.publish import Bundle, bundle_files
from registry.publish.local import LocalOptions, LocalTarget
from registry.reports import Provenance, Smoke
from registry.reports import write as write_report
from registry.testing.fixtures import HUB_ORG, HUB_TOKEN, HUB_USER

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("REGISTRY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
ORG = "registry-team"
BASE, CHILD, THIRD, XSS = (f"{ORG}/{n}" for n in ("base-merge", "merge-of-merges", "third-merge", "hostile-merge"))

# Each sets window.__xss or opens a dialog if it ever runs; with the page's CSP an inline one that got
# through would also log a console error, which the test counts too.
SCRIPT = "<script>window.__xss = 1; alert(1)</script>"
IMG = "<img src=x onerror=\"window.__xss = 1; alert(2)\">"
PAYLOAD = f"{SCRIPT}{IMG}"


# ---------------------------------------------------------------------------------------------
# A local registry with a few models, published through the real LocalTarget


def card_text(repo_id: str, meta: dict[str, Any], summary: str, extra: str = "") -> str:
    """A card shaped like the default template's: front matter, title, summary, sections."""
    name = repo_id.rpartition("/")[2]
    return (
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"
        f"# {name}\n\n{summary}\n\n## Merge details\n\n- **Method:** linear\n\n"
        "| Source | Label | Weight |\n|---|---|---:|\n| `a` | first | 0.3 |\n| `b` | second | 0.7 |\n"
        + extra
    )


def publish(
    home: Path,
    work: Path,
    repo_id: str,
    *,
    summary: str,
    parents: list[str],
    tags: list[str],
    license: str = "mit",
    license_name: str | None = None,
    labels: tuple[str, str] = ("GRPO, cosine reward", "GRPO, format reward"),
    smoke: bool | None = True,
    extra: str = "",
    method: str = "linear",
) -> None:
    """Publish a small fake model (card, reports, config, weights) with LocalTarget."""
    folder = work / repo_id.replace("/", "__")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    meta: dict[str, Any] = {"base_model": parents, "base_model_relation": "merge", "library_name": "transformers",
                            "pipeline_tag": "text-generation", "license": license}
    if license_name:
        meta.update(license_name=license_name, license_link="https://example.com/licence")
    meta["tags"] = ["merge", "mergekit", method, *tags]
    recipe_sha = (repo_id.encode().hex() * 8)[:64]
    merge_id = (repo_id.encode().hex() * 8)[-64:]
    # The sources' labels are the card's: its registry block carries them (provenance holds merge facts only).
    meta["registry"] = {"recipe_sha256": recipe_sha, "merge_identity": merge_id, "version": "0.1.0",
                        "sources": {"cos": {"label": labels[0]}, "fmt": {"label": labels[1]}}}
    card = card_text(repo_id, meta, summary, extra)
    (folder / "README.md").write_text(card)
    provenance = Provenance.model_validate({
        "merge_identity": merge_id, "merge_method": method, "normalize": True, "dtype": "bfloat16", "config_donor": "cos",
        "sources": {
            "cos": {"kind": "hub", "repo_id": parents[0], "revision": "c" * 40, "weight": 0.3},
            "fmt": {"kind": "local", "content_sha256": "d" * 64,
                    "weight": [{"filter": "mlp", "value": 0.5}, {"filter": None, "value": 0.7}]},
        },
        "files": {}, "versions": {"registry": "0.1.0", "mergekit": "0.1.5"}, "device": "cpu",
    })
    write_report(provenance, folder)
    report = None
    if smoke is not None:
        report = Smoke.model_validate({
            "merge_identity": merge_id, "passed": smoke, "device": "cpu",
            "checks": [
                {"name": "short", "status": "passed", "reason": "answered through the chat template", "details": {}},
                {"name": "long", "status": "passed" if smoke else "failed",
                 "reason": "retrieved 2 of 2" if smoke else "missed the pass key at 512 tokens", "details": {}},
            ],
            "short": {"prompt": "What is 17 * 24?", "output": "408", "new_tokens": 3, "stopped": "eos"},
            "long": [{"tokens": 512, "depth": 0.5, "status": "retrieved" if smoke else "missed", "reason": None,
                      "finite": True, "seconds": 0.41, "peak_memory_bytes": 123456}],
            "parity": [],
        })
        write_report(report, folder)
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    bundle = Bundle(repo_id, recipe_sha, {}, bundle_files(folder), provenance, report, card)
    LocalTarget(home).publish(bundle, LocalOptions())


def publish_all(home: Path, work: Path) -> None:
    """Five models: a merge, a merge of it, another child, a hostile one, and a model republished."""
    publish(home, work, BASE, summary="Linear merge of two GRPO checkpoints for math",
            parents=["deepseek-ai/up-a", "deepseek-ai/up-b"], tags=["math"])
    publish(home, work, CHILD, summary="A merge of the base merge with a code model",
            parents=[BASE, "deepseek-ai/up-c"], tags=["code"], license="apache-2.0", smoke=False,
            labels=("the base merge", "code fine-tune"))
    publish(home, work, THIRD, summary="Old summary, replaced by the second version",
            parents=[BASE], tags=["math"], smoke=None)
    publish(home, work, THIRD, summary="Second child of the base merge, under a team licence",
            parents=[BASE], tags=["math", "reasoning"], license="other", license_name="Team licence", smoke=None)
    publish(home, work, XSS, summary=f"Summary {PAYLOAD} end", parents=["deepseek-ai/up-a", "deepseek-ai/up-b"],
            tags=[f"tag{SCRIPT}", f"img{IMG}"], license="other", license_name=f"Licence {PAYLOAD}",
            labels=(f"label {PAYLOAD}", "plain"), method="linear",
            extra=(
                f"\n## Notes\n\nBody {PAYLOAD}\n\n{SCRIPT}\n\n{IMG}\n\n"
                "[click](javascript:window.__xss=1) [also](JAVASCRIPT:alert(3)) "
                "![pic](data:image/svg+xml,<svg onload=alert(4)>)\n\n"
                f"| cell |\n|---|\n| {IMG} |\n\n```html\n{SCRIPT}\n```\n"
            ))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("catalog")
    publish_all(root / "registry", root / "build")
    return root / "registry"


@pytest.fixture(scope="module")
def site(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    result = build_site(read_local(home), out, [])
    assert result.models == 4
    return out


@pytest.fixture(scope="module")
def base_url(site: Path) -> Iterator[str]:
    server = make_server(site, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------
# The browser: Debian's chromium through Playwright; missing is a failure, never a skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium); the catalog tests need it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]'")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Watched:
    """A page with everything a payload could set off recorded: console messages, dialogs, page errors."""

    def __init__(self, page: Any):
        self.page = page
        self.console: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def quiet(self) -> None:
        assert (self.console, self.dialogs, self.errors) == ([], [], [])
        assert self.page.evaluate("window.__xss") is None


@pytest.fixture
def page(browser: Any) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    watched = Watched(context.new_page())
    yield watched
    context.close()


def visible_rows(page: Any) -> list[str]:
    """The models a reader sees in the index: rendered, visible, taking up space."""
    return page.eval_on_selector_all(
        "#models > li",
        "rows => rows.filter(r => r.checkVisibility({visibilityProperty: true}) && r.getBoundingClientRect().height > 0)"
        ".map(r => r.dataset.repo)",
    )


ALL = [BASE, XSS, CHILD, THIRD]


# ---------------------------------------------------------------------------------------------
# Index, search, filters


def test_index_lists_the_latest_version_of_every_published_model(page: Watched, base_url: str):
    page.page.goto(base_url + "index.html")
    assert visible_rows(page.page) == ALL
    assert page.page.inner_text("#count") == "4 models"
    third = page.page.locator(f'li[data-repo="{THIRD}"]')
    assert third.locator(".summary").inner_text() == "Second child of the base merge, under a team licence"
    assert third.locator("dd.license").inner_text() == "Team licence"
    assert third.locator("dd.smoke").inner_text() == "not run"
    assert page.page.locator(f'li[data-repo="{CHILD}"] dd.smoke').inner_text() == "failed"
    assert page.page.locator(f'li[data-repo="{CHILD}"] dd.parents').inner_text() == f"{BASE}, deepseek-ai/up-c"
    assert page.page.get_attribute(f'li[data-repo="{CHILD}"] dd.parents a', "href") == f"models/{BASE}.html"
    page.quiet()


def test_search_and_filters_hide_exactly_the_right_rows(page: Watched, base_url: str):
    from playwright.sync_api import expect

    p = page.page
    p.goto(base_url + "index.html")
    p.fill("input[name=q]", "base merge")  # every word, anywhere: repo id, summary, parents
    assert visible_rows(p) == [BASE, CHILD, THIRD]
    p.fill("input[name=q]", "SECOND child")  # case does not matter
    assert visible_rows(p) == [THIRD]
    p.fill("input[name=q]", "code fine-tune")  # a source label from the card's registry block
    assert visible_rows(p) == [CHILD]
    assert p.inner_text("#count") == "1 of 4 models"
    p.fill("input[name=q]", "")
    p.select_option("select[name=tag]", "math")
    assert visible_rows(p) == [BASE, THIRD]
    p.fill("input[name=q]", "team licence")  # search and a filter together
    assert visible_rows(p) == [THIRD]
    p.fill("input[name=q]", "")
    p.select_option("select[name=tag]", "")
    p.select_option("select[name=parent]", BASE)
    assert visible_rows(p) == [CHILD, THIRD]
    p.select_option("select[name=smoke]", "not run")
    assert visible_rows(p) == [THIRD]
    p.select_option("select[name=parent]", "")
    p.select_option("select[name=smoke]", "passed")
    assert visible_rows(p) == [BASE, XSS]
    p.select_option("select[name=smoke]", "")
    p.select_option("select[name=license]", "apache-2.0")
    assert visible_rows(p) == [CHILD]
    p.select_option("select[name=method]", "linear")
    p.select_option("select[name=license]", "")
    assert visible_rows(p) == ALL
    p.fill("input[name=q]", "no such model anywhere")
    assert visible_rows(p) == []
    assert p.inner_text("#count") == "0 of 4 models"
    p.click("button[type=reset]")
    # Polled by Playwright itself: a string predicate would be eval'd, which the page's CSP refuses.
    expect(p.locator("#count")).to_have_text("4 models")
    assert visible_rows(p) == ALL
    page.quiet()


def test_filter_options_list_each_value_with_its_count(page: Watched, base_url: str):
    p = page.page
    p.goto(base_url + "index.html")
    options = {
        key: p.eval_on_selector_all(f"select[name={key}] option", "os => os.map(o => [o.value, o.textContent])")
        for key in ("parent", "license", "smoke")
    }
    assert options == {
        "parent": [["", "any"], ["deepseek-ai/up-a", "deepseek-ai/up-a (2)"], ["deepseek-ai/up-b", "deepseek-ai/up-b (2)"],
                   [BASE, f"{BASE} (2)"], ["deepseek-ai/up-c", "deepseek-ai/up-c (1)"]],
        "license": [["", "any"], ["other", "other (2)"], ["apache-2.0", "apache-2.0 (1)"], ["mit", "mit (1)"]],
        "smoke": [["", "any"], ["passed", "passed (2)"], ["failed", "failed (1)"], ["not run", "not run (1)"]],
    }


def test_a_tag_link_on_a_model_page_opens_the_index_filtered(page: Watched, base_url: str):
    p = page.page
    p.goto(base_url + f"models/{THIRD}.html")
    p.click("p.tags a:text-is('reasoning')")
    p.wait_for_url("**/index.html?tag=reasoning")
    assert p.input_value("select[name=tag]") == "reasoning"
    assert visible_rows(p) == [THIRD]
    page.quiet()


# ---------------------------------------------------------------------------------------------
# Hostile text: shown as text, never run


def test_script_and_onerror_payloads_in_every_field_execute_nothing(page: Watched, base_url: str, site: Path):
    p = page.page
    p.goto(base_url + "index.html")
    row = p.locator(f'li[data-repo="{XSS}"]')
    assert row.locator(".summary").inner_text() == f"Summary {PAYLOAD} end"
    assert row.locator("dd.license").inner_text() == f"Licence {PAYLOAD}"
    assert row.locator(".tag").all_inner_texts() == ["merge", "mergekit", "linear", f"tag{SCRIPT}", f"img{IMG}"]
    p.fill("input[name=q]", "onerror")  # the filter code handles the payload text as data too
    assert visible_rows(p) == [XSS]
    p.select_option("select[name=tag]", f"img{IMG}")
    assert visible_rows(p) == [XSS]
    assert p.evaluate("document.scripts.length") == 1  # ours: static/catalog.js
    assert p.evaluate("document.querySelectorAll('img, [onerror], [onload]').length") == 0

    p.click(f'li[data-repo="{XSS}"] h2 a')
    p.wait_for_url(f"**/models/{XSS}.html")
    assert p.inner_text("p.summary") == f"Summary {PAYLOAD} end"
    assert p.inner_text("#recipe table.sources tbody tr:first-child td:nth-child(2)") == f"label {PAYLOAD}"
    card = p.locator("article.card")
    assert card.locator("p").nth(1).inner_text() == f"Body {PAYLOAD}"
    assert card.locator("p").nth(2).inner_text() == SCRIPT
    assert card.locator("p").nth(3).inner_text() == IMG
    assert card.locator("pre code").last.inner_text() == SCRIPT + "\n"
    assert card.locator("a").all_inner_texts() == []  # javascript: links are not made into links
    assert p.evaluate("document.scripts.length") == 0
    assert p.evaluate("document.querySelectorAll('img, svg, iframe, [onerror], [onload]').length") == 0
    page.quiet()
    html = ((site / "models" / f"{XSS}.html").read_text() + (site / "index.html").read_text()).lower()
    for raw in ("<script>window", "<img src", "<svg", 'onerror="', 'href="javascript:', 'src="data:'):
        assert raw not in html


def test_render_markdown_escapes_html_and_drops_unsafe_links():
    html = render_markdown(f"# T {SCRIPT}\n\n[x](javascript:alert(1)) [ok](https://example.com)\n\n| a |\n|---|\n| {IMG} |\n")
    assert str(html) == (
        "<h1>T &lt;script&gt;window.__xss = 1; alert(1)&lt;/script&gt;</h1>\n"
        '<p>[x](javascript:alert(1)) <a href="https://example.com">ok</a></p>\n'
        "<table>\n<thead>\n<tr>\n<th>a</th>\n</tr>\n</thead>\n<tbody>\n<tr>\n"
        "<td>&lt;img src=x onerror=&quot;window.__xss = 1; alert(2)&quot;&gt;</td>\n</tr>\n</tbody>\n</table>\n"
    )


def test_cards_rendered_by_helper_processes_match_the_ones_rendered_here(monkeypatch: pytest.MonkeyPatch):
    import registry.catalog as catalog

    bodies = [f"# m{i}\n\nSummary {i} with `code` and {IMG}\n\n| a |\n|--:|\n| {i} |\n" for i in range(7)]
    here = [(str(html), summary) for html, summary in map(catalog.render_card_body, bodies)]
    monkeypatch.setattr(catalog, "PARALLEL_MIN_CARDS", 2)
    rendered_here = []
    original = catalog.render_card_body
    monkeypatch.setattr(catalog, "render_card_body", lambda body: rendered_here.append(body) or original(body))
    spread = catalog.render_card_bodies(bodies, workers=3)
    assert rendered_here == bodies[0::3]  # the other two thirds came back from the two helpers
    assert [(str(html), summary) for html, summary in spread] == here
    assert all(type(html).__name__ == "Markup" for html, _ in spread)
    assert here[4] == (
        '<h1>m4</h1>\n<p>Summary 4 with <code>code</code> and &lt;img src=x onerror=&quot;window.__xss = 1; alert(2)&quot;&gt;</p>\n'
        '<table>\n<thead>\n<tr>\n<th class="align-right">a</th>\n</tr>\n</thead>\n<tbody>\n<tr>\n'
        '<td class="align-right">4</td>\n</tr>\n</tbody>\n</table>\n',
        f"Summary 4 with code and {IMG}",
    )


# ---------------------------------------------------------------------------------------------
# Model pages and lineage


def test_lineage_links_go_both_ways(page: Watched, base_url: str):
    p = page.page
    p.goto(base_url + f"models/{CHILD}.html")
    assert p.locator("#lineage ul.parents li").all_inner_texts() == [f"{BASE} (in this catalog)", "deepseek-ai/up-c (on the Hub)"]
    assert p.get_attribute("#lineage ul.parents li:nth-child(2) a", "href") == "https://huggingface.co/deepseek-ai/up-c"
    assert p.locator("#lineage ul.children li").all_inner_texts() == ["none in this catalog"]
    p.click(f"#lineage ul.parents a:text-is('{BASE}')")  # child -> parent
    p.wait_for_url(f"**/models/{BASE}.html")
    assert p.inner_text("h1.repo") == BASE
    assert p.locator("#lineage ul.children li").all_inner_texts() == [CHILD, THIRD]
    assert p.locator("#lineage ul.parents li").all_inner_texts() == ["deepseek-ai/up-a (on the Hub)", "deepseek-ai/up-b (on the Hub)"]
    p.click(f"#lineage ul.children a:text-is('{CHILD}')")  # parent -> child
    p.wait_for_url(f"**/models/{CHILD}.html")
    assert p.inner_text("h1.repo") == CHILD
    page.quiet()


def test_model_page_shows_card_recipe_and_smoke_results_and_no_hub_link_for_a_local_model(page: Watched, base_url: str):
    p = page.page
    p.goto(base_url + f"models/{CHILD}.html")
    # Published to the local registry only: nothing says it is on a Hub, so no link to one.
    assert p.locator("a.hub").count() == 0
    assert p.locator("article.card h1").inner_text() == "merge-of-merges"
    assert p.locator("article.card table tbody tr").all_inner_texts() == ["a\tfirst\t0.3", "b\tsecond\t0.7"]
    assert p.locator("#recipe table.sources tbody tr").all_inner_texts() == [
        f"cos\tthe base merge\t{BASE}\tcccccccccccc\t0.3",
        "fmt\tcode fine-tune\tlocal checkpoint\tdddddddddddd\t0.5 for mlp; 0.7 otherwise",
    ]
    assert p.inner_text("#smoke > p") == "Failed on cpu."
    assert p.locator("#smoke table.checks tbody tr").all_inner_texts() == [
        "short\tpassed\tanswered through the chat template",
        "long\tfailed\tmissed the pass key at 512 tokens",
    ]
    assert p.locator("#smoke table.long tbody tr").all_inner_texts() == ["512\t50%\tmissed\t0.41 s\t121 KiB"]
    p.goto(base_url + f"models/{THIRD}.html")
    assert p.inner_text("#smoke p") == "No smoke-test report (smoke.json) was published with this model."
    assert p.get_attribute("ul.facts a[rel~=nofollow]", "href") == "https://example.com/licence"
    page.quiet()


def test_reading_needs_no_javascript(browser: Any, base_url: str):
    context = browser.new_context(java_script_enabled=False)
    p = context.new_page()
    p.goto(base_url + "index.html")
    assert p.is_hidden("#filters")
    rows = p.locator("#models > li")
    assert [rows.nth(i).get_attribute("data-repo") for i in range(rows.count())] == ALL
    assert all(rows.nth(i).is_visible() for i in range(rows.count()))
    p.click(f"a:text-is('{BASE}')")
    p.wait_for_url(f"**/models/{BASE}.html")
    assert p.locator("#lineage ul.children li").all_inner_texts() == [CHILD, THIRD]
    context.close()


def test_phone_width_is_readable_and_screenshots_are_saved(browser: Any, base_url: str):
    context = browser.new_context(viewport={"width": 375, "height": 812}, device_scale_factor=2, is_mobile=True)
    p = context.new_page()
    ARTIFACTS.mkdir(exist_ok=True)
    for url, name in ((base_url + "index.html", "catalog-index-phone.png"), (base_url + f"models/{CHILD}.html", "catalog-model-phone.png")):
        p.goto(url)
        # Nothing wider than the screen: no sideways scrolling to read a row or a card.
        assert p.evaluate("document.documentElement.scrollWidth") <= 375
        p.screenshot(path=str(ARTIFACTS / name), full_page=True)
        assert (ARTIFACTS / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p.goto(base_url + "index.html")
    # Each model's facts stack one per line, labelled, inside the screen's width.
    facts = p.locator(f'li[data-repo="{CHILD}"] dl.facts')
    assert p.evaluate("e => getComputedStyle(e).flexDirection", facts.element_handle()) == "column"
    assert facts.locator("dt").all_inner_texts() == ["Smoke tests", "Method", "License", "Parents", "Tags"]
    assert p.eval_on_selector_all("#models > li", "rows => Math.max(...rows.map(r => r.getBoundingClientRect().right))") <= 375
    context.close()
    desktop = browser.new_context(viewport={"width": 1280, "height": 900})
    d = desktop.new_page()
    d.goto(base_url + "index.html")
    d.screenshot(path=str(ARTIFACTS / "catalog-index.png"), full_page=True)
    desktop.close()


# ---------------------------------------------------------------------------------------------
# The Hub as a source


def upload_model(api: Any, repo_id: str, card: str, smoke: dict | None = None) -> None:
    from huggingface_hub import CommitOperationAdd

    api.create_repo(repo_id)
    ops = [CommitOperationAdd("README.md", card.encode()), CommitOperationAdd("config.json", b'{"model_type": "qwen2"}')]
    if smoke is not None:
        ops.append(CommitOperationAdd("smoke.json", json.dumps(smoke).encode()))
    api.create_commit(repo_id, ops, commit_message=f"Publish {repo_id}")


def hub_card(repo_id: str, parents: list[str], tags: list[str], summary: str) -> str:
    meta = {"base_model": parents, "base_model_relation": "merge", "license": "mit", "tags": tags}
    return card_text(repo_id, meta, summary)


def test_build_from_a_hub_org_lists_its_merges_with_cards_and_smoke(hub_server: Any, hub_api: Any, tmp_path: Path):
    parent, child = f"{HUB_ORG}/merged-parent", f"{HUB_ORG}/merged-child"
    upload_model(hub_api, parent, hub_card(parent, ["up/a", "up/b"], ["merge", "linear"], "The parent merge"),
                 smoke={"format": 3, "passed": True, "device": "cpu", "checks": []})
    upload_model(hub_api, child, hub_card(child, [parent, "up/c"], ["merge", "linear", "code"], "The child merge"))
    upload_model(hub_api, f"{HUB_ORG}/not-a-merge", hub_card(f"{HUB_ORG}/not-a-merge", ["up/a"], ["finetune"], "no"))
    upload_model(hub_api, f"{HUB_USER}/elsewhere", hub_card(f"{HUB_USER}/elsewhere", ["up/a", "up/b"], ["merge"], "other owner"))

    models = read_models(f"hf:{HUB_ORG}", api=hub_api)
    assert [(m.repo_id, m.url, m.metadata["base_model"], m.smoke) for m in models] == [
        (child, f"{hub_server.endpoint}/{child}", [parent, "up/c"], None),
        (parent, f"{hub_server.endpoint}/{parent}", ["up/a", "up/b"], Smoke(passed=True, device="cpu", checks=[])),
    ]

    run = subprocess.run(
        [sys.executable, "-m", "registry", "catalog", "build", "--from", f"hf:{HUB_ORG}", "-o", str(tmp_path / "site"), "--format", "json"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **hub_server.client_env(HUB_TOKEN)}, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["pages"] == ["index.html", f"models/{child}.html", f"models/{parent}.html"]
    page = (tmp_path / "site" / "models" / f"{parent}.html").read_text()
    assert f'<li><a href="../../models/{child}.html">{child}</a></li>' in page
    assert f'<a class="hub" href="{hub_server.endpoint}/{parent}" rel="noopener">' in page
    assert '<span class="smoke smoke-passed">passed</span>' in page


def test_a_hub_failure_is_one_clear_error(hub_server: Any, hub_api: Any):
    repo = f"{HUB_ORG}/broken"
    upload_model(hub_api, repo, hub_card(repo, ["up/a", "up/b"], ["merge"], "unreadable"))
    hub_server.inject(rf"^\w+ /{repo}/resolve/", 403, times=5)
    with pytest.raises(CatalogError) as failed:
        read_models(f"hf:{HUB_ORG}", api=hub_api)
    message = str(failed.value)
    assert message.startswith(f"cannot download README.md of {repo} from {hub_server.endpoint}: ")
    assert message.endswith(" (check your token and the network)")
    assert "\n" not in message


def test_unknown_source_is_a_usage_error():
    run = registry("catalog", "build", "--from", "github:x")
    assert (run.returncode, run.stdout, run.stderr) == (
        2, "", "error: --from 'github:x': expected 'local' or 'hf:ORG_OR_USER' (e.g. --from hf:my-team)\n",
    )


# ---------------------------------------------------------------------------------------------
# The command line: build and serve


def registry(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "registry", *args], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, **(env or {})}, timeout=60,
    )


def test_cli_builds_rebuilds_and_serves_the_site(home: Path, tmp_path: Path):
    env = {"REGISTRY_HOME": str(home)}
    run = registry("catalog", "build", "-o", "site", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"wrote site/index.html and 4 model pages from the local registry {home} in ")
    (tmp_path / "site" / "stale.html").write_text("left from an older build")
    assert registry("catalog", "build", "-o", "site", cwd=tmp_path, env=env).returncode == 0
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == [MARKER, "index.html", "models", "static"]

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    run = registry("catalog", "build", "-o", "notes", cwd=tmp_path, env=env)
    assert (run.returncode, run.stderr) == (
        2, "error: notes is not empty and was not built by `registry catalog build` (choose another -o or empty it)\n",
    )
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"

    serve = subprocess.Popen(
        [sys.executable, "-m", "registry", "catalog", "serve", "--port", "0", "--dir", "site"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = serve.stdout.readline()
        assert line.startswith("serving site at http://127.0.0.1:")
        url = line.split(" at ")[1].split()[0]
        with urlopen(url + "index.html", timeout=10) as response:
            assert response.status == 200
            assert f'data-repo="{CHILD}"' in response.read().decode()
        with urlopen(url + f"models/{CHILD}.html", timeout=10) as response:
            assert f'<h1 class="repo">{CHILD}</h1>' in response.read().decode()
    finally:
        serve.terminate()
        serve.wait(timeout=10)


def test_serve_without_a_site_says_what_to_do(tmp_path: Path):
    run = registry("catalog", "serve", "--dir", "nothing", cwd=tmp_path)
    assert (run.returncode, run.stderr) == (2, "error: nothing: no index.html here (run `registry catalog build` first, or give --dir)\n")


def test_a_team_template_extends_the_default_and_replaces_static_files(home: Path, tmp_path: Path):
    team = tmp_path / "templates"
    (team / "catalog" / "static").mkdir(parents=True)
    (team / "catalog" / "index.html.j2").write_text(
        '{% extends "default:catalog/index.html.j2" %}{% block title %}Team {{ models | length }} models{% endblock %}'
    )
    (team / "catalog" / "static" / "catalog.css").write_text("body { color: teal; }\n")
    build_site(read_local(home), tmp_path / "site", [team])
    index = (tmp_path / "site" / "index.html").read_text()
    assert "<title>Team 4 models</title>" in index
    assert f'data-repo="{CHILD}"' in index  # the default's list is still there
    assert (tmp_path / "site" / "static" / "catalog.css").read_text() == "body { color: teal; }\n"
    assert (tmp_path / "site" / "static" / "catalog.js").read_text().startswith("// Filters for the catalog index")


def test_empty_registry_builds_an_empty_catalog(tmp_path: Path):
    result = build_site(read_local(tmp_path / "empty"), tmp_path / "site", [])
    assert (result.models, result.pages) == (0, ["index.html"])
    assert "<p>Nothing has been published yet.</p>" in (tmp_path / "site" / "index.html").read_text()


# ---------------------------------------------------------------------------------------------
# Numbers for people, the Hub link, reports of an older format


def measured_model(repo_id: str, url: str | None = None) -> CatalogModel:
    """A model whose reports hold floats as measured: long, unrounded, 16 digits where binary makes them so."""
    card = card_text(repo_id, {"base_model": ["up/a", "up/b"], "license": "mit", "tags": ["merge", "linear"]}, "Measured")
    smoke = Smoke.model_validate({
        "passed": True, "device": "cuda", "checks": [],
        "long": [
            {"tokens": 4096, "depth": 1 / 3, "status": "retrieved", "seconds": 0.4321987, "peak_memory_bytes": 3725541376},
            {"tokens": 32768, "depth": 0.5, "status": "missed", "finite": False, "seconds": 12.3456789,
             "peak_memory_bytes": 123456789},
            {"tokens": 131072, "depth": 0.9, "status": "retrieved", "seconds": 77.73219, "peak_memory_bytes": 9512345678},
            {"tokens": 262144, "depth": 0.9, "status": "skipped", "reason": "longer than max_tokens"},
        ],
        "parity": [
            {"model": "merged", "nll": 0.30213456789, "long_retrieved": 2, "long_total": 3},
            {"model": "cos", "nll": 1.9999999, "long_retrieved": 3, "long_total": 3},
            {"model": "fmt", "nll": None, "long_retrieved": 0, "long_total": 0},
        ],
    })
    provenance = Provenance.model_validate({
        "merge_identity": "e" * 64, "merge_method": "linear", "normalize": True, "dtype": "bfloat16", "config_donor": "cos",
        "sources": {
            "cos": {"kind": "hub", "repo_id": "up/a", "revision": "c" * 40, "weight": 0.1 + 0.2},
            "fmt": {"kind": "local", "content_sha256": "d" * 64,
                    "weight": [{"filter": "mlp", "value": 0.1 + 0.2}, {"filter": None, "value": 0.7}]},
        },
        "files": {}, "versions": {"registry": "0.1.0"}, "device": "cuda",
    })
    meta, _ = split_front_matter(card)
    return CatalogModel(repo_id, card, meta or {}, smoke=smoke, provenance=provenance, url=url)


def test_numbers_on_a_model_page_are_rounded_for_people(tmp_path: Path):
    build_site([measured_model("team/measured")], tmp_path / "site", [])
    page = (tmp_path / "site" / "models" / "team" / "measured.html").read_text()
    assert (
        "<tbody>\n"
        "<tr><td>4,096</td><td>33.3%</td><td>retrieved</td><td>0.43 s</td><td>3.47 GiB</td></tr>\n"
        "<tr><td>32,768</td><td>50%</td><td>missed (non-finite logits)</td><td>12 s</td><td>118 MiB</td></tr>\n"
        "<tr><td>131,072</td><td>90%</td><td>retrieved</td><td>1.3 min</td><td>8.86 GiB</td></tr>\n"
        "<tr><td>262,144</td><td>90%</td><td>skipped: longer than max_tokens</td><td>n/a</td><td>n/a</td></tr>\n"
        "</tbody>"
    ) in page
    assert (
        "<tbody>\n"
        "<tr><td>merged</td><td>0.302</td><td>2 of 3</td></tr>\n"
        "<tr><td>cos</td><td>2.000</td><td>3 of 3</td></tr>\n"
        "<tr><td>fmt</td><td>n/a</td><td>n/a</td></tr>\n"
        "</tbody>"
    ) in page
    assert "<td>cccccccccccc</td><td>0.3</td></tr>" not in page  # the pin is in <code>; the weight cell follows it
    assert "<code>cccccccccccc</code></td><td>0.3</td></tr>" in page
    assert "<code>dddddddddddd</code></td><td>0.3 for mlp; 0.7 otherwise</td></tr>" in page
    # Nothing anywhere on the page with more decimals than a reader needs (0.30000000000000004, 0.4321987).
    assert re.findall(r"\d\.\d{4,}", page) == []


def test_the_catalog_shows_numbers_with_the_cards_own_filters():
    card, html = card_environment(()), html_environment([])
    for name, function in NUMBER_FILTERS.items():
        assert card.filters[name] is function
        assert html.filters[name] is function


def test_the_hub_link_is_shown_only_for_a_model_read_from_a_hub(home: Path, tmp_path: Path):
    # A local-registry version records no publish to a Hub, so it gets no URL (and no guessed link).
    assert sorted((m.repo_id, m.url) for m in read_local(home)) == sorted((repo_id, None) for repo_id in ALL)
    build_site([measured_model("team/local-only"), measured_model("team/on-hub", url="http://hub.test/team/on-hub")],
               tmp_path / "site", [])
    local = (tmp_path / "site" / "models" / "team" / "local-only.html").read_text()
    hub = (tmp_path / "site" / "models" / "team" / "on-hub.html").read_text()
    assert "On the Hub" not in local and 'class="hub"' not in local
    assert '<li><a class="hub" href="http://hub.test/team/on-hub" rel="noopener">On the Hub: team/on-hub</a></li>' in hub


# What registry 0.1 wrote (format 1): text fields in provenance, the recipe hash in both reports.
OLD_PROVENANCE = {
    "format": 1, "recipe_sha256": "a" * 64, "repo_id": "x/y", "merge_method": "linear", "normalize": True,
    "dtype": "bfloat16", "config_donor": "cos",
    "sources": {"cos": {"kind": "hub", "repo_id": "up/a", "revision": "c" * 40, "content_sha256": None,
                        "label": "cos", "hub_id": None, "weight": 0.3}},
    "files": {}, "versions": {"registry": "0.1.0"}, "device": "cpu",
}
OLD_SMOKE = {"format": 1, "passed": True, "device": "cpu", "recipe_sha256": "a" * 64, "checks": [], "long": [], "parity": []}
OLDER = "report written by an older registry; re-publish to refresh it"


def replace_published(home: Path, repo_id: str, name: str, text: str) -> None:
    """Put `text` as `name` into the newest local version of `repo_id` (a new file, not through its hard link)."""
    (folder,) = (home / "models" / repo_id).iterdir()
    (folder / name).unlink()
    (folder / name).write_text(text)


def test_a_local_model_with_reports_of_an_older_format_is_shown_with_a_note(tmp_path: Path):
    home, old = tmp_path / "registry", f"{ORG}/old-reports"
    publish(home, tmp_path / "build", BASE, summary="Current", parents=["up/a", "up/b"], tags=["math"])
    publish(home, tmp_path / "build", old, summary="Published by registry 0.1", parents=["up/a", "up/b"], tags=["math"])
    replace_published(home, old, "provenance.json", json.dumps(OLD_PROVENANCE))
    replace_published(home, old, "smoke.json", json.dumps(OLD_SMOKE))

    run = registry("catalog", "build", "-o", "site", cwd=tmp_path, env={"REGISTRY_HOME": str(home)})
    assert (run.returncode, run.stderr) == (0, "")
    assert run.stdout.startswith(f"wrote site/index.html and 2 model pages from the local registry {home} in ")
    page = (tmp_path / "site" / "models" / f"{old}.html").read_text()
    assert f'<p class="note">smoke.json: {OLDER}</p>\n<p class="note">provenance.json: {OLDER}</p>' in page
    assert '<article class="card">\n<h1>old-reports</h1>\n<p>Published by registry 0.1</p>' in page
    # The index still knows how its smoke test went; the unreadable reports are simply not shown.
    assert '<span class="smoke smoke-passed">passed</span>' in page
    assert "<p>No smoke-test report (<code>smoke.json</code>) was published with this model.</p>" in page
    index = (tmp_path / "site" / "index.html").read_text()
    assert index.count('<p class="note">') == 2 and f'<p class="note">smoke.json: {OLDER}</p>' in index
    assert '<p class="note">' not in (tmp_path / "site" / "models" / f"{BASE}.html").read_text()


def test_a_hub_model_with_a_report_of_an_older_format_is_shown_with_a_note(hub_server: Any, hub_api: Any, tmp_path: Path):
    old, new = f"{HUB_ORG}/old-format", f"{HUB_ORG}/current"
    upload_model(hub_api, old, hub_card(old, ["up/a", "up/b"], ["merge"], "an older registry wrote it"), smoke=OLD_SMOKE)
    upload_model(hub_api, new, hub_card(new, ["up/a", "up/b"], ["merge"], "current"),
                 smoke={"format": 3, "passed": True, "device": "cpu", "checks": []})
    run = subprocess.run(
        [sys.executable, "-m", "registry", "catalog", "build", "--from", f"hf:{HUB_ORG}", "-o", "site", "--format", "json"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **hub_server.client_env(HUB_TOKEN)}, timeout=120,
    )
    assert (run.returncode, run.stderr) == (0, "")
    assert json.loads(run.stdout)["pages"] == ["index.html", f"models/{new}.html", f"models/{old}.html"]
    page = (tmp_path / "site" / "models" / f"{old}.html").read_text()
    assert f'<p class="note">smoke.json: {OLDER}</p>' in page
    # Its smoke.json exists but cannot be read: neither passed nor "not run".
    assert '<span class="smoke smoke-unknown">unknown</span>' in page
    assert "<p>an older registry wrote it</p>" in page
    assert '<p class="note">' not in (tmp_path / "site" / "models" / f"{new}.html").read_text()


@pytest.mark.parametrize("text, problem", [
    ('{"format": 3, "passed": tru', "not valid JSON (Expecting value: line 1 column 25 (char 24))"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format": 3, "passed": true, "device": "cpu", "checks": "none"}', "checks: Input should be a valid list"),
    ('{"format": 4, "passed": true}', "unknown smoke.json format 4 (this registry reads format 3)"),
    ('{"format": "1", "passed": true}', 'unknown smoke.json format "1" (this registry reads format 3)'),
    ('{"passed": true}', "unknown smoke.json format null (this registry reads format 3)"),
])
def test_a_corrupt_report_on_the_hub_is_one_clear_error(hub_server: Any, hub_api: Any, text: str, problem: str):
    repo = f"{HUB_ORG}/corrupt"
    upload_model(hub_api, repo, hub_card(repo, ["up/a", "up/b"], ["merge"], "damaged"))
    hub_api.upload_file(path_or_fileobj=text.encode(), path_in_repo="smoke.json", repo_id=repo)
    with pytest.raises(ReportError) as failed:
        read_models(f"hf:{HUB_ORG}", api=hub_api)
    assert str(failed.value) == f"{hub_server.endpoint}/{repo}/smoke.json: {problem} (run `registry smoke` again to rewrite it)"


def test_a_corrupt_local_report_fails_the_build_in_one_line(tmp_path: Path):
    home, repo = tmp_path / "registry", f"{ORG}/corrupt"
    publish(home, tmp_path / "build", repo, summary="Damaged", parents=["up/a", "up/b"], tags=[])
    replace_published(home, repo, "provenance.json", '{"format": 2, "merge_identity": 7}')
    run = registry("catalog", "build", "-o", "site", cwd=tmp_path, env={"REGISTRY_HOME": str(home)})
    (folder,) = (home / "models" / repo).iterdir()
    assert (run.returncode, run.stdout, run.stderr) == (
        1, "", f"error: {folder / 'provenance.json'}: merge_identity: Input should be a valid string "
        "(run `registry merge` again to rewrite it)\n",
    )
    assert not (tmp_path / "site").exists()


# ---------------------------------------------------------------------------------------------
# Families: a page per family with its chart and a sortable table, the index grouped by family

FAMILY_SWEEP = """\
repo_id: fam-team/toy-a{a}-b{b}
sources:
  a: {model: up/a}
  b: {model: up/b}
merge:
  merge_method: linear
  models:
    - model: a
    - model: b
  parameters: {normalize: true}
sweep:
  family: toy-a-b
  grid:
    a: [0, 0.25, 0.5, 0.75, 1]
    b: 1 - a
"""
# NLL by point, chosen so that sorting by NLL is another order than the sweep's.
FAMILY_NLL = [0.324, 0.298, 0.305, 0.301, 0.296]
FAMILY_POINTS = ["fam-team/toy-a0-b1", "fam-team/toy-a0.25-b0.75", "fam-team/toy-a0.5-b0.5", "fam-team/toy-a0.75-b0.25",
                 "fam-team/toy-a1-b0"]


@pytest.fixture(scope="module")
def family_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding a family of five points (published through LocalTarget and its family hook) and one other model."""
    from registry.family import PointReports, build_family
    from registry.publish import PublishResult
    from registry.recipe import parse_recipe

    root = tmp_path_factory.mktemp("families")
    home, work = root / "registry", root / "build"
    recipe = parse_recipe(FAMILY_SWEEP)
    reports, results = [], []
    for point, nll in zip(recipe.points(), FAMILY_NLL, strict=True):
        repo_id = point.recipe.repo_id
        publish(home, work, repo_id, summary=f"Point {point.label} of the toy sweep", parents=["up/a", "up/b"], tags=["sweep"])
        smoke = Smoke.model_validate({"passed": True, "device": "cpu", "checks": [], "parity": [
            {"model": "merged", "nll": nll, "long_retrieved": 6, "long_total": 6},
            {"model": "a", "nll": 0.296, "long_retrieved": 6, "long_total": 6},
            {"model": "b", "nll": 0.324, "long_retrieved": 6, "long_total": 6}]})
        reports.append(PointReports(point, None, smoke, published=(f"local:{repo_id}",)))
        results.append(PublishResult("local", "", None, changed=False, repo_id=repo_id))
    publish(home, work, f"{ORG}/lone-merge", summary="Not part of any family", parents=["up/a", "up/b"], tags=["solo"])
    LocalTarget(home).publish_family(build_family(recipe, reports), results, LocalOptions())
    return home


@pytest.fixture(scope="module")
def family_url(family_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from registry.catalog import read_families

    out = tmp_path_factory.mktemp("family-site") / "site"
    result = build_site(read_local(family_home), out, [], read_families("local", family_home))
    assert (result.models, result.families) == (6, 1)
    assert result.pages[-1] == "families/toy-a-b.html"
    server = make_server(out, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def point_rows(page: Any) -> list[str]:
    return page.eval_on_selector_all("#family-table tbody.points tr", "rows => rows.map(r => r.dataset.repo)")


def test_a_family_page_sorts_its_points_by_any_metric_column(page: Watched, family_url: str):
    p = page.page
    p.goto(family_url + "families/toy-a-b.html")
    assert p.inner_text("h1") == "Family toy-a-b"
    headers = p.eval_on_selector_all("#family-table thead th", "ths => ths.map(t => t.textContent.trim())")
    assert headers[:4] == ["point", "state", "NLL", "retrieved"]
    assert point_rows(p) == FAMILY_POINTS  # the sweep's order
    # What each row sorts by: a number where the cell is one (the point column: the weight of `a`).
    assert p.eval_on_selector_all("#family-table tbody.points tr", "rows => rows.map(r => [r.cells[0].dataset.value, r.cells[2].dataset.value])") == [
        ["0.0", "0.324"], ["0.25", "0.298"], ["0.5", "0.305"], ["0.75", "0.301"], ["1.0", "0.296"]]
    assert p.eval_on_selector_all("#family-table tbody.parents tr td:first-child", "c => c.map(x => x.textContent)") == [
        "parent a", "parent b"]

    p.click("#family-table thead button:text-is('NLL')")
    by_nll = [FAMILY_POINTS[i] for i in (4, 1, 3, 2, 0)]  # 0.296, 0.298, 0.301, 0.305, 0.324
    assert point_rows(p) == by_nll
    assert p.get_attribute("#family-table thead th:nth-child(3)", "aria-sort") == "ascending"
    p.click("#family-table thead button:text-is('NLL')")
    assert point_rows(p) == by_nll[::-1]
    assert p.get_attribute("#family-table thead th:nth-child(3)", "aria-sort") == "descending"
    nll_cells = p.eval_on_selector_all("#family-table tbody.points td:nth-child(3)", "c => c.map(x => x.textContent)")
    assert nll_cells == ["0.324", "0.305", "0.301", "0.298", "0.296"]

    # Another column starts ascending again (the point column by the weight of `a`); the parents never move.
    p.click("#family-table thead button:text-is('point')")
    assert point_rows(p) == FAMILY_POINTS
    assert p.get_attribute("#family-table thead th:nth-child(3)", "aria-sort") is None
    p.click("#family-table thead button:text-is('point')")
    assert point_rows(p) == FAMILY_POINTS[::-1]
    assert p.eval_on_selector_all("#family-table tbody.parents tr td:first-child", "c => c.map(x => x.textContent)") == [
        "parent a", "parent b"]

    # Every point links to its model page, and the chart is there and loads.
    links = p.eval_on_selector_all("#family-table tbody.points td:first-child a", "a => a.map(x => x.getAttribute('href'))")
    assert sorted(links) == sorted(f"../models/{r}.html" for r in FAMILY_POINTS)
    assert p.get_attribute(".chart img", "src") == "../families/toy-a-b/family.svg"
    assert p.eval_on_selector(".chart img", "img => img.complete && img.naturalWidth > 0")
    p.click(f"#family-table a[href='../models/{FAMILY_POINTS[2]}.html']")
    assert p.inner_text("h1.repo") == FAMILY_POINTS[2]
    assert p.inner_text("a.family") == "toy-a-b"
    p.click("a.family")
    assert p.url == family_url + "families/toy-a-b.html"
    page.quiet()


def test_the_index_groups_the_points_under_their_family(page: Watched, family_url: str):
    p = page.page
    p.goto(family_url + "index.html")
    assert p.eval_on_selector_all("#families li.family", "f => f.map(x => x.dataset.family)") == ["toy-a-b"]
    group = p.locator('#families li.family[data-family="toy-a-b"]')
    assert group.locator("h3 a").get_attribute("href") == "families/toy-a-b.html"
    assert group.locator("ol.points > li").evaluate_all("l => l.map(x => x.dataset.repo)") == FAMILY_POINTS
    assert group.locator("ol.points > li").evaluate_all("l => l.map(x => x.textContent.trim())") == [
        f"{r} {w}" for r, w in zip(FAMILY_POINTS, ["a=0 b=1", "a=0.25 b=0.75", "a=0.5 b=0.5", "a=0.75 b=0.25", "a=1 b=0"],
                                   strict=True)]
    assert group.locator("ol.points a").evaluate_all("a => a.map(x => x.getAttribute('href'))") == [
        f"models/{r}.html" for r in FAMILY_POINTS]
    assert p.inner_text(f'li.model[data-repo="{FAMILY_POINTS[1]}"] dd.family') == "toy-a-b (a=0.25 b=0.75)"

    # The family filter lists exactly its points; the lone model is left out.
    assert len(visible_rows(p)) == 6
    p.select_option("select[name=family]", "toy-a-b")
    assert visible_rows(p) == sorted(FAMILY_POINTS, key=str.lower)
    assert p.inner_text("#count") == "5 of 6 models"
    page.quiet()


def test_an_index_without_families_has_no_family_section_or_filter(page: Watched, base_url: str):
    page.page.goto(base_url + "index.html")
    assert page.page.locator("#families").count() == 0
    assert page.page.locator("select[name=family]").count() == 0
    page.quiet()


def test_a_family_whose_name_is_not_a_name_is_refused_in_one_line(tmp_path: Path):
    from registry.catalog import CatalogFamily
    from registry.reports import Family

    report = Family(family="../../escape", recipe_sha256="a" * 64, aliases=["a"], selection="passed", rows=[])
    with pytest.raises(CatalogError) as refused:
        build_site([], tmp_path / "site", [], [CatalogFamily(report)])
    assert str(refused.value) == ("family '../../escape' must be a name of letters, digits, '-', '_' and '.' (at most 96) "
                                  "(fix the family's name in its sweep and publish it again)")
    assert not (tmp_path / "site").exists() and not (tmp_path / "escape.html").exists()


def test_families_are_read_from_the_family_report_each_point_carries_on_the_hub(hub_server: Any, hub_api: Any, tmp_path: Path):
    from huggingface_hub import CommitOperationAdd

    from registry.catalog import read_families
    from registry.family import PointReports, build_family
    from registry.recipe import parse_recipe
    from registry.reports import dumps

    recipe = parse_recipe(FAMILY_SWEEP.replace("fam-team/", f"{HUB_ORG}/"))
    points = recipe.points()
    family = build_family(recipe, [PointReports(p, None, None) for p in points])
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
    for point in points[:2]:
        repo_id = point.recipe.repo_id
        upload_model(hub_api, repo_id, hub_card(repo_id, ["up/a", "up/b"], ["merge"], f"point {point.label}"))
        hub_api.create_commit(repo_id, [CommitOperationAdd("family.json", dumps(family).encode()),
                                        CommitOperationAdd("family.svg", svg)], commit_message="family")

    models = read_models(f"hf:{HUB_ORG}", api=hub_api)
    assert [(m.repo_id, m.family) for m in models] == [
        (points[0].recipe.repo_id, {"name": "toy-a-b", "label": "a=0 b=1", "weights": {"a": 0.0, "b": 1.0}}),
        (points[1].recipe.repo_id, {"name": "toy-a-b", "label": "a=0.25 b=0.75", "weights": {"a": 0.25, "b": 0.75}}),
    ]
    families = read_families(f"hf:{HUB_ORG}", models=models, api=hub_api)
    assert [(f.name, f.report, f.charts) for f in families] == [("toy-a-b", family, {"family.svg": svg})]
    result = build_site(models, tmp_path / "site", [], families)
    assert result.families == 1
    assert (tmp_path / "site" / "families" / "toy-a-b" / "family.svg").read_bytes() == svg
    page = (tmp_path / "site" / "families" / "toy-a-b.html").read_text()
    assert f'<a href="../models/{points[0].recipe.repo_id}.html">a=0 b=1</a>' in page
    assert f'<tr data-repo="{points[4].recipe.repo_id}" data-order="4">' in page
    # Every point is listed; only the two in this catalog link to a page.
    assert page.count('<a href="../models/') == 2
