"""Data stage: read a user's dataset into one canonical, patient-safe form."""
