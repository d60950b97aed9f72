"""The shared image datamodule and its dataset registry."""
from datamodules.datasets import REGISTRY, DatasetNotFoundError, load_split
from datamodules.image_datamodule import ImageDataModule

__all__ = ["ImageDataModule", "REGISTRY", "DatasetNotFoundError", "load_split"]
