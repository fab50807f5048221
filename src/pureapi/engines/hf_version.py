"""The transformers releases the transformers engine runs on.

hf_batching drives transformers' continuous-batching internals (its request states, logits
processors and cache config) and hf_attention replaces an entry of its attention registry: private
parts that move between minor releases. So the engine runs only on the releases the tests ran on.
"""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from ..errors import ModelLoadError

# The releases the suite ran on; pyproject.toml pins the same range (a test keeps the two equal).
SUPPORTED = ">=5.25,<5.26"


def check_transformers(installed: str | None = None) -> None:
    """Refuse, in one line naming both, an installed transformers outside the supported range."""
    version = installed if installed is not None else metadata.version("transformers")
    try:
        supported = Version(version) in SpecifierSet(SUPPORTED, prereleases=True)
    except InvalidVersion:
        supported = False
    if not supported:
        raise ModelLoadError(
            f"transformers {version} is installed, but the transformers engine runs on transformers{SUPPORTED} "
            f"(it patches their internals): pip install 'transformers{SUPPORTED}'"
        )
