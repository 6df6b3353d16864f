"""Update rules and the loops that run them on each backend."""
