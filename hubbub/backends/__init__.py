"""I/O the shell plugs in: message stores (and, later, brokers)."""
