"""LSTM classifier for pixel-by-pixel (permuted) MNIST.

The importance-sampling paper (Katharopoulos & Fleuret, ICML 2018, Sec. 4.4) reads each 28x28 digit
as a sequence of 784 scalars (in a fixed random order for the permuted task of Le et al. 2015,
which the dataset applies), runs an LSTM (Hochreiter & Schmidhuber 1997) with 128 hidden units,
tanh activation and sigmoid gates, and classifies the last hidden state with a linear layer.

Initialization follows the Keras defaults the authors' code ran with: Glorot-uniform input weights,
orthogonal recurrent weights, zero biases except the forget gate's, which starts at 1.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import check_positive_int
from .registry import register

__all__ = ["PixelLSTM"]


class PixelLSTM(nn.Module):
    """LSTM over a flattened input sequence; the last hidden state feeds a linear classifier.

    Inputs of shape ``(B, T)``, ``(B, C, H, W)`` or any ``(B, ...)`` are flattened to ``T`` steps of
    ``input_size`` features each (``input_size = 1``: one pixel per step), so the sequence length is
    whatever the input holds (784 for MNIST, shorter in quick tests).

    Args:
        num_classes: outputs of the classifier.
        hidden: LSTM hidden units (128 in the paper).
        input_size: features per time step (1: pixel by pixel).
        num_layers: stacked LSTM layers (1 in the paper).
    """

    def __init__(self, num_classes: int = 10, hidden: int = 128, input_size: int = 1, num_layers: int = 1):
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("hidden", hidden)
        check_positive_int("input_size", input_size)
        check_positive_int("num_layers", num_layers)
        self.hidden, self.input_size = hidden, input_size
        self.lstm = nn.LSTM(input_size, hidden, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras-style LSTM initialization (Glorot input weights, orthogonal recurrent, forget bias 1)."""
        for name, p in self.lstm.named_parameters():
            if name.startswith("weight_ih"):
                # PyTorch stacks the gates (i, f, g, o) along dim 0; Keras initializes the stacked kernel.
                nn.init.xavier_uniform_(p)
            elif name.startswith("weight_hh"):
                for gate in p.data.chunk(4, 0):
                    nn.init.orthogonal_(gate)
            elif name.startswith("bias_ih"):
                nn.init.zeros_(p)
                p.data[self.hidden:2 * self.hidden] = 1.0
            elif name.startswith("bias_hh"):
                nn.init.zeros_(p)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        seq = x.reshape(b, -1)
        if seq.shape[1] % self.input_size != 0:
            raise ValueError(
                f"input of {seq.shape[1]} values per example is not a whole number of steps of "
                f"input_size={self.input_size}"
            )
        seq = seq.reshape(b, -1, self.input_size)
        out, _ = self.lstm(seq)
        return self.fc(out[:, -1])


@register("lstm_pixel", input_shape=(784,), num_classes=10)
def lstm_pixel(num_classes: int = 10, hidden: int = 128, input_size: int = 1, num_layers: int = 1) -> PixelLSTM:
    """Pixel-by-pixel MNIST LSTM, 128 hidden units (importance-sampling paper, Sec. 4.4)."""
    return PixelLSTM(num_classes, hidden, input_size, num_layers)
