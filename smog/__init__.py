"""smog: SMoG (Synchronous Momentum Grouping) self-supervised pretraining on smog_kernels."""
__version__ = "0.1.0"
