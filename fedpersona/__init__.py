"""fedpersona: privacy-preserving federated personalization of language-model assistants.

The design's folders ``client/``, ``server/``, ``privacy/`` and ``simulations/`` are the subpackages
``fedpersona.client``, ``fedpersona.server``, ``fedpersona.privacy`` and ``fedpersona.simulations``:
an installed copy holds them inside this package (pyproject's ``package-dir``); in a source tree or a
Flower app bundle (FAB) they sit beside this folder, and the package's path below finds them there.
"""

from pathlib import Path as _Path

_HERE = _Path(__file__).resolve().parent
_ROOT = _HERE.parent
if not (_HERE / "client").is_dir() and all((_ROOT / name / "__init__.py").is_file()
                                           for name in ("client", "server", "privacy", "simulations")):
    __path__.append(str(_ROOT))  # noqa: F821 - a package's __path__
