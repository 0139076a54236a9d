"""Data: the built-in synthetic image set and ImageFolder datasets for training."""
