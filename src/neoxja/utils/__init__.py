"""Utilities around the model (attention-mask visualisation, ...)."""
