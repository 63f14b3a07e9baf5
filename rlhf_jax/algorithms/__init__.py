"""Method drivers: each a thin loop around the shared train step."""
