"""CUDA-only logic checked on the CPU: GPU affinity on a fake topology, per-device RNG state, one
process per GPU, fused SGD, DALI labels and version guard, ONNX Runtime's TF32, and the GPU smoke
script without a GPU."""
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from image_classification import affinity, distributed, runtime
from image_classification.data.loaders.sampling import SamplerEpochs, ShardSampler
from image_classification.engine import optim
from image_classification.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# Two sockets of 4 hyperthreaded cores: socket 0 has cores 0-3 with siblings 8-11, socket 1 has
# 4-7 with 12-15 (Linux numbers the second threads after all first ones); two GPUs per socket.
SIBLINGS = {cpu: (cpu % 8, cpu % 8 + 8) for cpu in range(16)}
GPUS = {"00000000:1A:00.0": (0, 1, 2, 3, 8, 9, 10, 11), "00000000:1B:00.0": (0, 1, 2, 3, 8, 9, 10, 11),
        "00000000:3A:00.0": (4, 5, 6, 7, 12, 13, 14, 15), "00000000:3B:00.0": (4, 5, 6, 7, 12, 13, 14, 15)}


def topology(allowed=range(16)):
    return affinity.Topology(gpu_cores=GPUS, siblings=SIBLINGS, allowed=frozenset(allowed))


def test_affinity_splits_physical_cores_never_hyperthread_siblings():
    # torch's PCI bus id spelling ("0000:1b:00.0") finds NVML's ("00000000:1B:00.0").
    choose = affinity.choose_cpus
    assert choose(topology(), "0000:1b:00.0", "socket_unique_contiguous") == [2, 3, 10, 11]
    assert choose(topology(), "0000:1a:00.0", "socket_unique_contiguous") == [0, 1, 8, 9]
    assert choose(topology(), "0000:3b:00.0", "socket_unique_contiguous") == [6, 7, 14, 15]
    assert choose(topology(), "0000:1b:00.0", "socket_unique_interleaved") == [1, 3, 9, 11]
    assert choose(topology(), "0000:1b:00.0", "socket_single_unique") == [1, 9]
    assert choose(topology(), "0000:1b:00.0", "socket_single") == [0, 8]
    assert choose(topology(), "0000:1b:00.0", "socket") == [0, 1, 2, 3, 8, 9, 10, 11]
    for mode in ("socket_unique_contiguous", "socket_unique_interleaved", "socket_single_unique"):
        shares = [set(choose(topology(), bus, mode)) for bus in GPUS]
        assert all(not a & b for i, a in enumerate(shares) for b in shares[i + 1:]), mode


def test_affinity_stays_within_the_allowed_cpus():
    # SLURM/docker may allow only part of the socket: the split is the same for every process,
    # then restricted; when nothing of the share is allowed, the allowed part of the socket is used.
    assert affinity.choose_cpus(topology({2, 3, 4}), "0000:1b:00.0", "socket_unique_contiguous") == [2, 3]
    assert affinity.choose_cpus(topology({0, 8, 5}), "0000:1b:00.0", "socket_unique_contiguous") == [0, 8]
    assert affinity.choose_cpus(topology({5}), "0000:1b:00.0", "socket") == [5]
    with pytest.raises(UserError, match="PCI bus id"):
        affinity.choose_cpus(topology(), "0000:99:00.0", "socket")


def test_set_affinity_pins_every_thread_of_the_process(monkeypatch):
    calls, started, finish = {}, threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (started.set(), finish.wait()))
    worker.start()
    started.wait()
    monkeypatch.setattr(os, "sched_setaffinity", lambda tid, cpus: calls.__setitem__(tid, list(cpus)))
    try:
        assert affinity.set_affinity("0000:3a:00.0", "socket_unique_contiguous", topology()) == [4, 5, 12, 13]
    finally:
        finish.set()
        worker.join()
    assert calls[threading.get_native_id()] == [4, 5, 12, 13]
    assert calls[worker.native_id] == [4, 5, 12, 13]  # a thread that already existed moves too


