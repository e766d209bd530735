"""Where noise is injected: shake-shake blending of branches, random gradient on the loss."""

from .base import LossTransform, create_loss_transform, loss_transform_names, register_loss_transform

__all__ = ["LossTransform", "register_loss_transform", "create_loss_transform", "loss_transform_names"]
