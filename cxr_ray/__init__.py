"""cxr-ray: Ray-distributed training of NIH ChestX-ray14 classifiers and the cyclical-lr study."""

__version__ = "0.1.0"
