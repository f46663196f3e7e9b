"""The secret scanner: every format it knows, the files it scans before publishing, and a whole-tree check.

Fake secrets are assembled from pieces so that this file itself holds none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from models import build_tokenizer

from registry.errors import PublishError
from registry.leaks import SECRET_FORMATS, find_leaks, find_secrets
from registry.publish import bundle_files
from registry.testing.fixtures import HUB_USER
from registry.testing.hub import HubServer

ROOT = Path(__file__).parents[1]
TOY = ROOT / "tests" / "fixtures" / "toy"
TOY_RECIPE = ROOT / "recipes" / "examples" / "toy_cos_fmt.yaml"

HEX = "0123456789abcdef"
B64 = "Zm9vYmFyQmF6UXV4"  # 16 base64 characters
HF = "hf" + "_" + "Qx7" * 12  # 36 characters after hf_, like a real token
OPENAI = "sk" + "-proj-" + "Ab3_xY9-" * 6

# (id, line with the secret, column where it is reported, what it is, a near miss that is no secret)
FORMATS = [
    ("hf", "token: " + HF, 8, "a Hugging Face token (hf_…)", "token: hf" + "_" + "Qx7" * 9),
    ("hf-org", "token: api" + "_org_" + "Ab12" * 8, 8, "a Hugging Face organization token (api_org_…)", "token: api" + "_org_" + "Ab12"),
    ("aws-akia", "id: AKIA" + "IOSFODNN7EXAMPLE", 5, "an AWS access key id", "id: AKIA" + "IOSFODNN7EXAMPL"),
    ("aws-asia", "id: ASIA" + "Y34FZKBOKMUTVV7A", 5, "an AWS access key id", "id: ASIA" + "y34fzkbokmutvv7a"),
    (
        "aws-secret-env", "aws_secret_access_key=" + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", 1,
        "an AWS secret access key", "aws_secret_access_key=${AWS_SECRET_ACCESS_KEY}",
    ),
    (
        "aws-secret-json", '  "AWS_SECRET_ACCESS_KEY": "' + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY" + '"', 4,
        "an AWS secret access key", '  "AWS_SECRET_ACCESS_KEY": "' + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKE" + '"',
    ),
    ("github", "GH: ghp" + "_" + "a1B2c3" * 6, 5, "a GitHub token", "GH: ghp" + "_" + "a1B2c3" * 5),
    ("github-app", "GH: ghs" + "_" + "a1B2c3" * 6, 5, "a GitHub token", "GH: ghx" + "_" + "a1B2c3" * 6),
    ("github-pat", "GH: github" + "_pat_" + "11AB" * 21, 5, "a GitHub token", "GH: github" + "_pat_" + "11AB"),
    ("gitlab", "GL: glpat" + "-" + "xY9_z" * 4, 5, "a GitLab token", "GL: glpat" + "-" + "xY9"),
    ("slack-bot", "slack xoxb" + "-1234567890-1234567890123-" + "AbCdEf" * 4, 7, "a Slack token", "slack xoxb" + "-AbCdEf"),
    ("slack-user", "slack xoxp" + "-1234567890-1234567890-" + "a1b2" * 8, 7, "a Slack token", "slack xoxz" + "-1234567890-a1b2"),
    (
        "slack-webhook", "hook https://hooks.slack.com/services/" + "T0123ABCD/B0123ABCD/" + "Xy" * 12, 6,
        "a Slack webhook", "hook https://hooks.slack.com/services/",
    ),
    ("openai-project", "OPENAI_API_KEY=" + OPENAI, 16, "an OpenAI API key", "disk" + "-proj-" + "Ab3_xY9-" * 6),
    ("openai-legacy", "key sk" + "-" + "Ab1" * 7 + "T3Blbk" + "FJ" + "Cd2" * 7, 5, "an OpenAI API key", "key sk" + "-" + "Ab1" * 16),
    ("anthropic", "key sk" + "-ant-api03-" + "Zz9_" * 23 + "zAA", 5, "an Anthropic API key", "key sk" + "-ant-api03-" + "Zz9_"),
    ("google", "key AIza" + "SyD" + "-aB3" * 8, 5, "a Google API key", "key AIza" + "SyD"),
    ("stripe", "key sk" + "_live_" + "4eC39HqLyjWDarjtT1zdp7dc", 5, "a Stripe key", "key sk" + "_test_" + "4eC39HqLyjWDarjtT1zdp7dc"),
    ("private-key", "-----BEGIN RSA " + "PRIVATE KEY-----", 1, "a private key", "-----BEGIN PUBLIC KEY-----"),
    ("openssh-key", "-----BEGIN OPENSSH " + "PRIVATE KEY-----", 1, "a private key", "see BEGIN PRIVATE KEY in the docs"),
    ("putty-key", "PuTTY-User-" + "Key-File-3: ssh-ed25519", 1, "a private key", "PuTTY-User-Key-File"),
    (
        "jwt", "auth eyJ" + "hbGciOiJIUzI1NiJ9.eyJ" + "zdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", 6,
        "a JSON Web Token", "auth eyJ" + "hbGciOiJIUzI1NiJ9",
    ),
    (
        "azure-storage", "DefaultEndpointsProtocol=https;AccountName=x;Account" + "Key=" + B64 * 5 + "Zm9vYm" + "==", 46,
        "an Azure storage account key", "AccountName=x;Account" + "Key=" + B64,
    ),
    ("npm-token", "token npm" + "_" + "aB3dE6" * 6, 7, "an npm token", "token npm" + "_" + "aB3dE6"),
    (
        "npmrc", "//registry.npmjs.org/:_auth" + "Token=" + "a1b2c3d4-" * 4, 21, "an npm token",
        "//registry.npmjs.org/:_authToken=${NPM_TOKEN}",
    ),
    ("pypi", "password = pypi" + "-AgEIcHlwaS5vcmc" + "CJDaGVjayB" * 6, 12, "a PyPI token", "password = pypi" + "-AgEIcHlwaS5vcmc"),
    ("twilio-account", "sid AC" + HEX * 2, 5, "a Twilio key", "sid AC" + HEX * 2 + "0"),
    ("twilio-key", "key SK" + HEX * 2, 5, "a Twilio key", "key SK" + HEX[:15] + HEX),
    ("sendgrid", "key SG" + "." + "ngeVfQFYQlKU0ufo8x5d1A" + "." + "TwL2iGABf9DHoTf-09kqeF8tAmbihYzrnopKc-1s5cr", 5,
     "a SendGrid API key", "key SG" + "." + "ngeVfQFYQlKU0ufo8x5d1A" + "." + "TwL2iGABf9"),
    ("mailchimp", "key " + HEX * 2 + "-us" + "12", 37, "a Mailchimp API key", "key " + HEX * 2 + "-usa"),
    ("url-password", "remote https://zach:" + "hunter2@example.com/repo", 13, "a password in a URL", "remote https://zach@example.com:8080/repo"),
]


@pytest.mark.parametrize("line, col, what, near_miss", [case[1:] for case in FORMATS], ids=[case[0] for case in FORMATS])
def test_each_secret_format_is_found_and_its_near_miss_is_not(line, col, what, near_miss):
    text = f"first line\n{line}\n"
    assert [str(leak) for leak in find_secrets(text.encode(), {})] == [f"line 2:{col} contains {what}"]
    # The card is scanned with the same formats (and more: paths), as a reader sees it.
    assert [str(leak) for leak in find_leaks(text, {}) if "path" not in leak.what] == [f"line 2:{col} (title) contains {what}"]
    assert find_secrets(f"first line\n{near_miss}\n".encode(), {}) == []


def test_every_format_is_tested():
    assert {what for what, _, _ in SECRET_FORMATS} == {case[3] for case in FORMATS}


def test_values_of_secret_environment_variables_are_found_by_name():
    environ = {"OPENAI_API_KEY": "not-a-known-format-1234", "WANDB_API_KEY": "0123456789abcdef", "GREETING": "hello-world-1234"}
    data = b'{"a": "not-a-known-format-1234",\n "b": "x 0123456789abcdef", "c": "hello-world-1234"}\n'
    assert [str(leak) for leak in find_secrets(data, environ)] == [
        "line 1:8 contains the value of environment variable OPENAI_API_KEY",
        "line 2:10 contains the value of environment variable WANDB_API_KEY",
    ]
    # A known format held by a secret variable is named by the variable.
    assert [str(leak) for leak in find_secrets(f"HF_TOKEN={HF}".encode(), {"HF_TOKEN": HF})] == [
        "line 1:10 contains the value of environment variable HF_TOKEN"
    ]
    # Short values ("true", "1") would be found everywhere, so they are not looked for.
    assert find_secrets(b"debug: true", {"AUTH_DEBUG": "true"}) == []


def test_tokenizer_vocabularies_are_clean(tmp_path):
    environ = {"HF_TOKEN": HF, "OPENAI_API_KEY": OPENAI}
    files = [p for p in sorted(TOY.rglob("*")) if p.is_file()]
    # A byte-level BPE like Qwen2's, trained on this project's code and documents (thousands of pieces).
    corpus = [p.read_text() for p in sorted([*ROOT.glob("registry/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("docs/*.md"), *ROOT.glob("*.md")])]
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=20000, show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    assert len(tok.get_vocab()) > 8000
    build_tokenizer(tmp_path / "tiny", 288)
    files += [tmp_path / "tokenizer.json", *sorted((tmp_path / "tiny").iterdir())]
    for path in files:
        assert find_secrets(path.read_bytes(), environ) == [], path


# ---------------------------------------------------------------------------------------------
# Every file of a bundle is scanned before any target sees it


def _model_folder(tmp_path: Path) -> Path:
    """A finished model folder: the toy's files, with reports and a recipe beside them."""
    folder = tmp_path / "model"
    shutil.copytree(TOY / "ft_cos", folder)
    (folder / "provenance.json").write_text(json.dumps({"format": 1, "sources": {"cos": {"kind": "local"}}}, indent=2) + "\n")
    (folder / "smoke.json").write_text(json.dumps({"format": 1, "passed": True, "checks": []}, indent=2) + "\n")
    (folder / "recipe.yaml").write_text(TOY_RECIPE.read_text())
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# toy\n")
    return folder


