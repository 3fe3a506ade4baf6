"""The catalog, the model cache, memory measurement and the machine's compute set-up."""
