"""The version of moesnap (one place; the package face and provenance read it)."""

__version__ = "0.1.0"
