"""Data in the MVTec 3D-AD layout: reader and writer, synthetic generator (no torch)."""
