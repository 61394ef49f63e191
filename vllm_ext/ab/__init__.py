"""A/B benchmark harness: Metron user-facing metrics (`metron`); runner and reports build on it."""
