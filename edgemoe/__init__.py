"""edgemoe: run big Mixture-of-Experts models on a laptop."""
__version__ = "0.1.0"
