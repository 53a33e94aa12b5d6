"""``python -m alignexp.plan``: the Hydra entry point (``conf/train.yaml``); writes no run folder or log file."""

import sys

import hydra

from alignexp.config import CONF_DIR
from alignexp.plan import _main


def main() -> None:
    """Hydra composes ``conf/train.yaml`` with the command line; no run folder, no log file."""
    defaults = {"hydra.run.dir": ".", "hydra.output_subdir": "null", "hydra/job_logging": "disabled",
                "hydra/hydra_logging": "disabled"}
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in sys.argv[1:] if "=" in arg}
    sys.argv += [f"{key}={value}" for key, value in defaults.items() if key not in given]
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")(_main)()


if __name__ == "__main__":
    main()
