"""The commented `config.toml` that ships with the project, generated from the settings table (so it cannot drift)."""

from __future__ import annotations

from twotower_cli.config import FIELDS, SECRETS

HEADER = """# twotower configuration. Precedence: built-in defaults < this file < environment (.env, then real
# variables, named TWOTOWER_<SECTION>_<KEY>) < command-line flags. `twotower config` shows the result.
# Every setting is listed with its default; uncomment a line to change it.
"""


def toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '"%s"' % value
    return repr(value)


def render() -> str:
    lines = [HEADER]
    for section, kv in FIELDS.items():
        lines.append(f"[{section}]")
        for key, (default, help_text) in kv.items():
            if (section, key) in SECRETS:
                lines.append(f"# {key}: {help_text}. Keep secrets out of this file: put WANDB_API_KEY in .env")
            else:
                lines.append(f"# {key} = {toml_value(default)}    # {help_text}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
