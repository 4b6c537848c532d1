"""Using a trained model: classify.py, checkpoint2model.py, model2onnx.py, hubconf.py, the plot
command and the TensorBoard writer.

Models are real but tiny (random weights, few classes, 32-64 px) so the whole file runs in well
under a minute and a half on two CPU cores.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import checkpoint2model  # noqa: E402
import classify  # noqa: E402
import hubconf  # noqa: E402
import model2onnx  # noqa: E402
from image_classification import cli, models, plot  # noqa: E402
from image_classification.checkpoints import contents, writer  # noqa: E402
from image_classification.checkpoints.files import read_pth  # noqa: E402
from image_classification.data.contract import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from image_classification.data.loaders.transforms import open_rgb, val_transform  # noqa: E402
from image_classification.deploy import classifying, export_and_check, parity, runners  # noqa: E402
from image_classification.deploy.labels import class_names, imagenet_classes  # noqa: E402
from image_classification.deploy.loading import LoadedModel  # noqa: E402
from image_classification.deploy.metadata import METADATA_PREFIX  # noqa: E402
from image_classification.errors import UserError  # noqa: E402
from image_classification.reporting.dllogger import read_raport  # noqa: E402
from image_classification.reporting.reporter import Reporter  # noqa: E402
from image_classification.reporting.tensorboard import TensorBoardWriter  # noqa: E402
from tests.helpers.models import randomise_batch_norm  # noqa: E402

LINE = re.compile(r"^(.+): (\d+\.\d)%$")


# ---------------------------------------------------------------- fixtures

def _build(arch: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomise_batch_norm(models.get(arch).build(num_classes=num_classes)).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """One picture in each format/mode classify.py must handle, plus a file that is no image."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:60, 0:80]
    rgb = np.stack([x * 3, y * 4, (x + y) * 2], axis=-1).astype(np.uint8) ^ rng.integers(0, 40, (60, 80, 3), np.uint8)
    paths = {"jpeg": folder / "photo.jpg", "png": folder / "photo.png", "gray": folder / "gray.png",
             "rgba": folder / "alpha.png"}
    Image.fromarray(rgb).save(paths["jpeg"], quality=90)
    Image.fromarray(rgb[::-1].copy()).save(paths["png"])
    Image.fromarray(rgb[..., 0].T.copy(), "L").save(paths["gray"])
    alpha = (x * 3).astype(np.uint8)[..., None]
    Image.fromarray(np.concatenate([rgb[:, ::-1], alpha], axis=-1), "RGBA").save(paths["rgba"])
    not_image = tmp_path_factory.mktemp("bad") / "notes.jpg"
    not_image.write_text("this is not a picture\n")
    paths["not_image"] = not_image
    return paths


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18_10.pth"
    torch.save(_build("resnet18", 10).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory) -> dict:
    """A checkpoint as main.py writes it, but with the reference's ``module.`` prefixes and an EMA."""
    model, ema = _build("resnet18", 3, seed=1), _build("resnet18", 3, seed=2)
    state = {"epoch": 7, "best_prec1": 91.25, "arch": "resnet18", "num_classes": 3,
             "class_names": ["cat", "dog", "bird"], "optimizer": {},
             "config": {"image_size": 48, "val_resize_size": 56, "interpolation": "bilinear"},
             "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
             "state_dict_ema": ema.state_dict()}
    folder = tmp_path_factory.mktemp("run")
    writer.save(state, folder, epoch_index=None, is_best=False)
    no_ema = {k: v for k, v in state.items() if k != "state_dict_ema"}
    writer.save(no_ema, folder, epoch_index=None, is_best=False, filename="no_ema.pth.tar")
    return {"path": folder / "checkpoint.pth.tar", "no_ema": folder / "no_ema.pth.tar", "model": model,
            "ema": ema}


