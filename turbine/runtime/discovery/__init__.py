"""Discovery stores: where workers announce themselves and frontends watch for them."""
