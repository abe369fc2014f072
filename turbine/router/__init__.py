"""Routers: pick which live worker instance serves a request."""
