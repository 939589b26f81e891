"""fedpeft: federated, differentially private, parameter-efficient fine-tuning."""

__version__ = "0.1.0"
