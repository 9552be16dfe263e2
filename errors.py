"""Typed errors. The library raises these; the CLI turns them into a one-line message and an exit code, the server
into an HTTP status and a JSON body."""


class SimsearchError(Exception):
    """Base class for every error a user can cause or fix."""


class UnknownNameError(SimsearchError):
    """An encoder or reranker name that is not registered."""


class DbNotFoundError(SimsearchError):
    """No db at the given location."""


class SchemaError(SimsearchError):
    """The db was written by an incompatible (newer) version of simsearch."""


class ImageLoadError(SimsearchError):
    """A file that cannot be read as an image; the message is the one-line reason."""


class ModelError(SimsearchError):
    """Weights missing or corrupt, or an export that failed."""


class DatasetError(SimsearchError):
    """A benchmark or training dataset that does not have the expected layout."""


class DbBusyError(SimsearchError):
    """Another process is writing to the db and the caller asked not to wait."""


class DbCorruptError(SimsearchError):
    """A db file (manifest, LMDB, index) that is damaged; the message says which and how to recover."""


class EmptyDbError(SimsearchError):
    """The db holds no vectors yet (nothing indexed, or no image could be stored): there is nothing to search."""


class NotFoundError(SimsearchError):
    """An item the db does not hold (or no longer holds)."""


class DiskFullError(SimsearchError):
    """A write that found no space (a full disk, a quota, a file size limit); nothing was half-written."""
