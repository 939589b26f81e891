"""Flower ServerApp for fedpeft (thin: all logic is in ``fedpeft``)."""
