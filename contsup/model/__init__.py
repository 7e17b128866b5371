"""contsup.model: units -> partition -> GreedyNetwork; activation-memory costs."""
