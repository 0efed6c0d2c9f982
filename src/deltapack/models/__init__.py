"""How deltapack attaches to each architecture family."""
