"""The "dali-cpu" and "dali-gpu" backends: NVIDIA DALI pipelines (``fn`` API, ``pipeline_def``).

Training: fused decode + random crop (``fn.decoders.image_random_crop``, so only the crop window
is decoded; area ``--crop-scale``, aspect 3/4..4/3) → resize to ``[S, S]`` → optional
``--augmentation`` policy (DALI's own AutoAugment / RandAugment / TrivialAugment) → coin-flip
mirror + mean/std normalisation in ``crop_mirror_normalize``. Validation: decode → resize the
shorter side to ``val_resize_size`` → center crop + normalisation, with torchvision's size and
crop-position arithmetic, so both backends score the same pixels (up to resampling differences of
a grey level or two). EXIF orientation is ignored, as PIL does in the pytorch backend.

``dali-cpu`` runs every stage on the CPU (``device_id=None`` when the run's device is the CPU; on
a CUDA run only the last, normalising stage runs on the GPU, as in the reference); ``dali-gpu``
decodes with the "mixed" (nvJPEG) decoder and runs every later stage on the GPU.

Why the pipeline is fed from Python (``fn.external_source``) rather than by ``fn.readers.file``:
the reader shards a dataset into contiguous blocks and shuffles with its own generator, so its
per-rank sample sets, padding and epoch length would differ from the pytorch backend's, and a
mid-epoch resume would have to decode the batches it skips. (``fn.readers.tfrecord`` and
``fn.readers.webdataset`` have the same limits.) Here the sample order is
:class:`~image_classification.data.loaders.sampling.ShardSampler`'s -- the one definition every backend
uses -- and the source hands DALI the encoded bytes (``SampleSource.read``: a file, a tar member,
a TFRecord's ``image/encoded``) of exactly the batches this rank gets in this epoch, leaving out
what a mid-epoch resume says is trained. Both backends therefore see the same samples
in the same batches; reading a batch of files in the main thread costs a few milliseconds, against
the tens spent decoding it on the pipeline's threads.

One pipeline serves every epoch: at the end of an epoch the source raises ``StopIteration`` and
the pipeline is rewound (``reset``). An epoch left part-way (``--prof``, an interrupt) is drained
when the next one starts. Batches reach torch through DLPack without a copy (DALI's default,
dynamic executor reference-counts its output buffers). With ``--memory-format nhwc`` the pipeline
emits HWC, which *is* the channels_last layout, so the NCHW-shaped tensor handed on is a
``permute`` view of DALI's buffer.

Randomness comes from the pipeline seed, derived from ``--seed`` and the rank: the same seed gives
the same batches. Unlike the pytorch backend (whose draws depend on ``(seed, epoch, sample)``) the
pipeline's generator runs on across epochs, so a resumed run sees the same samples in the same
batches but different random crops.

Undecodable files: DALI aborts the whole pipeline on one. The loader catches that, decodes each
sample of the batches in flight on its own to find the culprits, and raises a one-line
:class:`UserError` naming them. (Zero-byte files never get here: ``scan_split`` drops them.)
Damaged shards stop the run the same way, with one line naming the shard: a record whose CRC does
not match when it is read, and anything indexing had to leave out (a truncated tail, a member
without a label) -- DALI cannot leave a sample out of a batch, and a silently smaller dataset is
not what the user asked for.

Signals: the pipeline is built and run with SIGTERM/SIGINT blocked (``signals.held``), so DALI's
threads inherit the block and a signal sent to the whole process group reaches only the main
thread, which finishes the step and checkpoints.

``nvidia.dali`` is imported only when one of these backends is chosen.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import types as pytypes
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from image_classification import signals
from image_classification.data.contract import (AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Backend,
                                                 LoaderConfig)
from image_classification.data.loaders import priority
from image_classification.data.loaders.sampling import SamplerEpochs, source_sampler
from image_classification.data.sources import SampleSource, ShardError, open_split
from image_classification.errors import UserError

INSTALL_HINT = "pip install nvidia-dali-cuda120"
# ``exec_dynamic`` (reference-counted outputs that torch may keep without a copy) got that name in
# DALI 1.44; older builds (such as older NGC PyTorch images ship) reject it when the pipeline is built.
MIN_DALI_VERSION = (1, 44)
_ASPECT = [3 / 4, 4 / 3]
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop, then a center-crop fallback (as DALI)
_POLICY_FILL = 0  # torchvision's policies fill uncovered pixels with black
# nvJPEG buffer preallocation for the mixed decoder, as the reference (avoids reallocations).
_DEVICE_MEMORY_PADDING = 211_025_920
_HOST_MEMORY_PADDING = 140_544_512
_SHOWN = 5
_DLPACK_PINNED = 3  # kDLCUDAHost: DALI's pinned host buffers (CPU outputs when the pipeline has a device)


# ---------------------------------------------------------------- DALI import and the backends

def import_dali(backend: str = "dali-cpu") -> pytypes.SimpleNamespace:
    """``nvidia.dali``'s pieces this module uses, or a UserError with the install command."""
    try:
        import nvidia.dali
        from nvidia.dali import fn, math, pipeline_def, types
        from nvidia.dali.tensors import TensorGPU
    except ImportError as error:
        raise UserError(f"--data-backend {backend} needs NVIDIA DALI, which cannot be imported ({error}); "
                        f"install it with `{INSTALL_HINT}`, or use --data-backend pytorch") from None
    found = nvidia.dali.__version__
    if tuple(int(part) for part in found.split(".")[:2]) < MIN_DALI_VERSION:
        needed = ".".join(map(str, MIN_DALI_VERSION))
        raise UserError(f"--data-backend {backend} needs NVIDIA DALI >= {needed} (its pipelines use exec_dynamic), "
                        f"found {found}; install it with `{INSTALL_HINT}` (requirements.txt pins the tested version)")
    return pytypes.SimpleNamespace(fn=fn, math=math, types=types, pipeline_def=pipeline_def, TensorGPU=TensorGPU)


