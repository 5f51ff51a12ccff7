"""Utilities: BatchMemoryManager, secure random numbers."""
