"""unpersonal: share synthetic medical images that single out no patient."""

__version__ = "0.1.0"
