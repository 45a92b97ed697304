"""Start a thunderkv module in a child Python that imports the *installed* package.

``python -m thunderkv.cli`` puts the working directory first on ``sys.path``. Run from a source
checkout after ``pip install .``, that directory's ``thunderkv/`` (no compiled extension, no
``thunderkv.serve``: those exist only in the installed package) shadows the installed one, and
the child fails where the parent worked. The children here drop the working directory from
``sys.path`` before importing anything (``-P`` would too, but only from Python 3.11).
"""

from __future__ import annotations

import sys

_RUN = ("import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
        "m = sys.argv.pop(1); runpy.run_module(m, run_name='__main__', alter_sys=True)")


def module_argv(module: str) -> list[str]:
    """argv prefix running ``python -m module`` without the working directory on sys.path;
    append the module's own arguments."""
    return [sys.executable, "-c", _RUN, module]
