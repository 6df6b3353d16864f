"""A pytest plugin (loaded by ``tests/conftest.py``): tests skipped for want of a package or a tool
are listed in a section of their own at the end of every run, and with ``GPUADAM_REQUIRE_ALL=1``
(as ``.ci/run`` sets) they fail the run.

A skipped parity file is one line among hundreds of dots; a run that quietly lost the comparison
with ``torch.optim`` must not pass CI. Skips for other reasons (a test that needs a GPU, say) are
left alone.
"""

from __future__ import annotations

import os
import re

import pytest

ENV_VAR = "GPUADAM_REQUIRE_ALL"
#: Skip reasons that mean: something the test extra installs is missing here.
MISSING = re.compile(
    r"could not import|not installed|cannot be imported|not importable|No module named|not found|not on PATH"
    r"|is not available|neither .* nor",
    re.I,
)


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def _where(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    return f"{longrepr[0]}:{longrepr[1]}" if isinstance(longrepr, tuple) and len(longrepr) == 3 else report.nodeid


def missing_skips(stats: dict) -> list[tuple[str, str]]:
    """``(where, reason)`` of every skip for a missing package or tool, in the order they ran."""
    return [(_where(r), _reason(r)) for r in stats.get("skipped", []) if MISSING.search(_reason(r))]


def _required() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not _required():
        return
    if missing_skips(reporter.stats) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    found = missing_skips(terminalreporter.stats)
    if not found:
        return
    verdict = f"{ENV_VAR}=1: the run FAILS" if _required() else f"set {ENV_VAR}=1 to fail the run"
    terminalreporter.section(f"did not run: a package or tool is missing ({verdict})", sep="!", red=True, bold=True)
    for where, reason in found:
        terminalreporter.line(f"{where}: {reason}", red=True)
    terminalreporter.line("install everything the tests use: pip install -e \".[test]\"", bold=True)
