"""Database layer: SQLAlchemy models and the names of the tenant tables."""
