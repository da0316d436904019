from __future__ import annotations

import pytest

from bft.prompts import TemplateError, load_template, parse_template
from bft.steps import curate, generate, rewrite


@pytest.mark.parametrize("step", [generate, curate, rewrite])
def test_builtin_templates_load_and_render(step):
    template = load_template(step.NAME, None, step.REQUIRED_PLACEHOLDERS)
    messages = template.messages(document="DOC-BODY", instruction="INSTR-BODY")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "DOC-BODY" in messages[-1]["content"]
    assert ("INSTR-BODY" in messages[-1]["content"]) == ("instruction" in step.REQUIRED_PLACEHOLDERS)
    assert "{{" not in messages[-1]["content"]


def test_curate_template_asks_for_score_on_last_line():
    text = load_template("curate", None, curate.REQUIRED_PLACEHOLDERS).user
    assert "Score: N" in text and all(str(n) in text for n in range(1, 6))


def test_rewrite_template_asks_for_res_tags():
    assert "[RES]" in load_template("rewrite", None, rewrite.REQUIRED_PLACEHOLDERS).user


def test_placeholders_inside_values_are_not_expanded():
    template = parse_template("### user\nD={{document}} I={{instruction}}", "t", {"document"})
    out = template.messages(document="{{instruction}} {x}", instruction="real")[0]["content"]
    assert out == "D={{instruction}} {x} I=real"


def test_user_template_file(tmp_path):
    path = tmp_path / "gen.txt"
    path.write_text("# comment line\n### user\nWhat asks for this?\n{{document}}\n")
    template = load_template("generate", str(path), {"document"})
    assert template.system is None
    assert template.messages(document="x") == [{"role": "user", "content": "What asks for this?\nx"}]
    assert template.sha256 != load_template("generate", None, {"document"}).sha256


@pytest.mark.parametrize("text, message", [
    ("no sections here", "no '### user' section"),
    ("### system\nonly system", "missing or empty"),
    ("### user\n{{document}} {{docment}}", "unknown placeholder"),
    ("### user\nno placeholder", "missing placeholder"),
    ("### user\n{{document}}\n### user\nagain", "appears twice"),
])
def test_malformed_templates(text, message):
    with pytest.raises(TemplateError, match=message):
        parse_template(text, "my.txt", {"document"})


def test_missing_template_file():
    with pytest.raises(TemplateError, match="not found"):
        load_template("generate", "/nonexistent/t.txt", {"document"})


def test_template_hash_is_the_files_sha256(tmp_path):
    import hashlib
    from pathlib import Path

    builtin = Path(__file__).resolve().parents[1] / "src" / "bft" / "templates" / "curate.txt"
    assert load_template("curate", None, {"document"}).sha256 == hashlib.sha256(builtin.read_bytes()).hexdigest()
    path = tmp_path / "gen.txt"
    path.write_bytes(b"### system\r\nBe brief.\r\n### user\r\nAsk about:\r\n{{document}}\r\n")
    template = load_template("generate", str(path), {"document"})
    assert template.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # saved with Windows line ends: the same prompt as with Unix ones
    assert template.messages(document="x") == [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Ask about:\nx"}]
    path.write_bytes(b"### user\n\xff{{document}}\n")
    with pytest.raises(TemplateError, match="not UTF-8"):
        load_template("generate", str(path), {"document"})
