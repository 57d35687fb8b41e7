"""Training-data ingest from S3: an image folder vs its Parquet shards, against a local moto_server.

    python bench/ingest_s3.py [--images 2000] [--size 64] [--rounds 2] [--shard-size 256] [--data DIR]

Starts ``moto_server`` on a free loopback port, uploads ``--images`` Kaggle training images (half
cats, half dogs) as a folder, packs them into shards on S3 with ``prepare_shards``, then times the
training dataset exactly as ``train_job`` builds it (``image_dataset`` with ``TrainPreset``, block
order randomised) from (a) the folder and (b) the shards, consumed in a Ray task through
``streaming_split`` as a Train worker would; rounds alternate folder / shards.  One embedded Ray
with 4 logical CPUs, as in configs/quick.yaml.  Prints images/s per round and the best of each.
Dummy credentials for the local server are set in this process's environment before Ray starts,
so the Ray workers inherit them; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_moto(port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    for _ in range(150):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except urllib.error.HTTPError:
            return proc
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"moto_server did not start; see {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--decode-batch-size", type=int, default=64)
    parser.add_argument("--data", default=os.environ.get("CATDOG_DATA", str(REPO.parent / "shared/data/dogs-vs-cats")))
    args = parser.parse_args()

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS"):
        os.environ.pop(key, None)
    work = Path(tempfile.mkdtemp(prefix="catdog-ingest-s3-"))
    moto = start_moto(port, work / "moto.log")
    try:
        import pyarrow.fs as pafs
        import ray

        from catdog.data import image_dataset, load_split
        from catdog.presets import TrainPreset
        from catdog.shards import prepare_shards
        from catdog.storage import Storage

        endpoint = f"http://127.0.0.1:{port}"
        storage = Storage(endpoint_url=endpoint)
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
        fs.create_dir("bench")
        half = args.images // 2
        names = [f"{kind}.{i}.jpg" for kind in ("cat", "dog") for i in range(half)]
        start = time.perf_counter()
        local = pafs.LocalFileSystem()
        total_bytes = 0
        for name in names:
            with local.open_input_stream(f"{args.data}/train/{name}") as src:
                data = src.read()
            total_bytes += len(data)
            with fs.open_output_stream(f"bench/folder/train/{name}") as dst:
                dst.write(data)
        print(
            f"uploaded {len(names)} images ({total_bytes / 1e6:.1f} MB) in {time.perf_counter() - start:.1f}s",
            flush=True,
        )

        ray.init(num_cpus=4, log_to_driver=False)
        start = time.perf_counter()
        report = prepare_shards(storage, "s3://bench/folder/train", "s3://bench/shards/train", args.shard_size)
        print(f"{report.line()} in {time.perf_counter() - start:.1f}s", flush=True)

        @ray.remote(num_cpus=0)
        def consume(shard, batch_size: int) -> int:
            n = 0
            for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
                n += len(batch["label"])
            return n

        def timed(uri: str) -> tuple[int, float, float]:
            start = time.perf_counter()
            split = load_split(storage, uri, val_fraction=0.2, seed=0)  # driver: names only
            listed = time.perf_counter() - start
            ds = image_dataset(
                storage, split.train, TrainPreset(args.size), batch_size=args.decode_batch_size, shards=split.shards
            ).randomize_block_order()
            shard = ds.streaming_split(1)[0]
            n = ray.get(consume.remote(shard, 64))
            return n, time.perf_counter() - start, listed

        results: dict[str, list[float]] = {"folder": [], "shards": []}
        for round_ in range(1, args.rounds + 1):
            for kind, uri in (("folder", "s3://bench/folder/train"), ("shards", "s3://bench/shards/train")):
                n, seconds, listed = timed(uri)
                results[kind].append(n / seconds)
                print(
                    f"round {round_} {kind:6s}: {n} train images in {seconds:.1f}s "
                    f"(listing {listed:.2f}s) = {n / seconds:.0f} img/s",
                    flush=True,
                )
        folder, shards = max(results["folder"]), max(results["shards"])
        print(
            f"best of {args.rounds}: folder {folder:.0f} img/s, shards {shards:.0f} img/s "
            f"({shards / folder:.2f}x) at {args.size}px, 4 logical CPUs, "
            f"{os.cpu_count()} cores",
            flush=True,
        )
        ray.shutdown()
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
