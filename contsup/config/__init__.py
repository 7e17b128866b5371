"""contsup.config: recipes: TOML -> validated, frozen Recipe; optimizers and schedules."""
