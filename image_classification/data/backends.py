"""Registers the built-in data backends. Each factory imports its module only when chosen."""
from image_classification.data.registry import register


def _pytorch():
    from image_classification.data import pytorch
    return pytorch.BACKEND


def _synthetic():
    from image_classification.data import synthetic
    return synthetic.BACKEND


register("pytorch", _pytorch)
register("synthetic", _synthetic)
