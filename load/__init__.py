"""Load harness (`make bench`)."""
