"""Inference engines behind services.inference.engine.InferenceEngine."""
