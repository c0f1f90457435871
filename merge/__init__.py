"""Weight consolidation: turn the checkpoint formats trainers save into Hugging Face model folders."""
