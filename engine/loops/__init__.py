"""One training loop per objective family; each reads top to bottom with numbered steps."""
