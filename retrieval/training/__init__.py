"""Training and fine-tuning of dual encoders, apart from the serving core (the service never
imports it): the InfoNCE loss (`loss`), the run's configuration (`config`), frozen-tower
splitting and feature caching (`towers`, `features`) and the training loop (`train`)."""
