"""What a user receives: the steward's HTML report (internal) and the export (shareable)."""
