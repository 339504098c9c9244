"""Enhancement models: networks, losses, training, metrics, shipped weights and model cards.

This package never imports the service (``dicomnode``); the service uses it only through
``models.registry``.
"""
