"""Pytest fixtures for the zoo area."""
