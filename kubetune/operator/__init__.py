"""The kopf operator. Never imports torch: see tests/unit/test_import_boundaries.py."""
