"""Rewrite pyproject's [tool.flwr.app.config] from fedpeft.config's defaults (run after changing them).

`flwr run` only accepts overrides for declared keys, so the table must list every key;
tests/test_config.py fails when the two drift apart.
"""

from pathlib import Path

from fedpeft.config import RunConfig, to_run_config


def fmt(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


path = Path(__file__).resolve().parents[1] / "pyproject.toml"
text = path.read_text()
head = text[: text.index("[tool.flwr.app.config]")]
body = "\n".join(f"{k} = {fmt(v)}" for k, v in to_run_config(RunConfig()).items())
path.write_text(head + "[tool.flwr.app.config]\n" + body + "\n")
