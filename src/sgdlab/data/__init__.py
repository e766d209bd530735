"""Datasets as tensors in memory (+ batched device-side augmentation); registry ``create(name, ...)``."""

from .augment import channel_stats, cifar_augment, normalize, random_crop, random_flip
from .datasets import Dataset, cache_dir, create, names, register, write_synthetic_cifar

__all__ = ["Dataset", "create", "names", "register", "cache_dir", "write_synthetic_cifar",
           "channel_stats", "normalize", "random_crop", "random_flip", "cifar_augment"]
