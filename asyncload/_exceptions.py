"""The one exception tree of asyncload.

Every error asyncload raises on purpose derives from :class:`AsyncloadError`.
Where a standard exception type describes the same situation, the class also
derives from it, so ``except FileNotFoundError`` or ``except ValueError`` keep
working for callers who do not know asyncload::

    AsyncloadError
    ├── BudgetError (ValueError)            budget too small for k sources x block size
    ├── FormatError (ValueError)            input that does not follow a documented format
    │   ├── ManifestError                   malformed / unsupported manifest
    │   ├── HeaderError                     malformed safetensors header or index
    │   └── KeyFormatError                  a key is not 32 raw bytes / 64 hex characters
    ├── UnsupportedDtypeError (TypeError)   a dtype that cannot become a numpy array
    ├── SourceError (OSError)               a storage source failed
    │   ├── BlockNotFoundError (FileNotFoundError)   block or source missing
    │   └── SourceUnavailableError          source could not be reached / read
    ├── IntegrityError                      bytes read do not match what the manifest says
    │   ├── ChecksumError                   crc32c mismatch
    │   ├── TruncatedBlockError             block shorter than the manifest says
    │   ├── StripeError                     more blocks of a parity stripe lost than it can rebuild
    │   └── AuthenticationError             a MAC, signature or AEAD tag does not verify
    │       ├── DecryptionError             wrong key, or a block / key envelope was altered
    │       └── KeyRequiredError            encrypted (or must be signed) and no key given
    ├── AsyncloadErrorGroup (ExceptionGroup)  several different errors at once
    └── ClosedError (RuntimeError)          the model or stream was used after close

Messages name the file, block and source involved; they never contain
credentials or key material.
"""

from __future__ import annotations

__all__ = [
    "AsyncloadError",
    "AsyncloadErrorGroup",
    "AuthenticationError",
    "BlockNotFoundError",
    "BudgetError",
    "ChecksumError",
    "ClosedError",
    "DecryptionError",
    "FormatError",
    "HeaderError",
    "IntegrityError",
    "KeyFormatError",
    "KeyRequiredError",
    "ManifestError",
    "SourceError",
    "SourceUnavailableError",
    "StripeError",
    "TruncatedBlockError",
    "UnsupportedDtypeError",
]


class AsyncloadError(Exception):
    """Root of every exception asyncload raises on purpose."""


class BudgetError(AsyncloadError, ValueError):
    """The memory budget cannot hold one block per source (S < k x m), or a size is invalid."""


class FormatError(AsyncloadError, ValueError):
    """Input does not follow one of the formats asyncload reads."""


class ManifestError(FormatError):
    """A manifest is malformed, inconsistent or of an unsupported version."""


class HeaderError(FormatError):
    """A safetensors header (or a Hugging Face index) is malformed or inconsistent."""


class UnsupportedDtypeError(AsyncloadError, TypeError):
    """A tensor's dtype has no numpy equivalent; its bytes are still kept and copied."""


class SourceError(AsyncloadError, OSError):
    """A storage source failed to read or write a block."""


class BlockNotFoundError(SourceError, FileNotFoundError):
    """A block, its file, or the whole source location is missing."""


class SourceUnavailableError(SourceError):
    """A source could not be reached or returned an I/O error."""


class IntegrityError(AsyncloadError):
    """Bytes read from a source do not match what the manifest records."""


class ChecksumError(IntegrityError):
    """A block's crc32c does not match the manifest."""


class TruncatedBlockError(IntegrityError):
    """A block (or the file range read in place) is shorter than the manifest records."""


class StripeError(IntegrityError):
    """A stripe lost more blocks than its parity can rebuild; no bytes were produced.

    The message names the stripe and every block and source that failed.
    ``available`` holds the stripe positions that could be read, ``needed``
    how many are required (the stripe's data blocks) and ``width`` its width.
    """

    def __init__(self, message: str, available: tuple[int, ...] = (), needed: int = 0, width: int = 0):
        super().__init__(message)
        self.available = available
        self.needed = needed
        self.width = width

    def __reduce__(self) -> tuple[type[StripeError], tuple[str, tuple[int, ...], int, int]]:
        return (type(self), (str(self), self.available, self.needed, self.width))


class AuthenticationError(IntegrityError):
    """A manifest MAC, a manifest signature or a block's AEAD tag does not verify."""


class DecryptionError(AuthenticationError):
    """Authentication failed: wrong key, or a block, key envelope or manifest was altered."""

    index: int | None = None


class KeyRequiredError(AuthenticationError):
    """The checkpoint is encrypted (or a signature is required) and the needed key was not given."""


class KeyFormatError(FormatError):
    """A key (bytes, hex text, key file or environment variable) is not 32 bytes / 64 hex characters."""


class AsyncloadErrorGroup(ExceptionGroup, AsyncloadError):
    """Several different asyncload errors at once (e.g. concurrent reads failing differently)."""


class ClosedError(AsyncloadError, RuntimeError):
    """A model, stream or source was used after it was closed."""
