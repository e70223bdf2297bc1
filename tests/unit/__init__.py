"""Unit tests of the pure modules: no root, no daemon, well under a second in all."""