def backend(kind: str) -> Backend:
    """The ``dali-cpu`` (``kind="cpu"``) or ``dali-gpu`` (``kind="gpu"``) backend."""
    name = f"dali-{kind}"
    import_dali(name)
    description = ("DALI: CPU decoding (fused random crop) and CPU augmentation" if kind == "cpu" else
                   "DALI: nvJPEG (mixed) decoding and GPU augmentation")
    return Backend(name, train_loader=functools.partial(DaliLoader, train=True, kind=kind),
                   val_loader=functools.partial(DaliLoader, train=False, kind=kind), description=description,
                   interpolations=INTERPOLATIONS)


# ---------------------------------------------------------------- what a pipeline does

@dataclass(frozen=True)
class PipelineSpec:
    """Everything the graph definition needs, resolved from a LoaderConfig."""

    train: bool
    image_size: int
    val_resize_size: int
    crop_scale: tuple[float, float]
    interpolation: str
    augmentation: str
    randaugment_num_ops: int
    randaugment_magnitude: int  # DALI's rand_augment has 31 magnitude bins, as torchvision's
    layout: str            # "CHW" (nchw) or "HWC" (nhwc: channels_last)
    decoder: str           # "cpu" or "mixed"
    gpu_tail: bool         # move to the GPU before crop_mirror_normalize (dali-cpu on a CUDA run)
    mean: tuple[float, ...] = IMAGENET_MEAN  # normalisation, of [0, 1] pixels (LoaderConfig's)
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def pixel_mean(self) -> list[float]:
        """crop_mirror_normalize's mean and std are of 0..255 pixels."""
        return [255.0 * m for m in self.mean]

    @property
    def pixel_std(self) -> list[float]:
        return [255.0 * s for s in self.std]

    @property
    def black(self) -> list[float]:
        """Pixel value 0, normalised: what torchvision's padding gives."""
        return [-m / s for m, s in zip(self.mean, self.std)]

    @property
    def on_gpu(self) -> bool:
        """The pipeline delivers on the GPU (its run's device is CUDA)."""
        return self.gpu_tail or self.decoder == "mixed"


