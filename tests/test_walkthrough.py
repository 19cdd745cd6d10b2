"""The walkthrough's exercise checks: each accepts a correct solution and rejects wrong ones.

The notebook's exercise cells hold working reference solutions (the student replaces them),
so running the notebook proves that every check can say "correct" (tests/test_notebook.py).
These tests prove the other half: a check cannot be passed by accident. The notebook's code
cells run here in one namespace, outside Jupyter; then each check is called with solutions
that are wrong in the ways students get them wrong - a constant, a sender that takes a late
ACK for the current one, a hard-coded key, a server bound to one interface.
"""

import linecache
import math
import os
import random
import threading
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("IPython")
pytest.importorskip("matplotlib")
os.environ.setdefault("MPLBACKEND", "Agg")  # no window: figures are only saved

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "walkthrough.ipynb"


def tagged(notebook, tag: str) -> list:
    return [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]


@pytest.fixture(scope="module")
def notebook_namespace():
    """Run every code cell of the notebook, in order, in one namespace; return it."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    namespace = {"__name__": "walkthrough"}
    here = Path.cwd()
    os.chdir(ROOT)  # the notebook reads docs/ relative to the repository
    try:
        for number, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            # A file name of its own, so inspect.getsource finds a function's source, as in Jupyter.
            name = f"<walkthrough cell {number}>"
            linecache.cache[name] = (len(cell.source), None, cell.source.splitlines(True), name)
            exec(compile(cell.source, name, "exec"), namespace)
    finally:
        os.chdir(here)
    return namespace


def test_every_exercise_has_its_check_right_after_it():
    cells = [cell for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]
    exercises = [number for number, cell in enumerate(cells) if "exercise" in cell.metadata.get("tags", [])]
    assert len(exercises) == 5
    for number in exercises:
        assert "Replace this with your own" in cells[number].source
        assert "check" in cells[number + 1].metadata.get("tags", [])


def test_the_reference_solutions_pass(notebook_namespace):
    ns = notebook_namespace
    assert "correct" in ns["check_exercise1"](ns["inspect"].getsource(ns["serve"]))
    assert "correct" in ns["check_exercise2"](ns["send_reliably"])
    assert "correct" in ns["check_exercise3"](ns["arrived"])
    assert "correct" in ns["check_exercise4"](ns["percentile"])
    assert "correct" in ns["check_exercise5"](ns["find_xor_key"])


# --- Exercise 1: a UDP server in a process of its own --------------------------------------

SERVER = """
def serve(port):
    import socket
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, port))
    print("listening on", sock.getsockname(), flush=True)
    while True:
        data, sender = sock.recvfrom(65535)
        print(sender, data, flush=True)
        REPLY
