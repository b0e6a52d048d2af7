"""ZKEB: a zero-knowledge encrypted backup server."""
