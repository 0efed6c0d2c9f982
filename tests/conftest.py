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
