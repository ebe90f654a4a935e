"""The chaos suite: faults under load, hostile input and secrets, with figures.

Rows recorded through ``tests.chaos.report.record`` during the session become docs/reliability.md
when the session ends (only if a chaos test ran, so a partial run elsewhere does not rewrite it).
"""

from __future__ import annotations

import pytest

from tests.chaos import report


@pytest.fixture(scope="session", autouse=True)
def _fresh_reliability_rows():
    """Rows come from this session only (a conftest below the root sees no pytest_sessionstart)."""
    report.reset()
    yield


def pytest_sessionfinish(session, exitstatus):
    text = report.render()
    if text is not None:
        report.DOC.write_text(text)
