"""Lightning DataModules of lightning-cit."""

from lightning_cit.datamodules.continual import ContinualInstructionDataModule

__all__ = ["ContinualInstructionDataModule"]