"""
WRONG_SERVERS = {
    "answers a constant": SERVER.replace("HOST", '"0.0.0.0"').replace("REPLY", 'sock.sendto(b"PONG", sender)'),
    "echoes without capitals": SERVER.replace("HOST", '"0.0.0.0"').replace("REPLY", "sock.sendto(data, sender)"),
    "bound to loopback only": SERVER.replace("HOST", '"127.0.0.1"').replace(
        "REPLY", "sock.sendto(data.upper(), sender)"),
    "bound to loopback, prints all interfaces": SERVER.replace("HOST", '"127.0.0.1"').replace(
        '", sock.getsockname()', '", ("0.0.0.0", port)').replace("REPLY", "sock.sendto(data.upper(), sender)"),
    "does not print what it got": SERVER.replace("HOST", '"0.0.0.0"').replace(
        "REPLY", "sock.sendto(data.upper(), sender)").replace("print(sender, data, flush=True)", "pass"),
    "answers from another socket": SERVER.replace("HOST", '"0.0.0.0"').replace(
        "REPLY", "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(data.upper(), sender)"),
}


@pytest.mark.parametrize("wrong", WRONG_SERVERS, ids=list(WRONG_SERVERS))
def test_exercise1_rejects_a_wrong_server(notebook_namespace, wrong):
    with pytest.raises(AssertionError):
        notebook_namespace["check_exercise1"](WRONG_SERVERS[wrong])


def test_exercise1_accepts_another_correct_server(notebook_namespace):
    source = SERVER.replace("HOST", '""').replace("REPLY", "sock.sendto(bytes(data).upper(), sender)")
    assert "correct" in notebook_namespace["check_exercise1"](source)


# --- Exercise 2: stop-and-wait over the lossy socket ----------------------------------------

def never_sends_again(sock, address, lines, timeout=0.2):
    """Sends each line once and waits for an answer, but never retransmits."""
    sock.settimeout(timeout)
    for number, line in enumerate(lines):
        sock.sendto(f"{number} {line}".encode(), address)
        try:
            sock.recvfrom(65535)
        except TimeoutError:
            pass
    return len(lines)


def takes_any_ack(sock, address, lines, timeout=0.2):
    """Retransmits, but takes any ACK - a late one of an earlier line too - for the current one."""
    sock.settimeout(timeout)
    sends = 0
    for number, line in enumerate(lines):
        while True:
            sock.sendto(f"{number} {line}".encode(), address)
            sends += 1
            try:
                sock.recvfrom(65535)
                break
            except TimeoutError:
                pass
    return sends


def miscounts(notebook_namespace):
    """Sends correctly, but returns the number of lines, not of datagrams sent."""
    def send(sock, address, lines, timeout=0.2):
        notebook_namespace["send_reliably"](sock, address, lines, timeout)
        return len(lines)
    return send


def test_exercise2_rejects_a_sender_that_never_sends_again(notebook_namespace):
    with pytest.raises(AssertionError):
        notebook_namespace["check_exercise2"](never_sends_again)


def test_exercise2_rejects_a_sender_fooled_by_a_late_ack(notebook_namespace):
    with pytest.raises(AssertionError, match="late|old ACK"):
        notebook_namespace["check_exercise2"](takes_any_ack)


def test_exercise2_rejects_a_wrong_count_of_sends(notebook_namespace):
    with pytest.raises(AssertionError, match="returned"):
        notebook_namespace["check_exercise2"](miscounts(notebook_namespace))


def repeats_blindly(sock, address, lines, timeout=0.2):
    """Sends each line 8 times and never reads an ACK: every line arrives, by luck."""
    for number, line in enumerate(lines):
        for _ in range(8):
            sock.sendto(f"{number} {line}".encode(), address)
        time.sleep(0.1)  # the receiver reads them all before the check stops it
    return 8 * len(lines)


def blocks_for_ever(sock, address, lines, timeout=0.2):
    """Waits for an ACK with no timeout: stuck once one is lost."""
    sock.settimeout(None)
    threading.Event().wait()


def test_exercise2_rejects_blind_repetition(notebook_namespace):
    with pytest.raises(AssertionError, match="not 6 \\+ 2 resends"):
        notebook_namespace["check_exercise2"](repeats_blindly)


def test_exercise2_fails_a_sender_that_blocks_instead_of_hanging(notebook_namespace):
    with pytest.raises(AssertionError, match="block for ever"):
        notebook_namespace["check_exercise2"](blocks_for_ever, patience=1)


# --- Exercise 3: reading an acknowledgement ---------------------------------------------------

WRONG_READERS = {
    "a constant": lambda cumulative, bitmap: [1, 2],
    "bit i as cumulative + 1 + i": lambda cumulative, bitmap: list(range(1, cumulative + 1)) + [
        cumulative + 1 + bit for bit in range(32) if bitmap >> bit & 1],
    "the cumulative number only": lambda cumulative, bitmap: list(range(1, cumulative + 1)),
}


@pytest.mark.parametrize("wrong", WRONG_READERS, ids=list(WRONG_READERS))
def test_exercise3_rejects_a_wrong_reading(notebook_namespace, wrong):
    with pytest.raises(AssertionError):
        notebook_namespace["check_exercise3"](WRONG_READERS[wrong])


# --- Exercise 4: the nearest-rank percentile -------------------------------------------------

def nearest_rank(values, q):
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def finite(values):
    return [float("inf") if value is None else value for value in values]


WRONG_PERCENTILES = {
    "a constant": lambda values, q: 66.12,
    "the largest": lambda values, q: max(finite(values)),
    "the mean": lambda values, q: sum(finite(values)) / len(values),
    "one rank too high": lambda values, q: sorted(finite(values))[min(int(q / 100 * len(values)), len(values) - 1)],
    "lost lines left out": lambda values, q: nearest_rank([value for value in values if value is not None] or [0], q),
}


@pytest.mark.parametrize("wrong", WRONG_PERCENTILES, ids=list(WRONG_PERCENTILES))
def test_exercise4_rejects_a_wrong_percentile(notebook_namespace, wrong):
    random.seed(4)  # the check draws random data: make a failure repeat
    with pytest.raises((AssertionError, IndexError, ValueError)):
        notebook_namespace["check_exercise4"](WRONG_PERCENTILES[wrong])


# --- Exercise 5: the XOR key from one captured JOIN ------------------------------------------

def seven_bytes_of_stream(notebook_namespace):
    """Returns the whole known key stream: right only for 7-byte keys."""
    ns = notebook_namespace
    known = ns["pack_fields"]("lobby")
    return lambda datagram: bytes(a ^ b for a, b in zip(datagram[ns["HEADER_SIZE"]:][:len(known)], known, strict=True))


def shortest_period(notebook_namespace):
    """Takes the stream's shortest period for the key, never asking the checksum."""
    ns = notebook_namespace
    known = ns["pack_fields"]("lobby")

    def find(datagram):
        stream = bytes(a ^ b for a, b in zip(datagram[ns["HEADER_SIZE"]:], known, strict=False))
        return stream[:next(p for p in range(1, 8) if stream[p:] == stream[:len(stream) - p])]
    return find


def test_exercise5_rejects_the_shortest_period_unchecked(notebook_namespace):
    with pytest.raises(AssertionError, match="not the key"):
        notebook_namespace["check_exercise5"](shortest_period(notebook_namespace))


