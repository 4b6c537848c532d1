"""Published weights by name (image_classification.models.catalogue): entries read from torchvision's
weights API and NGC's table, downloads from a local HTTP server (no network), preprocessing per entry."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torchvision

import classify
import model2onnx
from image_classification import cli, config, models
from image_classification.checkpoints.files import read_pth
from image_classification.deploy import loading
from image_classification.errors import UserError
from image_classification.models import catalogue, published, weights
from image_classification.preprocessing import EvalPreprocessing
from tests.helpers.models import randomise_batch_norm
from tests.helpers.shard_servers import serve_http
from tests.helpers.tiny_data import write_imagefolder


@pytest.fixture
def hub_home(tmp_path, monkeypatch) -> Path:
    """torch.hub's cache in a fresh folder (torch's own TORCH_HOME setting)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def served(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    with serve_http(folder) as server:
        yield folder, server


def hashed_file(folder: Path, stem: str, state_dict: dict) -> str:
    """Save ``state_dict`` as torch.hub names published files: ``<stem>-<sha256 prefix>.pth``."""
    temporary = folder / "tmp.pth"
    torch.save(state_dict, temporary)
    name = f"{stem}-{hashlib.sha256(temporary.read_bytes()).hexdigest()[:8]}.pth"
    temporary.rename(folder / name)
    return name


@pytest.fixture
def test_entry(served, hub_home):
    """``resnet18:TEST``: torchvision-format resnet18 weights (1000 classes) on the local server, with
    a preprocessing of its own (crop 28 after a bicubic resize to 36)."""
    folder, server = served
    source = randomise_batch_norm(torchvision.models.resnet18(weights=None), weight=True).eval()
    name = hashed_file(folder, "resnet18", source.state_dict())
    entry = catalogue.register(catalogue.Entry("resnet18:TEST", "resnet18", f"{server.url}/{name}", "test server",
                                               EvalPreprocessing(28, 36, "bicubic")))
    yield entry, source, server, name
    catalogue.unregister(entry.name)


def by_name(name: str) -> catalogue.Entry:
    return catalogue.find(name)


def test_entries_carry_torchvisions_transforms_metrics_and_the_options_their_weights_need():
    v2 = by_name("resnet50:IMAGENET1K_V2")
    assert (v2.preprocessing, v2.top1, v2.size_mb) == (EvalPreprocessing(224, 232, "bilinear"), 80.858, 97.79)
    assert v2.url == "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" and v2.source == "torchvision"
    assert by_name("ResNet50_Weights.IMAGENET1K_V2") is v2 and by_name("resnet50:DEFAULT") is v2
    b4 = by_name("efficientnet-b4:IMAGENET1K_V1")
    assert b4.preprocessing == EvalPreprocessing(380, 384, "bicubic")
    assert b4.model_options() == {"bn_epsilon": 1e-5, "bn_momentum": 0.1}
    assert by_name("efficientnet-b7:IMAGENET1K_V1").model_options() == {"bn_epsilon": 1e-3, "bn_momentum": 0.01}
    assert v2.model_options() == {}
    ngc = by_name("efficientnet-b4:NGC")
    assert (ngc.preprocessing, ngc.source, ngc.url) == (EvalPreprocessing(380, 412, "bicubic"), "NVIDIA NGC",
                                                        published.weights_url("efficientnet-b4"))
    torchvision_archs = sorted({e.arch for e in catalogue.entries() if e.source == "torchvision"})
    assert torchvision_archs == sorted(["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50-32x4d",
                                        "resnext101-32x8d", *(f"efficientnet-b{i}" for i in range(8))])
    for entry in catalogue.entries():  # our models have torchvision's parameter counts
        if entry.torchvision:
            assert entry.params == torchvision.models.get_weight(entry.torchvision).meta["num_params"], entry.name


# resnet18/50, resnext50-32x4d, resnext101-32x8d and efficientnet-b0/b4 are compared in test_models_*.py
@pytest.mark.parametrize("arch", ["resnet34", "resnet101", "resnet152", "efficientnet-b1", "efficientnet-b2",
                                  "efficientnet-b3", "efficientnet-b5", "efficientnet-b6", "efficientnet-b7"])
def test_torchvision_weights_of_every_catalogue_architecture_give_identical_logits(arch, tmp_path):
    entry = catalogue.default(arch)
    torch.manual_seed(0)
    theirs = randomise_batch_norm(torchvision.models.get_model(arch.replace("-", "_"), weights=None),
                                  weight=True).eval()
    torch.save(theirs.state_dict(), tmp_path / "tv.pth")
    ours = loading.load_model(arch, str(tmp_path / "tv.pth"), options=entry.model_options()).model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_pretrained_name_fine_tunes_with_its_preprocessing_and_classify_and_export_record_it(
        test_entry, hub_home, tmp_path, capsys):
    entry, source, server, name = test_entry
    data = write_imagefolder(tmp_path / "data", classes=("a", "b", "c"), train_per_class=4, val_per_class=2, size=40)
    args = ["--arch", "resnet18", "--pretrained", "resnet18:TEST", "--data-backend", "pytorch", "-b", "4",
            "--epochs", "1", "--workers", "0", "--device", "cpu", "--freeze-backbone-epochs", "1"]
    assert cli.main([*args, "--workspace", str(tmp_path / "ws"), str(data)]) == 0
    assert ("=> fc.weight/fc.bias from resnet18:TEST (1000 classes) left out: new classifier for 3 classes"
            in capsys.readouterr().out)
    saved = read_pth(tmp_path / "ws" / "checkpoint.pth.tar")
    # No size flags: the entry's preprocessing is the run's (training crop 28, evaluation resize 36 bicubic).
    assert saved["eval_preprocessing"] == EvalPreprocessing(28, 36, "bicubic").as_dict()
    assert saved["config"]["image_size"] == 28 and saved["config"]["pretrained"] == "resnet18:TEST"
    frozen = {k: v for k, v in saved["state_dict"].items() if not k.startswith("fc.")}
    mapped = weights.adapt_state_dict(source.state_dict(), models.get("resnet18").build())
    assert all(torch.equal(frozen[k], mapped[k]) for k in frozen)
    assert (hub_home / name).is_file() and server.gets[f"/{name}"] == 1

    image = data / "val" / "a" / "0.jpg"
    assert classify.main(["--pretrained", "resnet18:TEST", "--image", str(image), "--json", "--cpu"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["arch"], document["image_size"], document["resize_size"], document["interpolation"]) == (
        "resnet18", 28, 36, "bicubic")
    assert server.gets[f"/{name}"] == 1  # the cached file, checked against the hash in its name
    output = tmp_path / "m.onnx"
    assert model2onnx.main(["--pretrained", "resnet18:TEST", "--device", "cpu", "--output", str(output),
                            "--no-check"]) == 0
    import onnx
    metadata = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert {k.rsplit(".", 1)[-1]: v for k, v in metadata.items() if k.endswith(("image_size", "resize_size",
                                                                              "interpolation"))} == {
        "image_size": "28", "resize_size": "36", "interpolation": "bicubic"}


def test_a_mirror_serves_ngc_and_torchvision_files_and_their_hashes_are_checked(served, hub_home, monkeypatch):
    folder, server = served
    monkeypatch.setenv(published.MIRROR_ENV, server.url)
    ngc = models.get("resnet50").build()
    torch.save({"state_dict": {f"module.{k}": v for k, v in ngc.state_dict().items()}},
               folder / "nvidia_resnet50_200821.pth.tar")
    loaded = loading.load_source("resnet50", "resnet50:NGC")
    assert loaded.preprocessing == EvalPreprocessing(224, 256, "bilinear")
    assert all(torch.equal(t, ngc.state_dict()[k]) for k, t in loaded.model.state_dict().items())
    assert len(list(hub_home.glob("nvidia_resnet50_200821-*.pth.tar"))) == 1  # its sha256 in the cached name
    # A file that is not torchvision's (its SHA-256 does not start with the name's 7f5810bc) is refused.
    torch.save(models.get("efficientnet-b0").build().state_dict(), folder / "efficientnet_b0_rwightman-7f5810bc.pth")
    with pytest.raises(UserError, match=r"^could not download .*/efficientnet_b0_rwightman-7f5810bc.pth "
                                        r"\(RuntimeError: invalid hash value"):
        loading.load_source("efficientnet-b0", "efficientnet-b0:IMAGENET1K_V1")
    assert not list(hub_home.glob("efficientnet_b0*"))


@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet50", "--pretrained", "resnet50:IMAGENET1K_V3"],
     "unknown weights 'resnet50:IMAGENET1K_V3'; did you mean resnet50:IMAGENET1K_V2, resnet50:IMAGENET1K_V1, resnet50:NGC? "
     "(list them: python -m image_classification.models.catalogue)"),
    (["--arch", "resnet18", "--pretrained", "resnet50:IMAGENET1K_V2"],
     "weights resnet50:IMAGENET1K_V2 are for --arch resnet50, not --arch resnet18"),
    (["--arch", "resnext101-32x4d", "--pretrained", "resnext101-32x4d:IMAGENET1K_V1"],
     "unknown weights 'resnext101-32x4d:IMAGENET1K_V1'; did you mean resnext101-32x4d:NGC"),
    (["--arch", "se-resnext101-32x4d", "--pretrained", "--pretrained-from-file", "w.pth"],
     "--pretrained and --pretrained-from-file exclude each other"),
])
def test_bad_weights_names_are_one_line(argv, message, tmp_path, capsys):
    assert cli.main([*argv, "--data-backend", "synthetic", "--workspace", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {message}")


def test_bare_pretrained_keeps_the_reference_spelling_and_defaults():
    args = config.parse_args(["--arch", "resnet50", "--pretrained", "/data/imagenet"])
    assert (args.pretrained, args.data) == (True, "/data/imagenet")
    assert catalogue.for_flag(True, "resnet50").name == "resnet50:NGC"          # the reference's file
    assert catalogue.for_flag(True, "resnet18").name == "resnet18:IMAGENET1K_V1"  # torchvision's DEFAULT
    assert config.parse_args(["--pretrained", "resnet50:IMAGENET1K_V2", "DIR"]).pretrained == "resnet50:IMAGENET1K_V2"
    with pytest.raises(UserError, match="no published weights for --arch efficientnet-widese-b1"):
        catalogue.for_flag(True, "efficientnet-widese-b1")


def test_the_listing_names_params_top1_size_preprocessing_and_source(capsys):
    assert catalogue.main(["--arch", "resnet50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines] == [
        ["name", "params", "top-1", "%", "size", "MB", "eval", "preprocessing", "source"],
        ["resnet50:NGC", "25,557,032", "78.60", "-", "resize", "256", "crop", "224", "bilinear", "NVIDIA", "NGC"],
        ["resnet50:IMAGENET1K_V1", "25,557,032", "76.13", "97.8", "resize", "256", "crop", "224", "bilinear",
         "torchvision"],
        ["resnet50:IMAGENET1K_V2", "25,557,032", "80.86", "97.8", "resize", "232", "crop", "224", "bilinear",
         "torchvision"]]
