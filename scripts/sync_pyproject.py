"""Rewrite pyproject's [tool.flwr.app.config] from the `hospitals` preset (fedpeft.config's defaults
plus simulations/hospitals.toml; run after changing either), so `flwr run .` and `fedpeft simulate`
run the same default job.

`flwr run` only accepts overrides for declared keys, so the table must list every key;
tests/test_config.py fails when the two drift apart.
"""

from pathlib import Path

from fedpeft.cli import simulation_config


def fmt(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


path = Path(__file__).resolve().parents[1] / "pyproject.toml"
text = path.read_text()
head = text[: text.index("[tool.flwr.app.config]")]
body = "\n".join(f"{k} = {fmt(v)}" for k, v in simulation_config("hospitals", None, None).items())
path.write_text(head + "[tool.flwr.app.config]\n" + body + "\n")
