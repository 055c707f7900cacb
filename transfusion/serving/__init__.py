"""Serving: the continuous-batching scheduler and its engine thread, and the HTTP server on top (``server.create_app``
assembles it from the routers, formatting and middleware beside it)."""
