"""baton's services: each a small package with a thin transport over a core that knows nothing of transport."""
