"""User-facing tools built on the node but not part of the running node (the demo)."""
