"""The HTTP layer every surface shares: the server, the request context, error
answers, JSON bodies, server-sent events, metrics, the client address and the
OpenAPI document's builder."""