def _interp(dali, name: str):
    modes = {"bilinear": dali.types.INTERP_LINEAR, "bicubic": dali.types.INTERP_CUBIC,
             "triangular": dali.types.INTERP_TRIANGULAR}
    try:
        return modes[name]
    except KeyError:
        raise UserError(f"unknown --interpolation {name!r}; choose one of: {', '.join(modes)}") from None


def _policy(dali, spec: PipelineSpec, images):
    """``--augmentation`` with DALI's implementations (they need ``enable_conditionals``)."""
    if spec.augmentation == "none":
        return images
    # DALI's warp_affine (the policies' rotate/shear/translate) offers only nearest and linear
    # filters, so those ops are bilinear whatever --interpolation says (it still applies to resizing).
    common = {"shape": [spec.image_size, spec.image_size], "fill_value": _POLICY_FILL,
              "interp_type": dali.types.INTERP_LINEAR}
    # (Called while the pipeline is built, inside _quiet_deprecations: DALI's policies still use
    # deprecated aliases such as fn.experimental.equalize.)
    from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment
    if spec.augmentation == "autoaugment":
        return auto_augment.auto_augment_image_net(images, **common)
    if spec.augmentation == "randaugment":
        return rand_augment.rand_augment(images, n=spec.randaugment_num_ops, m=spec.randaugment_magnitude, **common)
    if spec.augmentation == "trivialaugment":
        return trivial_augment.trivial_augment_wide(images, **common)
    raise UserError(f"unknown --augmentation {spec.augmentation!r}; choose one of: {', '.join(AUGMENTATIONS)}")


def _graph(dali, spec: PipelineSpec, source):
    """The pipeline: encoded bytes + labels from ``source`` → normalised images + labels."""
    fn, types = dali.fn, dali.types
    encoded, labels = fn.external_source(source=source, num_outputs=2, batch=True,
                                         dtype=[types.UINT8, types.INT64])
    # EXIF orientation is ignored, as by PIL in the pytorch backend, so both backends see the same pixels.
    decoder = {"device": spec.decoder, "output_type": types.RGB, "adjust_orientation": False}
    if spec.decoder == "mixed":
        decoder.update(device_memory_padding=_DEVICE_MEMORY_PADDING, host_memory_padding=_HOST_MEMORY_PADDING)
    interp = _interp(dali, spec.interpolation)
    size = spec.image_size
    if spec.train:
        images = fn.decoders.image_random_crop(encoded, random_area=list(spec.crop_scale),
                                               random_aspect_ratio=_ASPECT, num_attempts=_CROP_ATTEMPTS,
                                               **decoder)
        images = fn.resize(images, size=[size, size], interp_type=interp)
        images = _policy(dali, spec, images)
        crop, mirror = {}, fn.random.coin_flip(probability=0.5)
    else:
        resize, crop = _val_geometry(dali, fn.peek_image_shape(encoded, adjust_orientation=False,
                                                               dtype=types.FLOAT64), spec)
        images = fn.resize(fn.decoders.image(encoded, **decoder), interp_type=interp, **resize)
        mirror = 0
    if spec.gpu_tail:
        images = images.gpu()
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=spec.layout, mean=spec.pixel_mean,
                                      std=spec.pixel_std, mirror=mirror, **crop)
    if spec.on_gpu:
        # A CPU output of a pipeline with a device sits in pinned memory, which DLPack calls
        # kDLCUDAHost and torch.from_dlpack rejects; on the GPU it is handed over like the images.
        labels = labels.gpu()
    return images, labels


