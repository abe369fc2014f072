"""Tool-call and reasoning parsers: one module per output format, a registry, and their composition."""
