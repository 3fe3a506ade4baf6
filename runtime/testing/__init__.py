"""Generated tiny weights and pytest helpers for the project's own tests (not shipped in the wheel)."""
