"""Model zoo: ResNet v1.5 family and EfficientNet B0-B7 (+ WideSE); :func:`backbone` gives a model's
stages as feature maps (:mod:`image_classification.models.features`)."""
from image_classification.models.features import Backbone, FeatureInfo, backbone
from image_classification.models.registry import ModelSpec, get, names

__all__ = ["Backbone", "FeatureInfo", "ModelSpec", "backbone", "get", "names"]
