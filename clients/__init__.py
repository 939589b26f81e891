"""Flower ClientApp for fedpeft sites (thin: all logic is in ``fedpeft``)."""
