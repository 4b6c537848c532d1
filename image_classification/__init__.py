"""convnets: train, evaluate and deploy ResNet v1.5 and EfficientNet image classifiers."""

__version__ = "0.1.0"