def _run_json(capsys, *argv) -> dict:
    assert classify.main([*argv, "--json", "--precision", "FP32", "--cpu"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _by_hand(model, path, image_size, resize_size, k=5):
    """The evaluation pipeline written out: val transform, /255, ImageNet mean/std, softmax."""
    pixels = val_transform(image_size, resize_size)(open_rgb(str(path))).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        probabilities = torch.softmax(model(((pixels - mean) / std)[None]), dim=1)[0]
    top = probabilities.topk(k)
    return top.indices.tolist(), top.values.tolist()


# ---------------------------------------------------------------- classify.py

def test_classify_matches_the_evaluation_pipeline_for_every_image_kind(capsys, images, resnet18_weights):
    kinds = ["jpeg", "png", "gray", "rgba"]
    doc = _run_json(capsys, "--arch", "resnet18", "--weights", str(resnet18_weights), "--image-size", "64",
                    "--image", *(str(images[k]) for k in kinds))
    assert (doc["image_size"], doc["resize_size"], doc["num_classes"]) == (64, 96, 10)
    model = _build("resnet18", 10)
    for kind, result in zip(kinds, doc["results"]):
        indices, probabilities = _by_hand(model, images[kind], 64, 96)
        assert result["image"] == str(images[kind])
        assert [p["index"] for p in result["predictions"]] == indices, kind
        assert [p["class"] for p in result["predictions"]] == [str(i) for i in indices]  # no names: indices
        np.testing.assert_allclose([p["probability"] for p in result["predictions"]], probabilities, atol=1e-5)


def test_classify_text_output_is_path_then_topk_lines_best_first(capsys, images, resnet18_weights):
    argv = ["--arch", "resnet18", "--pretrained-from-file", str(resnet18_weights), "--image-size", "64",
            "--topk", "3", "--image", str(images["jpeg"]), str(images["png"])]
    doc = _run_json(capsys, *argv)
    assert classify.main([*argv, "--precision", "FP32", "--cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 4
    for block, result in zip((lines[:4], lines[4:]), doc["results"]):
        assert block[0] == result["image"]
        parsed = [LINE.match(line).groups() for line in block[1:]]
        assert [name for name, _ in parsed] == [p["class"] for p in result["predictions"]]
        assert [pct for _, pct in parsed] == [f"{100 * p['probability']:.1f}" for p in result["predictions"]]
        assert [float(p) for _, p in parsed] == sorted((float(p) for _, p in parsed), reverse=True)


def test_classify_folder_and_amp(capsys, images, resnet18_weights, cpu_features):
    cpu_features("avx512_bf16")
    folder = images["jpeg"].parent
    doc = _run_json(capsys, "--arch", "resnet18", "--weights", str(resnet18_weights), "--image-size", "32",
                    "--image", str(folder), "-b", "3")
    assert [r["image"] for r in doc["results"]] == sorted(str(p) for p in folder.iterdir())
    # AMP (bf16 autocast on CPU) ranks the classes as fp32 does, with probabilities close to fp32's.
    amp_args = ["--arch", "resnet18", "--weights", str(resnet18_weights), "--image-size", "32", "--topk", "3",
                "--image", str(images["png"])]
    fp32 = _run_json(capsys, *amp_args)["results"][0]["predictions"]
    assert classify.main([*amp_args, "--precision", "AMP", "--cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["precision"] == "AMP-bf16"
    amp = result["results"][0]["predictions"]
    assert [p["index"] for p in amp] == [p["index"] for p in fp32]
    np.testing.assert_allclose([p["probability"] for p in amp], [p["probability"] for p in fp32], atol=0.02)


def test_classify_reports_the_precision_the_cpu_ran_not_tf32(capsys, images, resnet18_weights):
    assert classify.main(["--arch", "resnet18", "--weights", str(resnet18_weights), "--image-size", "32",
                          "--image", str(images["png"]), "--precision", "TF32", "--cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "FP32"  # before: "TF32" (a CUDA-only format)


def test_classify_default_is_fp32_where_the_cpu_emulates_bf16(capsys, images, resnet18_weights, cpu_features,
                                                                   monkeypatch):
    from image_classification.deploy import fast_cpu
    cpu_features("avx512_f", "avx512_vnni")
    prepared = []
    original = fast_cpu.cpu_fast_path
    monkeypatch.setattr(fast_cpu, "cpu_fast_path", lambda *a: prepared.append(a[1:]) or original(*a))
    assert classify.main(["--arch", "resnet18", "--weights", str(resnet18_weights), "--image-size", "32",
                          "--image", str(images["png"]), "--cpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["precision"] == "FP32" and doc["precision_note"].startswith("--amp: fp32 (this CPU has no native bf16")
    assert prepared == [(None, torch.channels_last)]  # precision.MEMORY_FORMAT_TABLE: measured faster


def test_classify_uses_checkpoint_class_names_arch_and_preprocessing(capsys, images, training_checkpoint):
    doc = _run_json(capsys, "--weights", str(training_checkpoint["path"]), "--topk", "3",
                    "--image", str(images["jpeg"]))
    assert (doc["arch"], doc["image_size"], doc["resize_size"]) == ("resnet18", 48, 56)
    predictions = doc["results"][0]["predictions"]
    assert sorted(p["class"] for p in predictions) == ["bird", "cat", "dog"]
    indices, _ = _by_hand(training_checkpoint["model"], images["jpeg"], 48, 56, k=3)
    assert [p["index"] for p in predictions] == indices
    ema = _run_json(capsys, "--weights", str(training_checkpoint["path"]), "--ema", "--topk", "3",
                    "--image", str(images["jpeg"]))
    indices, probabilities = _by_hand(training_checkpoint["ema"], images["jpeg"], 48, 56, k=3)
    assert [p["index"] for p in ema["results"][0]["predictions"]] == indices
    np.testing.assert_allclose([p["probability"] for p in ema["results"][0]["predictions"]], probabilities, atol=1e-5)


def test_class_names_fall_back_to_imagenet_then_indices(tmp_path):
    names = imagenet_classes()
    assert len(names) == len(set(names)) == 1000 and names[0] == "tench" and names[281] == "tabby"
    spec = models.get("resnet18")
    assert class_names(LoadedModel(None, spec, 1000), None) == names
    assert class_names(LoadedModel(None, spec, 3), None) == ["0", "1", "2"]
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    assert class_names(LoadedModel(None, spec, 3), str(labels)) == ["a", "b", "c"]
    with pytest.raises(UserError, match="has 3 names but the model has 4"):
        class_names(LoadedModel(None, spec, 4), str(labels))


def test_default_preprocessing_follows_the_architecture():
    args = classify.build_parser().parse_args(["--image", "x.jpg"])
    for arch, expected in [("resnet50", (224, 256, "bilinear")), ("efficientnet-b4", (380, 412, "bilinear"))]:
        resolved = classifying.resolve_preprocessing(LoadedModel(None, models.get(arch), 1000), args)
        assert (resolved.image_size, resolved.resize_size, resolved.interpolation) == expected


# ---------------------------------------------------------------- checkpoint2model.py

@pytest.mark.parametrize("ema", [False, True])
def test_checkpoint2model_writes_strict_loading_weights(tmp_path, capsys, training_checkpoint, ema):
    out = tmp_path / "weights.pth"
    argv = ["--checkpoint-path", str(training_checkpoint["path"]), "--weight-path", str(out)]
    assert checkpoint2model.main(argv + (["--ema"] if ema else [])) == 0
    printed = capsys.readouterr().out
    assert "best_prec1 91.25" in printed and "epoch 7" in printed
    state_dict = torch.load(out, map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state_dict)
    model = models.get("resnet18").build(num_classes=3).eval()
    model.load_state_dict(state_dict, strict=True)
    expected = training_checkpoint["ema" if ema else "model"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), expected(images))


def test_checkpoint2model_output_is_accepted_by_main_evaluate(tmp_path, capsys, training_checkpoint):
    out = tmp_path / "weights.pth"
    assert checkpoint2model.main(["--checkpoint-path", str(training_checkpoint["path"]),
                                  "--weight-path", str(out), "--labels-path", str(tmp_path / "labels.txt")]) == 0
    assert (tmp_path / "labels.txt").read_text().split() == ["cat", "dog", "bird"]
    common = ["--data-backend", "synthetic", "--evaluate", "--arch", "resnet18", "--num-classes", "3",
              "--image-size", "32", "-b", "4", "--synthetic-epoch-size", "8", "--workers", "0", "--seed", "3"]
    losses = []
    for source in (["--pretrained-from-file", str(out)], ["--resume", str(training_checkpoint["path"])]):
        workspace = tmp_path / source[0].strip("-")
        assert cli.main([*common, *source, "--workspace", str(workspace)]) == 0
        summary = [r for r in read_raport(workspace / "experiment_raport.json") if r.get("step") == []]
        losses.append(summary[-1]["data"]["val.loss"])
    assert losses[0] == losses[1]


# ---------------------------------------------------------------- model2onnx.py

@pytest.fixture(scope="module")
def export_weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("export")
    paths = {}
    for arch in ("resnet50", "efficientnet-b0"):
        paths[arch] = folder / f"{arch}.pth"
        torch.save(_build(arch, 5).state_dict(), paths[arch])
    return paths


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("arch", ["resnet50", "efficientnet-b0"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_parity_at_batch_1_and_4(capsys, export_weights, arch, fmt):
    weights_path = export_weights[arch]
    assert model2onnx.main(["--arch", arch, "--pretrained-from-file", str(weights_path), "--num-classes", "5",
                            "--image-size", "64", "--device", "cpu", "--format", fmt]) == 0
    printed = capsys.readouterr().out
    assert "check batch 1: max abs diff" in printed and "check batch 4" in printed and "check passed" in printed
    output = weights_path.with_suffix(".onnx" if fmt == "onnx" else ".torchscript.pt")
    assert output.is_file()

    model = _build(arch, 5)
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort
        graph_input = onnx.load(str(output)).graph.input[0]
        assert graph_input.type.tensor_type.shape.dim[0].dim_param  # symbolic, i.e. dynamic batch
        session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])  # noqa: E731
    else:
        scripted = torch.jit.load(str(output))
        run = lambda x: scripted(x)  # noqa: E731
    for batch in (1, 4):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected, got = model(x), run(x)
        assert got.shape == (batch, 5)
        assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_onnx_exporters_both_give_a_dynamic_batch(tmp_path, capsys, resnet18_weights):
    exporters = ["legacy"]
    try:
        import onnxscript  # noqa: F401
        exporters.append("dynamo")
    except ImportError:
        pass
    for exporter in exporters:
        output = tmp_path / f"{exporter}.onnx"
        assert model2onnx.main(["--arch", "resnet18", "--weights", str(resnet18_weights), "--image-size", "32",
                                "--device", "cpu", "--exporter", exporter, "--output", str(output)]) == 0
        assert f"{exporter} exporter" in capsys.readouterr().out
        # the batch axis is really dynamic: a batch the check never used (1, 4) runs and agrees
        images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = _build("resnet18", 10)(images)
        got = runners.onnx_runner(str(output), torch.device("cpu"))(images)
        assert got.shape == (3, 10)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if "dynamo" not in exporters:
        assert model2onnx.main(["--arch", "resnet18", "--exporter", "dynamo", "--output", str(output)]) == 2
        assert "needs the onnxscript package" in _one_error_line(capsys)


def test_export_fails_loudly_above_tolerance(tmp_path, capsys, monkeypatch, resnet18_weights):
    monkeypatch.setattr(parity, "check_parity",
                        lambda *a, **k: [parity.Parity(1, 0.0, 1.0), parity.Parity(4, 0.5, 2.0)])
    output = tmp_path / "m.pt"
    assert model2onnx.main(["--arch", "resnet18", "--weights", str(resnet18_weights), "--image-size", "32",
                            "--device", "cpu", "--format", "torchscript", "--output", str(output)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "differs from PyTorch by 0.5 at batch 4" in error[0]
    assert export_and_check.default_output("run/model_best.pth.tar", "resnet50", "onnx") == "run/model_best.onnx"
    assert export_and_check.default_output(None, "resnet50", "onnx") == "resnet50.onnx"


# ---------------------------------------------------------------- hubconf.py

def test_hub_entries_load_local_weights(export_weights, images):
    model = torch.hub.load(str(ROOT), "nvidia_resnet50", source="local", trust_repo=True,
                           pretrained_from_file=str(export_weights["resnet50"]))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), _build("resnet50", 5)(x))
    with pytest.raises(UserError, match="does not exist"):
        hubconf.nvidia_resnet50(pretrained_from_file=str(export_weights["resnet50"]) + ".missing")
    with pytest.raises(UserError, match="do not fit --arch efficientnet-b0"):
        hubconf.nvidia_efficientnet_b0(pretrained_from_file=str(export_weights["resnet50"]))
    effnet = hubconf.nvidia_efficientnet(pretrained_from_file=str(export_weights["efficientnet-b0"]))
    assert effnet.arch == "efficientnet-b0"  # the default type is a real arch (reference defect 22)
    with pytest.raises(ValueError, match="unknown EfficientNet type"):
        hubconf.nvidia_efficientnet(type="efficient-b0")
    for name in ("nvidia_resnext101_32x4d", "nvidia_se_resnext101_32x4d", "nvidia_efficientnet_b4",
                 "nvidia_efficientnet_widese_b0", "nvidia_efficientnet_widese_b4", "nvidia_resneXt"):
        assert callable(getattr(hubconf, name))


def test_hub_pretrained_downloads_the_ngc_file_weights_only(monkeypatch, tmp_path):
    reference = _build("efficientnet-b0", 1000)
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):  # NGC files wrap the weights in {"state_dict": ...}
        calls.append((url, hash_prefix))
        torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, dst)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = hubconf.nvidia_efficientnet_b0(pretrained=True)
    assert calls == [("https://api.ngc.nvidia.com/v2/models/nvidia/efficientnet_b0_pyt_amp/versions/"
                      "20.12.0/files/nvidia_efficientnet-b0_210412.pth", None)]
    assert len(list((tmp_path / "checkpoints").glob("nvidia_efficientnet-b0_210412-*.pth"))) == 1  # sha256 in name
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    with pytest.raises(ValueError, match="exclude each other"):
        hubconf.nvidia_resnet50(pretrained=True, pretrained_from_file="w.pth")


def test_hub_processing_utils(images):
    utils = hubconf.nvidia_convnets_processing_utils()
    batch = utils.prepare_input_from_uri(str(images["rgba"]))
    pixels = val_transform(224, 256)(open_rgb(str(images["rgba"]))).float() / 255
    expected = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert batch.shape == (1, 3, 224, 224) and torch.allclose(batch[0], expected, atol=1e-6)
    probabilities = torch.zeros(2, 1000)
    probabilities[0, 281], probabilities[0, 0], probabilities[1, 1] = 0.7, 0.2, 1.0
    best = utils.pick_n_best(probabilities, n=2)
    assert best[0] == [("tabby", "70.0%"), ("tench", "20.0%")] and best[1][0] == ("goldfish", "100.0%")
    assert len(utils.get_imgnet_classes()) == 1000


# ---------------------------------------------------------------- plot

def _write_raport(path: Path, epochs: int = 3, ema: bool = True, epoch_records: bool = True,
                  image_sizes: tuple[int, ...] = ()) -> None:
    reporter = Reporter(str(path), enabled=True, topk=5, progress_bar=False)
    reporter.dllogger.console = None
    reporter.log("PARAMETER", {"arch": "resnet18", "lr": 0.1})
    for epoch in range(epochs):
        for iteration in (10, 20):
            reporter.log([epoch, iteration], {"train.loss": 2.0 - epoch * 0.5, "train.lr": 0.1 / (epoch + 1)})
        reporter.log([epoch, 0, 10], {"val.compute_latency": 0.01})
        if epoch_records:
            data = {"train.loss": 2.0 - epoch * 0.5, "train.lr": 0.1 / (epoch + 1), "val.top1": 40.0 + 10 * epoch,
                    "val.top5": 80.0 + 5 * epoch, "val.loss": 1.8 - 0.4 * epoch}
            if ema:
                data.update({"val_ema.top1": 42.0 + 10 * epoch, "val_ema.top5": 81.0 + 5 * epoch,
                             "val_ema.loss": 1.7 - 0.4 * epoch})
            if image_sizes:
                data["train.image_size"] = image_sizes[epoch]
            reporter.log([epoch], data)
    reporter.log([], {"val.top1": 60.0})
    reporter.close()


def test_plot_writes_png_with_the_expected_series(tmp_path, capsys):
    raport = tmp_path / "experiment_raport.json"
    _write_raport(raport)
    assert plot.main([str(raport)]) == 0
    png = tmp_path / "experiment_raport.png"
    assert png.stat().st_size > 10_000
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 500
        assert json.loads(image.info["Series"]) == ["train.loss", "val.loss", "val_ema.loss", "val.top1",
                                                    "val_ema.top1", "val.top5", "val_ema.top5", "train.lr"]
    series = plot.epoch_series(read_raport(raport))
    assert series["val.top1"] == [(0, 40.0), (1, 50.0), (2, 60.0)]
    assert series["train.lr"][-1] == (2, pytest.approx(0.1 / 3))

    no_ema = tmp_path / "plain.json"
    _write_raport(no_ema, ema=False)
    out = tmp_path / "curves.png"
    assert plot.main([str(no_ema), "-o", str(out)]) == 0
    with Image.open(out) as image:
        assert json.loads(image.info["Series"]) == ["train.loss", "val.loss", "val.top1", "val.top5", "train.lr"]

    staged = tmp_path / "staged.json"
    _write_raport(staged, ema=False, image_sizes=(16, 16, 32))
    assert plot.main([str(staged), "-o", str(out)]) == 0
    with Image.open(out) as image:
        assert json.loads(image.info["Series"])[-1] == "train.image_size"
        assert image.size[0] > 1.3 * image.size[1]  # a third column holds the fifth panel
    assert plot.epoch_series(read_raport(staged))["train.image_size"] == [(0, 16.0), (1, 16.0), (2, 32.0)]


def test_plot_rejects_a_raport_without_epoch_records(tmp_path, capsys):
    raport = tmp_path / "r.json"
    _write_raport(raport, epoch_records=False)
    assert plot.main([str(raport)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no epoch records" in err[0]
    assert plot.main([str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_writer_logs_epoch_and_iteration_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = TensorBoardWriter(tmp_path, steps_per_epoch=25)
    raport = tmp_path / "r.json"
    _write_raport(raport, epochs=2)
    for record in read_raport(raport):
        if record["type"] == "LOG":
            writer.log(record["step"], record["data"])
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("epoch/val.top1")] == [(0, 40.0), (1, 50.0)]
    assert [e.step for e in events.Scalars("iteration/train.loss")] == [10, 20, 35, 45]
    assert "epoch/val_ema.top5" in events.Tags()["scalars"]
    assert not any("compute_latency" in tag for tag in events.Tags()["scalars"] if tag.startswith("iteration/"))


# ---------------------------------------------------------------- bad input: one line, exit 2

def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_classify_bad_inputs(capsys, tmp_path, images, resnet18_weights, training_checkpoint):
    weights = ["--arch", "resnet18", "--weights", str(resnet18_weights), "--image-size", "32"]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([*weights, "--image", str(tmp_path / "missing.jpg")], "does not exist"),
        ([*weights, "--image", str(images["not_image"])], "is not a readable image"),
        ([*weights, "--image", str(empty)], "contains no image files"),
        (["--arch", "resnet50", "--weights", str(resnet18_weights), "--image", str(images["png"])],
         "do not fit --arch resnet50"),
        (["--arch", "resnet50", "--weights", str(training_checkpoint["path"]), "--image", str(images["png"])],
         "was trained with --arch resnet18"),
        (["--weights", str(training_checkpoint["no_ema"]), "--ema", "--image", str(images["png"])],
         "has no EMA weights"),
        (["--weights", str(tmp_path / "missing.pth"), "--image", str(images["png"])], "does not exist"),
        ([*weights, "--topk", "0", "--image", str(images["png"])], "--topk must be a positive integer"),
        ([*weights, "--topk", "11", "--image", str(images["png"])], "more than the model's 10 classes"),
    ]
    for argv, message in cases:
        assert classify.main(argv) == 2, argv
        assert message in _one_error_line(capsys), argv


def test_tools_refuse_a_checkpoint_of_a_newer_format_in_one_line(capsys, tmp_path, images, training_checkpoint):
    newer = tmp_path / "newer.pth.tar"
    saved = read_pth(training_checkpoint["path"])
    torch.save({**saved, "format_version": contents.FORMAT_VERSION + 1}, newer)
    out = tmp_path / "out.pth"
    for tool, argv in ((classify, ["--weights", str(newer), "--image", str(images["png"])]),
                       (model2onnx, ["--weights", str(newer), "--output", str(tmp_path / "m.onnx")]),
                       (checkpoint2model, ["--checkpoint-path", str(newer), "--weight-path", str(out)])):
        assert tool.main(argv) == 2
        assert f"has format_version {contents.FORMAT_VERSION + 1}, newer than" in _one_error_line(capsys)
    assert not out.exists() and not (tmp_path / "m.onnx").exists()


def test_checkpoint2model_bad_inputs(capsys, tmp_path, training_checkpoint, resnet18_weights):
    out = str(tmp_path / "out.pth")
    assert checkpoint2model.main(["--checkpoint-path", str(tmp_path / "nope.tar"), "--weight-path", out]) == 2
    assert "checkpoint" in _one_error_line(capsys)
    assert checkpoint2model.main(["--checkpoint-path", str(training_checkpoint["no_ema"]),
                                  "--weight-path", out, "--ema"]) == 2
    assert "no EMA weights" in _one_error_line(capsys)
    assert not Path(out).exists()


def test_classify_script_reports_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "classify.py"), "--image", str(tmp_path / "none.jpg")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: image {tmp_path / 'none.jpg'} does not exist"


def test_pretrained_downloads_are_hash_checked(tmp_path, monkeypatch, capsys):
    """--pretrained through a local file:// URL (no network): torch.hub's naming rule checks a hash
    carried in the name while downloading; a name without one (NGC's) gets the download's SHA-256
    in its cached name, checked on every later use."""
    import hashlib
    from image_classification.errors import UserError
    from image_classification.models import published
    source = tmp_path / "served"
    source.mkdir()
    payload = tmp_path / "payload.pth"
    torch.save({"w": torch.arange(4.0)}, payload)
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cache = tmp_path / "hub" / "checkpoints"

    def serve(name):
        (source / name).write_bytes(payload.read_bytes())
        monkeypatch.setattr(published, "weights_url", lambda arch: (source / name).as_uri())

    serve(f"good-{digest[:8]}.pth")
    assert published.download_weights("resnet50") == str(cache / f"good-{digest[:8]}.pth")
    serve("bad-0123abcd.pth")
    with pytest.raises(UserError, match="invalid hash value"):
        published.download_weights("resnet50")
    assert not list(cache.glob("*bad*"))

    serve("nvidia_weights_200821.pth.tar")
    path = published.download_weights("resnet50")
    assert path == str(cache / f"nvidia_weights_200821-{digest[:16]}.pth.tar")
    assert f"sha256 {digest}" in capsys.readouterr().out
    (source / "nvidia_weights_200821.pth.tar").unlink()  # cached: no second download
    assert published.download_weights("resnet50") == path
    with open(path, "r+b") as file:  # a corrupted cache is an error, not a silent load
        file.seek(100)
        file.write(b"\x00\x01\x02")
    with pytest.raises(UserError, match="are corrupt"):
        published.download_weights("resnet50")


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet-b0"])
def test_cpu_fast_path_folds_every_batchnorm_and_predicts_as_fp32(arch):
    from image_classification import models
    from image_classification.deploy import fast_cpu
    torch.manual_seed(0)
    model = randomise_batch_norm(models.get(arch).build(num_classes=10), mean=0.5, var=(0.5, 2.0)).eval()
    fast = fast_cpu.cpu_fast_path(model, torch.bfloat16, torch.channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    images = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = fast(images.contiguous(memory_format=torch.channels_last)).float()
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
    assert (logits - reference).abs().max() <= 0.1 * reference.abs().max() + 0.05


def test_cpu_fast_path_keeps_fp32_weights_when_a_norm_layer_cannot_be_folded():
    from image_classification.deploy import fast_cpu
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Flatten()).eval()
    fast = fast_cpu.cpu_fast_path(model, torch.bfloat16, torch.channels_last)
    assert {p.dtype for p in fast.parameters()} == {torch.float32}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(torch.randn(2, 3, 8, 8)).shape == (2, 4 * 6 * 6)


# ---------------------------------------------------------------- evaluation preprocessing (issue 19)

def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx
    return {p.key[len(METADATA_PREFIX):]: p.value for p in onnx.load(str(path)).metadata_props}


def _evaluate_onnx(onnx_path: Path, tmp_path: Path) -> dict:
    """main.py --evaluate --onnx on a 3-class folder; the flags it resolved (its PARAMETER record)."""
    from tests.helpers.tiny_data import write_imagefolder
    data = write_imagefolder(tmp_path / "data", classes=("bird", "cat", "dog"), train_per_class=1, val_per_class=2,
                             size=80)
    workspace = tmp_path / "eval"
    assert cli.main(["--evaluate", "--onnx", str(onnx_path), "--data-backend", "pytorch", "-b", "6", "--workers",
                     "0", "--device", "cpu", "--workspace", str(workspace), str(data)]) == 0
    return [r["data"] for r in read_raport(workspace / "experiment_raport.json") if r.get("step") == "PARAMETER"][0]


def test_an_export_at_another_size_scales_the_trained_resize_for_every_consumer(tmp_path, capsys, training_checkpoint):
    # trained: crop 48 after a resize to 56; exported at 64 the resize keeps the ratio: round(64 * 56 / 48) = 75
    repository = tmp_path / "models"
    assert model2onnx.main(["--weights", str(training_checkpoint["path"]), "--image-size", "64", "--device", "cpu",
                            "--triton-repository", str(repository), "--max-batch-size", "2"]) == 0
    output = repository / "resnet18" / "1" / "model.onnx"
    # Before: 56, a resize smaller than the crop, in the metadata, the Triton config and main.py --onnx.
    assert (_onnx_metadata(output)["image_size"], _onnx_metadata(output)["resize_size"]) == ("64", "75")
    assert "shorter side resized to 75 px (bilinear), center crop 64x64" in (
        repository / "resnet18" / "config.pbtxt").read_text()
    used = _evaluate_onnx(output, tmp_path)
    assert (used["eval_image_size"], used["val_resize_size"]) == (64, 75)
    capsys.readouterr()
    assert classify.main(["--onnx", str(output), "--image", str(tmp_path / "data" / "val"), "--json", "--cpu"]) == 0
    assert (json.loads(capsys.readouterr().out)["resize_size"]) == 75


def test_main_evaluate_onnx_uses_the_interpolation_recorded_in_the_file(tmp_path, training_checkpoint):
    saved = read_pth(training_checkpoint["path"])
    saved["config"] = {**saved["config"], "interpolation": "bicubic"}
    writer.save(saved, tmp_path, epoch_index=None, is_best=False, filename="bicubic.pth.tar")
    output = tmp_path / "bicubic.onnx"
    assert model2onnx.main(["--weights", str(tmp_path / "bicubic.pth.tar"), "--device", "cpu", "--output",
                            str(output), "--no-check"]) == 0
    assert _onnx_metadata(output)["interpolation"] == "bicubic"
    # Before: main.py kept its own default, bilinear.
    assert _evaluate_onnx(output, tmp_path)["interpolation"] == "bicubic"
