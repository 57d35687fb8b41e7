"""The run report: one self-contained ``report.html`` (figures inlined) plus the PNGs beside it.

Written at the end of ``train`` and refreshed by ``predict`` and ``evaluate``; every section is
drawn from files in the run folder, so a section whose inputs do not exist yet says so.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import html
import io
import json
import logging
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catdog.calibration import clipped_log_loss, fit_ensemble_weights, fit_view_temperature, view_probs
from catdog.checkpoints import record_test_time
from catdog.config import CatdogConfig
from catdog.images import decode_image
from catdog.inference import (
    ModelRef,
    binary_metrics,
    classification_metrics,
    evaluation_rows,
    model_ref,
    predictions_dataset,
    read_columns,
    write_parquet_atomically,
)
from catdog.presets import EvalPreset
from catdog.shards import open_shard_set
from catdog.storage import Storage, basename, join

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
VAL_PREDICTIONS = "val_predictions"
VAL_STUDY = "val_study.json"
FIGURES_FILE = "figures.json"  # in report/: a digest of the data each PNG was drawn from
RUN_SUMMARY_FILE = "run_summary.json"  # wall time, machine, date: written by train
PLAN_FILE = "plan.json"  # a time-budgeted run's plan and what each part took: written by train
# Rounding in tables: seconds and rates to 0.1, every other fractional number to 4 decimals.
ONE_DECIMAL = {"train_seconds", "images_per_s", "seconds", "wall_seconds", "scoring_seconds", "minutes"}
ONE_DECIMAL |= {"budget_minutes", "allotted_minutes", "predicted_minutes", "actual_minutes"}
# Output files the report links to, relative to the run folder, when they exist.
RUN_FILES = (
    "config.yaml",
    "leaderboard.csv",
    "best.json",
    "val_study.json",
    "run_summary.json",
    "plan.json",
    "submission.csv",
    "evaluate/metrics.json",
    "mlflow.json",
    "logs/train.log",
    "logs/predict.log",
    "evaluate/logs/evaluate.log",
)
ARCH_FILES = ("metrics.csv", "result.json", "unreadable.txt")


def _read_csv(storage: Storage, uri: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_text(uri)))) if storage.exists(uri) else []


def validation_study(cfg: CatdogConfig, storage: Storage, val_rows: list[dict], shards=None) -> dict:
    """Score the held-out split with every leaderboard model; pick each model's test-time image size
    and fit its temperatures there (recorded in its checkpoint's ``meta.json``, which predict uses);
    fit the ensemble's weights; write ``val_study.json`` and return it.

    One pass per ``train.test_size_factors`` entry, however many models: every model at that
    multiple of its training size, on each image and its flip, keeping the raw margins.  The plain
    and TTA figures, both temperatures and the ensemble's figures all come from those margins, as
    predict computes probabilities from them, so they need no passes of their own (each pass costs a
    predictor start: ~15 s on a fresh GPU).  A model's size is the one with the lowest log loss in
    predict's default mode (``predict.tta``); the ensemble's weights are fitted in that mode too.  The
    best model's plain predictions are kept as Parquet for the confusion matrix and the
    most-confidently-wrong grid.  Never uses test1: these figures are on validation only.
    """
    board = _read_csv(storage, join(cfg.run_uri, "leaderboard.csv"))
    refs = [model_ref(storage, row["checkpoint"], as_trained=True) for row in board]
    rows = evaluation_rows(val_rows)
    factors = cfg.train.test_size_factors
    pass_uris = [join(cfg.run_uri, f".{VAL_PREDICTIONS}-{index}") for index in range(len(factors))]
    margins = []  # per factor: (models, views, images)
    for factor, uri in zip(factors, pass_uris):
        sized = [dataclasses.replace(ref, image_size=test_size(ref.image_size, factor)) for ref in refs]
        factor_margins, labels = margin_pass(cfg, storage, rows, shards, sized, uri)
        margins.append(factor_margins)
    mode = "tta" if cfg.predict.tta else "plain"
    sizes = [
        size_fits(ref, factors, [m[index] for m in margins], labels, cfg.predict.threshold)
        for index, ref in enumerate(refs)
    ]
    chosen = [min(fits, key=lambda fit: fit[mode]["log_loss"]) for fits in sizes]
    for ref, fit in zip(refs, chosen):
        record_test_time(storage, ref.checkpoint, test_time_record(ref, fit, len(labels)))
    picked = [margins[factors.index(fit["factor"])][index] for index, fit in enumerate(chosen)]
    plain = np.stack([view_probs(m[:1], fit["plain"]["temperature"]) for m, fit in zip(picked, chosen)])
    flipped = np.stack([view_probs(m, fit["tta"]["temperature"]) for m, fit in zip(picked, chosen)])
    study = study_figures(cfg, refs, chosen, plain, flipped, labels, mode)
    study["best"]["log_loss_uncalibrated"] = clipped_log_loss(view_probs(picked[0][:1], 1.0), labels)
    study["test_sizes"] = [{"arch": ref.arch, **fit} for ref, fits in zip(refs, sizes) for fit in fits]
    best_uri = pass_uris[factors.index(chosen[0]["factor"])]
    keep_best_predictions(cfg, storage, best_uri, chosen[0]["plain"]["temperature"], study["best"]["model"])
    for uri in pass_uris:
        storage.delete_dir(uri)
    storage.write_text(join(cfg.run_uri, VAL_STUDY), json.dumps(study, indent=2) + "\n")
    logger.info(
        "validation study (accuracy / log loss): %s; best at %d px (trained at %d), uncalibrated log loss %.4f",
        ", ".join(f"{k} {study[k]['accuracy']:.4f} / {study[k]['log_loss']:.4f}" for k in VARIANTS if k in study),
        chosen[0]["image_size"],
        refs[0].image_size,
        study["best"]["log_loss_uncalibrated"],
    )
    return study


# The study's scoring variants, as predict can run them (--tta / --no-tta, --ensemble).
VARIANTS = ("best", "best+tta", "ensemble", "ensemble+tta")


def test_size(size: int, factor: float) -> int:
    """A multiple of a training size, rounded to 8 px."""
    return max(8, round(size * factor / 8) * 8)


def size_fits(
    ref: ModelRef, factors: list[float], margins: list[np.ndarray], labels: np.ndarray, threshold: float
) -> list[dict]:
    """One model at each test size: the temperature fitted there and its accuracy (at ``threshold``)
    and log loss, plain (first view) and with flip TTA (both views).  ``margins``: per factor, (views, images)."""
    fits = []
    for factor, views in zip(factors, margins):
        fit = {"factor": factor, "image_size": test_size(ref.image_size, factor)}
        for mode, used in (("plain", views[:1]), ("tta", views)):
            temperature, loss = fit_view_temperature(used, labels)
            accuracy = float(((view_probs(used, temperature) >= threshold) == labels).mean())
            fit[mode] = {"temperature": temperature, "accuracy": accuracy, "log_loss": loss}
        fits.append(fit)
    return fits


def test_time_record(ref: ModelRef, fit: dict, n_images: int) -> dict:
    """What predict reads from ``meta.json`` ``test_time``: the size and the temperatures (plain, TTA)."""
    return {
        "image_size": fit["image_size"],
        "crop_fraction": ref.crop_fraction,
        "temperature": fit["plain"]["temperature"],
        "temperature_tta": fit["tta"]["temperature"],
        "fitted_on": f"validation study, {n_images} images",
    }


def study_figures(
    cfg: CatdogConfig,
    refs: list[ModelRef],
    chosen: list[dict],
    plain: np.ndarray,
    flipped: np.ndarray,
    labels,
    mode: str,
) -> dict:
    """Each variant's figures from the members' calibrated probabilities (models, images), with the
    ensemble's weights fitted in predict's default ``mode``."""
    threshold, best = cfg.predict.threshold, refs[0]
    name = f"{best.name}@{chosen[0]['image_size']}"
    study = {
        "best": probability_metrics(plain[0], labels, threshold, name),
        "best+tta": probability_metrics(flipped[0], labels, threshold, name + "+tta"),
    }
    for key, fit in (("best", chosen[0]["plain"]), ("best+tta", chosen[0]["tta"])):
        study[key] |= {"temperature": fit["temperature"], "image_size": chosen[0]["image_size"]}
    if len(refs) > 1:
        members = flipped if mode == "tta" else plain
        weights = fit_ensemble_weights(members, labels)
        name = "+".join(ref.name for ref, w in zip(refs, weights) if w > 0)
        study["ensemble"] = probability_metrics(weights @ plain, labels, threshold, name)
        study["ensemble+tta"] = probability_metrics(weights @ flipped, labels, threshold, name + "+tta")
        study["ensemble"]["weights"] = {ref.checkpoint: float(w) for ref, w in zip(refs, weights)}
        study["ensemble"]["members"] = [
            {
                "checkpoint": ref.checkpoint,
                "arch": ref.arch,
                "image_size": fit["image_size"],
                "temperature": fit[mode]["temperature"],
                "log_loss": clipped_log_loss(p, labels),
                "weight": float(w),
            }
            for ref, fit, p, w in zip(refs, chosen, members, weights)
        ]
    return study


def margin_pass(
    cfg: CatdogConfig, storage: Storage, rows, shards, refs: list[ModelRef], uri: str
) -> tuple[np.ndarray, np.ndarray]:
    """One pass of every model in ``refs`` over the validation rows, each image and its flip: their
    raw margins (models × 2 views × readable images) and the true labels.  Its Parquet stays at
    ``uri`` (the caller keeps the best model's part and deletes it)."""
    scored = [dataclasses.replace(ref, weight=1.0 if i == 0 else 0.0, temperature=1.0) for i, ref in enumerate(refs)]
    write_parquet_atomically(predictions_dataset(cfg, storage, rows, scored, True, shards, margins=True), storage, uri)
    margins, truth = [], []
    for batch in read_columns(storage, uri, ["member_margins", "truth", "error"]):
        batch = batch.filter(pc.is_null(batch.column("error")))
        margins.append(np.asarray(batch.column("member_margins").flatten()).reshape(-1, len(refs), 2))
        truth.append(np.asarray(batch.column("truth")))
    return np.concatenate(margins).transpose(1, 2, 0).astype(np.float64), np.concatenate(truth)


def keep_best_predictions(cfg: CatdogConfig, storage: Storage, pass_uri: str, temperature: float, model: str) -> None:
    """``val_predictions/`` (the report's figures): the best model's plain calibrated predictions, from
    the first view of the first model in the pass at its chosen size."""
    tables = []
    for batch in read_columns(storage, pass_uri, ["id", "path", "error", "truth", "member_margins"]):
        margin = np.asarray(pc.list_element(batch.column("member_margins"), 0).fill_null(0.0), np.float64)
        bad = np.asarray(pc.is_valid(batch.column("error")))
        prob = view_probs(margin[None, :], temperature).astype(np.float32)
        tables.append(
            pa.table(
                {
                    "id": batch.column("id"),
                    "path": batch.column("path"),
                    "prob_dog": pa.array(prob, mask=bad, type=pa.float32()),
                    "label": pa.array((prob >= cfg.predict.threshold).astype(np.int8), mask=bad, type=pa.int8()),
                    "model": pa.array([model] * batch.num_rows, type=pa.string()),
                    "error": batch.column("error"),
                    "truth": batch.column("truth"),
                }
            )
        )
    import ray.data

    write_parquet_atomically(ray.data.from_arrow(pa.concat_tables(tables)), storage, join(cfg.run_uri, VAL_PREDICTIONS))


def probability_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float, model: str) -> dict:
    """:func:`~catdog.inference.binary_metrics` of p(dog) ``probs`` labelled at ``threshold``."""
    return {**binary_metrics(probs, probs >= threshold, labels), "model": model}


def _figure_png(fig) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
    return out.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(histories: dict[str, list[dict]]) -> bytes:
    """Every architecture on shared axes: train loss, validation loss and validation accuracy by
    epoch, one colour per architecture across the three panels."""
    plt = _plt()
    panels = (("train_loss", "train loss"), ("val_loss", "validation loss"), ("val_acc", "validation accuracy"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharex=True)
    for index, (arch, history) in enumerate(histories.items()):
        epochs = [int(r["epoch"]) for r in history]
        for ax, (column, _) in zip(axes, panels):
            ax.plot(epochs, [float(r[column]) for r in history], "o-", color=f"C{index}", label=arch)
    from matplotlib.ticker import MaxNLocator

    axes[1].sharey(axes[0])  # both losses on one scale
    for ax, (_, title) in zip(axes, panels):
        ax.set_xlabel("epoch"), ax.set_title(title), ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend()
    data = _figure_png(fig)
    plt.close(fig)
    return data


def confusion_figure(confusion: list[list[int]], title: str) -> bytes:
    plt = _plt()
    matrix = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="black", fontsize=12)
    ax.set_xticks([0, 1], ["cat", "dog"]), ax.set_yticks([0, 1], ["cat", "dog"])
    ax.set_xlabel("predicted"), ax.set_ylabel("truth"), ax.set_title(title)
    data = _figure_png(fig)
    plt.close(fig)
    return data


def report_image_bytes(storage: Storage, train_uri: str, paths: list[str]) -> dict[str, bytes]:
    """The bytes of a few validation images.  A run trained from shards reads them from the
    shards: the folder they were packed from may be gone (or on another machine)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    shards = open_shard_set(storage, train_uri)
    if shards is None:
        return {path: storage.read_bytes(path) for path in paths}
    prefix = shards.source.rstrip("/") + "/"
    names = [path[len(prefix) :] for path in paths if path.startswith(prefix)]
    fs, _ = storage.resolve(shards.uri)
    files = [storage.resolve(uri)[1] for uri in shards.file_uris()]
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(
        columns=["name", "bytes"], filter=pc.field("name").isin(names)
    )
    return {shards.path_of(n): b for n, b in zip(table.column("name").to_pylist(), table.column("bytes").to_pylist())}


def wrong_grid_figure(storage: Storage, wrong: list[dict], images: dict[str, bytes]) -> bytes:
    plt = _plt()
    cols = 4
    rows = max(1, (len(wrong) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, wrong):
        if row["path"] in images:
            ax.imshow(decode_image(images[row["path"]], EvalPreset(128)))
        truth = "dog" if row["truth"] else "cat"
        ax.set_title(f"{basename(row['path'])}\ntruth {truth}, P(dog)={row['prob_dog']:.3f}", fontsize=8)
    data = _figure_png(fig)
    plt.close(fig)
    return data


def histogram_figure(probs: np.ndarray) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(probs, bins=40, range=(0, 1), color="tab:purple")
    ax.set_xlabel("P(dog)"), ax.set_ylabel("images"), ax.set_title(f"test predictions ({len(probs)} images)")
    data = _figure_png(fig)
    plt.close(fig)
    return data


def most_confidently_wrong(storage: Storage, predictions_uri: str, k: int = 12) -> list[dict]:
    wrong = []
    for batch in read_columns(storage, predictions_uri, ["path", "truth", "prob_dog", "error"]):
        for row in batch.to_pylist():
            if row["error"] is None and (row["prob_dog"] >= 0.5) != bool(row["truth"]):
                row["confidence"] = abs(row["prob_dog"] - 0.5)
                wrong.append(row)
                wrong = sorted(wrong, key=lambda r: -r["confidence"])[:k]
    return wrong


def rounded(column: str, value) -> str:
    """A table cell: seconds and rates to 0.1, other fractions to 4 decimals, the rest as is."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if value.strip().lstrip("-").isdigit():
            return value
        value = number
    if isinstance(value, float):
        return f"{value:.1f}" if column in ONE_DECIMAL else f"{value:.4f}"
    return "" if value is None else str(value)


def relative_link(run_uri: str, uri: str, text: str | None = None) -> str:
    """A link relative to the run folder (where report.html is) when ``uri`` is inside it; plain
    text otherwise (a report that was copied or moved keeps no link that points elsewhere)."""
    prefix = run_uri.rstrip("/") + "/"
    if not uri.startswith(prefix):
        return html.escape(text or uri)
    target = uri[len(prefix) :]
    return f"<a href='{html.escape(target)}'>{html.escape(text or target)}</a>"


def _table(rows: list[dict], columns: list[str], links: dict[str, str] | None = None) -> str:
    """``links``: column → run folder; that column's values become relative links."""
    links = links or {}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)

    def cell(row: dict, column: str) -> str:
        value = row.get(column, "")
        if column in links and value:
            return relative_link(links[column], str(value))
        return html.escape(rounded(column, value))

    body = "".join("<tr>" + "".join(f"<td>{cell(r, c)}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def headline(board: list[dict], summary: dict | None) -> str:
    """The answer first: best model, how good, how long, on what, when."""
    if not board:
        return "<p id='headline'>Not trained yet.</p>"
    best = board[0]
    parts = [
        f"Best model: <b>{html.escape(best['arch'])}</b>, validation accuracy <b>{float(best['val_acc']):.4f}</b>, "
        f"log loss <b>{float(best['val_log_loss']):.4f}</b>"
    ]
    if summary:
        machine = summary["machine"]
        gpus = f"{machine['gpus']} GPU(s)" if machine["gpus"] else "no GPU"
        workers = f"{machine['train_workers']} {'GPU' if machine['use_gpu'] else 'CPU'} train worker(s)"
        parts += [
            f"total wall time {summary['wall_seconds']:.1f} s ({summary['wall_seconds'] / 60:.1f} min)",
            f"{machine['cpus']} CPUs ({html.escape(machine['cpu_model'])}), {gpus}, "
            f"{machine['nodes']} node(s), {workers}",
            f"finished {html.escape(summary['finished_utc'])}",
        ]
    return f"<p id='headline' class='headline'>{'; '.join(parts)}.</p>"


def files_section(storage: Storage, run: str, board: list[dict]) -> str:
    """Relative links to every output file the run folder holds."""
    names = [name for name in RUN_FILES if storage.exists(join(run, name))]
    for row in board:
        names += [f"{row['arch']}/{name}" for name in ARCH_FILES if storage.exists(join(run, row["arch"], name))]
    for folder in ("predictions", VAL_PREDICTIONS, "evaluate/predictions"):
        if storage.exists(join(run, folder)):
            names.append(folder + "/")
    names += [f"{REPORT_DIR}/{basename(info.path)}" for info in storage.list_files(join(run, REPORT_DIR))]
    items = "".join(f"<li>{relative_link(run, join(run, name), name)}</li>" for name in names)
    return f"<h2 id='files'>Files</h2><ul>{items}</ul>"


def budget_section(plan: dict) -> str:
    """What each architecture got from the time budget: planned vs trained epochs, sizes, and
    predicted vs actual minutes, so a reader sees whether a model lost on merit or on budget."""
    rows = [{"part": arch, **entry} for arch, entry in plan["archs"].items()]
    rows.append({"part": "validation study", **plan["study"]})
    columns = ["part", "share", "image_sizes", "planned_epochs", "epochs", "allotted_minutes"]
    columns += ["predicted_minutes", "actual_minutes"]
    total = plan.get("actual_minutes")
    return (
        f"<h2 id='budget'>Time budget: {plan['budget_minutes']} min"
        + (f", {total} min used</h2>" if total is not None else "</h2>")
        + f"<p>speeds measured on a Train worker in {plan['measure_seconds']} s; plans re-made from the real pace</p>"
        + _table(rows, columns)
    )


class Figures:
    """The report's PNGs under ``report/``, each drawn again only when the data it shows changed.

    ``report/figures.json`` keeps a digest of each figure's data.  A refresh by predict or evaluate
    thus draws only the test histogram: the validation figures come from their PNGs, with no
    validation image read or decoded and no figure drawn again."""

    def __init__(self, storage: Storage, report_dir: str):
        self.storage, self.report_dir = storage, report_dir
        index_uri = join(report_dir, FIGURES_FILE)
        self.previous = json.loads(storage.read_text(index_uri)) if storage.exists(index_uri) else {}
        self.current: dict[str, str] = {}

    def img(self, name: str, data, draw: Callable[[], bytes]) -> str:
        """An inline ``<img>`` of ``name``: ``draw()`` unless ``data`` (what it shows: JSON values
        or numpy arrays) is what the existing PNG was drawn from."""
        digest = data_digest(data)
        uri = join(self.report_dir, name)
        if self.previous.get(name) == digest and self.storage.exists(uri):
            png = self.storage.read_bytes(uri)
        else:
            png = draw()
            self.storage.write_bytes(uri, png)
        self.current[name] = digest
        encoded = base64.b64encode(png).decode()
        return f'<img class="figure" alt="{name}" src="data:image/png;base64,{encoded}">'

    def save(self) -> None:
        self.storage.write_text(join(self.report_dir, FIGURES_FILE), json.dumps(self.current, indent=2) + "\n")


def data_digest(data) -> str:
    """A digest of JSON values and numpy arrays (by dtype, shape and bytes)."""
    digest = hashlib.sha256()

    def add(value):
        if isinstance(value, np.ndarray):
            digest.update(f"{value.dtype}{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                add(item)
            digest.update(b"]")
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode() + b";")

    add(data)
    return digest.hexdigest()[:24]


def study_section(study: dict, run: str) -> str:
    """The validation study: each variant's accuracy and log loss (the best model's also before
    calibration), each model at each test size it was tried at, and the ensemble's members with their
    temperatures and fitted weights."""
    columns = ("accuracy", "log_loss", "log_loss_uncalibrated", "image_size", "temperature", "n_images")
    rows = [{"variant": k, **{c: study[k][c] for c in columns if c in study[k]}} for k in VARIANTS if k in study]
    text = (
        "<h2 id='tta'>Test-time options on validation</h2><p>Probabilities calibrated by each model's "
        "temperature (fitted on validation); <code>log_loss_uncalibrated</code>: the model's own.</p>"
        + _table(rows, ["variant", *columns])
    )
    sizes = [
        {"arch": fit["arch"], "image_size": fit["image_size"]}
        | {
            f"{key}_{mode}": fit[mode][key]
            for mode in ("plain", "tta")
            for key in ("accuracy", "log_loss", "temperature")
        }
        for fit in study.get("test_sizes", [])
    ]
    if sizes:
        text += "<p>Test-time sizes tried (each with its own fitted temperature); predict uses each model's best:</p>"
        text += _table(sizes, list(sizes[0]))
    members = study.get("ensemble", {}).get("members")
    if members:
        text += "<p>Ensemble weights, fitted on validation log loss:</p>" + _table(
            members,
            ["arch", "image_size", "temperature", "log_loss", "weight", "checkpoint"],
            links={"checkpoint": run},
        )
    return text


def validation_sections(cfg: CatdogConfig, storage: Storage, figures: Figures) -> list[str]:
    """The confusion matrix and the most confidently wrong images of ``val_predictions/``; the
    images are read only when that grid has to be drawn again."""
    val_uri = join(cfg.run_uri, VAL_PREDICTIONS)
    if not storage.exists(val_uri):
        return ["<h2 id='confusion'>Confusion matrix</h2><p>no validation predictions yet</p>"]
    metrics = classification_metrics(storage, val_uri)
    confusion = figures.img(
        "confusion.png",
        [metrics["confusion"], metrics["model"]],
        lambda: confusion_figure(metrics["confusion"], metrics["model"]),
    )
    wrong = most_confidently_wrong(storage, val_uri)

    def wrong_grid() -> bytes:
        images = report_image_bytes(storage, cfg.data.train, [row["path"] for row in wrong])
        return wrong_grid_figure(storage, wrong, images)

    grid = figures.img("wrong.png", wrong, wrong_grid) if wrong else "<p>none wrong</p>"
    return [
        "<h2 id='confusion'>Confusion matrix (best model, validation)</h2>" + confusion,
        "<h2 id='wrong'>Most confidently wrong (validation)</h2>" + grid,
    ]


def write_report(cfg: CatdogConfig, storage: Storage) -> str:
    """Build ``<run>/report.html`` (+ ``<run>/report/*.png``) from what the run folder holds."""
    run, figures = cfg.run_uri, Figures(storage, join(cfg.run_uri, REPORT_DIR))
    board = _read_csv(storage, join(run, "leaderboard.csv"))
    summary_uri = join(run, RUN_SUMMARY_FILE)
    summary = json.loads(storage.read_text(summary_uri)) if storage.exists(summary_uri) else None
    sections = [
        headline(board, summary),
        "<h2 id='leaderboard'>Leaderboard</h2>"
        + (
            _table(
                board,
                ["arch", "val_acc", "val_log_loss", "val_log_loss_calibrated", "epochs", "best_epoch", "checkpoint"],
                links={"checkpoint": run},
            )
            if board
            else "<p>not trained yet</p>"
        ),
    ]
    histories = {row["arch"]: _read_csv(storage, join(run, row["arch"], "metrics.csv")) for row in board}
    histories = {arch: history for arch, history in histories.items() if history}
    curves = figures.img("curves.png", histories, lambda: curves_figure(histories)) if histories else ""
    sections.append("<h2 id='curves'>Training curves</h2>" + (curves or "<p>no metrics yet</p>"))
    sections += validation_sections(cfg, storage, figures)
    study_uri = join(run, VAL_STUDY)
    if storage.exists(study_uri):
        sections.append(study_section(json.loads(storage.read_text(study_uri)), run))
    evaluation_uri = join(run, "evaluate", "metrics.json")
    if storage.exists(evaluation_uri):
        evaluation = json.loads(storage.read_text(evaluation_uri))
        sections.append(
            "<h2 id='evaluate'>Evaluation</h2>"
            + _table([evaluation], ["input", "model", "accuracy", "log_loss", "n_images", "n_unreadable", "confusion"])
        )
    predictions_uri = join(run, "predictions")
    if storage.exists(predictions_uri):
        probs = np.concatenate(
            [np.zeros(0, np.float32)]
            + [b.column(0).drop_null().to_numpy() for b in read_columns(storage, predictions_uri, ["prob_dog"])]
        )
        sections.append(
            "<h2 id='histogram'>Predicted probabilities on the test set</h2>"
            + figures.img("test_histogram.png", probs, lambda: histogram_figure(probs))
        )
    else:
        sections.append("<h2 id='histogram'>Predicted probabilities on the test set</h2><p>run predict first</p>")
    figures.save()
    sections.append(
        "<h2 id='throughput'>Throughput and wall time</h2>"
        + _table(board, ["arch", "images_per_s", "train_seconds", "epochs", "image_sizes", "minutes"])
    )
    plan_uri = join(run, PLAN_FILE)
    if storage.exists(plan_uri):
        sections.append(budget_section(json.loads(storage.read_text(plan_uri))))
    sections.append(files_section(storage, run, board))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>catdog run {html.escape(cfg.run_name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px}img.figure{max-width:100%}"
        ".headline{font-size:18px;background:#f3f6fa;padding:10px 14px;border-left:4px solid #2a6ebb}</style>"
        f"</head><body><h1>catdog run <code>{html.escape(cfg.run_name)}</code></h1>"
        f"<p>{html.escape(run)}</p>{''.join(sections)}</body></html>"
    )
    uri = join(run, "report.html")
    storage.write_text(uri, page)
    return uri
