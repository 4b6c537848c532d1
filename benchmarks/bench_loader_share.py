"""How much of a training epoch does the data loader cost, per backend and data format, and where does it go?

    flock -x /tmp/cpu.lock python benchmarks/bench_loader_share.py            # 128, 96, 64 px; pytorch, dali-cpu
    flock -x /tmp/cpu.lock python benchmarks/bench_loader_share.py --sizes 128 --backends pytorch --rounds 1
    python benchmarks/bench_loader_share.py --sizes 64 --backends pytorch --images 64 --copies 2 --rounds 1  # runs?

For each image size, in one invocation and in alternating rounds, ``main.py`` trains one epoch
(``--training-only --no-checkpoints --print-freq 1``, ResNet18, batch 64, ``--amp --memory-format
auto``, ``-j 2``) on 2048 JPEGs of 500x375 px (512 generated images, q90, smooth colour ramps plus
sensor noise, each linked four times; written once under the temp folder) with each data backend on
each data format (``--formats``: the JPEG folder; the same images ``prepare --to packed`` with the
shorter side capped at ``--packed-max-size``, stored raw and as JPEG q90) and with the ``synthetic``
backend (main.py without a loader). The reference is a bare loop -- the same model, optimizer,
precision, memory format (what --amp picks on this CPU), allocator settings and denormal mode
(image_classification/allocator.py and denormals.py, as main.py on the CPU), one fixed in-memory
batch, nothing else, timed the same way: the limit a loader can reach, as
``../shared/bench/bare_loop.py --compute`` measures it. Every run is a fresh process.

A run's rate is the epoch throughput from its per-iteration records: all images / the sum of the
iterations' data-wait + compute times (the first one includes starting the loader's workers, and
the bare loop's first one its warm-up). Each round's ratio to that round's bare loop is printed,
then the best of ``--rounds`` runs against the best bare loop. The ratio, rate / bare-loop rate,
is the share of the epoch left to the model (1.0: the loader costs nothing); the loader's cost is
1 - ratio (the ``synthetic`` row shows how much of it is main.py's own loop). A fresh process's
speed varies by a few % from run to run, the bare loop's too, so one round's ratio carries both.

Where the rest goes: for each format, the pytorch backend's stages are timed in this process on one
thread, on ``--breakdown-samples`` training samples -- read (the stored bytes), decode (the image,
JPEG at the reduced scale the crop allows), augmentation (the random-resized crop's resize, flip,
``--augmentation`` policy, to a uint8 tensor), collation (a batch in the run's memory format) and
transfer (to the device, float and normalised; on the CPU the conversion alone) -- in ms per batch
and as a share of the bare loop's step. On 2 cores the workers' CPU time is taken from the model's
threads, so that share, at idle priority, is roughly what the epoch loses.

Speed figures mean something only when nothing else runs: on a shared machine take the exclusive
lock, as above.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from image_classification.reporting.dllogger import read_raport  # noqa: E402

WIDTH, HEIGHT = 500, 375
MARKER = ".bench-loader-share.json"
BARE = "bare loop"
TIMM = "timm train.py folder"
FORMATS = ("folder", "packed-raw", "packed-jpeg")
STAGES = ("read", "decode", "augment", "collate", "transfer")


def make_dataset(root: Path, images: int = 512, copies: int = 4, seed: int = 0) -> Path:
    """``root/train/class{0,1}``: ``images`` distinct 500x375 JPEGs, each linked ``copies`` times.

    Written once; a folder whose marker records the same settings is reused.
    """
    settings = {"images": images, "copies": copies, "seed": seed, "size": [WIDTH, HEIGHT]}
    marker = root / MARKER
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return root
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    x, y = x / WIDTH, y / HEIGHT
    for index in range(images):
        label = index % 2
        pixels = np.empty((HEIGHT, WIDTH, 3), np.float32)
        for channel in range(3):  # a ramp in a random direction plus a low-frequency wave
            angle, phase = rng.uniform(0, 2 * np.pi, 2)
            fx, fy = rng.uniform(0.5, 3.0, 2)
            low, high = np.sort(rng.uniform(0, 255, 2))
            ramp = np.cos(angle) * x + np.sin(angle) * y
            wave = np.sin(2 * np.pi * (fx * x + fy * y) + phase)
            pixels[..., channel] = low + (high - low) * (0.5 + 0.35 * ramp + 0.15 * wave)
        pixels[..., 0] += 40.0 * label
        pixels += rng.normal(0, 12, pixels.shape)
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        source = root / "images" / f"{index:04d}.jpg"
        source.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(source, quality=90)
        for copy in range(copies):
            link = folder / f"{index:04d}_{copy}.jpg"
            if not link.exists():
                link.symlink_to(source)
    marker.write_text(json.dumps(settings))
    return root


def packed_copy(folder: Path, target: Path, encoding: str, max_size: int) -> Path:
    """``prepare --to packed`` of ``folder`` into ``target`` (JPEG at q90; kept when already there)."""
    from image_classification.data.prepare import cli as prepare  # noqa: PLC0415

    command = ["--to", "packed", "--encoding", encoding, "--max-size", str(max_size), "--quality", "90",
               str(folder), str(target)]
    if prepare.main(command) != 0:
        raise SystemExit(f"prepare {' '.join(command)} failed")
    return target


def packed_forms(folder: Path, root: Path, max_size: int) -> dict[str, Path]:
    """The folder, and its packed copies (raw, JPEG q90)."""
    return {"folder": folder, **{f"packed-{encoding}": packed_copy(folder, root / f"packed-{encoding}-{max_size}",
                                                                    encoding, max_size) for encoding in ("raw", "jpeg")}}


def stage_costs(data: Path, size: int, args) -> dict[str, float]:
    """ms per batch of each of the pytorch backend's loader stages (STAGES), one thread."""
    import io  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from image_classification import precision, runtime  # noqa: PLC0415
    from image_classification.data import sources  # noqa: PLC0415
    from image_classification.data.loaders.decode import split_crop  # noqa: PLC0415
    from image_classification.data.loaders.device import Normalize  # noqa: PLC0415
    from image_classification.data.loaders.pytorch import Collate, Sample  # noqa: PLC0415
    from image_classification.data.loaders.transforms import train_transform  # noqa: PLC0415

    torch.set_num_threads(1)
    runtime.prepare_cpu_process()  # as in main.py's process (the batch buffers reused)
    amp_dtype = precision.choose("cpu", amp=args.amp).amp_dtype  # the runs' layout, as in epoch_rate
    memory_format = precision.memory_format("auto", "cpu", "train", amp_dtype)
    source = sources.open_source(str(data), "train")
    decoder, rest = split_crop(train_transform(size, augment=args.augmentation))
    step = max(1, len(source) // args.breakdown_samples)
    seconds = dict.fromkeys(STAGES, 0.0)
    samples = []
    for index in range(0, len(source), step)[:args.breakdown_samples]:
        # (the CPU generator alone is seeded, as the loader does: torch.manual_seed costs up to ms)
        start = time.perf_counter()
        stored = source.read(index)
        read = time.perf_counter()
        torch.default_generator.manual_seed(index)
        started = time.perf_counter()
        decoder.decode(io.BytesIO(stored))  # the decode alone (and the crop's draws)
        decoded = time.perf_counter()
        torch.default_generator.manual_seed(index)
        again = time.perf_counter()
        image = rest(decoder(io.BytesIO(stored)))  # the same decode, then the crop's resize and the rest
        done = time.perf_counter()
        seconds["read"] += read - start
        seconds["decode"] += decoded - started
        seconds["augment"] += max(0.0, (done - again) - (decoded - started))
        samples.append(Sample(image, int(source.labels[index]), source.name(index)))
    per_batch = {stage: 1e3 * value * args.batch_size / len(samples) for stage, value in seconds.items()}
    collate, normalize = Collate(size, memory_format), Normalize(torch.device("cpu"), memory_format)
    batches = [samples[i:i + args.batch_size] for i in range(0, len(samples) - args.batch_size + 1, args.batch_size)]
    for batch in batches or [samples]:
        start = time.perf_counter()
        images, _, _ = collate(batch)
        collated = time.perf_counter()
        normalize(images)
        per_batch["collate"] += 1e3 * (collated - start) * args.batch_size / len(batch) / max(1, len(batches))
        per_batch["transfer"] += 1e3 * (time.perf_counter() - collated) * args.batch_size / len(batch) / max(1, len(batches))
    return per_batch


def epoch_rate(backend: str, data: Path, size: int, args) -> float:
    """Images per second of one ``main.py`` training epoch, from its per-iteration records."""
    with tempfile.TemporaryDirectory() as workspace:
        command = [sys.executable, str(ROOT / "main.py"), "--data-backend", backend, "--arch", args.arch,
                   "--image-size", str(size), "-b", str(args.batch_size), "-j", str(args.workers),
                   "--epochs", "1", "--training-only", "--no-checkpoints", "--print-freq", "1", "--seed", "0",
                   "--num-classes", "2", "--memory-format", "auto", "--device", "cpu",
                   "--workspace", workspace] + (["--amp"] if args.amp else [])
        if backend == "synthetic":
            command += ["--synthetic-epoch-size", str(args.images * args.copies)]
        else:
            command.append(str(data))
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=workspace)
        steps: dict[tuple, dict] = {}
        for record in read_raport(Path(workspace) / "experiment_raport.json"):
            step = record.get("step")
            if record.get("type") == "LOG" and isinstance(step, list) and len(step) == 2:
                steps.setdefault(tuple(step), {}).update(record["data"])
    times = [d["train.data_time"] + d["train.compute_time"] for _, d in sorted(steps.items())
             if "train.compute_time" in d]
    if not times:
        raise SystemExit(f"no per-iteration records from {backend}")
    return len(times) * args.batch_size / sum(times)


