"""Stage 3: evaluation of generated images (not yet built: issue 4)."""
