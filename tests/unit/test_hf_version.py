"""The transformers engine starts only on the transformers releases it was tested on."""

from __future__ import annotations

import pytest

from pureapi.engines.hf_version import SUPPORTED, check_transformers
from pureapi.errors import ModelLoadError

from ..conftest import ROOT


@pytest.mark.parametrize("version", ["5.25.0", "5.25.3", "5.25.1.dev0"])
def test_a_tested_release_starts(version: str) -> None:
    check_transformers(version)


@pytest.mark.parametrize("version", ["5.24.2", "5.26.0", "5.26.0.dev0", "6.0.0", "4.57.1", "nightly"])
def test_another_release_is_refused_in_one_line_naming_both(version: str) -> None:
    with pytest.raises(ModelLoadError) as refused:
        check_transformers(version)
    message = str(refused.value)
    assert "\n" not in message and f"transformers {version} is installed" in message and SUPPORTED in message


def test_the_installed_release_is_supported_and_pinned() -> None:
    check_transformers()  # what this environment runs the suite on
    assert f'"transformers{SUPPORTED}",' in (ROOT / "pyproject.toml").read_text()  # the same range, pinned
