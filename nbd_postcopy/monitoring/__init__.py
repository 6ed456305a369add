"""Monitoring files shipped with the package, no code: `alerts.yml` (Prometheus alerting rules for the
device's and the page server's metrics), `alerts.test.yml` (their unit tests, for `promtool test rules`)
and `grafana-dashboard.json` (a Grafana dashboard). This package's directory is where they are:
`python3 -c 'import nbd_postcopy.monitoring as m, os; print(os.path.dirname(m.__file__))'`."""
