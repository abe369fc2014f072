"""Engines: what a worker runs to turn a PreprocessedRequest into a stream of EngineOutputs."""
