"""Data: SFT examples, replay streams, and the built-in task and corpora."""
