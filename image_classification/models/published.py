"""NVIDIA's published (NGC) weights: one table for main.py --pretrained, classify.py and hubconf.

Downloading needs network access; files are cached by ``torch.hub`` and always loaded with
``weights_only=True``. Offline, download the file elsewhere and use ``--pretrained-from-file``.
"""
from __future__ import annotations

import os

import torch

from image_classification.errors import UserError

NGC_URL = "https://api.ngc.nvidia.com/v2/models/nvidia/{name}/versions/{version}/files/{file}"

# arch -> (NGC model name, version, file)
PUBLISHED = {
    "resnet50": ("resnet50_pyt_amp", "20.06.0", "nvidia_resnet50_200821.pth.tar"),
    "resnext101-32x4d": ("resnext101_32x4d_pyt_amp", "20.06.0", "nvidia_resnext101-32x4d_200821.pth.tar"),
    "se-resnext101-32x4d": ("seresnext101_32x4d_pyt_amp", "20.06.0", "nvidia_se-resnext101-32x4d_200821.pth.tar"),
    "efficientnet-b0": ("efficientnet_b0_pyt_amp", "20.12.0", "nvidia_efficientnet-b0_210412.pth"),
    "efficientnet-b4": ("efficientnet_b4_pyt_amp", "20.12.0", "nvidia_efficientnet-b4_210412.pth"),
    "efficientnet-widese-b0": ("efficientnet_widese_b0_pyt_amp", "20.12.0", "nvidia_efficientnet-widese-b0_210412.pth"),
    "efficientnet-widese-b4": ("efficientnet_widese_b4_pyt_amp", "20.12.0", "nvidia_efficientnet-widese-b4_210412.pth"),
}


def weights_url(arch: str) -> str:
    try:
        name, version, file = PUBLISHED[arch]
    except KeyError:
        raise UserError(f"no published weights for --arch {arch} (available for: {', '.join(PUBLISHED)}); "
                        "use --pretrained-from-file") from None
    return NGC_URL.format(name=name, version=version, file=file)


def download_weights(arch: str) -> str:
    """Path of the cached download of ``arch``'s published weights (downloaded if missing)."""
    url = weights_url(arch)
    target = f"{torch.hub.get_dir()}/checkpoints/{url.rsplit('/', 1)[1]}"
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, target, progress=True)
        except Exception as error:  # network errors come in many types (URLError, HTTPError, OSError)
            raise UserError(f"could not download {url} ({type(error).__name__}: {error}); download it yourself "
                            "and pass --pretrained-from-file") from None
    return target
