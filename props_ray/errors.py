"""The one base class of every error a user can fix: the CLI prints its message and exits 2.

Each module keeps its own subclass (``ConfigError``, ``DataError``, ``LedgerError``, ...), named
for what was wrong; the message names the field, row or file. Anything that is not a
``UserError`` is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a refused action, explained in one message that names what to change."""
