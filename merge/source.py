"""The one shape every input layout has: a `WeightSource` of named tensors, read one tensor at a time.

A source describes its tensors from metadata alone (`specs()`), then fills one full tensor at a time into a
buffer the caller owns (`read()`). The writer therefore holds at most one tensor (the largest) plus a fixed
budget, whatever the model size: memory never grows with the number of tensors.

Names are the ones the Hugging Face model expects: each source strips its container (`{"model": sd}`) and
wrapper prefixes (`module.`, `_orig_mod.`, ...) with `model_key()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# torch dtype name -> (bytes per element, safetensors dtype code)
DTYPES: dict[str, tuple[int, str]] = {
    "float64": (8, "F64"),
    "float32": (4, "F32"),
    "float16": (2, "F16"),
    "bfloat16": (2, "BF16"),
    "float8_e4m3fn": (1, "F8_E4M3"),
    "float8_e5m2": (1, "F8_E5M2"),
    "int64": (8, "I64"),
    "int32": (4, "I32"),
    "int16": (2, "I16"),
    "int8": (1, "I8"),
    "uint8": (1, "U8"),
    "bool": (1, "BOOL"),
}
SAFETENSORS_TO_TORCH = {code: name for name, (_, code) in DTYPES.items()}
FLOATING = {"float64", "float32", "float16", "bfloat16"}


class MergeError(RuntimeError):
    """A checkpoint cannot be merged; the message is one line naming the problem (and the file, if one)."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # torch dtype name, a key of DTYPES
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][0]


class WeightSource(Protocol):
    """The tensors of one weight variant of one checkpoint."""

    def specs(self) -> dict[str, TensorSpec]:
        """Every tensor's name, dtype and shape, from metadata only (no tensor data is read)."""
        ...

    def read(self, name: str, out: memoryview) -> None:
        """Write the full tensor `name`, C-contiguous and in its own dtype, into `out` (exactly nbytes long)."""
        ...

    def byte_ranges(self, name: str) -> list[tuple[Path, int, int]] | None:
        """Where the tensor's bytes lie on disk, as (file, offset, length) runs that concatenate to the row-major
        tensor in its own dtype, or None when they do not lie so (converted, assembled or checked on `read`).
        With runs, the writer copies in the kernel (copy_file_range) instead of through user space."""
        ...

    def close(self) -> None: ...


# Wrappers that torch.compile, DDP/FSDP1 and activation checkpointing insert into parameter names.
WRAPPER_PARTS = frozenset({"_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def model_key(fqn: str) -> str:
    """A parameter name as the unwrapped model has it: `module._orig_mod.model.x` -> `model.x`."""
    return ".".join(part for part in fqn.split(".") if part not in WRAPPER_PARTS)
