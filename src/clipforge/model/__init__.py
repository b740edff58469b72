"""Model configuration, registry and modules."""
