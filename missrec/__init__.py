"""MISSRec toolkit: multi-modal interest-aware sequence representations for sequential recommendation."""

__version__ = "0.1.0"
