"""Hugging Face Inference Providers: the OpenAI-compatible router and its curated models."""
