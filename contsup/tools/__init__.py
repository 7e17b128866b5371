"""contsup.tools: sweeps, result tables, probes, reports, profiles and benches."""
