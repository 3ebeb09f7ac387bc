"""Serving many LoRA adapters on one base: continuous batching, generation, an OpenAI-style API.

- `sampling`: decoding settings per request, and picking the next token of every row at once.
- `text`: token ids to text increments, with stop strings.
- `kv`: the KV cache of the running batch: rows join, leave, and padding is trimmed.
- `engine`: iteration-level (continuous) batching over a MultiLoraModel (lora_dist.multi_lora).
- `adapters`: adapter names to slots, loaded and unloaded while requests run.
- `worker`: the engine on a background thread, for an asyncio server.
- `protocol`, `server`: the OpenAI-compatible HTTP API (FastAPI).
"""
