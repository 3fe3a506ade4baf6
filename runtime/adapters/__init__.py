"""Model adapters: one module per model family / library."""
