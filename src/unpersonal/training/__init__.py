"""Training stages: each fits one model on the run's training split and publishes it."""
