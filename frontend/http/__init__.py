"""The OpenAI-compatible HTTP API of the frontend: /v1/completions, /v1/chat/completions,
/v1/models, and vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter.

app.py serves it (aiohttp, in the frontend's event loop) with the middlewares for auth,
drain and metrics; schema.py reads the bodies; completions.py and models.py are the
endpoints, which call the gRPC API's own services; responses.py and errors.py write
OpenAI's response, chunk and error shapes."""
