"""Benchmarks of the toolkit's heavy stages; each returns a JSON-able dict."""
