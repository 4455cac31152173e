"""The version of vitkit, in a module that imports nothing (`vitkit.infer.cache` keys on it)."""

__version__ = "0.1.0"
