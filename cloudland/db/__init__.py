"""Database layer: models (desired state), engine/session factory, migrations."""
