"""kidney-seg: a reproducible 2D U-Net pipeline for KiTS kidney and tumour segmentation."""

__version__ = "0.1.0"
