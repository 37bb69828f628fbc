"""compass-serve: progressive image delivery on COMPASS, a learned scalable image codec."""

__version__ = "0.1.0"
