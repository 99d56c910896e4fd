"""The decision store and what hangs off it: recorder, live risk, review items (SQLite, PostgreSQL)."""