@pytest.mark.parametrize(
    "name",
    ["chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
     "provenance.json", "smoke.json", "recipe.yaml", "README.md"],
)
def test_a_secret_in_any_published_file_refuses_the_bundle(tmp_path, name):
    folder = _model_folder(tmp_path)
    assert set(bundle_files(folder, environ={})) >= {name, "model.safetensors"}
    path = folder / name
    lines = path.read_text().count("\n") + 1
    path.write_text(path.read_text() + f"\nslack xoxb-1234567890-1234567890123-{'AbCdEf' * 4}\n")
    with pytest.raises(PublishError) as err:
        bundle_files(folder, environ={})
    assert str(err.value) == (
        f"{name}:{lines + 1}:7 holds a Slack token; nothing was published "
        "(remove it from the source, report or template the file came from, then publish again)"
    )


def test_a_secret_in_the_weights_header_refuses_the_bundle(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _model_folder(tmp_path)
    weights = folder / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", "note": f"HF_TOKEN={HF}"})
    with pytest.raises(PublishError) as err:
        bundle_files(folder, environ={"HF_TOKEN": HF})
    assert str(err.value).startswith("model.safetensors:1:")
    assert str(err.value).endswith(" holds the value of environment variable HF_TOKEN; nothing was published "
                                   "(remove it from the source, report or template the file came from, then publish again)")
    assert HF not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Through `registry publish`


def _run(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "registry", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def _toy_recipe(folder: Path, sources: Path = TOY) -> Path:
    recipe = folder / "toy.yaml"
    recipe.write_text(TOY_RECIPE.read_text().replace("../../tests/fixtures/toy", str(sources)))
    return recipe


@pytest.mark.parametrize("token_in_environment", [True, False])
def test_a_secret_in_a_source_chat_template_is_never_published(tmp_path, token_in_environment):
    for name in ("ft_cos", "ft_fmt"):
        shutil.copytree(TOY / name, tmp_path / "toy" / name)
        template = tmp_path / "toy" / name / "chat_template.jinja"
        template.write_text(template.read_text() + f"\nHF_TOKEN={HF}\n")
    home = tmp_path / "home"
    env = {"REGISTRY_HOME": str(home), "HF_TOKEN": HF if token_in_environment else ""}
    run = _run(tmp_path, "publish", str(_toy_recipe(tmp_path, tmp_path / "toy")), "--target", "local", env=env)
    what = "the value of environment variable HF_TOKEN" if token_in_environment else "a Hugging Face token (hf_…)"
    assert run.returncode == 1
    assert run.stderr.splitlines()[-1] == (
        f"error: chat_template.jinja:2:10 holds {what}; nothing was published "
        "(remove it from the source, report or template the file came from, then publish again)"
    )
    assert "Traceback" not in run.stderr and HF not in run.stdout + run.stderr
    assert not (home / "models").exists() and not (home / "index.json").exists()


def test_nothing_written_anywhere_holds_the_token_or_a_secret(tmp_path):
    # A token the test Hub accepts, shaped like a real one, so every scanner and the client treat it as one.
    secrets = [HF.encode(), OPENAI.encode()]
    hub = HubServer(tmp_path / "hub", tokens={HF: HUB_USER}, orgs={"registry-examples": [HUB_USER]})
    recipe = _toy_recipe(tmp_path)
    env = {**hub.client_env(HF, home=tmp_path / "hf-home"), "OPENAI_API_KEY": OPENAI, "REGISTRY_HOME": str(tmp_path / "home")}

    def hits() -> list[str]:
        return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                      if p.is_file() and any(s in p.read_bytes() for s in secrets))

    # The search itself finds a planted value.
    (tmp_path / "canary").write_bytes(b"x" + secrets[1] + b"x")
    assert hits() == ["canary"]
    (tmp_path / "canary").unlink()

    with hub:
        published = _run(tmp_path, "publish", str(recipe), "--target", "local", "--target", "hf", "--format", "json", env=env)
        assert published.returncode == 0, published.stderr
        site_hf = _run(tmp_path, "catalog", "build", "--from", "hf:registry-examples", "-o", str(tmp_path / "site-hf"), env=env)
        assert site_hf.returncode == 0, site_hf.stderr
    site = _run(tmp_path, "catalog", "build", "-o", str(tmp_path / "site"), env=env)
    assert site.returncode == 0, site.stderr
    # The token was really used: the Hub accepted a commit from its user, and both catalogs list the model.
    assert [r.status for r in hub.find(r"^POST /api/models/registry-examples/.*/commit/main")] == [200]
    assert {r["target"] for r in json.loads(published.stdout)["results"]} == {"local", "hf"}
    for folder in ("site", "site-hf"):
        assert (tmp_path / folder / "models" / "registry-examples" / "toy-cos0.3-fmt0.7.html").is_file(), folder
    assert (tmp_path / "toy.lock.json").exists() and (tmp_path / "home" / "index.json").exists()
    assert any((tmp_path / "hub" / "lfs").iterdir())
    assert hits() == []
    assert not any(s.decode() in repr(r) for r in hub.requests for s in secrets)  # the server's request log
    for run in (published, site_hf, site):
        assert not any(s.decode() in run.stdout + run.stderr for s in secrets)