TIMM_LINE = re.compile(r"Train: \d+ \[\s*\d+/\d+.*?Time: ([\d.]+)s,\s+([\d.]+)/s")


def timm_rate(data: Path, size: int, args, amp_dtype) -> float:
    """Images per second of one epoch of timm's ``train.py`` on the JPEG folder, from its per-update
    log lines (``--log-interval 1``: the wall time between optimizer updates, data wait included, the
    first with worker start-up), the same arithmetic as ``epoch_rate`` and ``../shared/bench/parse_logs.py``."""
    with tempfile.TemporaryDirectory() as workspace:
        # --data-dir with explicit splits (the folder has no val/; timm scores the train split after the epoch)
        command = [sys.executable, str(args.timm_train), "--data-dir", str(data), "--train-split", "train",
                   "--val-split", "train", "--model", args.arch, "--num-classes", "2",
                   "--img-size", str(size), "-b", str(args.batch_size), "-j", str(args.workers), "--epochs", "1",
                   "--log-interval", "1", "--device", "cpu", "--warmup-epochs", "0",
                   "--seed", "0", "--output", workspace]
        command.append("--channels-last")  # what --memory-format auto chose on the CPU
        if amp_dtype is not None:  # as main.py --amp chose on this CPU
            command += ["--amp", "--amp-dtype", str(amp_dtype).removeprefix("torch.")]
        log = subprocess.run(command, check=True, capture_output=True, text=True, cwd=workspace)
    times, images = [], 0.0
    for match in TIMM_LINE.finditer(log.stdout + log.stderr):
        seconds, rate = float(match.group(1)), float(match.group(2))
        times.append(seconds)
        images += seconds * rate
    if not times:
        raise SystemExit(f"no per-update lines from {args.timm_train}")
    return images / sum(times)


