"""Event planes: publish/subscribe of KV events and load metrics."""
