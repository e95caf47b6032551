"""Host probes (SPEC 8): readings of a cell that only the host can take.

``base`` has the interface and errors, one module per probe (``nftables``, ``cgroup``,
``fc_metrics``, ``tap_link``), and ``scheduler`` runs them; see docs/probes.md.
"""
