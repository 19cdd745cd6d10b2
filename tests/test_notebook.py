"""walkthrough.ipynb: it runs from top to bottom in a fresh kernel, and is committed with its outputs.

The notebook is a lesson a student opens cold, so it must never fail half-way, must leave no
server, socket or thread running, and its saved outputs must be the ones a clean run gives.
"""

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "walkthrough.ipynb"
CELL_TIMEOUT = 120  # seconds per cell; the whole notebook takes well under one minute
# One class of 90 minutes: five sections, each ending with its exercise.
SECTIONS = 5
MAX_CELLS, MAX_PROSE_WORDS = 110, 3500
# What the notebook may use of the project: public names only (tests/test_walkthrough.py
# proves the exercise checks; this file proves the notebook runs and stays one class).
PUBLIC_NAMES = {
    "server": {"ServerConfig", "start_server"},
    "client": {"ChatClient", "format_event", "Timing"},
    "encryption_helper": {"make_cipher", "XorCipher", "CaesarCipher", "Packet", "PacketType",
                          "encode_packet", "decode_packet", "pack_fields", "unpack_fields",
                          "HEADER_FORMAT", "HEADER_SIZE", "Channel", "RtoEstimator", "LossySocket",
                          "ACK_DELAY", "ACK_EVERY", "SRP_G", "SRP_N"},
    "auth": {"password_key"},
}

# Run before the notebook's first cell: remember the threads already running, and every
# socket and child process the notebook starts from now on.
LEAK_WATCH = """
import socket as _socket, subprocess as _subprocess, threading as _threading
_threads_before = set(_threading.enumerate())
_sockets_opened, _processes_started = [], []
_original_socket_init = _socket.socket.__init__
def _recording_socket_init(self, *args, **kwargs):
    _original_socket_init(self, *args, **kwargs)
    _sockets_opened.append(self)
_socket.socket.__init__ = _recording_socket_init
_original_popen_init = _subprocess.Popen.__init__
def _recording_popen_init(self, *args, **kwargs):
    _original_popen_init(self, *args, **kwargs)
    _processes_started.append(self)
_subprocess.Popen.__init__ = _recording_popen_init
"""

# Run after the notebook's last cell: everything it started must be stopped. The kernel's own
# helpers (pyzmq starts a garbage-collector thread when it first sends a large output) do not count.
LEAK_CHECK = """
_left_open = [repr(sock) for sock in _sockets_opened if sock.fileno() != -1]
_left_running = [thread.name for thread in _threading.enumerate()
                 if thread not in _threads_before and thread.is_alive()
                 and not type(thread).__module__.startswith(("zmq", "ipykernel", "IPython", "jupyter"))]
_processes_running = [process.args for process in _processes_started if process.poll() is None]
assert _processes_started, "the notebook was to run a server in a process of its own"
assert not _left_open, f"sockets left open: {_left_open}"
assert not _left_running, f"threads left running: {_left_running}"
assert not _processes_running, f"processes left running: {_processes_running}"
"""


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def execute(notebook):
    """Run `notebook` in a fresh python3 kernel, in the repository's folder; return it with outputs."""
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    return notebook


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def output_texts(cell) -> list[str]:
    """Return the text of every output of a code cell (streams, results, errors)."""
    texts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            texts.append(output.text)
        elif output.output_type == "error":
            texts.append("\n".join(output.traceback))
        else:
            texts.extend(value for value in output.get("data", {}).values() if isinstance(value, str)
                         and not value.startswith("iVBOR"))  # base64 PNG: not text
    return texts


def tags(cell) -> list:
    return cell.metadata.get("tags", [])


def sections(notebook) -> list[list]:
    """Return the cells of each numbered section ("## 1. ..."), the heading's cell first."""
    found = []
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and re.search(r"^## \d+\. ", cell.source, re.MULTILINE):
            found.append([])
        if found:
            found[-1].append(cell)
    return found


