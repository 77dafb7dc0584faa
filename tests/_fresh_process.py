"""Code that makes a child process unable to import the project, so Auto classes must use a folder's own code.

Only the checkout itself is taken off `sys.path` (and the editable-install finder off `sys.meta_path`): a
virtual environment inside the checkout keeps its site-packages.
"""

import textwrap

ISOLATE = textwrap.dedent(
    """
    import importlib.util, os, sys
    _repo = os.path.realpath(sys.argv[2])
    sys.path = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != _repo]
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    for _name in ("modeling_gsva", "configuration_gsva", "processing_gsva", "pipeline_gsva", "gsva_hf"):
        assert importlib.util.find_spec(_name) is None, _name + " is importable"
    """
)
