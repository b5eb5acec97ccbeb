"""Marie providers service: provider abstraction, model registry, streaming chat over gRPC."""
