"""A pytest plugin for the kit's ``pytest_gpu`` step: print a failure's traceback the moment the
test fails, not at the end of the session.  A step that overruns its timeout (a hung teardown, a
second slow test) is killed before pytest's summary, and would otherwise lose the reason."""

from __future__ import annotations


def pytest_runtest_logreport(report) -> None:
    if report.failed:
        header = f"----- FAILED {report.nodeid} ({report.when}, {report.duration:.1f}s)"
        captured = "".join(f"--- {name} (last 3,000 characters)\n{text[-3000:]}\n" for name, text in report.sections)
        print(f"\n{header}\n{report.longreprtext}\n{captured}", flush=True)
