"""landmark plugin: registration hooks (filled in by the learned-backend work)."""
