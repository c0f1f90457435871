"""Weight consolidation: turn the checkpoint formats trainers save into Hugging Face model folders.

    merge_checkpoint(checkpoint, out, variant="regular", dtype=None, base_model=None, layout=None)
    average_checkpoints([ckpt, ...], out, ...)
    open_weights(checkpoint, variant, layout=None) -> WeightSource   (one tensor at a time, bounded memory)
    open_model(checkpoint, variant, base_model=None, layout=None) -> ModelWeights   (the merged folder, unwritten)

`layout` (merge.layouts.Layout, or its journaled name): where the weights are is looked up for it; without one
the layout is detected from the folder's file names.

Inputs: DCP directories (accelerate/HF Trainer FSDP2, torchtitan), per-rank DTensor files
(LMMs-Engine, veRL), and consolidated safetensors. Nothing here imports torch unless a tensor must be
cast, averaged or read from a torch.save file.
"""

from merge.consolidate import (
    ModelWeights,
    average_checkpoints,
    is_consolidated,
    merge_checkpoint,
    open_model,
    open_weights,
    variants_of,
)
from merge.layouts import Layout, detect_layout
from merge.source import MergeError, TensorSpec, WeightSource

__all__ = [
    "Layout",
    "MergeError",
    "ModelWeights",
    "TensorSpec",
    "WeightSource",
    "average_checkpoints",
    "detect_layout",
    "is_consolidated",
    "merge_checkpoint",
    "open_model",
    "open_weights",
    "variants_of",
]
