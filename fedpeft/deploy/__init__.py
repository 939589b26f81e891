"""Deployment at real data sites: certificates and keys, site config validation, and the
coordinator's SuperLink and the sites' SuperNodes (Flower's own processes, TLS and node auth on)."""
