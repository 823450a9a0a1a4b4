"""simulations: see README.md for what lands here."""
