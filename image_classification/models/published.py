"""NVIDIA's published (NGC) weights, and the hash-checked download of any published file.

The catalogue of every published file (these and torchvision's) is
:mod:`image_classification.models.catalogue`. Downloading needs network access (or a mirror,
:data:`MIRROR_ENV`); files are cached in ``torch.hub``'s directory, hash-checked (see
:func:`download_weights`) and always loaded with ``weights_only=True``. Offline, download the file elsewhere and use ``--pretrained-from-file``.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re

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


#: A base URL that serves the published files under their own names (an internal mirror, a local
#: test server): every download then fetches ``$CONVNETS_WEIGHTS_MIRROR/<file name>`` instead.
MIRROR_ENV = "CONVNETS_WEIGHTS_MIRROR"


def mirrored(url: str) -> str:
    """``url``, or its file at the mirror named by :data:`MIRROR_ENV`."""
    base = os.environ.get(MIRROR_ENV)
    return f"{base.rstrip('/')}/{url.rsplit('/', 1)[1]}" if base else url


def download_weights(arch: str) -> str:
    """Path of the cached, hash-checked download of ``arch``'s NGC weights (:func:`download`)."""
    return download(weights_url(arch))


def download(url: str) -> str:
    """Path of the cached, hash-checked download of ``url`` (from the mirror when one is set).

    torch.hub's ``check_hash`` naming rule: a file named ``NAME-<hex>.EXT`` must have a SHA-256
    starting with ``<hex>``. NGC's file names carry no hash and NGC publishes no checksums we could
    pin, so the first download's SHA-256 is written into the cached file's name by that rule and
    every later use checks the file against it (a truncated or altered cache is an error, not a
    silent load). A URL whose name carries a hash is checked already while downloading.
    """
    url = mirrored(url)
    name = url.rsplit("/", 1)[1]
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    stem, dot, ext = name.partition(".")
    expected = _HASH_IN_NAME.search(name)
    pattern = glob.escape(name) if expected else f"{glob.escape(stem)}-*{dot}{ext}"
    for cached in sorted(glob.glob(os.path.join(glob.escape(cache), pattern))):
        _check_hash(cached, expected or _HASH_IN_NAME.search(os.path.basename(cached)[len(stem):]))
        return cached
    os.makedirs(cache, exist_ok=True)
    partial = os.path.join(cache, f".{name}.{os.getpid()}.partial")  # ranks of one node may download at once
    try:
        torch.hub.download_url_to_file(url, partial, hash_prefix=expected.group(1) if expected else None,
                                       progress=True)
    except Exception as error:  # network errors come in many types (URLError, HTTPError, OSError)
        if os.path.exists(partial):
            os.remove(partial)
        raise UserError(f"could not download {url} ({type(error).__name__}: {error}); download it yourself "
                        "and pass --pretrained-from-file") from None
    digest = _sha256(partial)
    target = os.path.join(cache, f"{stem}-{digest[:16]}{dot}{ext}" if not expected else name)
    os.replace(partial, target)
    print(f"=> downloaded {url}: sha256 {digest}, cached as {target}")
    return target


_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_hash(path: str, match: re.Match | None) -> None:
    if match is None:
        raise UserError(f"cached weights {path} carry no hash in their name; delete the file to download it again")
    digest = _sha256(path)
    if not digest.startswith(match.group(1)):
        raise UserError(f"cached weights {path} are corrupt (sha256 {digest[:16]}..., its name says "
                        f"{match.group(1)}); delete the file to download it again")
