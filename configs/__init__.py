"""Job configs: default.py holds the recipe, one file per scheme."""
