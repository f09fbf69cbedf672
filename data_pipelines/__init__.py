"""Data sources and loaders for titan-hybrid."""