def test_exercise5_rejects_the_default_key(notebook_namespace):
    with pytest.raises(AssertionError):
        notebook_namespace["check_exercise5"](lambda datagram: b"II2120")


def test_exercise5_rejects_the_stream_taken_for_the_key(notebook_namespace):
    with pytest.raises(AssertionError, match="not the key"):
        notebook_namespace["check_exercise5"](seven_bytes_of_stream(notebook_namespace))


def test_exercise5_rejects_no_answer(notebook_namespace):
    with pytest.raises(AssertionError):
        notebook_namespace["check_exercise5"](lambda datagram: None)


# --- What each section shows (the notebook's former per-section test cells) -----------------
# The prose states these facts next to the outputs that show them; these tests keep them true.


def test_section1_a_socket_is_bound_by_its_first_sendto(notebook_namespace):
    socket = notebook_namespace["socket"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        assert client.getsockname() == ("0.0.0.0", 0)
        client.sendto(b"", receiver.getsockname())  # an empty datagram is a datagram too
        ip, port = client.getsockname()
        assert ip == "0.0.0.0" and port > 0
        assert receiver.recvfrom(65535) == (b"", ("127.0.0.1", port))
    config = notebook_namespace["ServerConfig"]()
    assert (config.host, config.port) == ("0.0.0.0", 9999)  # all interfaces, a fixed port


def test_section2_loss_is_seeded_and_stop_and_wait_pays_for_it(notebook_namespace):
    ns = notebook_namespace
    assert 60 * 0.55 < len(ns["received"]) < 60 * 0.9  # about 30% lost, not every one
    results = ns["results"]  # (sends per line, seconds) at 0, 10, 20 and 30% loss
    assert results[0][0] == 1.0
    assert results[-1][0] > 1.4  # 1 / (1 - 0.3)^2 = 2.04 expected


def test_section3_selective_repeat_resends_only_the_hole(notebook_namespace):
    ns = notebook_namespace
    assert (ns["cumulative"], ns["bitmap"]) == (1, 0b111111)
    assert ns["resent"] == [2]
    assert 0 in ns["receiver_window"]  # a window of 3 in a space of 4 numbers is ambiguous
    for window in (1, 4):
        busy, elapsed = ns["measured_utilisation"](window)
        assert abs(busy / elapsed - ns["utilisation"](window)) < 0.01


def test_section4_the_committed_data_says_what_the_prose_says(notebook_namespace):
    ns = notebook_namespace
    chat = ns["CHAT"]  # loss -> {"ours": [runs], "TCP": [runs]}
    assert len(chat[20]["ours"]) >= 3 and len(chat[20]["TCP"]) >= 3  # several runs of each
    assert max(run["p50"] for run in chat[0]["TCP"]) < min(run["p50"] for run in chat[0]["ours"])  # TCP faster at 0%
    assert max(run["p99"] for run in chat[20]["ours"]) < min(run["p99"] for run in chat[20]["TCP"])  # ours steadier
    assert sum(run["p50"] > 100 for run in chat[20]["TCP"]) == 2  # "in two of them even the median line waited"
    bulk = ns["LOSSY"]["bulk"]

    def runs(loss, proto):
        return [run for run in bulk if (run["loss"], run["proto"]) == (loss, proto)]
    assert min(run["mb_per_s"] for run in runs(0, "tcp")) > 10 * max(run["mb_per_s"] for run in runs(0, "ours"))
    for proto in ("ours", "tcp"):  # at 20%, "neither side is steady"
        seconds = [run["seconds"] for run in runs(20, proto)]
        assert max(seconds) > 3 * min(seconds)
    files = {(row["size_mb"], row["proto"]): row["seconds"] for row in ns["FILES"]["rows"]
             if row["receivers"] == 1 and row["loss"] == 20}
    assert files[10, "ours"] < files[10, "tcp"] and files[1, "tcp"] < files[1, "ours"]
    assert files[20, "tcp"] < files[20, "ours"]
    assert ns["new_after_timeouts"](False) == 1 and ns["new_after_timeouts"](True) == 0
    estimator = ns["RtoEstimator"]()
    for _ in range(20):
        estimator.observe(0.0002)
    assert estimator.rto == pytest.approx(0.01)  # RFC 6298's 1 s minimum, replaced by 10 ms


def test_section5_the_capture_gives_the_key_away_but_no_password(notebook_namespace):
    ns = notebook_namespace
    assert ns["stolen_key"] == b"II2120"
    assert len(ns["shifts"]) == 1  # the checksum names the one Caesar shift
    refused = ns["refused"]  # a LOGIN with another address's cookie: an ERROR, or no answer at all
    assert refused is None or "stale-cookie" in ns["unpack_fields"](refused.payload)
    assert "builder-42" not in repr(ns["first"] + ns["second"])  # bob's LOGINs: no password
    replayed = ns["unpack_fields"](ns["replayed"].payload)  # bob's proof, replayed: worthless
    assert replayed[1:] == ["invalid-login", "Invalid username or password."]
    assert not ns["tap"].thread.is_alive()
