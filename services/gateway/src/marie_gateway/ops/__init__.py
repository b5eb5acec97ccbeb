"""Routes for operators and the front proxy: health and readiness, the OpenAPI
document and its page, and Envoy's key check of gRPC calls."""
