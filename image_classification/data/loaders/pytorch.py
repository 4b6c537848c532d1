"""The "pytorch" backend: samples of a :mod:`~image_classification.data.sources` source (an ImageFolder,
TFRecord or WebDataset shards) decoded by PIL in DataLoader workers.

Three things differ from a plain ``ImageFolder`` + ``DataLoader``:

* **Unreadable samples do not end the run.** A sample that fails to read or decode (a corrupt,
  truncated or non-image file; a shard record with a CRC mismatch) is reported: each batch
  carries the skipped sample names as a third element, which :class:`DeviceLoader` collects for
  the engine (``loader.take_skipped()``). In training its place is taken by the next readable
  sample of the split (with the slot's own augmentation seed), so
  every batch stays full: ranks keep the same number of steps (a rank left with an empty batch
  would skip a step and desynchronise DDP's collectives) and BatchNorm never trains on one
  sample. In validation it is left out (each image must count once), so a batch may be smaller.
* **Augmentation is reproducible.** Each sample's random crop/flip/policy is drawn from a
  generator seeded with ``(seed, epoch, sample index)``, so a batch's content does not depend on
  ``--workers``, on which worker decoded it, or on whether the epoch was resumed mid-way.
* **Sharding is** :mod:`image_classification.data.loaders.sampling`, the same for every backend.
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import io
import logging
import weakref
from typing import Callable, Iterator, NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from image_classification import signals
from image_classification.data.contract import Backend, LoaderConfig
from image_classification.data.loaders.decode import split_crop
from image_classification.data.loaders.device import DeviceLoader
from image_classification.data.loaders.priority import WorkerInit
from image_classification.data.loaders.sampling import ShardSampler, source_sampler
from image_classification.data.loaders.transforms import Transform, open_rgb, train_transform, val_transform
from image_classification.data.sources import SampleSource, open_split

log = logging.getLogger(__name__)


class Sample(NamedTuple):
    image: torch.Tensor | None  # uint8 [3,H,W]; None when the sample could not be read or decoded
    label: int
    path: str                   # the sample's name (source.name): a path, or a shard and record
    replaces: str | None = None  # the unreadable sample whose place this one took (training)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch, well mixed so nearby keys do not correlate."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class SourceDataset(Dataset):
    """Samples of a :class:`SampleSource`, indexed by ``(epoch, index)`` (or a plain index: epoch 0).

    ``decode`` turns a binary file (the sample's bytes) into a PIL image; for training it is a
    :class:`~image_classification.data.loaders.decode.CropDecoder`, which draws the random crop itself and
    decodes no more pixels than the crop needs, so it runs under the sample's seed too.
    With ``refill`` an unreadable sample's slot is filled by the next readable one (wrapping around),
    decoded and augmented under the slot's own seed, so every rank's batches stay full.
    """

    def __init__(self, source: SampleSource, transform: Transform, seed: int,
                 decode: Callable[[io.BytesIO], Image.Image] = open_rgb, refill: bool = False):
        self.source = source
        self.transform = transform
        self.seed = seed
        self.decode = decode
        self.refill = refill

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        # The decoder and the transforms draw from torch's global CPU generator. With --workers 0 this
        # runs in the training process, whose generator (dropout, mixup) must not be reset by every
        # sample, so its state is put back afterwards. (Not torch.random.fork_rng: it probes the
        # accelerator, which a forked worker must not touch. Not torch.manual_seed: it also queues a
        # lazy seeding of every accelerator with a formatted stack trace, a large part of a small
        # sample's cost; the CPU generator alone gets the same seed.)
        seed = sample_seed(self.seed, epoch, index)
        state = torch.get_rng_state()
        try:
            found, image, replaces = index, self._decode(index, seed), None
            if image is None and self.refill:
                for offset in range(1, len(self.source)):
                    candidate = (index + offset) % len(self.source)
                    image = self._decode(candidate, seed)
                    if image is not None:
                        found, replaces = candidate, self.source.name(index)
                        break
            label, name = int(self.source.labels[found]), self.source.name(found)
            if image is None:
                return Sample(None, label, name)
            return Sample(self.transform(image), label, name, replaces)
        finally:
            torch.set_rng_state(state)

    def _decode(self, index: int, seed: int) -> Image.Image | None:
        """Sample ``index`` decoded (drawing from a generator seeded with ``seed``), or None when unreadable."""
        torch.default_generator.manual_seed(seed)
        try:
            return self.decode(io.BytesIO(self.source.read(index)))
        except Exception as error:  # noqa: BLE001 -- PIL plugins raise many types on malformed data
            log.debug("skipping unreadable sample %s: %s", self.source.name(index), error)
            return None


class EpochKeys(Sampler):
    """Yields ``(epoch, index)`` for a :class:`ShardSampler`'s indices.

    The epoch travels with each index because persistent workers hold their own copy of the
    dataset, which a ``set_epoch`` in the main process would never reach.
    """

    def __init__(self, sampler: ShardSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class Collate:
    """Stacks samples into ``(uint8 [N,3,S,S], int64 [N], skipped paths)``, leaving out failed ones.

    The batch is laid out in the run's memory format already, so the device-side conversion is a
    no-op. A batch in which every file failed has N = 0 (DeviceLoader drops it).
    """

    def __init__(self, image_size: int, memory_format: torch.memory_format):
        self.image_size = image_size
        self.memory_format = memory_format

    def __call__(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        good = [s for s in samples if s.image is not None]
        skipped = [s.path if s.image is None else s.replaces for s in samples if s.image is None or s.replaces]
        images = torch.empty((len(good), 3, self.image_size, self.image_size), dtype=torch.uint8)
        images = images.contiguous(memory_format=self.memory_format)
        for row, sample in zip(images, good):
            row.copy_(sample.image)
        labels = torch.tensor([s.label for s in good], dtype=torch.int64)
        return images, labels, skipped


def train_loader(config: LoaderConfig) -> DeviceLoader:
    transform = train_transform(config.image_size, config.interpolation, config.augmentation, config.crop_scale,
                                (config.randaugment_num_ops, config.randaugment_magnitude))
    # Draw the random crop from the file header, then decode only as many pixels as it needs.
    decode, transform = split_crop(transform)
    return _loader(config, "train", transform, decode)


def val_loader(config: LoaderConfig) -> DeviceLoader:
    transform = val_transform(config.image_size, config.val_resize_size, config.interpolation)
    return _loader(config, "val", transform)


def _loader(config: LoaderConfig, split: str, transform: Transform,
            decode: Callable[[io.BytesIO], Image.Image] = open_rgb) -> DeviceLoader:
    train = split == "train"
    source = open_split(config, split)
    sampler = source_sampler(source, config, train=train)
    batches = HeldStartLoader(
        SourceDataset(source, transform, config.seed, decode, refill=train),
        batch_size=config.batch_size,
        sampler=EpochKeys(sampler),
        collate_fn=Collate(config.image_size, config.memory_format),
        pin_memory=config.device.type == "cuda",
        # Worker base seeds come from this generator, not the global one: starting the workers
        # must not shift the training process's random stream (MixUp, dropout), or a resumed run
        # would diverge from an uninterrupted one. (Augmentation is seeded per sample anyway.)
        generator=torch.Generator().manual_seed(config.seed),
        **_worker_options(config),
    )
    return DeviceLoader(batches, device=config.device, memory_format=config.memory_format,
                        num_classes=source.num_classes,
                        class_names=list(source.class_names), sampler=sampler, description=source.describe(),
                        mean=config.mean, std=config.std)


class HeldStartLoader(DataLoader):
    """A DataLoader whose worker processes (and pin-memory thread) start with the shutdown signals
    held, so they never act on a SIGTERM/SIGINT meant for the main process (see ``signals``), and
    are stopped before the interpreter exits.

    A loader still referenced at exit (a global, a reference cycle, a library's closure) would
    otherwise meet multiprocessing's exit hook, which terminates and waits for its workers while
    PyTorch still watches them: a "worker exited unexpectedly" traceback on a good run. An exit hook
    registered after multiprocessing's runs before it and stops them the way the iterator's own
    finaliser does; it holds only a weak reference, so a loader let go earlier is freed as usual.

    Workers are forked with no garbage to inherit (:func:`_without_garbage`).
    """

    def __iter__(self):
        starting = self.num_workers > 0 and getattr(self, "_iterator", None) is None  # persistent: once
        with signals.held(), _without_garbage(starting):
            iterator = super().__iter__()
        hooked = getattr(self, "_exit_hooked", None)
        if self.num_workers > 0 and (hooked is None or hooked() is not iterator):  # persistent: once
            self._exit_hooked = weakref.ref(iterator)
            atexit.register(_stop_workers, self._exit_hooked)
        return iterator


@contextlib.contextmanager
def _without_garbage(forking: bool):
    """Collect the garbage before worker processes fork, and keep what they inherit out of their GC.

    A forked child inherits every object of the parent, garbage cycles included. If the child's GC
    collects one whose finaliser waits on threads of the parent -- a DALI ``Pipeline`` left over
    from an earlier loader joins its worker threads in ``__del__``, threads the child does not
    have -- the worker hangs and the epoch never ends (seen in a test process that had run DALI
    loaders). Collected here, such finalisers run in the parent; ``gc.freeze`` then puts what the
    worker inherits beyond its GC (it only touches its dataset and indices).
    """
    if not forking:
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _stop_workers(iterator_ref: weakref.ref) -> None:
    iterator = iterator_ref()
    if iterator is not None:
        iterator._shutdown_workers()  # what the iterator's __del__ does; idempotent


def _worker_options(config: LoaderConfig) -> dict:
    if config.workers == 0:
        return {"num_workers": 0}
    return {"num_workers": config.workers, "prefetch_factor": config.prefetch, "persistent_workers": True,
            "worker_init_fn": WorkerInit(idle=config.idle_priority)}


BACKEND = Backend("pytorch", train_loader=train_loader, val_loader=val_loader,
                  description="PIL decoding and torchvision transforms in DataLoader workers")
