"""Datasets and the training-time latent data order."""
