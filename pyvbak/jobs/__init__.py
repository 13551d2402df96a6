"""jobs layer (see docs/ARCHITECTURE.md)."""
