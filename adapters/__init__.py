"""Per-modality LoRA adapters and their manifests (see README.md in this folder)."""
