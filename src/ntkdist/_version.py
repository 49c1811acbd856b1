"""The package version (one definition, read by the fingerprint and stores)."""

__version__ = "0.1.0"
