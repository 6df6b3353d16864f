"""Hooks of the whole test run: ``skips`` lists the tests skipped for a missing package or tool,
and with GPUADAM_REQUIRE_ALL=1 (as .ci/run sets) fails the run."""

from skips import pytest_sessionfinish, pytest_terminal_summary  # noqa: F401
