"""Benchmark tooling: load generation against an OpenAI endpoint, and reports (markdown + PNG)."""
