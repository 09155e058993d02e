"""Exceptions raised by janus_core: every message says what is wrong and what to do."""


class JanusError(ValueError):
    """Bad input or an unusable checkpoint; the message tells the user how to fix it."""


class CheckpointError(JanusError):
    """A model folder or weight file is missing, truncated or does not match the config."""
