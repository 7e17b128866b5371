"""contsup.core: the plugin manager and the registries."""
