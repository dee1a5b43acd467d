"""Errors the CLI reports as one clear line (no traceback)."""


class MMLError(Exception):
    """A user-facing failure: bad input, missing file, checksum mismatch, refused bundle."""


class DataError(MMLError):
    """Missing, corrupt or inconsistent input data."""


class BundleError(MMLError):
    """A serving bundle that fails validation."""
