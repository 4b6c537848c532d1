"""Large-batch training: LARS, LAMB and AdamW against hand-computed steps, the poly schedule, the LR
scaling rule, evaluation cadence, the accuracy target, exact resume with LARS and the MLPerf presets."""
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from image_classification import cli, config, flag_rules
from image_classification.checkpoints.files import read_pth
from image_classification.engine import schedules
from image_classification.engine.loop import EvalPlan
from image_classification.engine.optim import OptimizerOptions, build_optimizer
from image_classification.errors import UserError
from tests.helpers.registered import model_for_module
from image_classification.reporting.dllogger import read_raport
from image_classification.runtime import build_runtime
from tests.helpers.net import free_port

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import launch  # noqa: E402

WD, LR, MOMENTUM, ETA = 0.01, 0.5, 0.9, 0.02


class ConvBn(nn.Module):
    """A conv with bias, a BatchNorm and a linear head: one tensor of every kind the rules treat apart."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=2, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


_lars_bn_cnn = model_for_module("lars-bn-cnn", ConvBn)



def _with_grads(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=generator)
        grads[name] = p.grad.clone()
    return grads


def _norm(t: torch.Tensor) -> float:
    return math.sqrt(float((t.double() ** 2).sum()))


# ---------------------------------------------------------------------------------------------
# LARS
# ---------------------------------------------------------------------------------------------

def _lars_by_hand(w, g, v, lr, adapted: bool, wd: float, trust_clip=False):
    """One LARS step written out from the MLPerf reference (float64)."""
    w, g = w.double(), g.double()
    if adapted:
        trust = ETA * _norm(w) / (_norm(g) + wd * _norm(w))
        if trust_clip:
            trust = min(trust / lr, 1.0)
        scaled = lr * trust * (g + wd * w)
    else:
        scaled = lr * g
    v = scaled if v is None else MOMENTUM * v + scaled
    return w - v, v


@pytest.mark.parametrize("trust_clip", [False, True])
def test_lars_two_steps_match_the_published_rule_and_skip_batchnorm_and_bias(trust_clip):
    model = ConvBn()
    optimizer = build_optimizer(model, OptimizerOptions(name="lars", momentum=MOMENTUM, weight_decay=WD,
                                                        trust_coefficient=ETA, eps=0.0, trust_clip=trust_clip),
                                lr=LR)
    expected = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    velocity = dict.fromkeys(expected)
    # The LR changes between the steps (momentum holds LR-scaled updates); with LARC clipping the LRs
    # are below the layers' trust ratios, so the clip is what decides the step.
    lrs = (0.002, 0.0005) if trust_clip else (LR, LR / 4)
    clipped = []
    for step, lr in enumerate(lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        grads = _with_grads(model, seed=step)
        optimizer.step()
        for name in expected:
            adapted = name in ("conv.weight", "fc.weight")  # BatchNorm and biases: no decay, no trust ratio
            if adapted:
                w = expected[name]
                clipped.append(ETA * _norm(w) / (_norm(grads[name]) + WD * _norm(w)) > lr)
            expected[name], velocity[name] = _lars_by_hand(expected[name], grads[name], velocity[name], lr, adapted,
                                                           WD if adapted else 0.0, trust_clip)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(clipped) == trust_clip


def test_lars_bn_weight_decay_puts_batchnorm_under_decay_and_trust_ratio():
    model = ConvBn()
    optimizer = build_optimizer(model, OptimizerOptions(name="lars", momentum=0.0, weight_decay=WD,
                                                        trust_coefficient=ETA, eps=0.0, bn_weight_decay=True),
                                lr=LR)
    before = model.bn.weight.detach().double().clone()
    grad = _with_grads(model, seed=3)["bn.weight"]
    optimizer.step()
    expected, _ = _lars_by_hand(before, grad, None, LR, adapted=True, wd=WD)
    torch.testing.assert_close(model.bn.weight.detach().double(), expected, rtol=1e-5, atol=1e-7)


def test_lars_trust_ratio_is_one_for_a_zero_layer():
    model = ConvBn()
    with torch.no_grad():
        model.fc.weight.zero_()
    optimizer = build_optimizer(model, OptimizerOptions(name="lars", momentum=0.0, weight_decay=WD,
                                                        trust_coefficient=ETA),
                                lr=LR)
    grad = _with_grads(model, seed=1)["fc.weight"]
    optimizer.step()
    torch.testing.assert_close(model.fc.weight.detach(), -LR * grad)


# ---------------------------------------------------------------------------------------------
# LAMB and AdamW
# ---------------------------------------------------------------------------------------------

def _lamb_by_hand(w, grads, lr, wd, adapted, betas=(0.9, 0.999), eps=1e-6, clip_divisors=None):
    w = w.double()
    m = v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.double() / (clip_divisors[t - 1] if clip_divisors else 1.0)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        r = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        u = r + wd * w
        trust = _norm(w) / _norm(u) if adapted else 1.0
        w = w - lr * trust * u
    return w


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_lamb_two_steps_match_the_paper_with_decoupled_decay_and_exclusions(max_grad_norm):
    model = ConvBn()
    optimizer = build_optimizer(model, OptimizerOptions(name="lamb", momentum=0.0, weight_decay=WD,
                                                        max_grad_norm=max_grad_norm),
                                lr=0.01)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads, divisors = [], []
    for step in range(2):
        grads.append(_with_grads(model, seed=10 + step))
        total = math.sqrt(sum(_norm(g) ** 2 for g in grads[-1].values()))
        divisors.append(max(1.0, total / max_grad_norm) if max_grad_norm else 1.0)
        optimizer.step()
    assert divisors[0] > 1 or not max_grad_norm  # the clipping is exercised
    for name, p in model.named_parameters():
        adapted = name in ("conv.weight", "fc.weight")
        expected = _lamb_by_hand(start[name], [g[name] for g in grads], 0.01, WD if adapted else 0.0, adapted,
                                 clip_divisors=divisors)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-7, msg=name)


def test_adamw_decays_decoupled_and_spares_batchnorm_and_bias():
    model = ConvBn()
    optimizer = build_optimizer(model, OptimizerOptions(name="adamw", momentum=0.0, weight_decay=0.5), lr=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decoupled decay can move a weight
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if name in ("conv.weight", "fc.weight") else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_fp16_grad_scaler_unscales_before_the_trust_ratio(name):
    """With a loss scale of 2^12 the step must equal the unscaled fp32 step (the trust ratio and
    the decay term would differ if the optimizer saw scaled gradients)."""
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    results = []
    for scale in (None, 4096.0):
        model = ConvBn()
        optimizer = build_optimizer(model, OptimizerOptions(name=name, momentum=MOMENTUM, weight_decay=WD), lr=0.1)
        runtime = build_runtime(device=torch.device("cpu"), amp=scale is not None, amp_dtype="float16",
                                memory_format="nchw", tf32=False)
        scaler = runtime.grad_scaler(scale, dynamic=False) if scale else runtime.grad_scaler()
        loss = nn.functional.cross_entropy(model(images), labels)  # fp32 forward in both runs
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    for plain, scaled in zip(*results):
        torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "sgd", "--max-grad-norm", "1"], "--max-grad-norm clips LAMB's gradients; it needs --optimizer lamb"),
    (["--optimizer", "adamw", "--trust-clip"], "--trust-clip clips the trust ratio of --optimizer lars or lamb"),
    (["--optimizer", "lamb", "--nesterov"], "--nesterov needs --optimizer sgd or lars and --momentum > 0"),
    (["--optimizer", "sgd", "--nesterov", "--momentum", "0"], "--nesterov needs --optimizer sgd or lars and --momentum > 0"),
])
def test_optimizer_flags_that_do_not_apply_are_one_line_errors(argv, message):
    with pytest.raises(UserError) as error:
        flag_rules.check(config.parse_args(["--data-backend", "synthetic", *argv]))
    assert str(error.value) == message
    flag_rules.check(config.parse_args(["--data-backend", "synthetic", "--optimizer", "lars", "--nesterov",
                                        "--trust-clip"]))  # where they apply: accepted


# ---------------------------------------------------------------------------------------------
# Schedule, scaling rule, evaluation cadence
# ---------------------------------------------------------------------------------------------

def test_poly_schedule_with_warmup_per_iteration():
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = schedules.build_scheduler(optimizer, steps_per_epoch=4, granularity="iteration", base=2.0,
                                          policy="poly", epochs=6, warmup=2, end_lr=0.1, power=2.0)
    lrs = []
    for _ in range(24):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(2.0 * 1 / 2) and lrs[2] == pytest.approx(2.0 * 1.5 / 2)  # warmup base*(e+1)/W
    for step in (8, 13, 18, 23):  # after warmup: end + (base - end) * (1 - (e - W) / (E - W))^2
        progress = (step / 4 - 2) / 4
        assert lrs[step] == pytest.approx(0.1 + 1.9 * (1 - progress) ** 2)
    assert lrs[8] == pytest.approx(2.0) and lrs[23] > 0.1
    assert schedules.lr_at(6, policy="poly", base=2.0, epochs=6, warmup=2, end_lr=0.1, power=3.0) == \
        pytest.approx(0.1)


@pytest.mark.parametrize("processes", [1, 2, 8])
@pytest.mark.parametrize("accumulation", [1, 4])
def test_lr_scaling_rule_uses_the_global_batch(processes, accumulation):
    argv = ["--data-backend", "synthetic", "-b", "32", "--lr", "0.1", "--lr-base-batch", "256",
            "--optimizer-batch-size", str(32 * processes * accumulation)]
    global_batch = 32 * processes * accumulation
    def plan(argv):
        flags = config.parse_args(argv)
        return schedules.Batching.plan(batch_size=flags.batch_size, processes=processes,
                                       optimizer_batch_size=flags.optimizer_batch_size, lr=flags.lr,
                                       base_batch=flags.lr_base_batch, rule=flags.lr_scaling)
    for rule, factor in (("linear", global_batch / 256), ("sqrt", math.sqrt(global_batch / 256))):
        batching = plan([*argv, "--lr-scaling", rule])
        assert (batching.global_batch, batching.accumulation_steps) == (global_batch, accumulation)
        assert batching.lr == pytest.approx(0.1 * factor)
    assert plan(argv).lr == pytest.approx(0.1 * global_batch / 256)
    plain = plan(argv[:6] + argv[8:])  # no --lr-base-batch: absolute
    assert plain.lr == 0.1 and plain.record() == {"global_batch": global_batch, "effective_lr": 0.1}


@pytest.mark.parametrize("argv, message", [
    (["--lr-scaling", "sqrt"], "give --lr-base-batch B with it"),
    (["--target-top1", "101"], "in (0, 100]"),
    (["--target-top1", "75.9", "--training-only"], "--target-top1 needs validation"),
    (["--eval-offset", "-1"], "--eval-offset must be >= 0"),
    (["--adam-betas", "0.9", "1.0"], "--adam-betas must be in [0, 1)"),
])
def test_bad_large_batch_flags_are_one_line_errors(argv, message):
    args = config.parse_args(["--data-backend", "synthetic", *argv])
    with pytest.raises(UserError) as error:
        flag_rules.check(args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_eval_cadence_follows_mlperf_offsets_and_always_ends_with_a_validation():
    assert [e for e in range(10) if EvalPlan(4, 2).due(e, 10)] == [1, 5, 9]        # after epochs 2, 6, 10
    assert [e for e in range(9) if EvalPlan(4, 0).due(e, 9)] == [3, 7, 8]          # 4, 8 and the last
    assert [e for e in range(3) if EvalPlan().due(e, 3)] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# End to end: cadence and target, exact resume with LARS, presets
# ---------------------------------------------------------------------------------------------

TINY_LARS = ["--arch", "lars-bn-cnn", "--data-backend", "pytorch", "--image-size", "20", "--val-resize-size", "20",
             "-b", "8", "--optimizer-batch-size", "16", "--optimizer", "lars", "--lr", "1.0", "--lr-base-batch", "64",
             "--lr-schedule", "poly", "--warmup", "1", "--lr-granularity", "iteration", "--weight-decay", "5e-4",
             "--trust-coefficient", "0.01", "--label-smoothing", "0.1", "--use-ema", "0.9", "--amp",
             "--workers", "0", "--seed", "3", "--device", "cpu", "--print-freq", "1"]


def _records(raport: Path):
    return [r for r in read_raport(raport) if r.get("type") == "LOG"]


def _epochs(raport: Path) -> dict[int, dict]:
    return {r["step"][0]: r["data"] for r in _records(raport) if isinstance(r["step"], list) and len(r["step"]) == 1}


def _iterations(raport: Path, metric: str) -> list[float]:
    return [r["data"][metric] for r in _records(raport) if isinstance(r["step"], list) and len(r["step"]) == 2
            and metric in r["data"]]


def _run(argv, workspace: Path, data: Path) -> int:
    return cli.main([*argv, "--workspace", str(workspace), str(data)])


def test_eval_every_and_target_top1_stop_the_run_and_record_the_epoch(small_digits_dir, tmp_path, capsys):
    args = [*TINY_LARS, "--epochs", "5", "--prof", "2", "--eval-every", "2"]
    assert _run([*args, "--target-top1", "1"], tmp_path / "target", small_digits_dir) == 0
    output = capsys.readouterr().out
    assert "global batch 16 (-b 8 x 1 process(es) x 2 accumulation step(s)), LR 0.25 (--lr 1 per 64 images" in output
    raport = tmp_path / "target" / "experiment_raport.json"
    parameters = [r["data"] for r in read_raport(raport) if r.get("step") == "PARAMETER"][0]
    assert (parameters["effective_lr"], parameters["global_batch"]) == (0.25, 16)
    epochs = _epochs(raport)
    assert sorted(epochs) == [0, 1] and "val.top1" not in epochs[0] and epochs[1]["val.top1"] >= 1
    summary = [r["data"] for r in _records(raport) if r["step"] == []][-1]
    assert summary["target_top1_epoch"] == 1 and summary["epochs_completed"] == 2
    assert read_pth(tmp_path / "target" / "checkpoint.pth.tar")["epoch"] == 2
    # A resume of a run that reached its target trains nothing (before: it went on to --epochs).
    assert _run([*args, "--target-top1", "1", "--auto-resume"], tmp_path / "target", small_digits_dir) == 0
    assert "reached --target-top1 1 after epoch 1; nothing to train" in capsys.readouterr().out
    assert sorted(_epochs(raport)) == [0, 1]
    assert read_pth(tmp_path / "target" / "checkpoint.pth.tar")["epoch"] == 2
    summary = [r["data"] for r in _records(raport) if r["step"] == []][-1]
    assert summary["target_top1_epoch"] == 1 and summary["epochs_completed"] == 2
    # Without a target: validations after epochs 2 and 4 and the last (5), counted from 1.
    assert _run([*args, "--eval-offset", "0"], tmp_path / "cadence", small_digits_dir) == 0
    epochs = _epochs(tmp_path / "cadence" / "experiment_raport.json")
    assert [e for e, record in sorted(epochs.items()) if "val.top1" in record] == [1, 3, 4]


def test_lars_resume_reproduces_the_uninterrupted_run(small_digits_dir, tmp_path):
    args = [*TINY_LARS, "--epochs", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _run(args, straight, small_digits_dir) == 0
    assert _run([*args, "--run-epochs", "1"], split, small_digits_dir) == 0
    assert _run([*args, "--resume", str(split / "checkpoint.pth.tar")], split, small_digits_dir) == 0
    for metric in ("train.loss", "train.lr"):
        assert _iterations(split / "experiment_raport.json", metric) == \
            _iterations(straight / "experiment_raport.json", metric)
    a, b = (read_pth(path / "checkpoint.pth.tar") for path in (straight, split))
    assert all(torch.equal(t, b["state_dict"][k]) for k, t in a["state_dict"].items())
    assert all(torch.equal(t, b["state_dict_ema"][k]) for k, t in a["state_dict_ema"].items())
    buffers_a, buffers_b = (state["optimizer"]["state"] for state in (a, b))
    assert buffers_a.keys() == buffers_b.keys() and len(buffers_a) == 6
    assert all(torch.equal(buffers_a[k]["momentum_buffer"], buffers_b[k]["momentum_buffer"]) for k in buffers_a)
    assert [g["adapt"] for g in b["optimizer"]["param_groups"]] == [True, False]


RECIPES = list(launch.load_config(ROOT / "configs.yml")["recipe"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_resolve_with_every_mode_and_reach_their_global_batch(recipe):
    cfg = launch.load_config(ROOT / "configs.yml")
    for mode in cfg["mode"]:
        presets = launch.resolve_presets(cfg, model="resnet50", precision="AMP", platform="DGXH100", mode=mode,
                                         recipe=recipe)
        args = config.parse_args(["/data"], presets)
        flag_rules.check(args)
        assert (args.optimizer, args.lr_schedule, args.lr_poly_power) == ("lars", "poly", 2.0)
    presets = launch.resolve_presets(cfg, model="resnet50", precision="AMP", platform="DGXH100", mode="convergence",
                                     recipe=recipe)
    args = config.parse_args(["/data"], presets)
    processes = args.optimizer_batch_size // args.batch_size
    assert schedules.accumulation_steps(args.optimizer_batch_size, args.batch_size, processes) == 1
    assert (args.eval_every, args.target_top1, args.label_smoothing, args.mixup) == (4, 75.9, 0.1, 0.0)


def test_mlperf_3k_preset_matches_nvidias_submission(capsys):
    resolved = _dry_run(["--model", "resnet50", "--precision", "AMP", "--platform", "DGXH100", "--mode",
                         "convergence", "--recipe", "mlperf-lars-3k", "/data"], capsys)
    assert {k: resolved[k] for k in ("batch_size", "optimizer_batch_size", "lr", "warmup", "epochs", "weight_decay",
                                     "momentum", "trust_coefficient", "eval_every", "eval_offset", "end_lr")} == {
        "batch_size": 400, "optimizer_batch_size": 3200, "lr": 11.0, "warmup": 2, "epochs": 37,
        "weight_decay": 5e-5, "momentum": 0.9, "trust_coefficient": 0.001, "eval_every": 4, "eval_offset": 2,
        "end_lr": 1e-4}
    assert launch.main(["--model", "resnet50", "--precision", "AMP", "--platform", "DGXH100", "--mode",
                        "convergence", "--recipe", "nope", "/data"]) == 2
    assert "unknown --recipe 'nope'; choose from: mlperf-lars-3k" in capsys.readouterr().err


def _dry_run(argv, capsys) -> dict:
    import yaml
    assert launch.main([*argv, "--dry-run"]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", ["mlperf-lars-3k", "mlperf-lars-4k"])
def test_recipes_run_a_few_steps_on_the_cpu(recipe, small_digits_dir, tmp_path):
    argv = ["--model", "resnet50", "--precision", "FP32", "--platform", "CPU", "--mode", "convergence",
            "--recipe", recipe, str(small_digits_dir), "--arch", "lars-bn-cnn", "--image-size", "20",
            "--val-resize-size", "20", "-b", "4",
            "--optimizer-batch-size", "8", "--epochs", "2", "--prof", "2", "--workers", "0", "--print-freq", "1",
            "--workspace", str(tmp_path), "--no-checkpoints"]
    assert launch.main(argv) == 0
    raport = tmp_path / "experiment_raport.json"
    assert [r["data"] for r in read_raport(raport) if r.get("step") == "PARAMETER"][0]["optimizer"] == "lars"
    losses = _iterations(raport, "train.loss")
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert "val.top1" in _epochs(raport)[1]  # eval offset 2: the first validation after epoch 2 (the last)


def test_lars_under_ddp_with_accumulation_matches_one_process_with_the_same_global_batch(small_digits_dir, tmp_path):
    """Two gloo processes x -b 4 x 2 accumulation steps = one process x -b 8 x 2: the same global batch,
    hence the same scaled LR, averaged gradients, trust ratios and weights."""
    import os
    import subprocess
    driver = ROOT / "tests" / "helpers" / "run_main.py"
    common = ["--arch", "tiny-cnn", "--data-backend", "pytorch", "--image-size", "16", "--val-resize-size", "16",
              "--optimizer", "lars", "--lr", "2.0", "--lr-base-batch", "64", "--optimizer-batch-size", "16",
              "--epochs", "1", "--workers", "0", "--seed", "3", "--device", "cpu", "--training-only"]
    runs = {}
    for nproc, batch in ((2, "4"), (1, "8")):
        port = free_port()
        workspace = tmp_path / str(nproc)
        env = {**os.environ, "DUMP_WEIGHTS": str(workspace / "weights"), "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                 "--master_port", str(port), str(driver), *common, "-b", batch, "--workspace",
                                 str(workspace), str(small_digits_dir)], env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-6000:]
        assert "global batch 16" in result.stdout and "LR 0.5 " in result.stdout
        runs[nproc] = [torch.load(workspace / f"weights.rank{r}", weights_only=True) for r in range(nproc)]
    for name, tensor in runs[2][0].items():
        assert torch.equal(tensor, runs[2][1][name]), name
        torch.testing.assert_close(tensor, runs[1][0][name], rtol=1e-4, atol=1e-5)


def test_resuming_an_sgd_checkpoint_with_lars_is_a_one_line_error():
    from image_classification.engine.optim import load_optimizer_state
    model = ConvBn()
    sgd = build_optimizer(model, OptimizerOptions(name="sgd", momentum=0.9, weight_decay=1e-4), lr=0.1)
    lars = build_optimizer(model, OptimizerOptions(name="lars", momentum=0.9, weight_decay=1e-4), lr=0.1)
    with pytest.raises(UserError, match="does not fit --optimizer lars"):
        load_optimizer_state(lars, sgd.state_dict())  # the biases sit in the other group


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["lars", "lamb", "adamw"])
def test_on_cuda_the_step_matches_the_cpu_step_and_fp16_training_runs(name, small_digits_dir, tmp_path):
    """On a GPU machine: ``python -m pytest -m gpu tests/test_large_batch.py``. AdamW is fused on CUDA."""
    after = []
    for device in ("cpu", "cuda"):
        model = ConvBn().to(device)
        optimizer = build_optimizer(model, OptimizerOptions(name=name, momentum=MOMENTUM, weight_decay=WD),
                                    lr=0.1, device=torch.device(device))
        for step in range(2):
            for (_, p), g in zip(model.named_parameters(), _with_grads(ConvBn(), seed=step).values()):
                p.grad = g.to(device)
            optimizer.step()
        after.append([p.detach().cpu() for p in model.parameters()])
    for cpu, cuda in zip(*after):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-6)
    argv = ["--arch", "resnet18", "--data-backend", "pytorch", "--image-size", "32", "--val-resize-size", "32",
            "-b", "8", "--optimizer-batch-size", "16", "--optimizer", name, "--lr", "0.01", "--lr-schedule", "poly",
            "--lr-granularity", "iteration", "--amp", "--amp-dtype", "float16", "--epochs", "1", "--prof", "4",
            "--print-freq", "1", "--seed", "1", "--workers", "2", "--device", "cuda"]
    assert _run(argv, tmp_path, small_digits_dir) == 0
    losses = _iterations(tmp_path / "experiment_raport.json", "train.loss")
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
