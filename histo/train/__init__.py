"""Making and scoring models: StarDist outline training, the nucleus classifier's training, augmentation,
and evaluation against expert outlines.
"""
