"""The entry points' output set-up: one handler, one line per event, no ANSI codes, no privacy warning lost.

Each check runs in a fresh interpreter: the set-up changes process-wide logging and warnings state.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import logging, subprocess, sys, warnings
from fedpersona.output import configure
configure(logging.INFO)
from flwr.common.logger import log
import opacus  # adds a root handler with logging.basicConfig at import, unless one is there
log(logging.INFO, "a Flower line")
log(logging.DEBUG, "a Flower debug line")
logging.getLogger("fedpersona.client.device").info("a line of ours")
warnings.warn_explicit("Secure RNG turned off. This is perfectly fine for experimentation", UserWarning,
                       "opacus/privacy_engine.py", 1, module="opacus.privacy_engine")
warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning,
                       "transformers/modeling_utils.py", 3303, module="transformers.modeling_utils")
warnings.warn_explicit("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices",
                       FutureWarning, "ray/_private/worker.py", 2051, module="ray._private.worker")
from fedpersona.config import load_config
load_config({"privacy.enabled": False}, env=False)
load_config({"privacy.enabled": False}, env=False)  # the same warning from another line: shown once
child = subprocess.run([sys.executable, "-c", "import warnings; warnings.warn_explicit('x', FutureWarning, "
                        "'transformers/modeling_utils.py', 1, module='transformers.modeling_utils')"],
                       capture_output=True, text=True)
print("CHILD-STDERR:" + child.stderr.strip(), file=sys.stderr)
'''


def test_one_handler_no_colours_and_only_unactionable_warnings_filtered():
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLWR_TELEMETRY_ENABLED="0")
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    lines = err.splitlines()
    assert "\x1b[" not in err
    assert sum("a Flower line" in line for line in lines) == 1, err  # Flower's own handler gone, Opacus's never added
    assert "a Flower debug line" not in err  # the handler's level holds for propagated records too
    assert sum("a line of ours" in line for line in lines) == 1, err
    assert sum("Secure RNG turned off" in line for line in lines) == 1, err  # never filtered
    assert sum("privacy.enabled = false" in line for line in lines) == 1, err  # kept, once
    assert "is_gradient_checkpointing" not in err and "Tip: In future versions of Ray" not in err
    assert "CHILD-STDERR:" in err and err.split("CHILD-STDERR:")[1].strip() == "", "child processes filter too"
