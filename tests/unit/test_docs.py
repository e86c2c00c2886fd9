"""The generated pages of docs/ match the code: docs/settings.md is what ``baton docs`` writes from the settings
classes now. A new or changed setting fails here until ``make docs`` is run."""

from __future__ import annotations

from pathlib import Path

from baton.cli import docs
from baton.runtime.settings import env_name

ROOT = Path(__file__).resolve().parents[2]


def test_generated_pages_are_current() -> None:
    for path, expected in docs.generated_pages().items():
        current = (ROOT / path).read_text(encoding="utf-8") if (ROOT / path).is_file() else None
        assert current == expected, f"{path} is stale: run `make docs` (baton docs) and commit it"


def test_the_settings_page_lists_every_setting_with_a_description() -> None:
    page = docs.settings_page()
    for service in docs.SETTINGS_CLASSES:
        cls = docs.settings_class(service)
        for name, info in cls.model_fields.items():
            assert info.description, f"{cls.__name__}.{name} has no Field(description=...)"
            if name != "home":  # documented once as BATON_HOME, shared by every service
                assert f"`{env_name(cls, name)}`" in page, name


def test_the_check_finds_a_stale_page(tmp_path: Path) -> None:
    assert docs.stale_pages(tmp_path) == list(docs.generated_pages())
    for path, text in docs.generated_pages().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text, encoding="utf-8")
    assert docs.stale_pages(tmp_path) == []
