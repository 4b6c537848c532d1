"""Training-loader throughput of each data backend on the same JPEG folder, side by side.

    python benchmarks/bench_data_backends.py [--data DIR] [--batch-size 64] [--workers 2]

Every backend gets the same LoaderConfig: the ImageFolder ``DIR/train`` (by default ~1000
generated ImageNet-like JPEGs of about 400x350 px, cached under the system temp folder), the
224 px training transform (random resized crop, flip, normalisation, ``--augmentation``), batch
size, worker count (DALI: threads) and device. A backend's rate is images per second of batches
delivered to the training loop (normalised float tensors on the device), after a warm-up of a few
batches that absorbs worker start-up. Backends are measured in turns, ``--repeats`` times each,
and the best turn counts, which damps the noise of a shared machine. ``dali-gpu`` is included
when a GPU is present.

``--shards`` adds two rows per backend reading the same images from local shards
(``prepare --to webdataset`` and ``--to tfrecord``, ``--shard-mb`` MB each, written once under the
temp folder), through the same ``SampleSource`` reads the folder rows use.

``--http`` adds a streaming row per backend: the same images as WebDataset shards
(``prepare --to webdataset``, ``--shard-mb`` MB each, written once under the temp folder), served by
a local HTTP server on 127.0.0.1 and read through ``train_shards`` with an empty shard cache at
the start of every turn, so the first epoch of a turn includes the downloads. It also prints the
bare download rate (every shard fetched by ``data.remote.local_copy`` into an empty cache).
Loopback has no network latency or bandwidth limit: the row measures the streaming code path, not
a real network.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from image_classification import machine  # noqa: E402
from image_classification.data import registry, remote  # noqa: E402
from image_classification.data.contract import AUGMENTATIONS, LoaderConfig  # noqa: E402
from image_classification.data.prepare import convert  # noqa: E402
from image_classification.errors import UserError  # noqa: E402

MARKER = ".bench-jpegs.json"


def make_jpegs(root: Path, count: int, classes: int = 10, seed: int = 0) -> Path:
    """``count`` photo-like JPEGs (smooth colour fields, texture, sensor noise) of ~400x350 px.

    Written once: a marker file records the settings, and a folder with the same marker is reused.
    """
    settings = {"count": count, "classes": classes, "seed": seed}
    marker = root / MARKER
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return root
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = int(rng.integers(340, 460)), int(rng.integers(300, 400))
        coarse = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)  # a few large colour regions
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        fine = rng.normal(0, 1, (height // 4, width // 4, 1)).astype(np.float32)
        texture = np.asarray(Image.fromarray(fine[..., 0]).resize((width, height), Image.BILINEAR))[..., None]
        pixels = field + 25 * texture + rng.normal(0, 6, (height, width, 3))
        path = root / "train" / f"class{index % classes:02d}" / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    marker.write_text(json.dumps(settings))
    return root


def measure(backend: str, config: LoaderConfig, warmup: int, epochs: int) -> float:
    """Images per second of ``backend``'s training loader over ``epochs`` epochs, after ``warmup`` batches."""
    loader = registry.get(backend).train_loader(config)
    if len(loader) <= warmup:
        raise UserError(f"{len(loader)} batches per epoch: use more images or a smaller --batch-size than "
                        f"{config.batch_size} (the first {warmup} batches are warm-up)")
    images, start = 0, None
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for step, (batch, _) in enumerate(loader):
            if config.device.type == "cuda":
                torch.cuda.synchronize(config.device)
            if start is None:
                if epoch == 0 and step + 1 < warmup:
                    continue
                start = time.perf_counter()  # the clock starts when the warm-up batches are out
                continue
            images += batch.shape[0]
    return images / (time.perf_counter() - start)


def make_shards(data: Path, shard_mb: float, data_format: str = "webdataset") -> Path:
    """Shards of ``data``'s ImageFolder (written once; a finished conversion is kept)."""
    suffix = "" if data_format == "webdataset" else f"-{data_format}"
    root = Path(tempfile.gettempdir()) / f"convnets-bench-shards-{data.name}-{shard_mb:g}mb{suffix}"
    settings = convert.Settings(data_format, int(shard_mb * 1e6), None, None, 90)
    convert.write_shards(str(data), str(root / "shards"), settings, workers=os.cpu_count() or 1)
    return root


def download_rate(urls: list[str]) -> tuple[float, int]:
    """MB/s of fetching every URL once into an empty shard cache, and the bytes fetched."""
    cache = tempfile.mkdtemp(prefix="convnets-bench-cache-")
    try:
        start = time.perf_counter()
        fetched = sum(os.path.getsize(remote.local_copy(url, cache)) for url in urls)
        return fetched / 1e6 / (time.perf_counter() - start), fetched
    finally:
        shutil.rmtree(cache)  # the temporary cache this function made


