"""Secure aggregation: the coordinator learns only the sum of the sites' updates
(``protocol``: the stages; ``ring``: fixed-point vectors and ChaCha20 masks)."""
