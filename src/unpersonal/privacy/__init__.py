"""Privacy models: the nearest-neighbour index, the distance floor, re-identification."""
