"""HTTP routers: jobs (/v1), served models (/v1/models), admin (/admin), health and metrics."""
