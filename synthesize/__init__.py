"""Stage 2: generators trained from the released file alone (not yet built: issue 3)."""
