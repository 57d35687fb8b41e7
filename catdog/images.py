"""Image files one at a time: what a name says (label, Kaggle id), a folder's listing, reading
a file's bytes and decoding them.

Both readers build on this module: the folder reader (:mod:`catdog.data`) and the Parquet shard set
(:mod:`catdog.shards`, which validates with :func:`decode_rgb`, the decoder every job uses), so a
folder and its shard set label, list and decode every image the same way.  Nothing here starts Ray.
"""

from __future__ import annotations

import io
import posixpath
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

from catdog.presets import EvalPreset, TrainPreset
from catdog.storage import Storage, is_remote, read_with_retries

CLASS_NAMES = ("cat", "dog")  # index = label: 0 = cat, 1 = dog
_FOLDER_LABELS = {"cat": 0, "cats": 0, "dog": 1, "dogs": 1}
_KAGGLE_NAME = re.compile(r"^(cat|dog)\.[^/]*$", re.IGNORECASE)
_ID_NAME = re.compile(r"^(\d+)\.[^.]+$")
# Decoded images bigger than this are reduced while decoding (JPEG draft / PIL reduce).
MAX_DECODE_PIXELS = 4096 * 4096


class DataError(Exception):
    """A data folder that cannot be used, phrased as one line."""


def label_from_path(path: str) -> int | None:
    """0 = cat, 1 = dog, from a Kaggle name (``cat.12.jpg``) or a class folder (``dogs/x.jpg``)."""
    base = posixpath.basename(path)
    match = _KAGGLE_NAME.match(base)
    if match:
        return CLASS_NAMES.index(match.group(1).lower())
    folder = posixpath.basename(posixpath.dirname(path)).lower()
    return _FOLDER_LABELS.get(folder)


# Ids are int64 (Parquet, the submission): a longer number, such as a 20-digit timestamp name, is no id.
ID_MAX = 2**63 - 1


def id_from_path(path: str) -> int | None:
    """The numeric Kaggle id of ``test1/123.jpg``, or None for other names and numbers past ``ID_MAX``."""
    match = _ID_NAME.match(posixpath.basename(path))
    value = int(match.group(1)) if match else None
    return value if value is not None and value <= ID_MAX else None


def list_images(storage: Storage, uri: str) -> list[str]:
    """Image file URIs under ``uri`` (recursively), sorted; hidden and non-image files are ignored."""
    return image_listing(storage, uri).column("path").to_pylist()


# A listing as Arrow columns: what planning, incremental reruns and Ray Data need, one column each.
LISTING_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the image's URI
        ("size", pa.int64()),
        ("version", pa.string()),  # mtime in ns (local), ETag (S3), sha256 (shard set)
        ("id", pa.int64()),  # numeric Kaggle id of "123.jpg", else null
        ("label", pa.int8()),  # 0 cat / 1 dog from the name or class folder, else null
    ]
)


def image_listing(storage: Storage, uri: str) -> pa.Table:
    """Every image under ``uri`` (recursively) as a :data:`LISTING_SCHEMA` table sorted by path;
    hidden and non-image files are left out.  Built column by column from the storage listing:
    no per-file Python object outlives the listing call."""
    if not storage.is_dir(uri):
        raise DataError(f"{uri}: image folder not found{storage.why_missing(uri)}")
    _, root = storage.resolve(uri)
    files = storage.list_versions(uri)
    relative = pc.utf8_ltrim(pc.utf8_slice_codeunits(files["path"], len(root)), "/")
    keep = pc.and_(
        pc.invert(pc.match_substring_regex(relative, r"(^|/)\.")),
        pc.match_substring_regex(files["path"], r"\.(jpg|jpeg|png)$", ignore_case=True),
    )
    files = files.filter(keep)
    paths = pc.utf8_replace_slice(files["path"], 0, 0, "s3://") if is_remote(uri) else files["path"]
    table = pa.table(
        {"path": paths, "size": files["size"], "version": files["version"], **names_to_columns(paths)},
        schema=LISTING_SCHEMA,
    )
    return table.sort_by("path")


def names_to_columns(paths: pa.ChunkedArray | pa.Array) -> dict[str, pa.Array]:
    """``id`` and ``label`` columns from paths, as :func:`id_from_path` and :func:`label_from_path` read them."""
    base = pc.replace_substring_regex(paths, r"^.*/", "")
    digits = pc.utf8_ltrim(pc.struct_field(pc.extract_regex(base, r"^(?P<id>\d+)\.[^.]+$"), [0]), "0")
    digits = pc.if_else(pc.equal(digits, ""), "0", digits)  # "000.jpg" is id 0
    # Past ID_MAX is no id (a cast would fail the whole listing): equally long numbers compare as text.
    length, most = pc.utf8_length(digits), str(ID_MAX)
    fits = pc.or_(pc.less(length, len(most)), pc.and_(pc.equal(length, len(most)), pc.less_equal(digits, most)))
    ids = pc.if_else(fits, digits, pa.scalar(None, pa.string()))
    kaggle = pc.struct_field(pc.extract_regex(base, r"(?i)^(?P<k>cat|dog)\."), [0])
    folder = pc.struct_field(pc.extract_regex(paths, r"(?i)(?:^|/)(?P<f>cats?|dogs?)/[^/]*$"), [0])
    kind = pc.utf8_lower(pc.coalesce(kaggle, folder))
    label = pc.if_else(pc.starts_with(kind, "c"), pa.scalar(0, pa.int8()), pa.scalar(1, pa.int8()))
    return {"id": pc.cast(ids, pa.int64()), "label": label}


def decode_rgb(data: bytes, source_size: int) -> Image.Image:
    """Bytes → upright RGB image, at least ``source_size`` on its short side where the source allows.
    Raises on anything that is not a usable image."""
    if not data:
        raise ValueError("empty file")
    image = Image.open(io.BytesIO(data))
    # JPEG draft decodes at 1/2, 1/4 or 1/8 scale directly: big photos never hit full size.
    if image.format == "JPEG":
        image.draft("RGB", (source_size, source_size))
    image = ImageOps.exif_transpose(image)
    if image.width * image.height > MAX_DECODE_PIXELS or min(image.size) >= 4 * source_size:
        image = image.reduce(max(1, min(image.size) // (2 * source_size)))
    return to_rgb(image)


def decode_image(data: bytes, preset: TrainPreset | EvalPreset, rng: np.random.Generator | None = None) -> np.ndarray:
    """Bytes → uint8 HWC array through ``preset``."""
    return preset(decode_rgb(data, preset.source_size), rng)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        array = np.asarray(image, dtype=np.float32)
        peak = float(array.max()) or 1.0
        image = Image.fromarray((array * (255.0 / peak)).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


_FILESYSTEMS: dict = {}


def read_uri(storage: Storage, uri: str) -> bytes:
    """Read a listed file in a Ray Data task, with retries; raise :class:`~catdog.storage.ReadError`
    if it cannot be read.  The filesystem is built once per process and storage."""
    remote = uri.startswith("s3://")
    key = (storage, remote)
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = storage.resolve(uri)[0]
    fs_path = uri[len("s3://") :] if remote else uri

    def read() -> bytes:
        with _FILESYSTEMS[key].open_input_stream(fs_path) as stream:
            return stream.read()

    return read_with_retries(uri, read, storage.endpoint if remote else None)


def error_text(exc: BaseException) -> str:
    """Why an image is unusable, in one short line that is the same on every run (no addresses)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")[:300]
