"""What a person sees: a short console (Ray's own output in the run's log file), --verbose, and
the ``catdog`` command."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, epochs_of, quick_overrides, set_args

from catdog import cli
from catdog.cli import JOBS
from catdog.console import MARK, duration

MAX_LINES = 40


def run(args: list[str], env: dict | None = None, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "CATDOG_VERBOSE"}, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def test_catdog_help_lists_every_job():
    proc = run(["-m", "catdog", "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    for job in ("train", "predict", "evaluate", "prepare"):
        assert job in proc.stdout


def printed_help(capsys, call) -> str:
    """What ``call`` printed before argparse's ``--help`` exited with 0."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        call()
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("job", sorted(JOBS))
def test_catdog_subcommand_help_matches_the_job_script(job, capsys, monkeypatch):
    """Same options either way: the definitions are shared.  In this process (the script as
    ``__main__``): the test above starts ``python -m catdog`` itself, the train job tests the scripts."""
    command = printed_help(capsys, lambda: cli.main([job, "--help"]))
    script_path = str(REPO / "jobs" / f"{job}.py")
    monkeypatch.setattr(sys, "argv", [script_path, "--help"])
    script = printed_help(capsys, lambda: runpy.run_path(script_path, run_name="__main__"))

    def options(text: str) -> set[str]:
        return {word.strip(",[]") for word in text.split() if word.startswith(("--", "[--"))}

    assert options(command) == options(script) and "--set" in options(script)
    assert "--config" in command and "--verbose" in command


def test_duration():
    assert duration(75) == "1:15" and duration(3725) == "1:02:05" and duration(-1) == "0:00"


@pytest.mark.slow
def test_quick_train_prints_a_short_console_and_logs_ray_to_the_run(small_real_data, tmp_path):
    # Two architectures show the per-architecture lines as well as three (each costs a Train run).
    small = {"models": "[sequential_cnn, mobilenet_v2]", "data.limit": 120, "data.image_size": 32}
    overrides = quick_overrides(small_real_data, tmp_path, **small)
    proc = run([str(REPO / "jobs" / "train.py"), "--config", "configs/quick.yaml", *set_args(overrides)])
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(lines) <= MAX_LINES, "\n".join(lines)
    run_dir = tmp_path / "quick"
    assert proc.stdout.splitlines()[-1] == str(run_dir / "best.json")
    # One epoch line per architecture, with the ETAs; no Ray prefixes or progress bars.
    epoch_lines = [line for line in proc.stdout.splitlines() if " epoch 1/1: " in line]
    assert len(epoch_lines) == 2 and all("ETA" in line and "(run)" in line for line in epoch_lines), proc.stdout
    assert sum(" epoch 1/1: " in line for line in proc.stderr.splitlines()) == 0, proc.stderr  # each line once
    assert "pid=" not in proc.stdout + proc.stderr and MARK not in proc.stdout + proc.stderr
    assert "Running Dataset" not in proc.stderr
    assert str(run_dir / "logs" / "train.log") in proc.stderr  # the start line says where the log goes
    log = (run_dir / "logs" / "train.log").read_text()
    assert "(TrainController pid=" in log and "Dataset" in log  # Ray's own output is kept, in the log
    assert "View the dashboard at" in log  # ray.dashboard unset: a train job's Ray has it (Train's cleaner)

    predict = run([str(REPO / "jobs" / "predict.py"), "--config", "configs/quick.yaml", *set_args(overrides)])
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert len(predict.stdout.splitlines() + predict.stderr.splitlines()) <= 10, predict.stdout + predict.stderr
    assert predict.stdout.splitlines()[-1] == str(run_dir / "submission.csv")
    log = (run_dir / "logs" / "predict.log").read_text()
    assert "Dataset" in log and "Started a local Ray instance" in log and "View the dashboard" not in log


@pytest.mark.slow
def test_verbose_restart_shows_rays_progress_and_trains_afresh(small_real_data, tmp_path):
    """One job checks both flags: ``--verbose`` prints Ray's own output instead of logging it, and
    ``--restart`` moves the previous run aside (a plain rerun would skip its finished architecture)."""
    previous = tmp_path / "verbose" / "sequential_cnn"
    previous.mkdir(parents=True)
    (previous / "result.json").write_text('{"epochs": 99}')
    small = {"models": "[sequential_cnn]", "data.limit": 120, "data.image_size": 32}  # any run shows the progress
    overrides = quick_overrides(small_real_data, tmp_path, "verbose", **small)
    args = [str(REPO / "jobs" / "train.py"), "--config", "configs/quick.yaml", "--verbose", "--restart"]
    proc = run([*args, *set_args(overrides)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "(TrainController pid=" in output and "Running Dataset" in output
    assert proc.stdout.splitlines()[-1] == str(tmp_path / "verbose" / "best.json")
    assert not Path(tmp_path / "verbose" / "logs" / "train.log").exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("verbose.old-")]
    assert len(aside) == 1 and f"--restart: moved the previous run to {aside[0]}" in proc.stderr
    assert (aside[0] / "sequential_cnn" / "result.json").read_text() == '{"epochs": 99}'
    assert json.loads((previous / "result.json").read_text())["epochs"] == 1
    assert epochs_of(previous / "metrics.csv") == [1]


def test_worker_lines_split_between_console_and_log(tmp_path, capsys):
    """What Ray's log_to_driver delivers: catdog's marked lines to the console without Ray's
    prefix, everything else to the log file with it."""
    from catdog.console import LogFile, _dispatch

    log = LogFile(str(tmp_path / "ray.log"))
    batch = {
        "pid": 42,
        "ip": "10.0.0.1",
        "localhost": "10.0.0.1",
        "actor_name": "RayTrainWorker",
        "is_err": False,
        "lines": [MARK + "resnet18 epoch 1/3: val_acc 0.9000", "Moving model to device: cpu"],
    }
    _dispatch(batch, log, passthrough=None, show_bars=False)
    _dispatch({**batch, "is_err": True, "lines": [MARK + "warning: bad image"]}, log, None, False)
    log.close()
    out = capsys.readouterr()
    assert out.out == "resnet18 epoch 1/3: val_acc 0.9000\n" and out.err == "warning: bad image\n"
    assert (tmp_path / "ray.log").read_text() == "(RayTrainWorker pid=42) Moving model to device: cpu\n"


def test_ray_log_moves_with_what_it_holds(tmp_path):
    from catdog.console import LogFile

    log = LogFile(str(tmp_path / "tmp" / "a.log"))
    log.write("before\n")
    log.move(str(tmp_path / "run" / "logs" / "train.log"))
    log.write("after\n")
    log.close()
    assert (tmp_path / "run" / "logs" / "train.log").read_text() == "before\nafter\n"
    assert not (tmp_path / "tmp" / "a.log").exists()
