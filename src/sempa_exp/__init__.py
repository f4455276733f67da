"""sempa-exp: experiment framework for SemPA (semantic preference alignment of decoder-LLM sentence embeddings)."""

__version__ = "0.1.0"
