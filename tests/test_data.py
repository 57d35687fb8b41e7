"""Ray Data ingestion: layouts, labels, ids, the deterministic split, decoding and bad files."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, write_image
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from catdog.data import image_dataset, load_split, split_rows
from catdog.images import DataError, decode_image, id_from_path, label_from_path, list_images
from catdog.presets import EvalPreset, TrainPreset
from catdog.storage import Storage
from catdog.training import Collate

STORAGE = Storage()


@pytest.mark.parametrize(
    "path,label",
    [
        ("/d/cat.12.jpg", 0),
        ("/d/dog.0.jpg", 1),
        ("/d/Dog.7.JPG", 1),
        ("/d/cats/x.png", 0),
        ("/d/dogs/y.jpeg", 1),
        ("/d/cat/z.jpg", 0),
        ("/d/dog/w.JPEG", 1),
        ("/d/readme.jpg", None),
        ("/d/bird.7.jpg", None),
        ("/d/cats/dog.3.jpg", 1),  # the Kaggle name wins over the folder
    ],
)
def test_label_from_path(path, label):
    assert label_from_path(path) == label


@pytest.mark.parametrize(
    "path,id_", [("/t/123.jpg", 123), ("/t/5000.JPG", 5000), ("/t/a1.jpg", None), ("/t/cat.1.jpg", None)]
)
def test_id_from_path(path, id_):
    assert id_from_path(path) == id_


def test_listing_ignores_hidden_and_non_image_files(kaggle_folder):
    (kaggle_folder / ".cache").mkdir()
    (kaggle_folder / ".cache" / "cat.99.jpg").write_bytes(jpeg_bytes())
    write_image(kaggle_folder / "CAT.100.JPEG")
    names = [p.rsplit("/", 1)[1] for p in list_images(STORAGE, str(kaggle_folder))]
    assert len(names) == 41
    assert "CAT.100.JPEG" in names and "notes.txt" not in names and ".hidden.jpg" not in names
    assert "cat.99.jpg" not in names


def test_class_folder_layout(tmp_path):
    for i in range(6):
        write_image(tmp_path / "cats" / f"c{i}.jpg")
        write_image(tmp_path / "dogs" / f"d{i}.png", fmt="PNG")
    split = load_split(STORAGE, str(tmp_path), val_fraction=0.5, seed=0)
    assert split.class_counts(split.train) == {"cat": 3, "dog": 3}
    assert split.class_counts(split.val) == {"cat": 3, "dog": 3}


def test_split_is_deterministic_stratified_and_order_independent():
    paths = [f"/d/{k}.{i}.jpg" for k in ("cat", "dog") for i in range(500)]
    a = split_rows(paths, 0.2, seed=3)
    shuffled = paths[:]
    random.Random(1).shuffle(shuffled)
    b = split_rows(shuffled, 0.2, seed=3)
    key = lambda rows: sorted(r["path"] for r in rows)  # noqa: E731
    assert key(a.val) == key(b.val) and key(a.train) == key(b.train)
    assert a.class_counts(a.val) == {"cat": 100, "dog": 100}
    assert not set(key(a.val)) & set(key(a.train))
    assert key(split_rows(paths, 0.2, seed=4).val) != key(a.val)
    # The split of a file does not depend on the folder it was listed from.
    moved = split_rows([p.replace("/d/", "/elsewhere/") for p in paths], 0.2, seed=3)
    assert sorted(r["path"].rsplit("/", 1)[1] for r in moved.val) == sorted(r["path"].rsplit("/", 1)[1] for r in a.val)


def test_limit_keeps_classes_balanced():
    paths = [f"/d/{k}.{i}.jpg" for k in ("cat", "dog") for i in range(100)]
    split = split_rows(paths, 0.25, seed=0, limit=40)
    assert split.class_counts(split.train + split.val) == {"cat": 20, "dog": 20}


def test_one_class_or_empty_folder_fails_with_one_line(tmp_path):
    for i in range(4):
        write_image(tmp_path / "only" / f"cat.{i}.jpg")
    with pytest.raises(DataError, match=r"no labelled dog images found \(4 cat, 0 dog\)"):
        load_split(STORAGE, str(tmp_path / "only"), 0.25, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no labelled cat or dog images found"):
        load_split(STORAGE, str(tmp_path / "empty"), 0.25, 0)
    with pytest.raises(DataError, match="image folder not found"):
        load_split(STORAGE, str(tmp_path / "missing"), 0.25, 0)


def test_unlabeled_names_are_skipped_with_a_warning(kaggle_folder, caplog):
    write_image(kaggle_folder / "readme.jpg")
    write_image(kaggle_folder / "bird.7.jpg")
    split = load_split(STORAGE, str(kaggle_folder), 0.25, 0)
    assert len(split.train) + len(split.val) == 40
    assert "readme.jpg" in caplog.text and "bird.7.jpg" in caplog.text


def encode(image: Image.Image, fmt="PNG", **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16", "I", "1"])
def test_every_colour_mode_decodes_to_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I" else "PNG")
    image = Image.new(mode, (40, 30))
    data = encode(image, fmt)
    out = decode_image(data, EvalPreset(24))
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8


def test_sixteen_bit_greyscale_keeps_its_contrast():
    array = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (64, 1))
    out = decode_image(encode(Image.fromarray(array)), EvalPreset(32, crop_fraction=1.0))
    assert out[..., 0].min() < 20 and out[..., 0].max() > 235


def test_exif_orientation_is_honoured():
    # A 60x20 landscape stored with "rotate 90" must come out portrait: red on top, blue at the bottom.
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 30, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data, EvalPreset(20, crop_fraction=1.0))
    upright = Image.open(io.BytesIO(data))
    assert upright.size == (60, 20)
    assert out[0, 10, 0] > 200 and out[-1, 10, 2] > 200  # red top row, blue bottom row after rotation


def test_huge_jpeg_decodes_small_without_full_size_buffer(monkeypatch):
    data = encode(Image.new("RGB", (6000, 4500), (10, 120, 10)), "JPEG", quality=50)
    sizes: dict[str, tuple] = {}
    real_draft, real_reduce = JpegImagePlugin.JpegImageFile.draft, Image.Image.reduce

    def draft(self, mode, size):
        result = real_draft(self, mode, size)
        sizes["draft"] = self.size  # what the JPEG decoder will produce
        return result

    def reduce(self, factor, box=None):
        out = real_reduce(self, factor, box)
        sizes["reduce"] = out.size
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    monkeypatch.setattr(Image.Image, "reduce", reduce)
    preset = EvalPreset(64)
    out = decode_image(data, preset)
    assert out.shape == (64, 64, 3) and abs(int(out[32, 32, 1]) - 120) < 10
    # The decoder ran at 1/8 scale (never at 6000x4500), then reduce() brought it near the preset's size.
    assert sizes["draft"] == (750, 563)
    assert preset.source_size <= min(sizes["reduce"]) < 4 * preset.source_size


def test_tiny_image_and_png_bytes_under_jpg_name():
    assert decode_image(encode(Image.new("RGB", (1, 1), (255, 0, 0))), EvalPreset(16)).shape == (16, 16, 3)


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"", ValueError, "empty file"),
        (b"<html>not an image</html>", UnidentifiedImageError, "cannot identify image file"),
        (jpeg_bytes()[:200], OSError, "Truncated File Read"),
    ],
    ids=["empty", "html", "truncated"],
)
def test_undecodable_bytes_raise(data, error, message):
    with pytest.raises(error, match=message):  # the dataset turns it into an error row with this text
        decode_image(data, EvalPreset(16))


def test_train_preset_augments_and_eval_preset_is_deterministic():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    data = encode(image)
    rng = np.random.default_rng(1)
    train = [decode_image(data, TrainPreset(32), rng) for _ in range(4)]
    evals = [decode_image(data, EvalPreset(32)) for _ in range(2)]
    assert any(not np.array_equal(train[0], t) for t in train[1:])
    assert np.array_equal(evals[0], evals[1])


def rows_of(ds) -> list[dict]:
    """Collect a small test dataset batch by batch (never ``take_all``)."""
    rows = []
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
        for i in range(len(batch["path"])):
            rows.append({k: v[i] for k, v in batch.items()})
    return rows


@pytest.mark.slow
def test_dataset_keeps_corrupt_files_as_error_rows(kaggle_folder, ray_session):
    (kaggle_folder / "cat.900.jpg").write_bytes(jpeg_bytes()[:100])
    (kaggle_folder / "dog.901.jpg").write_bytes(b"")
    (kaggle_folder / "dog.902.jpg").write_text("<html>")
    (kaggle_folder / "dog.903.jpg").write_bytes(encode(Image.new("RGB", (30, 30))))  # PNG bytes, .jpg name
    rows = [{"path": p, "label": label_from_path(p)} for p in list_images(STORAGE, str(kaggle_folder))]
    kept = rows_of(image_dataset(STORAGE, rows, EvalPreset(24), batch_size=8))
    errors = {r["path"].rsplit("/", 1)[1]: r["error"] for r in kept if r["error"]}
    assert len(kept) == 44
    assert set(errors) == {"cat.900.jpg", "dog.901.jpg", "dog.902.jpg"}
    assert "empty file" in errors["dog.901.jpg"]
    assert all(r["image"].shape == (24, 24, 3) for r in kept)
    dropped = rows_of(image_dataset(STORAGE, rows, EvalPreset(24), batch_size=8, drop_errors=True, threads=2))
    assert len(dropped) == 41 and not any(r["error"] for r in dropped)


@pytest.mark.slow
def test_real_train_folder_through_ray_data(data_dir, ray_session):
    split = load_split(STORAGE, str(data_dir / "train"), val_fraction=0.2, seed=0)
    everything = split.train + split.val
    assert len(everything) == 16000
    assert split.class_counts(everything) == {"cat": 8000, "dog": 8000}
    assert split.class_counts(split.val) == {"cat": 1600, "dog": 1600}
    train_paths, val_paths = {r["path"] for r in split.train}, {r["path"] for r in split.val}
    assert not train_paths & val_paths and len(train_paths | val_paths) == 16000
    # Listing and splitting cover all 16,000; decoding every 16th (1,000 images, both classes) is enough
    # to show that every real file decodes through Ray Data, at a sixteenth of the time.
    sample = sorted(everything, key=lambda r: r["path"])[::16]
    ds = image_dataset(STORAGE, sample, EvalPreset(64), batch_size=128, drop_errors=True)
    rows, labels, seen, collate = 0, 0, set(), Collate()
    for batch in ds.iter_torch_batches(batch_size=512, collate_fn=collate):
        assert batch["image"].dtype == torch.uint8 and tuple(batch["image"].shape[1:]) == (64, 64, 3)
        assert batch["label"].dtype == torch.int64
        paths = collate.paths(batch)
        rows += len(paths)
        labels += int(batch["label"].sum())
        seen.update(paths)
    assert rows == len(sample) == 1000 and labels == sum(r["label"] for r in sample) == 500
    assert seen == {r["path"] for r in sample}


def test_decode_threads_split_the_rows_and_give_the_same_batch(kaggle_folder):
    from catdog.data import decode_batch

    (kaggle_folder / "dog.901.jpg").write_bytes(b"")
    paths = np.array(list_images(STORAGE, str(kaggle_folder)), dtype=object)
    presets = {"image": EvalPreset(24), "small": EvalPreset(16)}
    one = decode_batch({"path": paths, "label": np.zeros(len(paths))}, STORAGE, presets)
    three = decode_batch({"path": paths, "label": np.zeros(len(paths))}, STORAGE, presets, threads=3)
    assert len(paths) > 3 and set(one) == set(three)
    for column in one:
        np.testing.assert_array_equal(one[column], three[column])
    assert [p.rsplit("/", 1)[1] for p, e in zip(three["path"], three["error"]) if e] == ["dog.901.jpg"]
    assert three["image"].shape == (len(paths), 24, 24, 3) and three["image"][0].any()
    # more threads than rows, and a threaded batch that drops its unreadable row
    tiny = decode_batch({"path": paths[:2], "label": np.zeros(2)}, STORAGE, presets, threads=8)
    np.testing.assert_array_equal(tiny["image"], one["image"][:2])
    dropped = decode_batch({"path": paths, "label": np.zeros(len(paths))}, STORAGE, presets, True, threads=2)
    assert len(dropped["path"]) == len(paths) - 1 and not any(dropped["error"])


def operator_names(ds) -> list[str]:
    """The dataset's logical operators, source first."""
    names, op = [], ds._logical_plan.dag
    while op is not None:
        names.append(op.name)
        op = op.input_dependencies[0] if op.input_dependencies else None
    return names[::-1]


@pytest.mark.slow
def test_training_blocks_come_in_a_new_order_each_epoch_and_the_decode_streams(kaggle_folder, ray_session):
    from catdog.config import CatdogConfig
    from catdog.train_job import train_datasets

    cfg = CatdogConfig.model_validate({"data": {"train": str(kaggle_folder), "decode_batch_size": 4}})
    split = load_split(STORAGE, str(kaggle_folder), val_fraction=0.2, seed=0)
    rows = split.train
    ds = train_datasets(cfg, split, STORAGE, 24)["train"]  # what the Train workers get
    # The block shuffle is an all-to-all step: after the decode it waited for the whole epoch's decode
    # before the first batch (and held every decoded image); before it, the decode streams.
    names = operator_names(ds)
    assert names.index("RandomizeBlockOrder") < names.index("MapBatches(decode_batch)")
    epochs = [[p for b in ds.iter_batches(batch_size=4, batch_format="numpy") for p in b["path"]] for _ in range(3)]
    assert all(sorted(epoch) == sorted(r["path"] for r in rows) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1  # 8 blocks: 3 equal orders by chance ~ 1e-9
