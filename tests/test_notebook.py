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
SECTIONS_WITH_TESTS = 7

# Run before the notebook's first cell: remember the threads already running, and every
# socket the notebook opens from now on.
LEAK_WATCH = """
import socket as _socket, threading as _threading
_threads_before = set(_threading.enumerate())
_sockets_opened = []
_original_socket_init = _socket.socket.__init__
def _recording_socket_init(self, *args, **kwargs):
    _original_socket_init(self, *args, **kwargs)
    _sockets_opened.append(self)
_socket.socket.__init__ = _recording_socket_init
"""

# Run after the notebook's last cell: everything it started must be stopped. The kernel's own
# helpers (pyzmq starts a garbage-collector thread when it first sends a large output) do not count.
LEAK_CHECK = """
_left_open = [repr(sock) for sock in _sockets_opened if sock.fileno() != -1]
_left_running = [thread.name for thread in _threading.enumerate()
                 if thread not in _threads_before and thread.is_alive()
                 and not type(thread).__module__.startswith(("zmq", "ipykernel", "IPython", "jupyter"))]
assert not _left_open, f"sockets left open: {_left_open}"
assert not _left_running, f"threads left running: {_left_running}"
"""

# Reference answers for the cells tagged "exercise", found by the name each cell defines.
SOLUTIONS = {
    "my_ack": "my_ack = (2, 0b1011)",
    "find_xor_key": 'def find_xor_key(datagram):\n    return recover_xor_key(datagram, pack_fields("lobby"))',
    "sends_per_request": "sends_per_request = 1 / (0.7 * 0.7)",
    "stop_and_wait_seconds": "stop_and_wait_seconds = 100 * 0.2\nwindow_32_seconds = 4 * 0.2",
    "ping": """
def ping(address, count=10, timeout=0.2):
    rtts, lost = [], 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        for number in range(1, count + 1):
            sent_at = time.perf_counter()
            sock.sendto(f"Ping {number} {sent_at}".encode(), address)
            try:
                sock.recvfrom(65535)
                rtts.append(time.perf_counter() - sent_at)
            except TimeoutError:
                lost += 1
    return rtts, lost
""",
    # Written from docs/PROTOCOL.md: HELLO for a cookie, LOGIN for a token, then the session's
    # requests numbered from 1; each answer is found by its first field, re.
    "log_in_and_say_hello": """
def log_in_and_say_hello(server_address):
    cipher = make_cipher("xor")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)

        def ask(packet):
            sock.sendto(encode_packet(packet, cipher), server_address)
            while True:
                answer = decode_packet(sock.recvfrom(65535)[0], cipher)
                if answer.type in (PacketType.OK, PacketType.ERROR):
                    fields = unpack_fields(answer.payload)
                    if fields[0] == str(packet.seq):
                        assert answer.type == PacketType.OK, fields
                        return answer, fields

        _, (_, cookie) = ask(Packet(PacketType.HELLO, 1, payload=pack_fields("." * 94)))
        welcome, _ = ask(Packet(PacketType.LOGIN, 2, payload=pack_fields(cookie, "dana", "d4na-pass")))
        ask(Packet(PacketType.JOIN, 1, token=welcome.token, payload=pack_fields("lobby", "juara")))
        _, said = ask(Packet(PacketType.SAY, 2, token=welcome.token, payload=pack_fields("hello")))
        return said[-1]
""",
}


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


def answer_exercises(notebook) -> int:
    """Replace each exercise cell's blank by its reference answer; return how many were answered."""
    answered = 0
    for cell in code_cells(notebook):
        if "exercise" not in cell.metadata.get("tags", []):
            continue
        name = next(name for name in SOLUTIONS if re.search(rf"^(def )?{name}\b", cell.source, re.MULTILINE))
        cell.source = SOLUTIONS[name].strip()
        answered += 1
    return answered


def test_notebook_runs_in_a_fresh_kernel_and_leaves_nothing_running():
    """One run does three checks: every cell runs, the exercises' checks accept the reference
    answers (proof that they can say "correct"), and nothing is left running."""
    notebook = read_notebook()
    assert answer_exercises(notebook) == len(SOLUTIONS)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(LEAK_WATCH))
    notebook.cells.append(nbformat.v4.new_code_cell(LEAK_CHECK))
    execute(notebook)  # raises CellExecutionError, naming the cell, if any cell fails
    checks = [cell for cell in code_cells(notebook) if cell.source.startswith("def check_exercise")]
    results = ["".join(output_texts(cell)) for cell in checks]
    assert len(results) == len(SOLUTIONS)
    assert all(": correct" in result for result in results), results
    assert any("'rahasia'" in result for result in results)  # the room password recovered from the capture


def test_unanswered_exercises_say_so():
    cells = [cell for cell in code_cells(read_notebook()) if cell.source.startswith("def check_exercise")]
    assert len(cells) == len(SOLUTIONS)
    assert all(re.search("not (answered|done) yet", "".join(output_texts(cell))) for cell in cells)


def test_committed_notebook_was_run_top_to_bottom():
    cells = code_cells(read_notebook())
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), \
        "save the notebook after Restart Kernel and Run All Cells, so its outputs are those of a clean run"
    assert not [cell.source for cell in cells if any(output.output_type == "error" for output in cell.outputs)]


def test_committed_notebook_shows_its_plots_and_passing_section_tests():
    cells = code_cells(read_notebook())
    images = [output for cell in cells for output in cell.outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 3
    assert all(output.metadata["image/png"]["alt"] for output in images)  # a description for each
    text = "\n".join(text for cell in cells for text in output_texts(cell))
    for section in range(1, SECTIONS_WITH_TESTS + 1):
        assert f"section {section}: tests pass" in text


def test_committed_outputs_name_no_local_paths():
    text = "\n".join(text for cell in code_cells(read_notebook()) for text in output_texts(cell))
    here = re.escape(str(ROOT))  # wherever this checkout happens to be
    for pattern in (here, r"/tmp/", r"/home/", r"/Users/", r"/root/", r"[A-Za-z]:\\", r"site-packages"):
        assert not re.search(pattern, text), f"an output shows a local path matching {pattern!r}"
