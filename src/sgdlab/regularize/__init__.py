"""Where noise is injected: shake-shake blending of branches, random gradient on the loss."""

from ..keyed import keyed
from .base import LossTransform, create_loss_transform, loss_transform_names, register_loss_transform
from .shake import Shake, shake
from .random_gradient import RandomGradient
from .correlation import BranchCorrelation, branch_correlation
from .selective import SelectiveBackprop

__all__ = ["LossTransform", "register_loss_transform", "create_loss_transform", "loss_transform_names",
           "shake", "Shake", "RandomGradient", "branch_correlation", "BranchCorrelation",
           "SelectiveBackprop", "keyed"]
