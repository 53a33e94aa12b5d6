"""alignexp: aligning language models with human preferences without reinforcement learning.

:func:`conf_dir` finds the package's config tree; it imports nothing but the standard library, so that
the tools which run without Hydra (``alignexp.gpu_check``) use it too.
"""

from importlib import resources
from pathlib import Path

__version__ = "0.1.0"


def conf_dir() -> str:
    """The config tree, found through the package: ``alignexp/conf/`` when installed from a wheel (the build
    maps the repository's top-level ``conf/`` there), else ``conf/`` beside the package, in a checkout or an
    editable install. An absolute path, as Hydra wants it."""
    package = Path(str(resources.files(__name__))).resolve()
    for folder in (package / "conf", package.parent / "conf"):
        if (folder / "train.yaml").is_file():
            return str(folder)
    raise FileNotFoundError(f"alignexp's config tree is neither {package / 'conf'} (an installed wheel) nor "
                            f"{package.parent / 'conf'} (a checkout); reinstall alignexp")
