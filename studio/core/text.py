"""Text that comes from files (metadata, captions, names) made safe to show on a terminal or a page.

>>> escape_controls("title\\x1b[2Jfake")
'title\\\\x1b[2Jfake'
"""

from __future__ import annotations

import unicodedata


def escape_controls(text: str, keep_newlines: bool = False) -> str:
    """Replace control and format characters (ANSI escapes, carriage returns, bidi overrides...) by visible
    escapes such as \\x1b or \\u202e, so a file's text cannot clear a screen, fake lines or reorder a line."""
    out = []
    for ch in str(text):
        if keep_newlines and ch == "\n":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)
