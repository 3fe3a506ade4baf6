"""The model contract: tasks, their typed messages, error kinds, Arrow codecs, stages."""
