"""Pure data shared between processes: msgspec structs, no I/O, no imports from the rest of turbine."""