def _val_geometry(dali, shape, spec: PipelineSpec) -> tuple[dict, dict]:
    """Resize and center-crop arguments with torchvision's exact arithmetic (pytorch backend).

    torchvision resizes the shorter side to R and the longer one to ``int(R * long / short)``
    (DALI's ``resize_shorter`` would round it), and puts the crop at ``round((side - S) / 2)`` with
    Python's round-half-to-even (DALI's center rounds halves up). Computed per sample from the
    encoded image's shape, in float64.
    """
    floor, types = dali.math.floor, dali.types
    height, width = shape[0], shape[1]
    scale = spec.val_resize_size / dali.math.min(height, width)
    # The epsilon absorbs float error in side * R / side (exact sizes are at least 1 / short apart).
    new_height, new_width = floor(height * scale + 1e-6), floor(width * scale + 1e-6)
    resize = {"resize_y": dali.fn.cast(new_height, dtype=types.FLOAT),
              "resize_x": dali.fn.cast(new_width, dtype=types.FLOAT)}

    def position(side):
        # CMN's window start is trunc(pos * (side - S)): choose pos so that it lands on
        # round_half_even((side - S) / 2). A negative margin (crop larger than the image, padded)
        # keeps pos 0.5, which centres the image as torchvision's padding does.
        margin = dali.math.max(side - spec.image_size, 0.0)
        half = floor(margin / 2)
        odd_margin, odd_half = margin - 2 * half, half - 2 * floor(half / 2)
        start = half + odd_margin * odd_half
        return dali.fn.cast((start + 0.5) / dali.math.max(margin, 1.0), dtype=types.FLOAT)

    crop = {"crop": [spec.image_size, spec.image_size], "crop_pos_y": position(new_height),
            "crop_pos_x": position(new_width), "rounding": "truncate", "out_of_bounds_policy": "pad",
            "fill_values": spec.black}  # torchvision pads with black; DALI fills the normalised output
    return resize, crop


@contextlib.contextmanager
def _quiet_deprecations():
    """Drop DALI's own DeprecationWarnings (about its internals, not this code); keep the rest.

    DALI forces the "default" filter around these warnings, so an "ignore" filter cannot hide them;
    recording them can.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        yield
    for warning in caught:
        if not issubclass(warning.category, DeprecationWarning):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def pipeline_seed(seed: int, rank: int, train: bool) -> int:
    """A per-rank DALI seed from ``--seed`` (the reference used a fixed 12 + device id)."""
    digest = hashlib.blake2b(f"dali:{seed}:{rank}:{int(train)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**31 - 1)


# ---------------------------------------------------------------- feeding the pipeline

def read_encoded(source: SampleSource, index: int) -> np.ndarray:
    """Sample ``index``'s encoded bytes; a damaged or unreadable one is a one-line UserError."""
    try:
        return np.frombuffer(source.read(index), dtype=np.uint8)
    except ShardError as error:
        raise UserError(f"{error}; DALI cannot leave a sample out: repair or re-create the shard, "
                        "or use --data-backend pytorch, which skips damaged samples") from None
    except OSError as error:
        raise UserError(f"cannot read {source.name(index)}: {error.strerror or error}") from None


class Feeder:
    """The ``external_source``: one call, one batch of the planned epoch (encoded bytes, labels).

    ``in_flight`` holds the sample indices of the batches handed to DALI and not yet delivered, so a
    failed batch can be examined sample by sample. ``error`` is a sample that could not be read
    (DALI reports the callback's exception as its own RuntimeError).
    """

    def __init__(self, source: SampleSource):
        self.source = source
        self.labels = np.asarray(source.labels, dtype=np.int64)
        self.plan: list[list[int]] = []
        self.position = 0
        self.stopped = False
        self.error: UserError | None = None
        self.in_flight: collections.deque[list[int]] = collections.deque()

    def start(self, plan: list[list[int]]) -> None:
        self.plan, self.position, self.stopped, self.error = plan, 0, False, None
        self.in_flight.clear()

    def stop(self) -> None:
        """End the epoch early: the next call raises StopIteration."""
        self.stopped = True

    def __call__(self):
        if self.stopped or self.position >= len(self.plan):
            raise StopIteration
        indices = self.plan[self.position]
        self.position += 1
        self.in_flight.append(indices)
        try:
            encoded = [read_encoded(self.source, i) for i in indices]
        except UserError as error:
            self.error = error
            raise
        return encoded, self.labels[indices]


