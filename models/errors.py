"""Errors a user can meet. Each message says what was wrong and what to do about it.

The CLI and the API print these messages and never a traceback; anything else that escapes
is a bug in Signalgraph.
"""


class SignalgraphError(Exception):
    """Base class of every error that is the user's to fix (input, config, missing weights)."""


class ConfigError(SignalgraphError):
    """A profile or spec is malformed or inconsistent."""


class AssetError(SignalgraphError):
    """A model could not be located or prepared."""


class UnknownModelError(AssetError):
    """A name that no profile, shipped package or builder knows."""


class AssetMissingError(AssetError):
    """A model that is known but not present here (not installed, not downloaded, not prepared)."""


class MediaError(SignalgraphError):
    """An image, audio or video input that cannot be used."""


class CorruptMediaError(MediaError):
    """The bytes do not decode as the media they claim to be."""


class MediaTooLargeError(MediaError):
    """The media is over a configured limit (pixels, duration, bytes)."""


class UntrainedProjectorError(SignalgraphError):
    """A projector has no trained weights; running it would produce noise."""


class ModelOutputError(SignalgraphError):
    """A model wrote something that cannot be parsed even after repair."""
