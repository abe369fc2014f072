"""Request planes: how a frontend streams a request to a worker and the worker's deltas back."""
