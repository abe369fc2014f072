"""The distributed runtime: discovery store, request plane and event plane."""
