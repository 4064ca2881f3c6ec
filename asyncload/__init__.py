"""asyncload: async, memory-bounded loading of model checkpoints stored as blocks over many sources."""

from __future__ import annotations

from ._assemble import TensorStream
from ._config import Limits, format_size, parse_size
from ._exceptions import (
    AsyncloadError,
    AsyncloadErrorGroup,
    AuthenticationError,
    BlockNotFoundError,
    BudgetError,
    ChecksumError,
    ClosedError,
    DecryptionError,
    FormatError,
    HeaderError,
    IntegrityError,
    KeyFormatError,
    KeyRequiredError,
    ManifestError,
    SourceError,
    SourceUnavailableError,
    StripeError,
    TruncatedBlockError,
    UnsupportedDtypeError,
)
from ._format import Manifest, TensorInfo
from ._loader import LoaderStatistics, Model, load, open, save
from ._tools import BadBlock, VerifyReport, pack, rekey, unpack, verify
from ._writer import SavedPath

__version__ = "0.1.0"

__all__ = [
    "AsyncloadError",
    "AsyncloadErrorGroup",
    "AuthenticationError",
    "BadBlock",
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
    "Limits",
    "LoaderStatistics",
    "Manifest",
    "ManifestError",
    "Model",
    "SavedPath",
    "SourceError",
    "SourceUnavailableError",
    "StripeError",
    "TensorInfo",
    "TensorStream",
    "TruncatedBlockError",
    "UnsupportedDtypeError",
    "VerifyReport",
    "__version__",
    "format_size",
    "load",
    "open",
    "pack",
    "parse_size",
    "rekey",
    "save",
    "unpack",
    "verify",
]
