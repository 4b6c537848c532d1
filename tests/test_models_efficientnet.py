"""EfficientNet B0-B7 / WideSE B0-B7, as specifications.

CPU only and kept fast: batch 1, eval mode, 64x64 inputs except the default-resolution checks on
B0, B4 and WideSE-B0; structural checks build on the meta device (no memory, no init cost).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from image_classification.errors import UserError
from image_classification.models import registry, weights
from image_classification.models.efficientnet import (
    CONFIGS,
    MBConv,
    StochasticDepth,
    convert_torchvision,
    scale_depth,
    scale_width,
)
from tests.helpers.models import load_file_into, randomise_batch_norm

PARAM_COUNTS = {
    "efficientnet-b0": 5_288_548,
    "efficientnet-b1": 7_794_184,
    "efficientnet-b2": 9_109_994,
    "efficientnet-b3": 12_233_232,
    "efficientnet-b4": 19_341_616,
    "efficientnet-b5": 30_389_784,
    "efficientnet-b6": 43_040_704,
    "efficientnet-b7": 66_347_960,
    "efficientnet-widese-b0": 8_423_848,
    "efficientnet-widese-b1": 13_336_204,
    "efficientnet-widese-b2": 15_678_504,
    "efficientnet-widese-b3": 21_530_032,
    "efficientnet-widese-b4": 34_927_246,
    "efficientnet-widese-b5": 56_146_944,
    "efficientnet-widese-b6": 80_444_154,
    "efficientnet-widese-b7": 125_844_160,
}
IMAGE_SIZE = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380, "b5": 456, "b6": 528,
              "b7": 600}
DROPOUT = {"b0": 0.2, "b1": 0.2, "b2": 0.3, "b3": 0.3, "b4": 0.4, "b5": 0.4, "b6": 0.5, "b7": 0.5}
HUB_NAMES = {
    "efficientnet-b0": "nvidia_efficientnet_b0",
    "efficientnet-b4": "nvidia_efficientnet_b4",
    "efficientnet-widese-b0": "nvidia_efficientnet_widese_b0",
    "efficientnet-widese-b4": "nvidia_efficientnet_widese_b4",
}
FULL_RESOLUTION = {"efficientnet-b0", "efficientnet-b4", "efficientnet-widese-b0"}
# (stem, features, repeats) from the reference's scaling table.
SCALED = {
    "b0": (32, 1280, (1, 2, 2, 3, 3, 4, 1)),
    "b1": (32, 1280, (2, 3, 3, 4, 4, 5, 2)),
    "b2": (32, 1408, (2, 3, 3, 4, 4, 5, 2)),
    "b3": (40, 1536, (2, 3, 3, 5, 5, 6, 2)),
    "b4": (48, 1792, (2, 4, 4, 6, 6, 8, 2)),
    "b5": (48, 2048, (3, 5, 5, 7, 7, 9, 3)),
    "b6": (56, 2304, (3, 6, 6, 8, 8, 11, 3)),
    "b7": (64, 2560, (4, 7, 7, 10, 10, 13, 4)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core box, OpenMP spin-waits under contention made the
    same forwards up to 100x slower. Restored afterwards so other test modules are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def variant(arch: str) -> str:
    return arch.rsplit("-", 1)[1]


def build(arch: str, **options) -> nn.Module:
    return registry.get(arch).build(**options).eval()


def build_meta(arch: str, **options) -> nn.Module:
    """Structure only: parameters on the meta device cost neither memory nor init time."""
    with torch.device("meta"):
        return registry.get(arch).build(**options)


def image(size: int = 64, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(image() if x is None else x)


def save(obj: object, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


# ---------------------------------------------------------------- registry and architecture

@pytest.mark.parametrize("arch", list(PARAM_COUNTS))
def test_variant_parameters_defaults_and_forward(arch: str) -> None:
    spec = registry.get(arch)
    v = variant(arch)
    assert spec.family == "efficientnet"
    assert spec.default_image_size == IMAGE_SIZE[v]
    assert spec.hub_name == HUB_NAMES.get(arch)
    assert spec.defaults["dropout"] == DROPOUT[v]
    assert spec.defaults["survival_prob"] == (0.8 if v == "b4" else 1.0)
    assert spec.defaults["stochastic_depth_mode"] == "row"
    model = spec.build().eval()
    assert (model.arch, model.family) == (arch, "efficientnet")
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[arch]
    assert model.classifier.dropout.p == DROPOUT[v]
    size = spec.default_image_size if arch in FULL_RESOLUTION else 64
    assert logits(model, image(size)).shape == (1, 1000)


@pytest.mark.parametrize("v", list(SCALED))
def test_scaling_rules_give_reference_widths_and_depths(v: str) -> None:
    stem, features, repeats = SCALED[v]
    config = CONFIGS[v]
    assert (config.stem_channels, config.feature_channels) == (stem, features)
    assert tuple(s.repeats for s in config.stages()) == repeats


def test_scaling_rounds_to_multiples_of_eight_without_losing_ten_percent() -> None:
    assert scale_width(32, 1.0) == 32
    assert scale_width(16, 1.1) == 16  # 17.6 -> 16 (within 10%)
    assert scale_width(24, 1.4) == 32  # 33.6 -> 32
    assert scale_width(3, 1.0) == 8  # floor of 8
    assert scale_width(100, 0.5) == 48  # 50 -> 48 loses only 4%
    assert scale_width(11, 1.0) == 16  # 11 -> 8 would lose 27%, so one more step of 8
    assert scale_width(1000, 0.1) == 104  # 100 -> 104
    assert scale_depth(1, 1.1) == 2 and scale_depth(3, 2.6) == 8 and scale_depth(2, 1.0) == 2


def test_b4_stage_channels_and_block_count() -> None:
    model = build_meta("efficientnet-b4")
    out_channels = [stage[-1].proj.conv.out_channels for stage in model.layers]
    assert out_channels == [24, 32, 56, 112, 160, 272, 448]
    assert sum(isinstance(m, MBConv) for m in model.modules()) == 32
    assert model.stem.conv.out_channels == 48 and model.features.conv.out_channels == 1792


def test_state_dict_names_follow_reference() -> None:
    keys = set(build_meta("efficientnet-b0").state_dict())
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {
        "stem.conv.weight", "layers.0.block0.depsep.conv.weight",
        "layers.0.block0.proj.conv.weight",
        "layers.1.block0.expand.conv.weight", "layers.1.block0.se.squeeze.weight",
        "layers.1.block0.se.squeeze.bias", "layers.1.block0.se.expand.weight",
        "layers.1.block0.se.expand.bias", "layers.6.block0.proj.conv.weight",
        "features.conv.weight", "classifier.fc.weight", "classifier.fc.bias",
    }
    expected |= {f"{unit}.bn.{p}" for unit in ("stem", "features", "layers.1.block1.depsep")
                 for p in bn}
    assert expected <= keys
    assert not any(k.startswith("layers.0.block0.expand") for k in keys)
    assert not any(k.startswith("layers.7") or ".block4." in k for k in keys)


@pytest.mark.parametrize("arch, squeeze", [("efficientnet-b0", 4), ("efficientnet-widese-b0", 24)])
def test_se_squeeze_width_original_vs_widese(arch: str, squeeze: int) -> None:
    """Block layers.1.block0: input 16, hidden 96. Original squeezes 16/4, WideSE 96/4."""
    se = build_meta(arch).layers[1].block0.se
    assert se.squeeze.weight.shape == (squeeze, 96)
    assert se.expand.weight.shape == (96, squeeze)


def test_bn_and_dropout_options_reach_the_layers() -> None:
    model = build_meta("efficientnet-b0")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {(m.momentum, m.eps) for m in bns} == {(0.01, 1e-3)}
    model = build_meta("efficientnet-b0", bn_momentum=0.1, bn_epsilon=1e-5, dropout=0.0)
    assert {(m.momentum, m.eps) for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {
        (0.1, 1e-5)}
    assert model.classifier.dropout.p == 0.0


@pytest.mark.parametrize("options", [
    {"dropout": 1.0}, {"dropout": -0.1}, {"dropout": "0.2"}, {"survival_prob": 0.0},
    {"survival_prob": 1.5}, {"survival_prob": True}, {"stochastic_depth_mode": "sample"},
    {"conv_init": "xavier"}, {"trt": "False"}, {"bn_momentum": 1.5}, {"bn_epsilon": 0.0},
    {"fused_se": True}, {"num_classes": 0},
])
def test_bad_option_values_are_user_errors(options: dict) -> None:
    with pytest.raises(UserError):
        build_meta("efficientnet-b0", **options)


def test_conv_init_follows_option() -> None:
    """Kaiming-normal: std = sqrt(2 / fan); fan_out of a 1x1 1280x(320) conv is 1280."""
    torch.manual_seed(0)
    for mode, fan in (("fan_in", 320), ("fan_out", 1280)):
        conv = build("efficientnet-b0", conv_init=mode).features.conv.weight
        assert conv.std().item() == pytest.approx((2 / fan) ** 0.5, rel=0.05)


# ---------------------------------------------------------------- weights

@pytest.mark.parametrize("v", ["b0", "b4"])
def test_torchvision_weights_give_identical_logits(v: str, tmp_path: Path) -> None:
    """torchvision B0-B4 use BN eps 1e-5 (B5-B7 use 1e-3): the eps is not in the state dict,
    so matching logits need ``bn_epsilon=1e-5``. With the 1x1-conv SE (trt) the op sequence is
    the same as torchvision's and the logits are bit-identical; the Linear SE rounds differently.
    """
    tv = randomise_batch_norm(getattr(torchvision.models, f"efficientnet_{v}")(weights=None), weight=True).eval()
    path = save(tv.state_dict(), tmp_path / "tv.pth")
    x = image(64, batch=2)
    expected = logits(tv, x)
    for trt in (True, False):
        model = build(f"efficientnet-{v}", trt=trt, bn_epsilon=1e-5)
        load_file_into(model, path)
        if trt:
            assert torch.equal(logits(model, x), expected)
        else:
            torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("v", list(CONFIGS))
def test_torchvision_key_map_covers_every_variant(v: str) -> None:
    with torch.device("meta"):
        tv = getattr(torchvision.models, f"efficientnet_{v}")(weights=None)
    model = build_meta(f"efficientnet-{v}")
    adapted = weights.adapt_state_dict(tv.state_dict(), model)
    assert weights.describe_mismatch(adapted, model.state_dict()) == ""


def test_torchvision_weights_do_not_fit_widese(tmp_path: Path) -> None:
    tv = torchvision.models.efficientnet_b0(weights=None)
    path = save(tv.state_dict(), tmp_path / "tv.pth")
    with pytest.raises(UserError, match="shape mismatch at layers"):
        load_file_into(build("efficientnet-widese-b0"), path)


def test_converter_leaves_other_formats_alone() -> None:
    model = build_meta("efficientnet-b0")
    ours = model.state_dict()
    assert convert_torchvision(ours, set(ours)) is ours
    resnet_like = {"conv1.weight": torch.zeros(1), "classifier.1.weight": torch.zeros(1)}
    assert convert_torchvision(resnet_like, set(ours)) is resnet_like


def test_ngc_style_checkpoint_round_trips(tmp_path: Path) -> None:
    source = randomise_batch_norm(build("efficientnet-b0"), weight=True)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
               "epoch": 3}
    path = save(wrapped, tmp_path / "ngc.pth")
    target = build("efficientnet-b0")
    load_file_into(target, path)
    assert torch.equal(logits(target), logits(source))


@pytest.mark.parametrize("src_trt", [False, True])
def test_trt_and_linear_se_weights_are_interchangeable(src_trt: bool, tmp_path: Path) -> None:
    source = randomise_batch_norm(build("efficientnet-b0", trt=src_trt), weight=True)
    path = save(source.state_dict(), tmp_path / "w.pth")
    target = build("efficientnet-b0", trt=not src_trt)
    load_file_into(target, path)
    assert target.layers[1].block0.se.squeeze.weight.dim() == (2 if src_trt else 4)
    torch.testing.assert_close(logits(target), logits(source), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- stochastic depth

def test_survival_probability_decays_linearly_over_residual_blocks() -> None:
    model = build_meta("efficientnet-b4")  # survival_prob 0.8 by default
    blocks = [m for m in model.modules() if isinstance(m, MBConv)]
    for b, block in enumerate(blocks):
        if block.residual:
            assert block.stochastic_depth.survival_prob == pytest.approx(1 - 0.2 * b / 32)
        else:
            assert block.stochastic_depth is None
    assert not blocks[0].residual and blocks[1].residual
    off = build_meta("efficientnet-b0")  # survival_prob 1.0: no drop-path modules at all
    assert not any(isinstance(m, StochasticDepth) for m in off.modules())


def test_drop_path_is_identity_in_eval() -> None:
    x = torch.randn(4, 3, 2, 2)
    for mode in ("row", "batch"):
        assert StochasticDepth(0.5, mode).eval()(x) is x


def test_row_mode_drops_whole_samples_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    out = StochasticDepth(0.5, "row").train()(torch.ones(4000, 2, 2, 2))
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 0.45 < (per_sample[:, 0] == 0).float().mean().item() < 0.55
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)


def test_batch_mode_drops_the_whole_batch_or_nothing_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    drop = StochasticDepth(0.5, "batch").train()
    means = []
    for _ in range(400):
        out = drop(torch.ones(8, 2, 2, 2))
        assert (out == 0).all() or (out == 2).all()
        means.append(out.mean().item())
    assert set(means) == {0.0, 2.0}
    assert sum(means) / len(means) == pytest.approx(1.0, abs=0.15)


def test_residual_block_adds_zero_or_rescaled_branch_per_sample() -> None:
    torch.manual_seed(0)
    model = build("efficientnet-b0", survival_prob=0.5)
    block = model.layers[5].block3  # 192 -> 192, stride 1: residual, survival 1 - 0.5 * 14/16
    assert block.residual
    p = block.stochastic_depth.survival_prob
    assert p == pytest.approx(0.5625)
    x = torch.randn(64, 192, 2, 2)
    with torch.no_grad():
        branch = block(x) - x  # eval: the plain branch
        block.stochastic_depth.train()  # BN stays in eval so the branch is deterministic
        added = block(x) - x
    kept = torch.tensor([torch.allclose(a, b / p, atol=1e-5) for a, b in zip(added, branch)])
    dropped = (added.flatten(1) == 0).all(1)
    assert (kept ^ dropped).all() and kept.any() and dropped.any()


def test_eval_forward_is_deterministic_with_stochastic_depth_on() -> None:
    model = build("efficientnet-b0", survival_prob=0.5, stochastic_depth_mode="batch")
    assert torch.equal(logits(model), logits(model))


# ---------------------------------------------------------------- precision and layout

def test_channels_last_matches_contiguous() -> None:
    model = build("efficientnet-b0")
    x = image(64)
    expected = logits(model)
    model = model.to(memory_format=torch.channels_last)
    out = logits(model, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_channels_last_eval_and_train_step() -> None:
    torch.manual_seed(0)
    model = build("efficientnet-b0", survival_prob=0.8).to(memory_format=torch.channels_last)
    x = image(64, batch=2).contiguous(memory_format=torch.channels_last)
    expected = logits(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(model, x)
        assert out.shape == (2, 1000) and out.dtype == torch.bfloat16
        # bf16 keeps 8 bits of mantissa: the logits agree to a few percent of their scale
        assert (out.float() - expected).abs().max() <= 0.05 * expected.abs().max()
        model.train()
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    grad = model.stem.conv.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