def test_checkpointed_cuda_rng_is_the_current_devices_only(monkeypatch):
    generators = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    current, restored = [1], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": generators[current[0]])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(generators.values()))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(int(state)))
    state = runtime.rng_state()
    assert torch.equal(state["cuda"], generators[1])
    # Resumed where this process sees a single GPU (torchrun -> SLURM one GPU per task).
    current[0] = 0
    runtime.set_rng_state(state, local_rank=1)
    assert restored == [1]
    # A checkpoint written with one state per visible GPU: local rank 3 of 4 used GPU 3.
    legacy = dict(state, cuda=[torch.tensor([k], dtype=torch.uint8) for k in range(4)])
    runtime.set_rng_state(legacy, local_rank=3)
    assert restored == [1, 3]


def _claim(store, rank, world_size, device_key, errors):
    try:
        distributed.check_one_process_per_device(store, distributed.DistributedContext(rank, rank, world_size),
                                                 device_key, visible=2)
        errors[rank] = None
    except UserError as error:
        errors[rank] = str(error)


@pytest.mark.parametrize("keys, shared", [(["h 0000:1a:00.0", "h 0000:1b:00.0", "g 0000:1a:00.0"], False),
                                          (["h 0000:1a:00.0", "h 0000:1b:00.0", "h 0000:1a:00.0"], True)])
