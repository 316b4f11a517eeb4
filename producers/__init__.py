"""Camera producer daemons: push paired RGB + xyz frames onto a line's frames stream (`crd produce`).

Torch-free: runs on a camera PC's base install.
"""
