"""Resume and incremental predict on one input: uninterrupted, killed-then-resumed, 1% new.

    python bench/resume_figures.py [--config configs/local.yaml] [--data DIR] [--images 5000]
                                   [--kill-at 0.75] [--out bench/results]

Every run is ``jobs/predict.py`` in a fresh subprocess (its own embedded Ray), timed wall-clock:

1. ``uninterrupted``: the first ``--images`` test1 images into an empty output;
2. ``killed`` + ``resumed``: the same into another output, SIGKILLed (driver and its Ray) at
   ``--kill-at`` of the uninterrupted wall time, then the same command again (at 0.4 on 2 cores
   the job was still starting and had committed nothing: the resumed run scored everything);
3. ``incremental``: 99% of the images scored, then 1% new ones added and the command run again.

The model is a freshly initialised checkpoint of the config's first architecture at its image
size: the same computation as a trained one (no training run is needed to reproduce the figures).
Writes ``<out>/resume-<timestamp>.json`` and ``<out>/resume.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SUMMARY = re.compile(r"^predict: scored (\d+), reused (\d+), removed (\d+) of (\d+) images")


def fresh_checkpoint(cfg, folder: Path) -> Path:
    import torch

    from catdog.checkpoints import save_checkpoint
    from catdog.models import build_model

    spec = cfg.models[0]
    arch, size = spec.arch, spec.image_size or cfg.data.image_size
    model = build_model(arch)
    folder.mkdir(parents=True)
    meta = {"arch": arch, "image_size": size, "config_hash": "bench", "run_name": "bench"}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(str(folder), model, optimizer, cfg=meta, epoch=0, step=0, history=[{}])
    return folder


def linked_folder(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (dst / name).exists():
            os.link(src / name, dst / name)
    return dst


def predict(cfg_file: Path, model: Path, images: Path, out: Path, kill_after: float | None = None) -> dict:
    command = [sys.executable, str(REPO / "jobs" / "predict.py"), "--config", str(cfg_file), "--model", str(model)]
    command += ["--input", str(images), "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}", "RAY_ADDRESS": ""}
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, _ = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"wall_s": time.monotonic() - started, "killed": True}
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"predict failed ({proc.returncode}): {' '.join(command)}")
    match = next(m for m in map(SUMMARY.match, stdout.splitlines()) if m)
    counts = dict(zip(("scored", "reused", "removed", "total"), map(int, match.groups())))
    return {"wall_s": wall, **counts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    parser.add_argument("--data", default=os.environ.get("CATDOG_DATA", str(REPO.parent / "shared/data/dogs-vs-cats")))
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--kill-at", type=float, default=0.75)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--note", default="", help="a line for the results file, e.g. 'quiet machine'")
    args = parser.parse_args()
    from catdog.config import load_config

    test1 = Path(args.data) / "test1"
    names = sorted((p.name for p in test1.iterdir() if p.suffix == ".jpg"), key=lambda n: int(n.split(".")[0]))
    names = names[: args.images]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="catdog-resume-") as tmp:
        work = Path(tmp)
        cfg = load_config(args.config, [f"storage.root={work}"])
        cfg_file = work / "cfg.yaml"
        cfg_file.write_text(cfg.to_yaml())
        model = fresh_checkpoint(cfg, work / "checkpoint")
        images = linked_folder(test1, work / "all", names)
        rows["uninterrupted"] = predict(cfg_file, model, images, work / "a")
        kill_after = args.kill_at * rows["uninterrupted"]["wall_s"]
        rows["killed"] = predict(cfg_file, model, images, work / "b", kill_after=kill_after)
        rows["resumed"] = predict(cfg_file, model, images, work / "b")
        base = linked_folder(test1, work / "inc", names[: len(names) - len(names) // 100])
        rows["incremental base (99%)"] = predict(cfg_file, model, base, work / "c")
        linked_folder(test1, base, names)
        rows["incremental (+1% new)"] = predict(cfg_file, model, base, work / "c")
    lines = [args.note, ""] if args.note else []
    what = f"{len(names)} test1 images, {Path(args.config).name}, {cfg.models[0].arch}"
    lines += [f"{what}; each run a fresh process", ""]
    lines += ["| run | wall s | scored | reused | removed |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        scored = "killed" if r.get("killed") else r["scored"]
        lines.append(f"| {name} | {r['wall_s']:.1f} | {scored} | {r.get('reused', '')} | {r.get('removed', '')} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = json.dumps({"note": args.note, "runs": rows}, indent=2) + "\n"
    (out / f"resume-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(result)
    (out / "resume.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
