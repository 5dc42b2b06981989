"""The errors fedbits raises at its boundaries.

Every error a user can cause (bad config, bad data file, unknown model, malformed
payload) is a :class:`FedbitsError`; the command line prints its message and exits
with status 2 instead of showing a traceback from deep inside a library.
"""


class FedbitsError(Exception):
    """Base class: a problem with the user's input, named precisely in the message."""


class ConfigError(FedbitsError):
    """A configuration file or ``--set`` override is invalid."""


class DataError(FedbitsError):
    """A dataset file, folder or record is missing or malformed."""


class ModelError(FedbitsError):
    """A model name, path or file cannot be loaded."""


class WireError(FedbitsError):
    """A payload is malformed, truncated, oversized or from the wrong method/round."""


class ClientError(FedbitsError):
    """A client's update was rejected (bad payload, non-finite values, crash)."""


class NoUpdateAccepted(FedbitsError):
    """A run ended without a single accepted client update: its model is untrained."""
