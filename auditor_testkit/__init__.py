"""The auditor's test kit: the model factory, the local Hub server, report samples, the demo.

Installed with the product (``pip install -e .``) but never imported by it: the ``auditor``
CLI finds these commands through the ``auditor.commands`` entry-point group.
"""
