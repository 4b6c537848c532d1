"""torch.hub entry points, under the reference's names.

    model = torch.hub.load(REPO_DIR, "nvidia_resnet50", source="local", pretrained_from_file="model.pth")
    utils = torch.hub.load(REPO_DIR, "nvidia_convnets_processing_utils", source="local")
    batch = utils.prepare_input_from_uri("cat.jpg")
    probabilities = torch.softmax(model(batch), dim=1)
    utils.pick_n_best(probabilities, n=5)

Every model entry takes ``pretrained`` (True: download the published NGC weights, or a published
name such as ``"resnet50:IMAGENET1K_V2"``; **off by default** here, unlike the reference, since it
needs network access), ``pretrained_from_file=PATH`` (a local
weights file or training checkpoint, loaded strictly; a missing file is an error),
``state_dict_key_map_fn`` (applied to every key before loading) and model options as keyword
arguments (``num_classes``, ``trt``, ``dropout``, ...). ``num_classes`` defaults to the file's
classifier size, else 1000; another number (fine-tuning) loads every weight but the classifier,
which is new. Models are returned in eval mode. ``convnets_backbone`` returns an architecture's
stages as a feature-map backbone.
"""
import urllib.parse as _urlparse
import urllib.request as _urlrequest

import numpy as _np
import torch as _torch

from image_classification import models as _models
from image_classification import preprocessing as _preprocessing
from image_classification.checkpoints import contents as _contents
from image_classification.data.loaders import transforms as _transforms
from image_classification.deploy import labels as _labels
from image_classification.deploy import loading as _loading
from image_classification.models import catalogue as _catalogue

dependencies = ["torch", "torchvision", "PIL", "numpy"]


def _build(arch, pretrained=False, pretrained_from_file=None, state_dict_key_map_fn=None, progress=True,
           **kwargs):
    if pretrained and pretrained_from_file:
        raise ValueError("pretrained=True and pretrained_from_file exclude each other")
    num_classes = kwargs.pop("num_classes", None)
    # num_classes other than the weights' (fine-tuning): all but the classifier load, the classifier is new
    fine_tune = dict(num_classes=num_classes, options=kwargs, new_classifier=num_classes is not None)
    if pretrained_from_file is not None:
        state_dict, source = _contents.read_weights(str(pretrained_from_file)).state_dict, str(pretrained_from_file)
    elif pretrained:
        entry = _catalogue.for_flag(pretrained, arch)  # True: NGC's file; or a name, e.g. "resnet50:IMAGENET1K_V2"
        if state_dict_key_map_fn is None:
            return _loading.load_published(entry, **fine_tune).model
        source = _catalogue.fetch(entry)  # hash-checked, loaded with weights_only=True
        state_dict = _contents.read_weights(source).state_dict
    else:
        return _loading.load_model(arch, num_classes=num_classes, options=kwargs).model
    if state_dict_key_map_fn is not None:
        state_dict = {state_dict_key_map_fn(key): value for key, value in state_dict.items()}
    return _loading.load_model(arch, state_dict=state_dict, source=source, **fine_tune).model


def _entry(arch):
    def entry(pretrained=False, **kwargs):
        return _build(arch, pretrained=pretrained, **kwargs)
    entry.__name__ = _models.get(arch).hub_name
    entry.__doc__ = (f"{arch} ({_models.get(arch).default_image_size} px). pretrained=True downloads the "
                     "NGC weights; pretrained_from_file=PATH loads a local file strictly; other keyword "
                     "arguments are model options (num_classes, ...).")
    return entry


nvidia_resnet50 = _entry("resnet50")
nvidia_resnext101_32x4d = _entry("resnext101-32x4d")
nvidia_se_resnext101_32x4d = _entry("se-resnext101-32x4d")
nvidia_efficientnet_b0 = _entry("efficientnet-b0")
nvidia_efficientnet_b4 = _entry("efficientnet-b4")
nvidia_efficientnet_widese_b0 = _entry("efficientnet-widese-b0")
nvidia_efficientnet_widese_b4 = _entry("efficientnet-widese-b4")


def nvidia_resneXt(pretrained=False, **kwargs):
    """Alias of nvidia_resnext101_32x4d (the reference's older name)."""
    return nvidia_resnext101_32x4d(pretrained=pretrained, **kwargs)


def nvidia_efficientnet(type="efficientnet-b0", pretrained=False, **kwargs):  # noqa: A002 - reference name
    """Any EfficientNet by arch name: efficientnet-b0..b7, efficientnet-widese-b0..b7."""
    if not str(type).startswith("efficientnet-") or type not in _models.names():
        variants = [n for n in _models.names() if n.startswith("efficientnet-")]
        raise ValueError(f"unknown EfficientNet type {type!r}; choose one of: {', '.join(variants)}")
    return _build(type, pretrained=pretrained, **kwargs)


def convnets_backbone(arch="resnet50", weights=None, out_indices=None, **kwargs):
    """``arch``'s stages as a backbone for detection or segmentation: ``forward`` returns the feature
    maps listed in ``.feature_info`` (channels, stride). ``weights``: a weights file or training
    checkpoint, a published name such as "resnet50:IMAGENET1K_V2", or None (random). ``out_indices``:
    the stages (ResNet 0-3 at strides 4-32; default: the last stage of each stride). Other keyword
    arguments are model options."""
    return _models.backbone(arch, weights=weights, out_indices=out_indices, **kwargs)


class _ProcessingUtils:
    """Helpers of the reference's hub example: load an image, read the top classes."""

    @staticmethod
    def prepare_input_from_uri(uri, cuda=False, image_size=224):
        """A local path (or http(s) URL) -> normalised ``[1, 3, S, S]`` float tensor, evaluation
        preprocessing (resize the shorter side to S+32, center crop S)."""
        evaluation = _preprocessing.resolve(None, image_size)
        image = _transforms.to_rgb(_open_uri(uri))
        batch = evaluation.normalize(_torch.device("cpu"))(evaluation.transform()(image).unsqueeze(0))
        return batch.cuda() if cuda else batch

    @staticmethod
    def pick_n_best(predictions, n=5):
        """Per sample, the ``n`` most probable (class name, "pp.p%") pairs of ``[N, 1000]``
        probabilities (apply softmax first). Prints them and returns them."""
        probabilities = _torch.as_tensor(predictions).detach().float().cpu()
        classes = _labels.imagenet_classes()
        values, indices = probabilities.topk(n, dim=1)
        results = []
        for sample, (row_values, row_indices) in enumerate(zip(values.tolist(), indices.tolist())):
            best = [(classes[i], f"{100 * p:.1f}%") for p, i in zip(row_values, row_indices)]
            print(f"sample {sample}: {best}")
            results.append(best)
        return results

    @staticmethod
    def get_imgnet_classes():
        """The 1000 ImageNet class names as a NumPy array (index it with class ids)."""
        return _np.array(_labels.imagenet_classes())


def _open_uri(uri):
    from PIL import Image

    scheme = _urlparse.urlparse(str(uri)).scheme
    if scheme in ("http", "https"):
        import io

        with _urlrequest.urlopen(uri, timeout=30) as response:
            image = Image.open(io.BytesIO(response.read()))
            image.load()
        return image
    return _transforms.open_rgb(str(uri)[7:] if scheme == "file" else str(uri))


def nvidia_convnets_processing_utils():
    """The processing helpers: prepare_input_from_uri, pick_n_best, get_imgnet_classes."""
    return _ProcessingUtils()
