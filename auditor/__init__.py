"""Auditor bot for the Hugging Face Hub.

Data flow: hub -> weights -> analysis -> rules -> store -> reports.
"""

__version__ = "0.1.0"

# Bump when an analysis changes its results: revisions audited with an older
# analysis version are audited again (the history is kept).
ANALYSIS_VERSION = "1"
