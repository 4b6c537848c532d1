"""Engine specifications: LR policies, loss, accumulation, EMA, weight-decay groups."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from image_classification import models
from image_classification.data.loaders.sampling import SamplerEpochs, ShardSampler
from image_classification.engine import schedules
from image_classification.engine.ema import ModelEma, effective_decay
from image_classification.engine.losses import SmoothedCrossEntropy
from image_classification.engine.optim import OptimizerOptions, build_optimizer, parameter_groups
from image_classification.engine.trainer import TrainComponents, train_epoch
from image_classification.runtime import build_runtime


def _scheduled_lrs(policy, granularity="epoch", steps_per_epoch=1, epochs=10, **kwargs):
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = schedules.build_scheduler(optimizer, steps_per_epoch=steps_per_epoch, granularity=granularity,
                                          base=0.8, policy=policy, epochs=epochs, **kwargs)
    lrs = []
    for _ in range(epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_with_warmup_matches_formula_at_chosen_epochs():
    lrs = _scheduled_lrs("cosine", epochs=10, warmup=2, end_lr=0.1)
    assert lrs[0] == pytest.approx(0.8 * 1 / 2)
    assert lrs[1] == pytest.approx(0.8 * 2 / 2)
    for epoch in (2, 5, 9):
        expected = 0.1 + 0.5 * (1 + math.cos(math.pi * (epoch - 2) / 8)) * (0.8 - 0.1)
        assert lrs[epoch] == pytest.approx(expected)
    assert lrs[9] > 0.1  # the last epoch never reaches end_lr


def test_step_policy_uses_milestones_and_gamma():
    lrs = _scheduled_lrs("step", epochs=10, milestones=[3, 7], gamma=0.5)
    assert lrs[:3] == pytest.approx([0.8] * 3)
    assert lrs[3:7] == pytest.approx([0.4] * 4)
    assert lrs[7:] == pytest.approx([0.2] * 3)


def test_linear_policy():
    lrs = _scheduled_lrs("linear", epochs=10, warmup=0)
    assert lrs == pytest.approx([0.8 * (1 - e / 10) for e in range(10)])


def test_epoch_granularity_is_constant_within_an_epoch_and_iteration_granularity_is_not():
    per_epoch = _scheduled_lrs("cosine", steps_per_epoch=4, epochs=5)
    assert per_epoch[:4] == pytest.approx([0.8] * 4)
    assert per_epoch[4] == pytest.approx(0.5 * (1 + math.cos(math.pi / 5)) * 0.8)
    per_step = _scheduled_lrs("cosine", granularity="iteration", steps_per_epoch=4, epochs=5)
    assert per_step[2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5 / 5)) * 0.8)


def test_label_smoothing_equals_reference_formula_for_hard_and_soft_targets():
    torch.manual_seed(0)
    logits, target, eps = torch.randn(6, 5), torch.randint(0, 5, (6,)), 0.1
    log_p = logits.log_softmax(1)
    expected = ((1 - eps) * -log_p.gather(1, target[:, None]).squeeze(1) + eps * -log_p.mean(1)).mean()
    assert SmoothedCrossEntropy(eps)(logits, target) == pytest.approx(expected.item(), rel=1e-6)
    soft = torch.softmax(torch.randn(6, 5), 1)
    expected_soft = ((1 - eps) * (-log_p * soft).sum(1) + eps * -log_p.mean(1)).mean()
    assert SmoothedCrossEntropy(eps)(logits, soft) == pytest.approx(expected_soft.item(), rel=1e-6)
    assert SmoothedCrossEntropy(0.0)(logits, target) == pytest.approx(F.cross_entropy(logits, target).item())


def test_ema_update_matches_formula():
    model = nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.99)
    start = model.weight.detach().clone()
    expected = start.clone()
    for step in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        decay = min(0.99, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * model.weight.detach()
    torch.testing.assert_close(ema.module.weight, expected)
    assert effective_decay(0.99, 1000) == 0.99
    assert ema.updates == 3


def test_ema_averages_batchnorm_buffers_but_not_counters():
    model = nn.BatchNorm1d(2)
    ema = ModelEma(model, decay=0.5)
    model.train()
    model(torch.randn(8, 2) + 5)
    ema.update(model)  # first update: decay min(0.5, 1/10) = 0.1 from the initial zeros
    torch.testing.assert_close(ema.module.running_mean, 0.9 * model.running_mean)
    torch.testing.assert_close(ema.module.running_var, 0.1 * torch.ones(2) + 0.9 * model.running_var)
    assert model.running_mean.min() > 0.4  # the model's statistics really moved (momentum 0.1 of ~5)
    assert ema.module.num_batches_tracked.item() == 0


def test_batchnorm_parameters_get_no_weight_decay_by_module_type():
    model = models.get("resnet18").build(num_classes=10)
    groups = parameter_groups(model, weight_decay=1e-4, bn_weight_decay=False)
    decayed, undecayed = groups[0]["params"], groups[1]["params"]
    bn_ids = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in undecayed} == bn_ids
    downsample_bn = model.layers[1][0].downsample[1]  # named "downsample.1": no "bn" in the name
    assert id(downsample_bn.weight) in {id(p) for p in undecayed}
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))
    assert groups[1]["weight_decay"] == 0.0
    assert parameter_groups(model, 1e-4, bn_weight_decay=True)[1]["weight_decay"] == 1e-4


class _ListLoader(SamplerEpochs):
    """The Loader protocol over a fixed list of batches (one sample each, for the epoch's
    arithmetic); counts the batches handed out."""

    def __init__(self, batches):
        self.batches = batches
        self.sampler = ShardSampler(len(batches), batch_size=1, rank=0, world_size=1, seed=0, train=True)
        self.fetched = 0

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        for batch in self.batches[self.batches_trained:]:
            self.fetched += 1
            yield batch

    def take_skipped(self):
        return []


def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _parts(model, accumulation_steps=1, lr=0.5, optimizer_name="sgd"):
    optimizer = build_optimizer(model, OptimizerOptions(name=optimizer_name, momentum=0.9, weight_decay=1e-3),
                                                        lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    runtime = build_runtime(device=torch.device("cpu"), amp=False, amp_dtype=None, memory_format="nchw", tf32=False)
    return TrainComponents(model=model, module=model, optimizer=optimizer, scheduler=scheduler,
                           scaler=runtime.grad_scaler(), criterion=SmoothedCrossEntropy(0.1), runtime=runtime,
                           accumulation_steps=accumulation_steps)


def _train_one_epoch(batches, accumulation_steps, optimizer_name="sgd"):
    model = _tiny_net()
    train_epoch(_parts(model, accumulation_steps, optimizer_name=optimizer_name), _ListLoader(batches), epoch=0,
                print_freq=100)
    return model


def _batches(count, size=4):
    torch.manual_seed(3)
    return [(torch.randn(size, 3, 8, 8), torch.randint(0, 3, (size,))) for _ in range(count)]


def test_prof_n_trains_and_reports_exactly_n_batches():
    batches, model = _batches(6), _tiny_net()
    loader = _ListLoader(batches)
    outcome = train_epoch(_parts(model, lr=0.0), loader, epoch=0, print_freq=100, prof=3)
    with torch.no_grad():  # lr 0: every batch sees the initial weights
        expected = sum(SmoothedCrossEntropy(0.1)(model(x), y).item() for x, y in batches[:3]) / 3
    assert loader.fetched == 3 and outcome.batches_done == 3 and not outcome.interrupted
    assert outcome.metrics["train.loss"] == pytest.approx(expected, rel=1e-6)


def test_validate_with_prof_n_decodes_exactly_n_batches():
    from image_classification.engine.validation import Validator
    from image_classification.reporting.reporter import Reporter
    loader = _ListLoader(_batches(5))
    runtime = build_runtime(device=torch.device("cpu"), amp=False, amp_dtype=None, memory_format="nchw", tf32=False)
    validator = Validator(loader, runtime, SmoothedCrossEntropy(0.0), Reporter(None, enabled=False), topk=2, prof=2)
    metrics = validator.score(_tiny_net())
    assert loader.fetched == 2
    assert {"val.top1", "val.top2", "val.loss", "val.compute_latency"} <= set(metrics)


def test_ddp_all_reduces_once_per_optimizer_step_with_accumulation(tmp_path):
    """no_sync on every micro-batch but the last of its group: 6 micro-batches, accumulation 3,
    one gradient bucket -> 2 all-reduces (counted by a DDP communication hook)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(_tiny_net())
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(bucket.index())
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])
        model.register_comm_hook(None, counting_allreduce)
        parts = _parts(model.module, accumulation_steps=3)
        parts.model = model
        train_epoch(parts, _ListLoader(_batches(6)), epoch=0, print_freq=100)
        assert calls == [0, 0]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("optimizer_name", ["sgd", "rmsprop"])
