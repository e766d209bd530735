"""Batched tensor transforms that run on whichever device the batch is on.

The standard CIFAR augmentation (He et al. 2016; used by all five papers' CIFAR recipes):
a random crop of the image padded by 4 pixels, and a horizontal flip with probability 1/2,
applied to a whole batch at once with no per-example Python work (airbench style).

With ``keys`` (a :class:`sgdlab.keyed.Keys` of the batch) every example's crop offsets and flip are a
pure function of (seed, step, dataset index), the same whichever process holds the example; otherwise
they come from ``generator`` (torch's global one if None).
"""

from __future__ import annotations

import torch

from ..keyed import Keys, stream_id

__all__ = ["channel_stats", "normalize", "random_crop", "random_flip", "cifar_augment"]


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of images ``x`` (N, C, ...), shapes (C,)."""
    if x.dim() < 3:
        raise ValueError(f"channel_stats expects (N, C, ...) images, got shape {tuple(x.shape)}")
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dim=dims), x.std(dim=dims)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` per channel (channel axis 1)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.to(x).view(shape)) / std.to(x).view(shape)


def _check_nchw(x: torch.Tensor, fn: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{fn} expects images (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] == x.shape[2] > 4:  # (N, H, H, C): square images, channels last
        raise ValueError(f"{fn} expects images (N, C, H, W); shape {tuple(x.shape)} looks channels-last "
                         f"(N, H, W, C): pass x.permute(0, 3, 1, 2)")


_CROP = stream_id("augment.crop")
_FLIP = stream_id("augment.flip")


def _check_source(generator, keys, n: int, fn: str) -> None:
    if keys is None:
        return
    if generator is not None:
        raise ValueError(f"{fn}: pass generator or keys, not both")
    if not isinstance(keys, Keys):
        raise ValueError(f"{fn}: keys must be a sgdlab.keyed.Keys, got {type(keys).__name__}")
    keys.check_rows(n, fn)


def random_crop(x: torch.Tensor, padding: int = 4, *, fill: torch.Tensor | float = 0.0,
                generator: torch.Generator | None = None, keys: Keys | None = None) -> torch.Tensor:
    """Random ``H x W`` crops of the batch ``x`` (N, C, H, W) padded by ``padding`` pixels.

    Each example gets its own offset, uniform in ``[0, 2 * padding]`` on both axes.
    ``fill`` is the padding value, a scalar or per-channel tensor (C,) (e.g. the normalised
    value of black, so that crop-after-normalisation equals the usual crop-then-normalise).
    With ``keys`` the offsets of example ``i`` are ``floor(u * (2 padding + 1))`` for two keyed uniforms
    of ``keys.indices[i]`` (stream ``augment.crop``).
    """
    _check_nchw(x, "random_crop")
    _check_source(generator, keys, x.shape[0], "random_crop")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    n, c, h, w = x.shape
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1)
    fill_t = fill_t.view(1, -1, 1, 1) if fill_t.numel() > 1 else fill_t.view(1, 1, 1, 1)
    padded = torch.nn.functional.pad(x - fill_t, (padding,) * 4) + fill_t
    if keys is not None:
        off = (keys.next_uniform(_CROP, 2, device=x.device, dtype=torch.float64) * (2 * padding + 1)).long()
        oy, ox = off[:, 0], off[:, 1]
    else:
        gen_device = generator.device if generator is not None else x.device
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device).to(x.device)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
    out = padded.gather(2, rows)
    cols = (ox[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return out.gather(3, cols)


def random_flip(x: torch.Tensor, p: float = 0.5, *, generator: torch.Generator | None = None,
                keys: Keys | None = None) -> torch.Tensor:
    """Flip each image of ``x`` (N, ..., W) horizontally with probability ``p`` (with ``keys``: when the
    keyed uniform of its dataset index, stream ``augment.flip``, is below ``p``)."""
    _check_source(generator, keys, x.shape[0], "random_flip")
    if keys is not None:
        mask = keys.next_uniform(_FLIP, 1, device=x.device)[:, 0] < p
    else:
        gen_device = generator.device if generator is not None else x.device
        mask = torch.rand(x.shape[0], generator=generator, device=gen_device).to(x.device) < p
    return torch.where(mask.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def cifar_augment(x: torch.Tensor, *, fill: torch.Tensor | float = 0.0,
                  generator: torch.Generator | None = None, keys: Keys | None = None) -> torch.Tensor:
    """Standard CIFAR augmentation (He et al. 2016, sec. 4.2): random crop with 4-pixel padding, then a
    random horizontal flip. ``x`` is a batch of images ``(N, C, H, W)``; a channels-last array
    ``(N, H, W, C)`` is refused (cropping it would cut the channel axis). ``keys``: keyed draws, see the
    module docstring."""
    _check_nchw(x, "cifar_augment")
    return random_flip(random_crop(x, 4, fill=fill, generator=generator, keys=keys), generator=generator, keys=keys)
