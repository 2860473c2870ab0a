"""Shared test settings: hypothesis profiles sized for a 2-core CPU."""

import os

from hypothesis import HealthCheck, settings

# JIT compilation makes the first example slow; deadlines would only measure the compiler.
settings.register_profile(
    "default", deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", deadline=None, max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