# ---------------------------------------------------------------- the loader

class DaliLoader(SamplerEpochs):
    """A :class:`~image_classification.data.contract.Loader` over one split, driving one pipeline."""

    def __init__(self, config: LoaderConfig, *, train: bool, kind: str = "cpu"):
        self.dali = import_dali(f"dali-{kind}")
        self.train = train
        self.device = _check_device(config.device, kind)
        self.idle_priority = config.idle_priority
        self.source = open_split(config, "train" if train else "val")
        if self.source.kind != "folder" and self.source.skipped:
            raise UserError(f"{self.source.skipped[0]} ({len(self.source.skipped)} sample(s) left out while indexing "
                            f"{self.source.location}); DALI cannot skip samples: repair or re-create the shard, "
                            "or use --data-backend pytorch, which skips them")
        self.num_classes = self.source.num_classes
        self.class_names = list(self.source.class_names)
        self.description = self.source.describe()
        self.batch_size = config.batch_size
        self.sampler = source_sampler(self.source, config, train=train)
        self.channels_last = config.memory_format == torch.channels_last
        gpu = self.device.type == "cuda"
        self.spec = PipelineSpec(
            train=train, image_size=config.image_size, val_resize_size=config.val_resize_size,
            crop_scale=tuple(config.crop_scale), interpolation=config.interpolation,
            augmentation=config.augmentation if train else "none", randaugment_num_ops=config.randaugment_num_ops,
            randaugment_magnitude=config.randaugment_magnitude, layout="HWC" if self.channels_last else "CHW",
            decoder="mixed" if kind == "gpu" else "cpu", gpu_tail=gpu and kind == "cpu",
            mean=tuple(config.mean), std=tuple(config.std))
        self.pipeline_args = {
            "batch_size": config.batch_size, "num_threads": max(1, config.workers),
            "device_id": (self.device.index if self.device.index is not None else torch.cuda.current_device())
            if gpu else None,
            "seed": pipeline_seed(config.seed, config.rank, train), "prefetch_queue_depth": max(1, config.prefetch),
            "exec_dynamic": True,  # reference-counted outputs: safe to hand to torch without a copy
        }
        self.feeder = Feeder(self.source)
        self._pipe = None
        self._running = False  # an epoch was started and not run to its end
        self._pipe = self._build()  # bad options fail now, not at the first batch

    # -- Loader protocol

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def take_skipped(self) -> list[str]:
        return []  # DALI cannot leave a file out of a batch: an unreadable one stops the run (UserError)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pipe = self._idle_pipeline()
        indices = self.sampler.indices()
        self.feeder.start([indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)])
        self._running = True
        while True:
            try:
                with self._starting_threads():  # DALI may start threads here
                    outputs = pipe.run()
            except StopIteration:
                break
            except RuntimeError as error:  # DALI aborted the pipeline; it cannot run again
                self._discard()
                raise self._failure(error) from None
            except BaseException:
                self._discard()
                raise
            self.feeder.in_flight.popleft()
            yield self._to_torch(outputs)
        pipe.reset()
        self._running = False

    # -- internals

    def _build(self):
        with _quiet_deprecations(), self._starting_threads():
            pipe = self.dali.pipeline_def(_graph)(self.dali, self.spec, self.feeder,
                                                   enable_conditionals=self.spec.augmentation != "none",
                                                   **self.pipeline_args)
            pipe.build()
        return pipe

    @contextlib.contextmanager
    def _starting_threads(self):
        """Around anything that may start DALI threads: they leave the shutdown signals to the main
        thread, and they run at idle priority when the model shares the CPU (``data.loaders.priority``)."""
        with signals.held(), priority.new_threads(self.idle_priority):
            yield

    def _discard(self) -> None:
        self._pipe, self._running = None, False

    def _idle_pipeline(self):
        """The pipeline, rewound: rebuilt after a failure, drained after an abandoned epoch."""
        if self._pipe is None:
            self._pipe = self._build()
        elif self._running:
            self.feeder.stop()
            try:
                with self._starting_threads():
                    while True:
                        self._pipe.run()  # at most prefetch_queue_depth batches already scheduled
            except StopIteration:
                self._pipe.reset()
            except RuntimeError:  # a bad file among the abandoned batches: start afresh
                self._pipe = self._build()
            self._running = False
        return self._pipe

    def _to_torch(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = (as_torch(output, self.dali, self.device) for output in outputs)
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC buffer seen as a channels_last NCHW tensor
        # Both are on self.device already (spec.on_gpu), so no asynchronous copy reads DALI's buffers.
        return images.to(self.device), labels.to(self.device)

    def _failure(self, error: BaseException) -> UserError:
        if self.feeder.error is not None:
            return self.feeder.error
        candidates = [i for batch in self.feeder.in_flight for i in batch]
        bad = undecodable(self.source, candidates, self.dali, decoder=self.spec.decoder,
                          device_id=self.pipeline_args["device_id"])
        if bad:
            shown = ", ".join(bad[:_SHOWN]) + (", ..." if len(bad) > _SHOWN else "")
            return UserError(f"DALI cannot decode {len(bad)} image(s): {shown}; remove or re-encode them, "
                             "or use --data-backend pytorch, which skips unreadable files")
        first = self.source.name(candidates[0]) if candidates else "?"
        return UserError(f"the DALI pipeline failed on a batch starting with {first}: {dali_reason(error)}")


def as_torch(output, dali, device: torch.device | None = None) -> torch.Tensor:
    """A DALI TensorList as a torch tensor sharing its memory (DLPack, no copy).

    The outputs were synchronised with the host by ``Pipeline.run()``, so a GPU tensor is ready to
    be used on any stream; ``device`` is the CUDA device the pipeline runs on.
    """
    tensor = output.as_tensor()
    if isinstance(tensor, dali.TensorGPU):
        with torch.cuda.device(device):
            return torch.from_dlpack(tensor)
    if tensor.__dlpack_device__()[0] == _DLPACK_PINNED:
        return torch.tensor(np.asarray(tensor))  # torch cannot import pinned host memory: copy it, now
    return torch.from_dlpack(tensor)


def _check_device(device: torch.device, kind: str) -> torch.device:
    if kind != "gpu" or device.type == "cuda":
        return device
    if not torch.cuda.is_available():
        raise UserError("--data-backend dali-gpu needs a CUDA GPU and none is available; "
                        "use --data-backend dali-cpu")
    raise UserError(f"--data-backend dali-gpu delivers batches on the GPU, but this run's device is {device}; "
                    "use --data-backend dali-cpu")


# ---------------------------------------------------------------- finding undecodable files

def undecodable(source: SampleSource, indices: list[int], dali, *, decoder: str = "cpu",
                device_id: int | None = None) -> list[str]:
    """The names of the samples among ``indices`` that DALI's decoder rejects, each decoded on its own."""
    bad: list[str] = []
    pipe = None
    for index in indices:
        data = read_encoded(source, index)
        if data.size == 0:
            bad.append(source.name(index))
            continue
        if pipe is None:  # a failure leaves a pipeline unusable, so build another
            pipe = dali.pipeline_def(_decode_graph)(dali, decoder, batch_size=1, num_threads=1, device_id=device_id,
                                                    exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
            with signals.held():
                pipe.build()
        try:
            with signals.held():
                pipe.run(encoded=[data])
        except RuntimeError:
            bad.append(source.name(index))
            pipe = None
    return bad


def _decode_graph(dali, decoder: str):
    encoded = dali.fn.external_source(name="encoded", dtype=dali.types.UINT8, ndim=1)
    return dali.fn.decoders.image(encoded, device=decoder, output_type=dali.types.RGB)


def dali_reason(error: BaseException) -> str:
    """The one informative line of a DALI error (they span pages, with C++ and Python traces)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines:
        after = lines[lines.index("encountered:") + 1:]
        if after:
            return after[0]
    return next((line for line in lines if not line.startswith("Critical error")), "unknown DALI error")
