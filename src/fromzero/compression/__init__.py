"""Model compression: quantization, pruning and distillation."""
