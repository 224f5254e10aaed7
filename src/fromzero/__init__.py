"""fromzero: develop large neural models from zero, and fine-tune them.

Readable from-scratch model code, YAML recipes with a CLI, weights in safetensors and
Hugging Face layouts, training that runs on a laptop CPU and scales out with torchrun.
"""

__version__ = "0.1.0"
