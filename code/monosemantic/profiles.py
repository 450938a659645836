"""The three profiles, each a set of stage configs, in one place.

- ``tiny``: seconds on one CPU core; what the tests and CI run end to end.
- ``cpu``:  the committed default; the whole pipeline on a 2-core laptop CPU in about an hour.
- ``gpu``:  the anchor's scale (~819M LM tokens, >= 90M SAE activations) and beyond, on one H100.

Each stage module defines its config dataclass; this module picks its numbers per profile. A stage
reads its config with ``profiles.get("cpu").lm`` and nothing else.
"""

from __future__ import annotations

import dataclasses

from .config import check_profile


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    # one field per stage, added as stages land (each a StageConfig subclass)


def get(name: str) -> Profile:
    """The profile called ``name`` (``tiny``, ``cpu`` or ``gpu``)."""
    check_profile(name)
    return _PROFILES[name]()


def _tiny() -> Profile:
    return Profile(name="tiny")


def _cpu() -> Profile:
    return Profile(name="cpu")


def _gpu() -> Profile:
    return Profile(name="gpu")


_PROFILES = {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}
