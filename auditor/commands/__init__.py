"""CLI commands that span areas (``audit``, ``sanitize``): the top layer, beside ``cli``.

Commands that belong to one area stay in ``auditor/<area>/commands.py``.
"""
