"""monosemantic: sparse autoencoders and monosemantic features, as a reproducible research book."""

__version__ = "0.1.0"
