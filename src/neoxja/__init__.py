"""neoxja: GPT-NeoX-Japanese in plain PyTorch — same checkpoints, same ids, same logits as transformers."""

__version__ = "0.1.0"
