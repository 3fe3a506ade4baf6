"""The OpenAI-compatible gateway: HTTP app, dora bridge, settings, routes, OpenAI bodies, pictures."""
