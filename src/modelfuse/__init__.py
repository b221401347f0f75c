"""modelfuse: fuse trained neural networks."""
__version__ = "0.1.0"
