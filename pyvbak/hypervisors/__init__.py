"""hypervisors layer (see docs/ARCHITECTURE.md)."""
