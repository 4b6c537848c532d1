"""Model zoo: ResNet v1.5 family and EfficientNet B0-B7 (+ WideSE)."""
from image_classification.models.registry import ModelSpec, get, names

__all__ = ["ModelSpec", "get", "names"]
