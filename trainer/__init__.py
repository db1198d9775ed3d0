"""trainer: LoRA/QLoRA fine-tuning, evaluation, merge and GGUF export."""
