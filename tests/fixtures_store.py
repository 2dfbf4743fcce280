"""Pytest fixtures for the store area."""
