"""Serving many LoRA adapters on one base: continuous batching, generation, an OpenAI-style API.

- `sampling`: decoding settings per request, and picking the next token of every row at once.
- `text`: prompts to token ids, token ids to text increments, with stop strings.
- `kv`: the KV cache of the running batch: rows join, leave, and padding is trimmed.
- `engine`: iteration-level (continuous) batching over a MultiLoraModel (lora_dist.multi_lora).
- `adapters`: adapter names to slots, loaded and unloaded while requests run.
- `worker`: the engine on a background thread, for an asyncio server.
- `runtime`: a base, its adapters, engine and worker, built from directories.
- `protocol`, `server`, `http`: the OpenAI-compatible HTTP API (FastAPI on uvicorn).
- `offline`: JSONL requests and results for `lora-dist generate`.
- `errors`: request errors with their HTTP status and OpenAI error body.
"""
