"""The test harness itself: CATDOG_REQUIRE turns missing components and skips into failures, quickly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

TESTS = REPO / "tests"


def pytest_in(folder: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=folder,
        # The session's own settings (CI sets CATDOG_REQUIRE) must not leak into a run that sets none.
        env={**{k: v for k, v in os.environ.items() if k not in ("CATDOG_REQUIRE", "CATDOG_STORE_DURATIONS")}, **env},
    )
    return proc, time.monotonic() - start


def test_a_required_component_that_is_missing_stops_the_session_at_once_naming_it(tmp_path):
    proc, elapsed = pytest_in(
        REPO, "tests/test_config.py", CATDOG_DATA=str(tmp_path / "nonexistent"), CATDOG_REQUIRE="data"
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output[-3000:]
    assert "required component missing: CATDOG_DATA" in output and str(tmp_path / "nonexistent") in output
    assert " passed" not in output  # not a single test ran
    assert elapsed < 60


def test_an_unknown_required_component_is_refused(tmp_path):
    proc, _ = pytest_in(REPO, "tests/test_config.py", CATDOG_REQUIRE="data,chromuim")
    assert proc.returncode == 3 and "unknown component 'chromuim'" in proc.stdout + proc.stderr


def test_under_require_only_the_gpu_marker_may_skip(tmp_path):
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n\n"
        "def test_skips_for_a_missing_thing():\n    pytest.skip('something is missing')\n\n"
        "@pytest.mark.gpu\ndef test_needs_a_gpu():\n    pytest.skip('no CUDA')\n\n"
        "def test_plain():\n    pass\n"
    )
    fake_data = tmp_path / "data"
    (fake_data / "train").mkdir(parents=True)
    (fake_data / "test1").mkdir()
    # tests/conftest.py as a plugin: its hooks apply to a test file outside tests/.
    env = {"PYTHONPATH": f"{REPO}:{TESTS}", "CATDOG_DATA": str(fake_data)}
    plain, _ = pytest_in(tmp_path, "-p", "conftest", "-rs", "test_probe.py", **env)
    assert plain.returncode == 0 and "1 passed, 2 skipped" in plain.stdout, plain.stdout[-3000:]
    required, _ = pytest_in(tmp_path, "-p", "conftest", "-rfs", "test_probe.py", CATDOG_REQUIRE="data", **env)
    assert required.returncode == 1, required.stdout[-3000:]
    assert "1 failed, 1 passed, 1 skipped" in required.stdout, required.stdout[-3000:]
    assert "FAILED test_probe.py::test_skips_for_a_missing_thing" in required.stdout
    assert "skipped under CATDOG_REQUIRE=data: Skipped: something is missing" in required.stdout


def test_ci_script_exits_quickly_naming_a_missing_data_folder(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / ".ci" / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CATDOG_DATA": str(tmp_path / "nonexistent")},
    )
    assert proc.returncode == 3 and "required component missing: CATDOG_DATA" in proc.stderr, proc.stderr
    assert time.monotonic() - start < 10


def test_under_xdist_a_module_and_the_quick_run_and_cluster_modules_each_stay_on_one_worker(tmp_path):
    """`make test` runs ``-n 2``: without tests/conftest.py's scheduler, xdist would
    spread a module's tests over both workers (its module fixtures built twice) and train
    ``quick_run`` once per worker."""
    body = "import time\n\n" + "".join(f"def test_{i}({{arg}}):\n    time.sleep(0.2)\n\n" for i in range(6))
    quick = "import pytest\n\n@pytest.fixture(scope='session')\ndef quick_run():\n    return 1\n\n"
    cluster = "import pytest\n\npytestmark = pytest.mark.cluster\n\n"
    for name, head, arg in [
        ("test_quick_a", quick, "quick_run"),
        ("test_quick_b", quick, "quick_run"),
        ("test_cluster_a", cluster, ""),
        ("test_cluster_b", cluster, ""),
        ("test_plain", "", ""),
    ]:
        (tmp_path / f"{name}.py").write_text(head + body.format(arg=arg))
    env = {"PYTHONPATH": f"{REPO}:{TESTS}"}
    proc, _ = pytest_in(tmp_path, "-p", "conftest", "-n", "2", "-v", **env)
    assert proc.returncode == 0 and "30 passed" in proc.stdout, proc.stdout[-3000:]
    workers: dict[str, set[str]] = {}
    for line in proc.stdout.splitlines():
        if "PASSED" in line and line.startswith("[gw"):
            worker, module = line.split()[0], line.split("::")[0].split()[-1]
            workers.setdefault(module.removesuffix(".py"), set()).add(worker)
    assert len(workers) == 5 and all(len(used) == 1 for used in workers.values()), workers
    assert workers["test_quick_a"] == workers["test_quick_b"]
    assert workers["test_cluster_a"] == workers["test_cluster_b"]


def test_under_xdist_the_longest_recorded_modules_start_first_and_a_run_can_record_them(tmp_path):
    """xdist's own order (most tests first, then the collection's) would start test_a and test_b."""
    body = "import time\n\n" + "".join(f"def test_{i}():\n    time.sleep(0.2)\n\n" for i in range(4))
    for name in ("test_a", "test_b", "test_c"):
        (tmp_path / f"{name}.py").write_text(body)
    durations = tmp_path / "tests" / "durations.json"
    durations.parent.mkdir()
    durations.write_text(json.dumps({"test_c.py": 100, "test_b.py": 50}))
    env = {"PYTHONPATH": f"{REPO}:{TESTS}", "CATDOG_STORE_DURATIONS": "1"}
    proc, _ = pytest_in(tmp_path, "-p", "conftest", "-n", "2", "-v", **env)
    assert proc.returncode == 0 and "12 passed" in proc.stdout, proc.stdout[-3000:]
    order = [line.split("::")[0].split()[-1] for line in proc.stdout.splitlines() if "PASSED" in line]
    assert set(order[:2]) == {"test_c.py", "test_b.py"} and order[-1] == "test_a.py", order
    recorded = json.loads(durations.read_text())
    assert set(recorded) == {"test_a.py", "test_b.py", "test_c.py"}
    assert all(0.8 <= seconds < 5 for seconds in recorded.values()), recorded
