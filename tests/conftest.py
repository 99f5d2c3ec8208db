"""Shared pytest configuration for the whole suite."""

from __future__ import annotations

import os

from hypothesis import settings

# One profile for every run, local or CI: no deadline (a shared machine's timing is noisy, and a
# slow example is not a failure) and enough examples to reach the C kernel's edge cases.
# HYPOTHESIS_PROFILE selects another registered profile (e.g. "default") when needed.
settings.register_profile("ci", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
