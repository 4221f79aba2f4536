"""The model layer: one small module per family (llama, mistral, qwen2, qwen3) over shared
layers (linear.py, attention.py, norm.py, rotary.py, embedding.py, decoder.py), weight
loading and sharding (loader.py, parallel.py), the family registry (registry.py); and the
default model's GGUF conversion (gguf_convert.py)."""
