"""Serving: the continuous-batching scheduler (and, next, the HTTP server on top of it)."""
