"""The migration source: the page server, the RAM it reads, and the freeze gate."""
