"""The fault suite: a real server process against a PostgreSQL the tests restart, stall
and cut off, asserting what callers see and what the database holds afterwards."""
