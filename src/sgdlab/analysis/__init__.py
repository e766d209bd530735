"""Diagnostics of trained models: sharpness, interpolation, Hessian spectrum, noise scales."""

__all__: list[str] = []
