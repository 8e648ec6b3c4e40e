"""Released-file format, privacy ledger and accounting. Needs no torch: an auditor can use it alone."""
from .errors import MepfError
from .format import Release, load
from .staging import write_release

__all__ = ["MepfError", "Release", "load", "write_release"]
