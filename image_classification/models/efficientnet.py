"""EfficientNet B0-B7 and WideSE (registered in a later change)."""
