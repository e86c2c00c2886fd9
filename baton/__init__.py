"""baton: one GPU, your texts — RAG memory, QLoRA views, LoRA serving, and a GPU-lease scheduler."""

__version__ = "0.1.0"
