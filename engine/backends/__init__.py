"""Model runners behind one small interface (see base.py)."""
