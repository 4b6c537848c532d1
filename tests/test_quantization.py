"""Quantization-aware training (quant_main.py / --quantize), INT8 ONNX export, ONNX evaluation and the
Triton model repository, on a small BatchNorm CNN and the 32 px digits."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import classify  # noqa: E402
import model2onnx  # noqa: E402
from image_classification import cli, models  # noqa: E402
from image_classification.checkpoints.files import read_pth  # noqa: E402
from image_classification.deploy import runners  # noqa: E402
from image_classification.reporting.dllogger import read_raport  # noqa: E402
from tests.helpers.registered import model_for_module  # noqa: E402

ARCH = "tiny-bn-cnn"


def tiny_bn_cnn(num_classes: int = 10) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, num_classes))


_tiny_bn_cnn_registered = model_for_module(ARCH, tiny_bn_cnn, default_image_size=32)


COMMON = ["--arch", ARCH, "--data-backend", "pytorch", "--image-size", "32", "--val-resize-size", "32", "-b", "32",
          "--workers", "0", "--seed", "3", "--device", "cpu", "--print-freq", "100"]
QAT = [*COMMON, "--quantize", "--calib-batches", "2", "--epochs", "2", "--lr", "0.01", "--momentum", "0.9",
       "--lr-schedule", "cosine"]


def summary(workspace: Path) -> dict:
    return [r["data"] for r in read_raport(workspace / "experiment_raport.json")
            if r.get("type") == "LOG" and r["step"] == []][-1]


def epochs(workspace: Path) -> dict[int, dict]:
    return {r["step"][0]: r["data"] for r in read_raport(workspace / "experiment_raport.json")
            if r.get("type") == "LOG" and isinstance(r["step"], list) and len(r["step"]) == 1}


def one_line_error(capsys, status: int) -> str:
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def fp32(digits_dir, tmp_path_factory) -> Path:
    workspace = tmp_path_factory.mktemp("fp32")
    assert cli.main([*COMMON, "--epochs", "4", "--lr", "0.3", "--lr-schedule", "cosine", "--workspace",
                     str(workspace), str(digits_dir)]) == 0
    return workspace


@pytest.fixture(scope="module")
def qat(fp32, digits_dir, tmp_path_factory) -> Path:
    workspace = tmp_path_factory.mktemp("qat")
    assert cli.main([*QAT, "--pretrained-from-file", str(fp32 / "model_best.pth.tar"), "--workspace",
                     str(workspace), str(digits_dir)]) == 0
    return workspace


def test_qat_keeps_fp32_accuracy_and_saves_int8_quantizers(fp32, qat):
    fp32_top1, qat_top1 = summary(fp32)["val.top1"], summary(qat)["val.top1"]
    assert fp32_top1 > 50
    assert qat_top1 > fp32_top1 - 2.0, (fp32_top1, qat_top1)
    saved = read_pth(qat / "checkpoint.pth.tar")  # weights_only=True
    assert saved["arch"] == ARCH and "modelopt_state" in saved
    amax = {k: v for k, v in saved["state_dict"].items() if k.endswith("_quantizer._amax")}
    # Every conv and the linear layer: a per-tensor input range and one weight range per output channel.
    assert amax["0.weight_quantizer._amax"].numel() == 16 and amax["11.weight_quantizer._amax"].numel() == 10
    assert amax["0.input_quantizer._amax"].numel() == 1 and all((v > 0).all() for v in amax.values())
    # Max calibration: a weight range is the largest |weight| of its output channel in the fp32
    # model that was calibrated; the first input's range is the largest |normalised pixel| seen,
    # at most (1 - 0.406) / 0.225 = 2.64 (white in the blue channel), and above black's 2.12 in red.
    start = read_pth(fp32 / "model_best.pth.tar")["state_dict"]
    for layer in ("0", "3", "6", "11"):
        per_channel = start[f"{layer}.weight"].abs().flatten(1).amax(dim=1)
        torch.testing.assert_close(amax[f"{layer}.weight_quantizer._amax"].flatten(), per_channel)
    assert 2.12 < amax["0.input_quantizer._amax"].item() <= (1 - 0.406) / 0.225 + 1e-4


def test_qat_resume_reproduces_the_uninterrupted_run(fp32, qat, digits_dir, tmp_path):
    args = [*QAT, "--pretrained-from-file", str(fp32 / "model_best.pth.tar"), "--workspace", str(tmp_path),
            str(digits_dir)]
    assert cli.main([*args, "--run-epochs", "1"]) == 0
    assert cli.main([*args, "--resume", str(tmp_path / "checkpoint.pth.tar")]) == 0
    assert epochs(tmp_path)[1]["train.loss"] == epochs(qat)[1]["train.loss"]
    assert epochs(tmp_path)[1]["val.top1"] == epochs(qat)[1]["val.top1"]
    straight, resumed = (read_pth(w / "checkpoint.pth.tar")["state_dict"] for w in (qat, tmp_path))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_int8_onnx_export_matches_fake_quant_and_evaluates_like_pytorch(qat, digits_dir, tmp_path, capsys):
    output = tmp_path / "qat.onnx"
    assert model2onnx.main(["--weights", str(qat / "checkpoint.pth.tar"), "--int8", "--output", str(output),
                            "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "check passed" in printed and "top-1 agreement" in printed
    ops = [node.op_type for node in onnx.load(str(output)).graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6  # inputs and weights
    # The deployed file scores the val set like the fake-quantized PyTorch model.
    pytorch_ws, onnx_ws = tmp_path / "pt", tmp_path / "onnx"
    assert cli.main([*COMMON, "--evaluate", "--resume", str(qat / "checkpoint.pth.tar"), "--workspace",
                     str(pytorch_ws), str(digits_dir)]) == 0
    assert cli.main(["--evaluate", "--onnx", str(output), "--data-backend", "pytorch", "-b", "64", "--workers", "0",
                     "--device", "cpu", "--workspace", str(onnx_ws), str(digits_dir)]) == 0
    assert abs(summary(onnx_ws)["val.top1"] - summary(pytorch_ws)["val.top1"]) <= 100 / 360 + 1e-6
    # classify.py runs the file with the preprocessing and class names recorded in it.
    image = sorted((digits_dir / "val" / "7").iterdir())[0]
    capsys.readouterr()
    assert classify.main(["--onnx", str(output), "--image", str(image), "--topk", "3"]) == 0
    via_onnx = capsys.readouterr().out.splitlines()
    assert classify.main(["--weights", str(qat / "checkpoint.pth.tar"), "--image", str(image), "--topk", "3",
                          "--precision", "FP32", "--cpu"]) == 0
    via_pytorch = capsys.readouterr().out.splitlines()
    assert via_onnx[0] == via_pytorch[0] == str(image) and len(via_onnx) == 4
    assert [line.split(":")[0] for line in via_onnx] == [line.split(":")[0] for line in via_pytorch]


def test_triton_repository_config_parses_and_model_runs_at_1_and_max_batch(qat, tmp_path, capsys):
    from tritonclient.grpc import model_config_pb2
    import onnxruntime as ort

    repository = tmp_path / "models"
    assert model2onnx.main(["--weights", str(qat / "checkpoint.pth.tar"), "--triton-repository", str(repository),
                            "--max-batch-size", "16", "--device", "cpu"]) == 0
    assert "check batch 16" in capsys.readouterr().out
    folder = repository / f"{ARCH}-int8"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt", "labels.txt"]
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == (f"{ARCH}-int8", "onnxruntime_onnx", 16)
    assert config.HasField("dynamic_batching")
    (inp,), (out,) = config.input, config.output
    assert (inp.name, list(inp.dims), inp.data_type) == ("input", [3, 32, 32], model_config_pb2.TYPE_FP32)
    assert (out.name, list(out.dims), out.label_filename) == ("logits", [10], "labels.txt")
    assert (folder / "labels.txt").read_text().splitlines() == [str(d) for d in range(10)]
    # Fed by the names and dims the config declares, the served file gives the logits that the ONNX
    # runner of main.py --onnx and classify.py --onnx gives.
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    runner = runners.onnx_runner(str(folder / "1" / "model.onnx"), torch.device("cpu"))
    rng = np.random.default_rng(0)
    for batch in (1, config.max_batch_size):
        images = rng.random((batch, *inp.dims), dtype=np.float32)
        (logits,) = session.run([out.name], {inp.name: images})
        assert logits.shape == (batch, 10) and np.isfinite(logits).all()
        np.testing.assert_array_equal(logits, runner(torch.from_numpy(images)).numpy())
    # An existing model folder is never overwritten.
    assert model2onnx.main(["--weights", str(qat / "checkpoint.pth.tar"), "--triton-repository", str(repository),
                            "--device", "cpu"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_quantization_input_is_one_line(fp32, digits_dir, tmp_path, capsys):
    weights = str(fp32 / "model_best.pth.tar")
    status = model2onnx.main(["--weights", weights, "--int8", "--output", str(tmp_path / "x.onnx")])
    assert "has no quantizers" in one_line_error(capsys, status)
    assert not (tmp_path / "x.onnx").exists()
    status = cli.main([*QAT, "--workspace", str(tmp_path), str(digits_dir)])
    assert "--pretrained-from-file" in one_line_error(capsys, status)
    status = cli.main([*QAT, "--evaluate", "--pretrained-from-file", weights, "--workspace", str(tmp_path),
                       str(digits_dir)])
    assert "calibrates on the training set" in one_line_error(capsys, status)
    status = cli.main([*QAT, "--pretrained-from-file", weights, "--workspace", str(tmp_path), str(tmp_path / "none")])
    one_line_error(capsys, status)  # a missing calibration (training) set
    status = cli.main(["--onnx", str(tmp_path / "x.onnx"), "--data-backend", "pytorch", str(digits_dir)])
    assert "add --evaluate" in one_line_error(capsys, status)
    status = cli.main(["--evaluate", "--onnx", str(tmp_path / "x.onnx"), "--data-backend", "pytorch", str(digits_dir)])
    assert "does not exist" in one_line_error(capsys, status)


def test_quant_archs_are_the_efficientnets_with_quantize_on():
    for variant in ("b0", "b4", "b7"):
        quant, base = models.get(f"efficientnet-quant-{variant}"), models.get(f"efficientnet-{variant}")
        assert quant.quantized and not base.quantized
        assert (quant.default_image_size, quant.defaults) == (base.default_image_size, base.defaults)
    a, b = models.get("efficientnet-quant-b0").build(10), models.get("efficientnet-b0").build(10)
    assert a.state_dict().keys() == b.state_dict().keys()


@pytest.mark.parametrize("variant, expected", [
    ("b0", dict(epochs=10, batch_size=128, optimizer="sgd", lr=0.0125, momentum=0.89, weight_decay=4.5e-5,
                lr_schedule="cosine")),
    ("b4", dict(epochs=2, batch_size=32, optimizer="rmsprop", lr=4.09e-6, rmsprop_alpha=0.853, rmsprop_eps=0.00422,
                momentum=0.9, weight_decay=9.714e-4, lr_schedule="linear")),
])
def test_quantization_recipes_run_quant_main_with_the_reference_hyperparameters(variant, expected, tmp_path):
    import multiproc
    from image_classification import config

    shim = tmp_path / "python"
    shim.write_text("#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" > \"$RECIPE_CALL\"\n")
    shim.chmod(0o755)
    script = ROOT / f"efficientnet/quantization/DGX1V-32G_efficientnet-quant-{variant}_FP32.sh"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(shim), "RECIPE_CALL": str(tmp_path / "call")}
    subprocess.run(["bash", str(script), "w.pth", "ws", "--print-freq", "5"], env=env, check=True, timeout=60)
    call = (tmp_path / "call").read_text().split("\0")[:-1]
    spawn = multiproc.parse_args(call[1:])
    assert spawn.nproc_per_node == 8 and spawn.training_script == str(ROOT / "quant_main.py")
    args = config.parse_args(spawn.training_script_args, {"quantize": True})
    assert (args.arch, args.pretrained_from_file, args.workspace, args.print_freq, args.quantize) == (
        f"efficientnet-quant-{variant}", "w.pth", "ws", 5, True)
    assert {key: getattr(args, key) for key in expected} == expected
    missing = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "usage:" in missing.stderr


def test_post_training_int8_for_onnx_runtime_scores_like_fp32(fp32, digits_dir, tmp_path, capsys):
    weights = str(fp32 / "model_best.pth.tar")
    repository = tmp_path / "models"
    # This 3-layer CNN is far more sensitive to INT8 rounding than the zoo's deep models (ResNet18
    # on the digits agrees on 100 %), hence the lower bar.
    assert model2onnx.main(["--weights", weights, "--int8-calibration", str(digits_dir), "--calibration-images",
                            "128", "--min-agreement", "0.95", "--triton-repository", str(repository),
                            "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "calibrated on 128 images" in printed and "check passed" in printed
    assert "=> calibration MinMax (per-channel, U8 activations): top-1 agreement" in printed
    assert "\n=> chose " in printed
    output = repository / f"{ARCH}-int8" / "1" / "model.onnx"
    ops = [node.op_type for node in onnx.load(str(output)).graph.node]
    chosen = next(line for line in printed.splitlines() if line.startswith("=> chose "))
    # Which candidate wins depends on the trained weights (nhwc training, the default since
    # --memory-format auto, gives others than nchw): all three convolutions in INT8, or the
    # first/last layer kept in fp32 -- the first conv stays a float Conv, and only that one.
    float_convs = 1 if "first/last layer fp32" in chosen else 0
    assert ops.count("QLinearConv") == 3 - float_convs and ops.count("Conv") == float_convs, (chosen, ops)
    assert "BatchNormalization" not in ops and (not float_convs or ops[0] == "Conv")
    # The deployed file scores the val set within two points of the fp32 model.
    pytorch_ws, onnx_ws = tmp_path / "pt", tmp_path / "onnx"
    assert cli.main([*COMMON, "--evaluate", "--pretrained-from-file", weights, "--workspace", str(pytorch_ws),
                     str(digits_dir)]) == 0
    assert cli.main(["--evaluate", "--onnx", str(output), "--data-backend", "pytorch", "-b", "64", "--workers", "0",
                     "--device", "cpu", "--workspace", str(onnx_ws), str(digits_dir)]) == 0
    assert abs(summary(onnx_ws)["val.top1"] - summary(pytorch_ws)["val.top1"]) <= 2.0


def test_post_training_int8_bad_input_is_one_line(fp32, qat, digits_dir, tmp_path, capsys):
    weights = str(fp32 / "model_best.pth.tar")
    output = str(tmp_path / "x.onnx")
    status = model2onnx.main(["--weights", weights, "--int8-calibration", str(tmp_path / "none"), "--output", output])
    assert "no such directory" in one_line_error(capsys, status)
    status = model2onnx.main(["--weights", str(qat / "checkpoint.pth.tar"), "--int8-calibration", str(digits_dir),
                              "--output", output])
    assert "QAT checkpoint" in one_line_error(capsys, status)
    status = model2onnx.main(["--weights", weights, "--int8-calibration", str(digits_dir), "--format", "torchscript",
                              "--output", output])
    assert "drop --format torchscript" in one_line_error(capsys, status)
    status = model2onnx.main(["--weights", weights, "--int8-calibration", str(digits_dir), "--calibration-images",
                              "0", "--output", output])
    assert "--calibration-images" in one_line_error(capsys, status)
    status = model2onnx.main(["--weights", weights, "--int8-calibration", str(digits_dir), "--min-agreement", "99",
                              "--output", output])
    assert "--min-agreement is a share" in one_line_error(capsys, status)
    assert not (tmp_path / "x.onnx").exists()


def test_post_training_int8_chooses_the_calibration_by_agreement_and_still_refuses(fp32, digits_dir, tmp_path,
                                                                                   capsys, monkeypatch):
    """Every recipe is tried when none agrees on every image; the best is chosen and reported, and
    a file below --min-agreement is still refused (agreement scores faked per recipe, in order)."""
    from image_classification.deploy import ptq
    from image_classification.deploy.parity import Parity
    scores = iter([0.90, 0.97, 0.93, 0.95, 0.96, 0.94])
    monkeypatch.setattr(ptq, "agreement", lambda *args, **kwargs: Parity(
        batch=16, max_abs_diff=1.0, max_abs_output=10.0, top1_agreement=next(scores)))
    output = tmp_path / "int8.onnx"
    status = model2onnx.main(["--weights", str(fp32 / "model_best.pth.tar"), "--int8-calibration", str(digits_dir),
                              "--calibration-images", "16", "--output", str(output), "--device", "cpu"])
    captured = capsys.readouterr()
    assert status == 1 and output.is_file()
    tried = [line for line in captured.out.splitlines() if line.startswith("=> calibration ")]
    assert [line.split(": top-1")[0] for line in tried] == [f"=> calibration {r.describe()}" for r in ptq.RECIPES]
    assert "=> chose Percentile (per-channel, U8 activations) of 6 calibration recipe(s) tried" in captured.out
    assert "agreement with fp32 97.0%" in captured.out.split("=> check")[1]
    assert "agrees with fp32 on only 97.0% of the calibration images with the best of 6 calibration recipes" in \
        captured.err


def test_post_training_int8_stops_at_the_first_recipe_that_agrees_everywhere(fp32, digits_dir, tmp_path, capsys,
                                                                            monkeypatch):
    from image_classification.deploy import ptq
    from image_classification.deploy.parity import Parity
    scores = iter([0.98, 1.0])
    monkeypatch.setattr(ptq, "agreement", lambda *args, **kwargs: Parity(
        batch=16, max_abs_diff=0.1, max_abs_output=10.0, top1_agreement=next(scores)))
    assert model2onnx.main(["--weights", str(fp32 / "model_best.pth.tar"), "--int8-calibration", str(digits_dir),
                            "--calibration-images", "16", "--output", str(tmp_path / "int8.onnx"),
                            "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "=> chose Percentile (per-channel, U8 activations) of 2 calibration recipe(s) tried" in printed
