"""From a requested model to the deployments that serve it: registry, key access, router, health."""
