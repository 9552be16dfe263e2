"""simsearch: find the images that look like this one."""

__version__ = "0.1.0"
