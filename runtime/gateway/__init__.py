"""The OpenAI-compatible gateway: dora bridge, HTTP app, routes, OpenAI bodies, pictures."""
