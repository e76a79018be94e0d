"""`twotower config`: the effective configuration and where every value came from."""

from __future__ import annotations

from twotower_cli.cli.common import command, settings
from twotower_cli.cli.console import out, print_json
from twotower_cli.cli.main import app
from twotower_cli.cli.options import ConfigOpt, JsonOpt


@command(app, "config", short_help="The effective configuration and where each value came from",
         help="Show the effective configuration and the source of every value.")
def config_command(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    cfg = settings(config)
    values = cfg.to_dict(mask_secrets=True)
    if json_out:
        doc = {s: {k: {"value": v, "source": cfg.sources[s][k]} for k, v in kv.items()} for s, kv in values.items()}
        print_json(doc)
        return
    from rich.table import Table

    table = Table(title="twotower configuration (defaults < config.toml < env < flags)")
    for col in ("setting", "value", "source", "env variable"):
        table.add_column(col)
    for section, kv in values.items():
        for key, value in kv.items():
            src = cfg.sources[section][key]
            style = "dim" if src == "default" else "bold"
            table.add_row(f"{section}.{key}", repr(value) if isinstance(value, str) else str(value),
                          f"[{style}]{src}[/]", f"TWOTOWER_{section.upper()}_{key.upper()}")
    out.print(table)
