"""OpenAI's Responses API, `/v1/responses`: its bodies, its items both ways, the
store of responses kept with `store: true`, and its routes."""
