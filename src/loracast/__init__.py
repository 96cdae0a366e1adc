"""loracast: carry a LoRA adapter from one LLM family to another (CAST)."""

__version__ = "0.1.0"
