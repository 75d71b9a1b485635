"""Simulated clients: who is available and trains each round (`participation`), and how the global
model serves each client after fine-tuning on its own data (`personalization`)."""
