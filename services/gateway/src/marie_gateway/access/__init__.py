"""Who may call and how much: API keys and scopes, the tenant a key reaches,
per-key limits and each request's account of what it used."""
