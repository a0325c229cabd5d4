"""``ferry dashboard``: the cluster live in a browser (hosts, domains, migrations)."""
