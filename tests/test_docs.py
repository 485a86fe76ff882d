"""The README is the user's manual: it must document every setting the service reads."""

from __future__ import annotations

from pathlib import Path

from service.settings import ServiceSettings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_documents_every_setting_with_its_default():
    text = README.read_text()
    for name, field in ServiceSettings.model_fields.items():
        assert f"`PTQ4DM_{name.upper()}`" in text, f"README misses PTQ4DM_{name.upper()}"
        default = field.default_factory() if field.default_factory else field.default
        if isinstance(default, (int, float, str)) and not isinstance(default, bool):
            assert f"`PTQ4DM_{name.upper()}` | `{default}`" in text, f"README default of {name} is stale"