def test_two_processes_on_one_gpu_stop_every_rank_with_one_line(keys, shared):
    store, errors = dist.HashStore(), {}
    threads = [threading.Thread(target=_claim, args=(store, rank, len(keys), key, errors))
               for rank, key in enumerate(keys)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if not shared:
        assert errors == {0: None, 1: None, 2: None}
        return
    assert errors[0] == errors[2] == ("ranks 0, 2 all use CUDA device 0000:1a:00.0 on h: more processes on this "
                                      "node than its 2 visible GPU(s); start at most 2 per node (--nproc_per_node) "
                                      "or give each process its own GPU (CUDA_VISIBLE_DEVICES)")
    assert "other ranks share a GPU" in errors[1]
    assert all("\n" not in error for error in errors.values())


def test_sgd_is_fused_on_cuda_and_resuming_keeps_this_runs_kernel():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    options = optim.OptimizerOptions(name="sgd", momentum=0.9, weight_decay=1e-4)
    on_cuda = optim.build_optimizer(model, options, lr=0.1, device=torch.device("cuda"))
    on_cpu = optim.build_optimizer(model, options, lr=0.1, device=torch.device("cpu"))
    assert [g["fused"] for g in on_cuda.param_groups] == [True, True]
    assert on_cuda._step_supports_amp_scaling  # what lets GradScaler.step skip its found_inf .item()
    assert not any(g["fused"] for g in on_cpu.param_groups)
    optim.load_optimizer_state(on_cuda, on_cpu.state_dict())  # a checkpoint written on the CPU
    assert [g["fused"] for g in on_cuda.param_groups] == [True, True]
    rmsprop = optim.build_optimizer(model, optim.OptimizerOptions(name="rmsprop", momentum=0.9, weight_decay=0),
                                    lr=0.1, device=torch.device("cuda"))
    assert "fused" not in rmsprop.defaults  # PyTorch 2.14 has no fused RMSprop


def test_onnx_parity_on_cuda_disables_onnxruntime_tf32(monkeypatch, tmp_path):
    import onnxruntime as ort
    from image_classification.deploy import runners
    sessions = []

    class Session:
        def __init__(self, path, providers):
            sessions.append(providers)

        def get_inputs(self):
            return [type("Input", (), {"name": "input"})()]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    runners.onnx_runner(str(tmp_path / "m.onnx"), torch.device("cuda", 1))
    assert sessions == [[("CUDAExecutionProvider", {"device_id": 1, "use_tf32": 0}), "CPUExecutionProvider"]]


def test_dali_older_than_1_44_is_one_line_naming_the_version(monkeypatch):
    import nvidia.dali
    from image_classification.data.loaders import dali
    monkeypatch.setattr(nvidia.dali, "__version__", "1.42.0")
    with pytest.raises(UserError, match=r"needs NVIDIA DALI >= 1\.44 .*found 1\.42\.0"):
        dali.import_dali("dali-cpu")


class PinnedHostTensor:
    """What a DALI CPU output of a pipeline with a device looks like: DLPack device kDLCUDAHost."""

    def __init__(self, array):
        self.array = array

    def __dlpack_device__(self):
        return (3, 0)

    def __dlpack__(self, **kwargs):
        raise BufferError("Unsupported device_type: 3")  # what torch.from_dlpack meets

    def __array__(self, dtype=None, copy=None):
        return self.array


def test_dali_pinned_cpu_output_is_copied_not_imported():
    from image_classification.data.loaders import dali
    labels = np.array([3, 1, 4], dtype=np.int64)
    output = type("TensorList", (), {"as_tensor": lambda self: PinnedHostTensor(labels)})()
    tensor = dali.as_torch(output, dali.import_dali())
    assert tensor.tolist() == [3, 1, 4]
    labels[0] = 9  # a copy: DALI may reuse its buffer
    assert tensor.tolist() == [3, 1, 4]


def test_dali_labels_join_the_images_on_the_gpu():
    from unittest import mock
    from image_classification.data.loaders import dali
    spec = dict(train=False, image_size=32, val_resize_size=36, crop_scale=(0.08, 1.0), interpolation="bilinear",
                augmentation="none", randaugment_num_ops=2, randaugment_magnitude=9, layout="CHW")
    for decoder, gpu_tail, on_gpu in (("mixed", False, True), ("cpu", True, True), ("cpu", False, False)):
        fake = mock.MagicMock()
        encoded, labels = mock.MagicMock(), mock.MagicMock()
        fake.fn.external_source.return_value = (encoded, labels)
        _, delivered = dali._graph(fake, dali.PipelineSpec(**spec, decoder=decoder, gpu_tail=gpu_tail), None)
        assert (delivered is labels.gpu.return_value) == on_gpu
        assert (delivered is labels) == (not on_gpu)


def test_gpu_smoke_without_cuda_prints_one_line_and_passes():
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_smoke.sh")], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["gpu smoke: no CUDA device visible; nothing to check (pass)"]


def test_step_metrics_are_read_one_interval_late_without_device_syncs(monkeypatch):
    """--print-freq 1 (the benchmark modes): no step waits for the device; each interval's record
    is written when the next interval ends, with the loss of its own step."""
    from image_classification.engine.losses import SmoothedCrossEntropy
    from image_classification.engine.trainer import TrainComponents, train_epoch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    rt = runtime.build_runtime(device=torch.device("cpu"), amp=False, amp_dtype=None, memory_format="nchw",
                               tf32=False)
    losses, syncs, logged = [], [], []

    def criterion(output, target):
        loss = SmoothedCrossEntropy(0.0)(output, target)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(runtime.Runtime, "synchronize", lambda self: syncs.append(len(losses)))
    optimizer = optim.build_optimizer(model, optim.OptimizerOptions(name="sgd", momentum=0.9, weight_decay=0),
                                                                    lr=0.1)
    parts = TrainComponents(model=model, module=model, optimizer=optimizer,
                            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                            scaler=rt.grad_scaler(1.0), criterion=criterion, runtime=rt)
    batches = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1])) for _ in range(4)]
    loader = type("Loader", (SamplerEpochs,), {"__len__": lambda self: 4, "__iter__": lambda self: iter(batches),
                                               "sampler": ShardSampler(4, batch_size=1, rank=0, world_size=1,
                                                                       seed=0, train=True)})()
    train_epoch(parts, loader, epoch=0, print_freq=1,
                log=lambda step, data: logged.append((step, len(losses), data["train.loss"])))
    assert [(step, seen) for step, seen, _ in logged] == [([0, 1], 2), ([0, 2], 3), ([0, 3], 4), ([0, 4], 4)]
    assert [loss for _, _, loss in logged] == pytest.approx(losses)
    assert syncs == [4]  # once, for the epoch's throughput
