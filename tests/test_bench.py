"""The benchmarks cannot rot: each script runs once on a tiny input and prints every row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from catdog.runtime import cpu_model

pytestmark = pytest.mark.slow


def bench_smoke(data_dir: Path, out: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--data", str(data_dir), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(out.glob("smoke*.md")).read_text()


def test_bench_smoke_one_catdog_row_per_group(data_dir, tmp_path):
    """What CI runs: one measurement per group (the full table is the `bench` marker's)."""
    paths = ("catdog_folder", "catdog_train", "catdog_predict")
    table = bench_smoke(data_dir, tmp_path, "--paths", ",".join(paths), "--no-scaling")
    rows = [line for line in table.splitlines() if line.startswith(("| ingest", "| train", "| predict"))]
    assert [row.split(" | ")[1] for row in rows] == list(paths)
    # ingest has no model; the model rows run fp32 on both sides in the smoke (bf16 beside it in `make bench`)
    assert [row.split(" | ")[3:5] for row in rows] == [["", "2"], ["fp32", "2"], ["fp32", "2"]]
    results = json.loads(next(tmp_path.glob("*.json")).read_text())["results"]
    assert [r["group"] for r in results] == ["ingest", "train", "predict"]
    assert all(r["summary"]["images"] > 0 and r["summary"]["images_per_s"] > 0 for r in results)
    assert results[2]["summary"]["steady_images_per_s"] > 0
    # End to end like the plain loop: one pass per image, not configs/local.yaml's flip TTA.
    [scored_as] = results[2]["runs"][0]["scored_as"]
    assert scored_as.startswith("mobilenet_v2:") and not scored_as.endswith("+tta"), scored_as


def test_bench_set_reaches_the_catdog_rows_config_and_only_theirs(data_dir, tmp_path):
    """An override that catdog's config refuses fails the catdog row (before any Ray starts), so
    ``--set`` reaches the config that row loads; the plain row beside it never reads it."""
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--data", str(data_dir), "--out", str(tmp_path)]
    cmd += ["--groups", "predict", "--no-scaling", "--set", "predict.no_such_lever=1"]
    plain = subprocess.run([*cmd, "--paths", "plain_predict"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert (tmp_path / "smoke-predict-partial-set-predict.no_such_lever-1.md").exists()
    proc = subprocess.run([*cmd, "--paths", "catdog_predict"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode != 0 and "catdog_predict failed" in proc.stderr
    assert "predict.no_such_lever" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.bench
def test_bench_smoke_prints_every_row(data_dir, tmp_path):
    table = bench_smoke(data_dir, tmp_path)
    expected = [
        ("ingest", "pillow_single", ""),
        ("ingest", "dataloader_2", ""),
        ("ingest", "ray_read_images", ""),
        ("ingest", "catdog_folder", ""),
        ("ingest", "catdog_shards", ""),
        ("ingest", "catdog_folder", "| 1 |"),
        ("train", "plain_train", ""),
        ("train", "catdog_train", ""),
        ("predict", "plain_predict", ""),
        ("predict", "catdog_predict", ""),
        ("predict", "catdog_predict", "| 1 |"),
    ]
    rows = [line for line in table.splitlines() if line.startswith("| ingest") or line.startswith("| train")]
    rows += [line for line in table.splitlines() if line.startswith("| predict")]
    for group, path, workers in expected:
        assert any(f"| {group} | {path} |" in row and workers in row for row in rows), f"missing {group}/{path}"
    for ratio in (
        "ingest: catdog folder / stock read_images",
        "ingest: catdog folder / plain DataLoader",
        "ingest: catdog shards / plain DataLoader",
        "ingest scaling: catdog folder, 2 / 1 Ray workers",
        "train sequential_cnn fp32: Ray Train 1 worker / plain loop",
        "predict mobilenet_v2 fp32: catdog steady state / plain loop, 96 images",
        "predict mobilenet_v2 fp32: catdog end to end / plain loop, 96 images",
        "predict mobilenet_v2 fp32: predict scaling, 2 / 1 predictor actors, end to end, 96 images",
    ):
        assert ratio in table
    results = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert len(results["results"]) == len(expected)
    assert all(r["summary"]["images"] > 0 for r in results["results"])
    predict = [r for r in results["results"] if r["path"] == "catdog_predict"]
    assert all(r["summary"]["steady_images_per_s"] > 0 for r in predict)


def run_script(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def lever_rates(data_dir: Path, *only: str) -> dict[str, float]:
    """Run ``bench/levers.py --smoke`` (restricted to the ``--only`` texts given) and return its rows."""
    filters = [arg for text in only for arg in ("--only", text)]
    out = run_script(str(REPO / "bench" / "levers.py"), "--smoke", "--data", str(data_dir), *filters)
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and not line.startswith("| lever")]
    return {row[0].lstrip("| "): float(row[1]) for row in rows}


def test_levers_smoke_one_single_process_and_one_ray_lever(data_dir):
    """What CI runs: one lever of each kind (each Ray row costs a Ray start; the full list is `bench`'s)."""
    rates = lever_rates(data_dir, "catdog decode_image", "512 files/task, 2 decode threads")
    expected = {"catdog decode_image (draft, box resize)", "ray: catdog reader, 512 files/task, 2 decode threads"}
    assert set(rates) == expected
    assert all(rate > 0 for rate in rates.values()), rates


@pytest.mark.bench
def test_levers_smoke_prints_every_lever(data_dir):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import levers
    finally:
        sys.path.remove(str(REPO / "bench"))
    rates = lever_rates(data_dir)
    assert set(rates) == {*levers.LEVERS, *levers.RAY_LEVERS}
    assert all(rate > 0 for rate in rates.values()), rates


def test_fold_batchnorm_smoke_times_both_models_and_compares_their_logits():
    out = run_script(str(REPO / "bench" / "fold_batchnorm.py"), "--smoke")
    [line] = out.splitlines()
    fields = line.split()
    assert fields[:3] == ["sequential_cnn", "32", "px"], line
    eager, folded, ratio = float(fields[5]), float(fields[8]), float(fields[10].rstrip("x"))
    assert eager > 0 and folded > 0 and ratio == pytest.approx(folded / eager, abs=0.006)
    assert float(fields[-1]) < 1e-3, line  # the same function to within float rounding


def test_ingest_from_s3_smoke_times_folder_and_shards(data_dir):
    out = run_script(
        str(REPO / "bench" / "ingest_s3.py"),
        "--images",
        "64",
        "--rounds",
        "1",
        "--shard-size",
        "16",
        "--data",
        str(data_dir),
    )
    assert "uploaded 64 images" in out
    # 32 cats and 32 dogs, 6 of each held out for validation: both sources read the same 52 images
    for kind in ("folder", "shards"):
        lines = [line for line in out.splitlines() if line.startswith(f"round 1 {kind}")]
        assert lines and ": 52 train images in " in lines[0] and lines[0].endswith("img/s"), out
    assert "best of 1: folder" in out


def test_plan_scale_smoke_measures_both_scenarios(tmp_path):
    out = run_script(str(REPO / "bench" / "plan_scale.py"), "--sizes", "3000", "--out", str(tmp_path))
    assert "| 3,000 | first | 3,000 |" in out and "| 3,000 | nightly | 30 |" in out
    rows = json.loads(next(tmp_path.glob("plan_scale-*.json")).read_text())["rows"]
    assert [r["scenario"] for r in rows] == ["first", "nightly"]
    assert all(0 < r["plan_total_s"] < r["job_to_first_batch_s"] and r["driver_peak_rss_gib"] > 0 for r in rows)
    # make bench passes no --note: the table still says which machine measured it
    assert f"{os.cpu_count()} CPUs, {cpu_model()}" in (tmp_path / "plan_scale.md").read_text().splitlines()[0]


def test_process_cpu_counts_a_child_and_its_cpu_seconds(tmp_path):
    """A grandchild of the measured command that burns 1.5 CPU-s is listed once with its CPU time."""
    (tmp_path / "burn_cpu.py").write_text(
        "import time\nstart = time.process_time()\nwhile time.process_time() - start < 1.5:\n    pass\n"
    )
    spawn = "import subprocess, sys; subprocess.run([sys.executable, 'burn_cpu.py'], cwd=sys.argv[1], check=True)"
    out = run_script(str(REPO / "bench" / "process_cpu.py"), "--", sys.executable, "-c", spawn, str(tmp_path))
    rows = [line.split(None, 2) for line in out.splitlines() if line.endswith(" burn_cpu.py")]
    assert len(rows) == 1 and rows[0][1] == "1" and float(rows[0][0]) >= 1.0, out
    assert "all processes seen; machine busy" in out.splitlines()[-1]