def measure_http(backend: str, config: LoaderConfig, warmup: int, epochs: int) -> float:
    """:func:`measure` with a fresh, empty shard cache (removed afterwards)."""
    cache = tempfile.mkdtemp(prefix="convnets-bench-cache-")
    try:
        return measure(backend, dataclasses.replace(config, cache_dir=cache), warmup, epochs)
    finally:
        shutil.rmtree(cache)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="ImageFolder root with train/ (default: generate --images JPEGs, cached)")
    parser.add_argument("--images", type=int, default=1000, help="images to generate without --data (default: 1000)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: pytorch dali-cpu, plus dali-gpu when a GPU is present")
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers / DALI threads (default: 2)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--augmentation", default="none", choices=AUGMENTATIONS)
    parser.add_argument("--interpolation", default="bilinear", choices=("bilinear", "bicubic"))
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per turn (default: 2)")
    parser.add_argument("--warmup", type=int, default=2, help="batches left out of the timing (default: 2)")
    parser.add_argument("--repeats", type=int, default=2, help="turns per backend; the best counts (default: 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", action="store_true", help="--memory-format nhwc")
    parser.add_argument("--http", action="store_true",
                        help="add rows streaming WebDataset shards of the images from a local HTTP server")
    parser.add_argument("--shards", action="store_true",
                        help="add rows reading the images as local WebDataset and TFRecord shards")
    parser.add_argument("--shard-mb", type=float, default=64,
                        help="shard size for --shards and --http, in MB (default: 64)")
    args = parser.parse_args(argv)
    print(machine.describe(), flush=True)

    backends = args.backends or ["pytorch", "dali-cpu"] + (["dali-gpu"] if torch.cuda.is_available() else [])
    data = args.data or make_jpegs(Path(tempfile.gettempdir()) / f"convnets-bench-jpegs-{args.images}", args.images)
    config = LoaderConfig(
        data_dir=str(data), image_size=args.image_size, val_resize_size=args.image_size + 32,
        batch_size=args.batch_size, workers=args.workers, prefetch=2, interpolation=args.interpolation,
        augmentation=args.augmentation, device=torch.device(args.device), seed=0,
        memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    print(f"data {data}/train, {args.image_size} px train transform, augmentation {args.augmentation}, "
          f"batch {args.batch_size}, {args.workers} workers/threads, device {args.device}, "
          f"{os.cpu_count()} CPUs visible, best of {args.repeats} turn(s) of {args.epochs} epoch(s)", flush=True)
    with contextlib.ExitStack() as stack:
        runs = {name: (measure, config) for name in backends}
        if args.shards:
            for data_format, label in (("webdataset", "wds"), ("tfrecord", "tfrecord")):
                shard_dir = str(make_shards(Path(data), args.shard_mb, data_format) / "shards")
                shard_config = dataclasses.replace(config, data_dir=shard_dir)
                runs.update({f"{name} {label}": (measure, shard_config) for name in backends})
        if args.http:
            from tests.helpers.shard_servers import serve_http
            shards = make_shards(Path(data), args.shard_mb)
            server = stack.enter_context(serve_http(shards))
            count = len(remote.expand(str(shards / "shards" / "train-*.tar")))
            pattern = f"{server.url}/shards/train-{{000000..{count - 1:06d}}}.tar"
            rate, fetched = download_rate(remote.expand(pattern))
            print(f"http: {count} shard(s), {fetched / 1e6:.1f} MB, download into an empty cache {rate:.0f} MB/s "
                  f"({pattern})", flush=True)
            http_config = dataclasses.replace(config, data_dir=None, train_shards=pattern)
            runs.update({f"{name} http": (measure_http, http_config) for name in backends})
        best = {name: 0.0 for name in runs}
        try:
            for turn in range(args.repeats):
                for name, (timer, run_config) in runs.items():
                    rate = timer(name.split()[0], run_config, args.warmup, args.epochs)
                    print(f"  turn {turn + 1}: {name:<18} {rate:8.1f} images/s", flush=True)
                    best[name] = max(best[name], rate)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    baseline = best.get("pytorch")
    print(f"\n{'backend':<18} {'images/s':>9} {'vs pytorch':>11}")
    for name, rate in best.items():
        ratio = f"{rate / baseline:10.2f}x" if baseline else "          -"
        print(f"{name:<18} {rate:9.1f} {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
