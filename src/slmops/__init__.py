"""slmops: the whole life of a small language model on hardware you already own."""

__version__ = "0.1.0"
