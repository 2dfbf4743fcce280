"""Pytest fixtures for the hub area."""
