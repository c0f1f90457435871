"""How ckpt-watch writes quantities for people (the live view, `ckpt-watch merge`). A leaf: imports nothing."""

from __future__ import annotations


def human_bytes(count: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as disks and `ls -lh --si` count)."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:.3g} TB"
