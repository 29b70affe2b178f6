"""Other people's file formats: SDXL's original key names and LoRA files (kohya, PEFT/diffusers)."""
