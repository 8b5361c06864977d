"""Small score_sde-style config package for tests (see default_small_configs.py)."""
