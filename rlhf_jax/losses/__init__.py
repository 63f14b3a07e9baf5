"""Pure loss functions: arrays in, `(loss, metrics)` out."""
