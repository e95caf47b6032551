"""The README's promises that can drift: the two commands first, the config reference."""

from __future__ import annotations

from pathlib import Path

from producer.ops.config import config_reference

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_commands() -> None:
    head = README.split("\n## ", 1)[0]
    assert "make demo" in head and "make test" in head


def test_config_reference_is_current() -> None:
    start = README.index("<!-- config-reference")
    body = README[README.index("\n", start) + 1 : README.index("<!-- /config-reference -->")]
    assert body.strip() == config_reference().strip(), "regenerate the README config table"
