"""Shared test settings: quiet transformers logs, hypothesis profiles, a fixed seed per test (helpers: helpers.py)."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# transformers logs a fallback notice on every CPU run of its GDN reference; keep test output readable
logging.getLogger("transformers").setLevel(logging.ERROR)


# CI draws the same examples every run (a red build always means a real failure); locally, set
# HYPOTHESIS_PROFILE=deep for a long randomized search.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=40, **_common)
settings.register_profile("ci", max_examples=40, derandomize=True, **_common)
settings.register_profile("deep", max_examples=400, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default"))


@pytest.fixture(autouse=True)
def _fresh_state():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items) -> None:
    """Skip the tests of an architecture the installed transformers does not have (a parameter ``arch``, or its name
    in the test's name): newer families need a newer transformers than the oldest one CI runs (.ci/run)."""
    import transformers

    from deltapack.tiny import TINY
    from helpers import installed, model_type_of

    missing = set(TINY) - set(installed(tuple(TINY)))
    if not missing:
        return
    for item in items:
        arch = getattr(getattr(item, "callspec", None), "params", {}).get("arch")
        named = [a for a in sorted(missing) if f"_{a}_" in f"_{item.originalname}_"]
        lacking = arch if isinstance(arch, str) and arch in missing else (named[0] if named else None)
        if lacking:
            reason = f"transformers {transformers.__version__} has no model type {model_type_of(lacking)!r}"
            item.add_marker(pytest.mark.skip(reason=reason))
