"""Privacy attacks run against the global model; each attack is one file implementing ``Attack``."""
