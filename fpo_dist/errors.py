"""Errors shared by the modules below ``fpo_dist.config``."""


class ConfigError(ValueError):
    """A configuration problem, reported before any work is done."""
