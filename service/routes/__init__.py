"""HTTP routers: jobs (/v1), admin (/admin), health and metrics."""
