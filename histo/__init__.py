"""histo: whole-slide image analysis of synovial and lymph-node biopsies."""

__version__ = "0.1.0"
