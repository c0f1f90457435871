"""Weight consolidation: turn the checkpoint formats trainers save into Hugging Face model folders.

    merge_checkpoint(checkpoint, out, variant="regular", dtype=None, base_model=None)
    average_checkpoints([ckpt, ...], out, ...)
    open_weights(checkpoint, variant) -> WeightSource      (one tensor at a time, bounded memory)

Inputs: DCP directories (accelerate/HF Trainer FSDP2, torchtitan), per-rank DTensor files
(LMMs-Engine, veRL), and consolidated safetensors. Nothing here imports torch unless a tensor must be
cast, averaged or read from a torch.save file.
"""

from merge.consolidate import average_checkpoints, is_consolidated, merge_checkpoint, open_weights, variants_of
from merge.source import MergeError, TensorSpec, WeightSource

__all__ = [
    "MergeError",
    "TensorSpec",
    "WeightSource",
    "average_checkpoints",
    "is_consolidated",
    "merge_checkpoint",
    "open_weights",
    "variants_of",
]
