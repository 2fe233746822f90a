"""knox_server: the central Knox v0 API server."""
