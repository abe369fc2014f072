"""runtime/events."""
