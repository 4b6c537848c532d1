"""The backbone API: a classifier's stages as feature maps (image_classification.models.backbone)."""
from pathlib import Path

import numpy as np
import pytest
import torch

import hubconf
from image_classification import models
from image_classification.errors import UserError
from tests.helpers.models import randomise_batch_norm


def saved_classifier(arch: str, path: Path, num_classes: int = 10, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomise_batch_norm(models.get(arch).build(num_classes=num_classes, **options), weight=True).eval()
    torch.save(model.state_dict(), path)
    return model


@pytest.mark.parametrize("arch, size, channels, strides", [
    ("resnet18", 64, [64, 128, 256, 512], [4, 8, 16, 32]),
    ("resnext50-32x4d", 64, [256, 512, 1024, 2048], [4, 8, 16, 32]),
    ("se-resnext101-32x4d", 32, [256, 512, 1024, 2048], [4, 8, 16, 32]),
    ("efficientnet-b0", 64, [16, 24, 40, 112, 320], [2, 4, 8, 16, 32]),
    ("efficientnet-widese-b4", 64, [24, 32, 56, 160, 448], [2, 4, 8, 16, 32]),
])
def test_feature_maps_are_the_classifiers_stage_activations(arch, size, channels, strides, tmp_path):
    classifier = saved_classifier(arch, tmp_path / "w.pth")
    net = models.backbone(arch, weights=str(tmp_path / "w.pth"))
    assert [i.channels for i in net.feature_info] == channels and net.strides == strides
    seen = {}
    for info in net.feature_info:
        classifier.get_submodule(info.module).register_forward_hook(
            lambda module, args, output, name=info.module: seen.__setitem__(name, output))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        classifier(x)
        maps = net(x)
    assert len(maps) == len(channels)
    for info, feature in zip(net.feature_info, maps):
        assert feature.shape == (2, info.channels, size // info.stride, size // info.stride)
        assert torch.equal(feature, seen[info.module]), info


def test_out_indices_pick_stages_and_bad_ones_are_one_line():
    net = models.backbone("efficientnet-b0", out_indices=(3, 5))
    assert [(i.index, i.module, i.channels, i.stride) for i in net.feature_info] == [
        (3, "layers.3", 80, 16), (5, "layers.5", 192, 32)]
    with pytest.raises(UserError, match=r"^out_indices \[4\]: give distinct stage indices in 0..3 "
                                        r"\(0: stride 4, 1: stride 8, 2: stride 16, 3: stride 32\)$"):
        models.backbone("resnet18", out_indices=(4,))


def test_a_backbone_of_weights_that_do_not_fit_names_the_layer(tmp_path):
    saved_classifier("resnet34", tmp_path / "r34.pth")
    with pytest.raises(UserError, match=r"^weights in .*r34.pth do not fit --arch resnet18: 96 unexpected keys "
                                        r"\(e.g. layers.0.2.conv1.weight\)$"):
        models.backbone("resnet18", weights=str(tmp_path / "r34.pth"))


def test_backbone_exports_to_onnx_and_runs_in_onnx_runtime(tmp_path):
    import onnxruntime
    saved_classifier("resnet18", tmp_path / "w.pth")
    net = hubconf.convnets_backbone("resnet18", weights=str(tmp_path / "w.pth"), out_indices=(1, 2, 3))
    names = [f"stride{s}" for s in net.strides]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)
        torch.onnx.export(net, (x,), str(tmp_path / "b.onnx"), dynamo=False, input_names=["input"],
                          output_names=names, dynamic_axes={"input": {0: "batch"}}, opset_version=17)
    session = onnxruntime.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(names, {"input": x.numpy()})
    assert [tuple(g.shape) for g in got] == [(2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-4)


def test_backbone_trains_stage_by_stage_in_train_mode():
    net = models.backbone("efficientnet-b0", survival_prob=0.5).train()
    maps = net(torch.randn(2, 3, 32, 32))
    sum(m.sum() for m in maps).backward()
    assert net.body.get_submodule("layers.0.block0.depsep.conv").weight.grad is not None
