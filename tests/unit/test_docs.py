from pathlib import Path

import pytest

from protoagg_dagster.core import settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("setting", settings.ALL_SETTINGS, ids=lambda s: s.env)
def test_every_setting_is_documented_in_the_readme(setting: settings.Setting) -> None:
    assert f"`{setting.env}`" in (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands_that_exist() -> None:
    text = (ROOT / "README.md").read_text()
    first_screen = text[: text.index("## Walk-through")]
    for command in ("scripts/run-local", "scripts/test"):
        assert command in first_screen
        assert (ROOT / command).stat().st_mode & 0o111
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
