"""Registers the built-in data backends. Each factory imports its module only when chosen."""
from image_classification.data.registry import register


def _pytorch():
    from image_classification.data import pytorch
    return pytorch.BACKEND


def _synthetic():
    from image_classification.data import synthetic
    return synthetic.BACKEND


def _dali_cpu():
    from image_classification.data import dali  # imports nvidia.dali only when it is called
    return dali.backend("cpu")


def _dali_gpu():
    from image_classification.data import dali
    return dali.backend("gpu")


register("pytorch", _pytorch)
register("synthetic", _synthetic)
register("dali-cpu", _dali_cpu)
register("dali-gpu", _dali_gpu)
