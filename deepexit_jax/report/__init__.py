"""Reports written from results: the sweep's (`report.sweep`: sweep.md/csv/json/png, also
importable from `report` itself) and the probe study's (`report.probes`: probe.md/...)."""

from deepexit_jax.report.sweep import (
    calibration_markdown,
    markdown,
    plot,
    plot_measures,
    to_json,
    write_csv,
    write_report,
    write_results,
)

__all__ = ["calibration_markdown", "markdown", "plot", "plot_measures", "to_json", "write_csv",
           "write_report", "write_results"]
