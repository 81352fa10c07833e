"""OpenAI-compatible serving: config, engines (transformers continuous batching, vLLM), app."""
