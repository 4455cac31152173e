"""Errors vitkit raises on purpose: each names what was wrong and how to fix it."""


class VitkitError(Exception):
    """Base class for every error vitkit raises deliberately."""


class ConfigError(VitkitError, ValueError):
    """A model or training configuration is invalid."""


class CheckpointError(VitkitError):
    """A checkpoint file is missing, unsafe, or does not match the model."""


class ImageError(VitkitError):
    """An image could not be read or decoded."""
