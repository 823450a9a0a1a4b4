"""Flower ClientApps: the PyTorch device (``client_app``) over framework-free steps (``device``) and
users' personal data (``users``)."""
