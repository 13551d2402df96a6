"""repo layer (see docs/ARCHITECTURE.md)."""
