"""Quantized weights: the bitsandbytes settings (:mod:`neoxja.quantization.config`)."""
