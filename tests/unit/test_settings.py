"""Settings: one flag per field, shown in groups, one name for concurrent generations, old names as aliases."""

from __future__ import annotations

import pytest

from pureapi.cli import serve_parser
from pureapi.settings import GROUPS, Settings, settings_from_args


def test_every_field_is_in_exactly_one_group() -> None:
    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(Settings.model_fields) and len(grouped) == len(set(grouped))


def test_help_shows_the_groups() -> None:
    text = serve_parser().format_help()
    for title in GROUPS:
        assert f"\n{title}:\n" in text
    assert "--parallel PARALLEL, --max-batch-size PARALLEL" in text


def test_concurrency_has_one_name_and_a_default_per_engine() -> None:
    assert [Settings().concurrency(e) for e in ("llamacpp", "transformers", "remote")] == [16, 8, 16]
    assert Settings(threads=1).concurrency("llamacpp") == 16  # no longer derived from the web server's threads
    assert Settings(parallel=2).concurrency("transformers") == 2


@pytest.mark.parametrize("argv", [["--max-batch-size", "3"], ["--parallel", "3"]])
def test_the_old_flag_is_an_alias(argv: list[str]) -> None:
    assert settings_from_args(serve_parser().parse_args(argv)).parallel == 3


def test_the_old_env_var_is_an_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUREAPI_MAX_BATCH_SIZE", "5")
    assert settings_from_args(serve_parser().parse_args([])).parallel == 5
    monkeypatch.setenv("PUREAPI_PARALLEL", "6")  # the new name wins
    assert settings_from_args(serve_parser().parse_args([])).parallel == 6
    assert Settings.model_validate({"max_batch_size": 7}).parallel == 7
