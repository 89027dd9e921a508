"""I/O the shell plugs into the core: brokers (memory, Redis, NATS), message stores (memory, SQLite,
PostgreSQL) and the worker that feeds them, JWT verification, and the Prometheus metrics."""