def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch(optimizer_name):
    torch.manual_seed(1)
    images, labels = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    big = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    micro = [(images[i:i + 4], labels[i:i + 4]) for i in range(0, 16, 4)]
    reference = _train_one_epoch(big, accumulation_steps=1, optimizer_name=optimizer_name)
    accumulated = _train_one_epoch(micro, accumulation_steps=2, optimizer_name=optimizer_name)
    for a, b in zip(reference.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_short_last_accumulation_group_is_averaged_over_its_own_size():
    torch.manual_seed(2)
    images, labels = torch.randn(12, 3, 8, 8), torch.randint(0, 3, (12,))
    big = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    micro = [(images[i:i + 4], labels[i:i + 4]) for i in range(0, 12, 4)]
    reference = _train_one_epoch(big, accumulation_steps=1)
    accumulated = _train_one_epoch(micro, accumulation_steps=2)
    for a, b in zip(reference.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["cosine", "linear", "step"])
def test_a_run_shorter_than_its_warmup_is_all_warmup(policy):
    lrs = _scheduled_lrs(policy, epochs=2, warmup=8)
    assert lrs == pytest.approx([0.8 / 8, 0.8 * 2 / 8])


def test_docs_main_help_is_generated_from_the_parser(monkeypatch):
    """docs/main-help.txt must match the parser: regenerate with
    ``COLUMNS=100 python main.py --help > docs/main-help.txt``."""
    from pathlib import Path
    from image_classification import config
    monkeypatch.setenv("COLUMNS", "100")
    expected = (Path(__file__).resolve().parents[1] / "docs" / "main-help.txt").read_text()
    assert config.build_parser().format_help() == expected


def _scaler_for(argv, defaults=None):
    """(dynamic?, initial scale) of the GradScaler main.py builds for ``argv``, found by behaviour:
    an overflowing step halves a dynamic scale and leaves a fixed one."""
    from image_classification import config
    args = config.parse_args([*argv, "--data-backend", "synthetic"], defaults)
    runtime = build_runtime(device=torch.device("cpu"), amp=args.amp, amp_dtype="float16", memory_format="nchw",
                            tf32=False)
    scaler = runtime.grad_scaler(args.static_loss_scale, args.dynamic_loss_scale)
    initial = scaler.get_scale()
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scaler.scale(parameter.sum()).backward()
    parameter.grad.fill_(float("inf"))
    scaler.step(optimizer)
    scaler.update()
    assert parameter.item() == 0.0  # the overflowing step was skipped
    return scaler.get_scale() == initial / 2, initial


def test_loss_scale_flags_have_the_seed_meaning():
    assert _scaler_for(["--amp"]) == (True, 65536.0)  # neither flag: dynamic from PyTorch's default
    assert _scaler_for(["--amp", "--static-loss-scale", "256"]) == (False, 256.0)  # fixed
    assert _scaler_for(["--amp", "--dynamic-loss-scale"]) == (True, 65536.0)
    assert _scaler_for(["--amp", "--static-loss-scale", "256", "--dynamic-loss-scale"]) == (True, 256.0)


def test_amp_presets_keep_the_reference_dynamic_scale_from_128():
    import launch
    _, rest, presets = launch.split_argv(["--model", "resnet50", "--precision", "AMP", "--platform", "DGXA100",
                                          "--mode", "convergence"])
    assert _scaler_for([], presets) == (True, 128.0)
    assert _scaler_for(["--static-loss-scale", "64"], presets) == (True, 64.0)


def test_gather_checkpoints_bare_switch_keeps_all_and_gives_dir_back():
    from image_classification import config
    assert config.parse_args(["--gather-checkpoints", "/data"]).gather_checkpoints == -1
    assert config.parse_args(["--gather-checkpoints", "/data"]).data == "/data"
    assert config.parse_args(["/data", "--gather-checkpoints"]).gather_checkpoints == -1
    parsed = config.parse_args(["--gather-checkpoints", "3", "/data"])
    assert (parsed.gather_checkpoints, parsed.data) == (3, "/data")
    assert config.parse_args(["/data"]).gather_checkpoints is None  # resolved at start: 0, or the resumed run's
