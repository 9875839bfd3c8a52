"""Pre-training: configuration, learning-rate schedule (the DeepSpeed loop builds on these)."""
