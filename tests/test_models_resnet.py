"""ResNet v1.5 family and the shared weight loader, as specifications.

Everything runs on CPU with 64x64 inputs in eval mode so the file stays fast.
"""
from __future__ import annotations

import fractions
import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from image_classification.checkpoints.contents import read_weights
from image_classification.errors import UserError
from image_classification.models import registry, weights
from image_classification.models.resnet import ResNet, ResNetConfig
from tests.helpers.models import load_file_into, randomise_batch_norm

PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50-32x4d": 25_028_904,
    "resnext101-32x4d": 44_177_704,
    "resnext101-32x8d": 88_791_336,
    "se-resnext101-32x4d": 45_251_128,
}
# A tiny SE-ResNeXt (one block per stage) keeps the SE tests fast.
TINY_SE = ResNetConfig(True, (1, 1, 1, 1), (32, 64, 128, 256), 2, groups=8, squeeze_excitation=True)


def build(arch: str, **options) -> nn.Module:
    return registry.get(arch).build(**options).eval()


def logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def save(obj: object, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


# ---------------------------------------------------------------- architecture

@pytest.mark.parametrize("arch", list(PARAM_COUNTS))
def test_parameter_counts_match_reference(arch: str) -> None:
    spec = registry.get(arch)
    assert spec.family == "resnet" and spec.default_image_size == 224
    with torch.device("meta"):  # shapes only: skips initialising up to 88M parameters
        model = spec.build()
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[arch]


def test_an_architecture_nothing_defines_is_refused_naming_the_nearest() -> None:
    """The reference README lists resnext101-32x8d-basic, which no public source defines."""
    with pytest.raises(UserError) as error:
        registry.get("resnext101-32x8d-basic")
    message = str(error.value)
    assert "\n" not in message and "no public source defines it" in message
    assert "nearest: resnext101-32x8d " in message
    assert "resnext101-32x8d-basic" not in registry.names()


def test_hub_names() -> None:
    assert registry.get("resnet50").hub_name == "nvidia_resnet50"
    assert registry.get("resnext101-32x4d").hub_name == "nvidia_resnext101_32x4d"
    assert registry.get("se-resnext101-32x4d").hub_name == "nvidia_se_resnext101_32x4d"
    assert registry.get("resnet18").hub_name is None


def test_resnet50_state_dict_names_follow_reference() -> None:
    keys = set(build("resnet50").state_dict())
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {"conv1.weight", "fc.weight", "fc.bias", "layers.3.0.downsample.0.weight"}
    expected |= {f"bn1.{p}" for p in bn} | {f"layers.3.0.downsample.1.{p}" for p in bn}
    expected |= {f"layers.2.5.{c}.weight" for c in ("conv1", "conv2", "conv3")}
    expected |= {f"layers.0.2.bn3.{p}" for p in bn}
    assert expected <= keys
    assert not any(k.startswith("layer1.") or "squeeze" in k for k in keys)
    assert "layers.3.1.downsample.0.weight" not in keys  # only the first block downsamples


def test_resnet50_stride_is_on_the_3x3_conv() -> None:
    block = build("resnet50").layers[1][0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_se_resnext_state_dict_names_and_shapes() -> None:
    sd = build("se-resnext101-32x4d").state_dict()
    assert sd["layers.2.22.squeeze.squeeze.weight"].shape == (16, 1024)  # hidden is an absolute 16
    assert sd["layers.2.22.squeeze.squeeze.bias"].shape == (16,)
    assert sd["layers.2.22.squeeze.expand.weight"].shape == (1024, 16)
    assert sd["layers.3.0.squeeze.expand.bias"].shape == (2048,)
    assert sd["layers.0.0.conv2.weight"].shape == (128, 4, 3, 3)  # 32 groups of 4 channels
    assert sd["layers.0.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["fc.weight"].shape == (1000, 2048)


def test_basic_block_names() -> None:
    keys = set(build("resnet18").state_dict())
    assert {"layers.1.0.conv1.weight", "layers.1.0.bn2.running_var",
            "layers.1.0.downsample.0.weight", "layers.3.1.conv2.weight"} <= keys
    assert not any(".conv3." in k or ".bn3." in k for k in keys)
    assert "layers.0.0.downsample.0.weight" not in keys  # 64 -> 64, stride 1: no shortcut conv


def test_num_classes_sets_fc_shape() -> None:
    model = build("resnet50", num_classes=10)
    assert model.fc.weight.shape == (10, 2048)
    assert logits(model).shape == (1, 10)


def test_last_bn_0_init_zeroes_the_last_bn_of_each_block() -> None:
    for arch, last in (("resnet50", "bn3"), ("resnet18", "bn2")):
        zeroed, default = build(arch, last_bn_0_init=True), build(arch)
        blocks = [b for stage in zeroed.layers for b in stage]
        assert all(torch.all(getattr(b, last).weight == 0) for b in blocks)
        assert all(torch.all(b.bn1.weight == 1) for b in blocks)
        assert all(torch.all(getattr(b, last).weight == 1) for s in default.layers for b in s)


def test_conv_init_fan_out_sets_the_weight_std_and_bad_value_rejected() -> None:
    # Kaiming normal: std = sqrt(2 / fan); the first 3x3 conv that widens 64 -> 128 channels has
    # fan_in 64*9 = 576 and fan_out 128*9 = 1152, and 73,728 weights (std known to ~0.3 %).
    for mode, fan in (("fan_in", 576), ("fan_out", 1152)):
        torch.manual_seed(0)
        model = build("resnet18", conv_init=mode)
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                    and (m.in_channels, m.out_channels) == (64, 128))
        assert conv.weight.std().item() == pytest.approx((2 / fan) ** 0.5, rel=0.02), mode
    assert torch.isfinite(logits(model)).all()
    with pytest.raises(UserError, match="conv_init"):
        build("resnet18", conv_init="xavier")


def test_boolean_options_must_be_booleans() -> None:
    with pytest.raises(UserError, match="last_bn_0_init"):
        build("resnet18", last_bn_0_init="False")


def test_build_rejects_options_of_another_family() -> None:
    with pytest.raises(UserError, match="does not take model option.*dropout"):
        registry.get("resnet50").build(dropout=0.2)


def test_fused_and_unfused_se_agree() -> None:
    fused = randomise_batch_norm(ResNet(TINY_SE, num_classes=10, fused_se=True), weight=True).eval()
    plain = ResNet(TINY_SE, num_classes=10, fused_se=False).eval()
    plain.load_state_dict(fused.state_dict())
    torch.testing.assert_close(logits(plain), logits(fused))


def test_channels_last_bf16_autocast_forward_agrees_with_fp32() -> None:
    torch.manual_seed(0)
    for model in (build("resnet50"), ResNet(TINY_SE, num_classes=10).eval()):
        model = randomise_batch_norm(model, weight=True).to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
        with torch.no_grad():
            expected = model(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
        assert out.dtype == torch.bfloat16
        # bf16 keeps 8 bits of mantissa: the logits agree to a few percent of their scale
        assert (out.float() - expected).abs().max() <= 0.05 * expected.abs().max()


# ---------------------------------------------------------------- loading weights

@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50-32x4d", "resnext101-32x8d"])
def test_torchvision_weights_give_identical_logits(arch: str, tmp_path: Path) -> None:
    theirs = randomise_batch_norm(getattr(torchvision.models, arch.replace("-", "_"))(weights=None), weight=True).eval()
    path = save(theirs.state_dict(), tmp_path / "tv.pth")
    ours = build(arch)
    load_file_into(ours, path, "resnet")
    torch.testing.assert_close(logits(ours), logits(theirs))


def test_torchvision_reference_checkpoint_with_args(tmp_path: Path) -> None:
    """torchvision's train.py stores {"model", "optimizer", ..., "args": Namespace}."""
    import argparse

    theirs = torchvision.models.resnet18(weights=None).eval()
    ckpt = {"model": theirs.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=0.1)}
    ours = build("resnet18")
    load_file_into(ours, save(ckpt, tmp_path / "ckpt.pth"), "resnet")
    torch.testing.assert_close(logits(ours), logits(theirs))


def test_ngc_style_checkpoint_round_trips(tmp_path: Path) -> None:
    source = randomise_batch_norm(build("resnet50"), weight=True)
    renamed = {}
    for name, tensor in source.state_dict().items():
        if name.startswith("layers."):
            stage, rest = name[len("layers."):].split(".", 1)
            name = f"layer{int(stage) + 1}.{rest}"
        renamed[f"module.{name}"] = tensor
    assert "module.layer4.2.conv3.weight" in renamed
    path = save({"state_dict": renamed, "epoch": 3}, tmp_path / "ngc.pth.tar")
    target = build("resnet50")
    load_file_into(target, path, "resnet")
    torch.testing.assert_close(logits(target), logits(source))


def test_compiled_model_prefix_and_explicit_key(tmp_path: Path) -> None:
    source, ema = build("resnet18"), randomise_batch_norm(build("resnet18"), weight=True)
    ckpt = {"state_dict": source.state_dict(),
            "state_dict_ema": {f"_orig_mod.{k}": v for k, v in ema.state_dict().items()}}
    path = save(ckpt, tmp_path / "ckpt.pth")
    target = build("resnet18")
    load_file_into(target, path, "resnet", key="state_dict_ema")
    torch.testing.assert_close(logits(target), logits(ema))
    with pytest.raises(UserError, match="no entry 'ema'.*state_dict_ema"):
        read_weights(path, key="ema")


@pytest.mark.parametrize("src_trt,dst_trt", [(False, True), (True, False)])
def test_se_weights_reshape_between_linear_and_conv(src_trt: bool, dst_trt: bool,
                                                    tmp_path: Path) -> None:
    source = randomise_batch_norm(ResNet(TINY_SE, num_classes=10, trt=src_trt), weight=True).eval()
    target = ResNet(TINY_SE, num_classes=10, trt=dst_trt, arch="tiny-se").eval()
    squeeze = "layers.1.0.squeeze.squeeze.weight"
    assert source.state_dict()[squeeze].dim() == (4 if src_trt else 2)
    assert target.state_dict()[squeeze].dim() == (4 if dst_trt else 2)
    load_file_into(target, save(source.state_dict(), tmp_path / "se.pth"), "resnet")
    torch.testing.assert_close(logits(target), logits(source))


def test_trt_se_resnext_builds_conv_se() -> None:
    sd = build("se-resnext101-32x4d", trt=True).state_dict()
    assert sd["layers.0.0.squeeze.squeeze.weight"].shape == (16, 256, 1, 1)


# ---------------------------------------------------------------- load errors

def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.pth does not exist"):
        load_file_into(build("resnet18"), str(tmp_path / "nope.pth"), "resnet")


def test_truncated_file(tmp_path: Path) -> None:
    path = save(build("resnet18").state_dict(), tmp_path / "full.pth")
    data = Path(path).read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.pth is not a readable PyTorch file"):
        read_weights(str(tmp_path / "cut.pth"))


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"hello world"])
def test_garbage_file(content: bytes, tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(content)
    with pytest.raises(UserError, match=r"junk\.pth is not a readable PyTorch file"):
        read_weights(str(tmp_path / "junk.pth"))


def test_file_needing_unsafe_unpickling(tmp_path: Path) -> None:
    obj = {"fc.weight": torch.zeros(1), "ratio": fractions.Fraction(1, 3)}
    path = save(obj, tmp_path / "u.pth")
    with pytest.raises(UserError, match=r"u\.pth holds a fractions\.Fraction object.*unsafe"):
        read_weights(path)


@pytest.mark.parametrize("obj,why", [([torch.zeros(1)], "holds a list"),
                                     ({"epoch": 3}, "entry 'epoch' is not a tensor"),
                                     ({}, "does not contain a state dict")])
def test_file_that_is_not_a_state_dict(obj: object, why: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=why):
        read_weights(save(obj, tmp_path / "x.pth"))


def test_wrong_arch(tmp_path: Path) -> None:
    path = save(build("resnet18").state_dict(), tmp_path / "rn18.pth")
    with pytest.raises(UserError) as info:
        load_file_into(build("resnet50"), path, "resnet")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"weights in {path} do not fit --arch resnet50: ")
    assert "missing keys (e.g. layers.0.0.conv3.weight)" in message
    assert "shape mismatch at" in message


