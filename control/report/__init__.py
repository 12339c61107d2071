"""Signed proof reports, one per incident hold: for legal, regulators and the record.

``build`` turns the server's state into the report (pure), ``signing`` signs it with
the server's key and checks it offline, naming any altered laptop row, and ``render_html``
renders it for people. The server builds and signs (``control.rpc.report_service``);
the CLI writes the files and verifies them (``control.cli.report``).
"""
