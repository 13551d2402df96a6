"""sources layer (see docs/ARCHITECTURE.md)."""
