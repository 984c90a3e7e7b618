"""Validate params.yaml as a whole and write each stage's effective params to resolved/<stage>.json.

Every later stage depends on its own resolved file, so DVC reruns exactly the stages whose effective
params changed: `dvc exp run -S sft.lr=3e-4` reruns sft@mild (which inherits `lr`) but not sft@stress
(which overrides it). A bad params file fails here, naming the key and value, before anything runs.

    python stages/resolve.py
"""


import typer

from poststate.params import ParamsError, resolve_all, write_resolved


def main() -> None:
    try:
        resolved = resolve_all()
    except ParamsError as e:
        typer.echo(f"invalid params:\n{e}", err=True)
        raise typer.Exit(code=2) from None
    write_resolved(resolved)
    typer.echo(f"resolved {len(resolved)} param sections -> resolved/")


if __name__ == "__main__":
    typer.run(main)