def test_notebook_runs_in_a_fresh_kernel_and_leaves_nothing_running():
    """One run does three checks: every cell runs, every exercise's check says "correct" for
    the reference solution its exercise cell holds, and nothing is left running. Cells whose
    outputs are the same on every run must show what the committed notebook shows."""
    committed = read_notebook()
    notebook = read_notebook()
    notebook.cells.insert(0, nbformat.v4.new_code_cell(LEAK_WATCH))
    notebook.cells.append(nbformat.v4.new_code_cell(LEAK_CHECK))
    execute(notebook)  # raises CellExecutionError, naming the cell, if any cell fails
    checks = [cell for cell in code_cells(notebook) if "check" in tags(cell)]
    results = ["".join(output_texts(cell)) for cell in checks]
    assert [f"Exercise {number}: correct" in result for number, result in enumerate(results, 1)] == [True] * SECTIONS
    fresh = [cell for cell in notebook.cells[1:-1]]
    for saved, new in zip(committed.cells, fresh, strict=True):
        if "same-every-run" in tags(saved):
            # (a stream's text may come in one output or several, as the kernel flushed it)
            assert "".join(output_texts(new)) == "".join(output_texts(saved)), \
                f"the output of this cell changed:\n{saved.source}"


def test_notebook_is_one_class():
    notebook = read_notebook()
    prose = " ".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    assert len(notebook.cells) <= MAX_CELLS
    assert len(prose.split()) <= MAX_PROSE_WORDS
    found = sections(notebook)
    assert len(found) == SECTIONS
    for number, cells in enumerate(found, 1):
        assert cells[0].source.lstrip().startswith(f"## {number}. ") or f"\n## {number}. " in cells[0].source
        code = [cell for cell in cells if cell.cell_type == "code"]
        kinds = [[tag for tag in tags(cell) if tag in ("exercise", "check")] for cell in code]
        assert [kind for kind in kinds if kind] == [["exercise"], ["check"]], f"section {number}"
        # The section ends with its exercise: after the check, only its measurements.
        after = code[[kind == ["check"] for kind in kinds].index(True) + 1:]
        assert all("measure" in tags(cell) for cell in after), f"section {number} goes on after its exercise"


def test_notebook_uses_public_interfaces_only():
    sources = "\n".join(cell.source for cell in code_cells(read_notebook()))
    for module, allowed in PUBLIC_NAMES.items():
        assert not re.search(rf"^\s*import {module}\b", sources, re.MULTILINE)
        for names in re.findall(rf"^\s*from {module} import \(?([^)\n]*)", sources, re.MULTILINE):
            assert {name.strip() for name in names.split(",")} <= allowed, names
    assert not re.search(r"\._[A-Za-z]", sources), "a private name is used"


def test_notebook_sends_only_to_loopback():
    sources = "\n".join(cell.source for cell in code_cells(read_notebook()))
    assert "SO_BROADCAST" not in sources and "255.255" not in sources and "<broadcast>" not in sources
    assert set(re.findall(r"\d+\.\d+\.\d+\.\d+", sources)) <= {"127.0.0.1", "0.0.0.0"}


def test_each_exercise_holds_a_solution_to_replace():
    cells = [cell for cell in code_cells(read_notebook()) if "exercise" in tags(cell)]
    assert len(cells) == SECTIONS
    assert all(cell.source.startswith("# Replace this with your own.") for cell in cells)


def test_committed_notebook_was_run_top_to_bottom():
    cells = code_cells(read_notebook())
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), \
        "save the notebook after Restart Kernel and Run All Cells, so its outputs are those of a clean run"
    assert not [cell.source for cell in cells if any(output.output_type == "error" for output in cell.outputs)]


def test_committed_notebook_shows_its_plots_and_passing_checks():
    cells = code_cells(read_notebook())
    images = [output for cell in cells for output in cell.outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 2
    assert all(output.metadata["image/png"]["alt"] for output in images)  # a description for each
    text = "\n".join(text for cell in cells for text in output_texts(cell))
    for number in range(1, SECTIONS + 1):
        assert f"Exercise {number}: correct" in text


def test_committed_outputs_name_no_local_paths():
    text = "\n".join(text for cell in code_cells(read_notebook()) for text in output_texts(cell))
    here = re.escape(str(ROOT))  # wherever this checkout happens to be
    for pattern in (here, r"/tmp/", r"/home/", r"/Users/", r"/root/", r"[A-Za-z]:\\", r"site-packages"):
        assert not re.search(pattern, text), f"an output shows a local path matching {pattern!r}"
