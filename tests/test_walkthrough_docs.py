"""docs/SOCKETS_MORE.md, the detail the walkthrough leaves out: its code runs as it stands.

The page is a lesson to paste into a Python session, part after part; if the code it shows
stopped working with the project's modules, the page would teach something false.
"""

import contextlib
import io
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "SOCKETS_MORE.md"


def test_every_code_block_of_the_page_runs_in_order():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) > 20
    # Traffic stays on this machine: the page never broadcasts.
    assert not any("SO_BROADCAST, 1)" in block or "255.255.255.255\"" in block for block in blocks)
    namespace = {"__name__": "sockets_more"}
    here = Path.cwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            for number, block in enumerate(blocks):
                exec(compile(block, f"<docs/SOCKETS_MORE.md block {number}>", "exec"), namespace)
    finally:
        os.chdir(here)
    assert namespace["found"].servers()  # the search on loopback found the page's server
