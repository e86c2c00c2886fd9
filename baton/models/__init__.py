"""Models that baton builds itself: tiny causal LMs and phrase adapters for tests, benchmarks and the demo."""
