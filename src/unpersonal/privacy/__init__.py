"""Privacy: the nearest-neighbour index, the distance floors, the filter, the audit's attacks and
planted copies (the re-identification network itself is in `unpersonal.artifacts.reid`)."""
