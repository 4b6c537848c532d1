"""Training engine: optimizer, LR schedule, loss, EMA and the train/validate loops."""
