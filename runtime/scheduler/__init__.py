"""The memory scheduler: its pure policy, bookkeeping, control messages, graph analysis, status."""
