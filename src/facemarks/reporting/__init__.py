"""Figures and the README's results table."""