def test_wrong_num_classes_suggests_the_flag(tmp_path: Path) -> None:
    path = save(build("resnet18", num_classes=10).state_dict(), tmp_path / "ten.pth")
    with pytest.raises(UserError, match=r"shape mismatch at fc\.weight: file \[10, 512\] vs "
                                        r"model \[1000, 512\] \(use --num-classes 10\)"):
        load_file_into(build("resnet18"), path, "resnet")


# ---------------------------------------------------------------- converter registry

def test_family_converter_applies_before_strict_load(tmp_path: Path) -> None:
    source = build("resnet18")
    foreign = {f"backbone.{k}": v for k, v in source.state_dict().items()}

    def strip_backbone(sd: dict, target_keys: set[str]) -> dict:
        if not any(k.startswith("backbone.") for k in sd):
            return sd
        return {k.removeprefix("backbone."): v for k, v in sd.items()}

    weights.register_converter("test-family-a", strip_backbone)
    try:
        target = build("resnet18")
        load_file_into(target, save(foreign, tmp_path / "f.pth"), "test-family-a")
    finally:
        weights.unregister_converter("test-family-a", strip_backbone)
    torch.testing.assert_close(logits(target), logits(source))


def test_converter_may_not_drop_keys() -> None:
    def drop_last(sd: dict, target_keys: set[str]) -> dict:
        return dict(list(sd.items())[:-1])

    weights.register_converter("test-family-b", drop_last)
    model = build("resnet18")
    try:
        with pytest.raises(ValueError, match="must not drop keys"):
            weights.adapt_state_dict(model.state_dict(), model, "test-family-b")
    finally:
        weights.unregister_converter("test-family-b", drop_last)


def test_layer_rename_only_when_it_matches() -> None:
    model = build("resnet18")
    sd = {"layer9.0.conv1.weight": torch.zeros(1), "layer1.0.conv1.weight": torch.zeros(1)}
    out = weights.adapt_state_dict(sd, model, "resnet")
    assert set(out) == {"layer9.0.conv1.weight", "layers.0.0.conv1.weight"}
