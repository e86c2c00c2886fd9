"""HTTP routes, one module per API surface (as vLLM's entrypoints/openai): decode, call the core, encode."""