def fixed_batch_rate(size: int, args) -> float:
    """Images per second of the bare training step on one in-memory batch, in a fresh process."""
    command = [sys.executable, __file__, "--fixed-batch", str(size), "--arch", args.arch,
               "-b", str(args.batch_size), "--images", str(args.images), "--copies", str(args.copies)]
    if not args.amp:
        command.append("--fp32")
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def run_fixed_batch(size: int, args) -> None:
    """The bare loop: as many steps as a loader epoch has, each timed from the end of the last."""
    import torch  # noqa: PLC0415 -- only this child process needs it

    from image_classification import models, precision, runtime  # noqa: PLC0415

    runtime.prepare_cpu_process()  # as main.py on the CPU: the same process conditions

    torch.manual_seed(0)
    amp_dtype = precision.choose("cpu", amp=args.amp).amp_dtype  # as main.py [--amp] --memory-format auto
    memory_format = precision.memory_format("auto", "cpu", "train", amp_dtype)
    model = models.get(args.arch).build(num_classes=2).to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    images = torch.randn(args.batch_size, 3, size, size).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 2, (args.batch_size,))
    steps = args.images * args.copies // args.batch_size
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
    print(steps * args.batch_size / (time.perf_counter() - start))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 96, 64])
    parser.add_argument("--backends", nargs="+", default=["pytorch", "dali-cpu"])
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each; the best counts (default: 2)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=512, help="distinct JPEGs (default: 512)")
    parser.add_argument("--copies", type=int, default=4, help="links to each JPEG (default: 4: 2048 per epoch)")
    parser.add_argument("--data", type=Path, default=None, help="ImageFolder root (default: generated, cached)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS,
                        help="data formats each backend reads (default: all)")
    parser.add_argument("--packed-max-size", type=int, default=160,
                        help="shorter-side cap of the packed copies (default: 160, the val resize at 128 px)")
    parser.add_argument("--breakdown-samples", type=int, default=256,
                        help="training samples timed stage by stage per format (default: 256)")
    parser.add_argument("--fp32", dest="amp", action="store_false",
                        help="train without --amp (fp32), as a CPU without native bf16 does with --amp")
    parser.add_argument("--timm-train", type=Path, default=None, metavar="TRAIN_PY",
                        help="also run timm's train.py (from a pytorch-image-models checkout; timm installed) "
                             "on the JPEG folder in every round")
    parser.add_argument("--augmentation", default="none", help=argparse.SUPPRESS)  # as main.py's default
    parser.add_argument("--fixed-batch", type=int, metavar="PX", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.fixed_batch:
        run_fixed_batch(args.fixed_batch, args)
        return 0

    from image_classification import machine, precision  # noqa: PLC0415
    print(machine.describe(), flush=True)
    chosen = precision.choose("cpu", amp=args.amp)
    # a generated folder per setting: one with other images must not be mixed into it
    root = Path(tempfile.gettempdir()) / f"convnets-bench-loader-share-{args.images}x{args.copies}"
    data = args.data or make_dataset(root, args.images, args.copies)
    every = packed_forms(data, data.with_name(f"{data.name}-packed"), args.packed_max_size)
    forms = {name: every[name] for name in args.formats}
    runs = [(BARE, None), ("synthetic", None)] + [(backend, name) for backend in args.backends for name in forms]
    if args.timm_train:
        runs.append((TIMM, None))
    amp = "--amp" if args.amp else "no --amp"
    print(f"{args.arch}, batch {args.batch_size}, {amp} ({chosen.name}), --memory-format auto, -j {args.workers}, "
          f"{data}, packed <= {args.packed_max_size} px, {os.cpu_count()} CPUs, best of {args.rounds} round(s)",
          flush=True)
    best: dict[tuple[int, str], float] = {}
    rounds: dict[tuple[int, str], list[float]] = {}  # every round's rate, in order
    for size in args.sizes:
        for turn in range(args.rounds):
            for backend, form in runs:
                label = f"{backend} {form}" if form else backend
                rate = (fixed_batch_rate(size, args) if backend == BARE else
                        timm_rate(data, size, args, chosen.amp_dtype) if backend == TIMM else
                        epoch_rate(backend, forms[form] if form else data, size, args))
                print(f"  {size:4d} px  round {turn + 1}  {label:<22} {rate:7.1f} img/s", flush=True)
                best[size, label] = max(best.get((size, label), 0.0), rate)
                rounds.setdefault((size, label), []).append(rate)
    print("\nper round, the ratio to the same round's bare loop (lowest .. highest)")
    for (size, label), rates in rounds.items():
        ratios = [rate / bare for rate, bare in zip(rates, rounds[size, BARE])]
        print(f"{size:5d}  {label:<22} " + " ".join(f"{ratio:6.3f}" for ratio in ratios)
              + f"   ({min(ratios):.3f} .. {max(ratios):.3f})")
    print(f"\n{'size':>5}  {'run':<22} {'img/s':>7}  {'ratio to bare loop':>18}")
    for size in args.sizes:
        limit = best[size, BARE]
        for label in dict.fromkeys(label for (s, label) in best if s == size):
            print(f"{size:5d}  {label:<22} {best[size, label]:7.1f}  {best[size, label] / limit:18.3f}")
    print("\nwhere a batch's loader CPU time goes (pytorch backend, one thread, ms per batch of "
          f"{args.batch_size}; share: of the bare loop's step)")
    print(f"{'size':>5}  {'format':<12} " + " ".join(f"{stage:>9}" for stage in STAGES) + f" {'total':>9} {'share':>7}")
    for size in args.sizes:
        step_ms = 1e3 * args.batch_size / best[size, BARE]
        for name, path in forms.items():
            costs = stage_costs(path, size, args)
            total = sum(costs.values())
            print(f"{size:5d}  {name:<12} " + " ".join(f"{costs[stage]:9.1f}" for stage in STAGES)
                  + f" {total:9.1f} {total / step_ms:7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
