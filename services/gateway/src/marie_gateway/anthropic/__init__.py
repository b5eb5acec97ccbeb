"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`, and
`/v1/models` in Anthropic's shape), on the same providers contract as the
OpenAI surface."""
