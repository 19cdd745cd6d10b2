"""Shared fixtures: a real server on 127.0.0.1 port 0, and clients that clean up after themselves.

Everything here is fast on purpose: a low password-hash cost and short timeouts. No test
waits a fixed time to synchronise; each waits for the reply or event it expects.
"""

import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import client
import server
from encryption_helper import RECV_BUFFER, Channel, RtoEstimator

FAST_HASH = 1000  # PBKDF2 iterations in tests; the real default is 600,000
EVENT_WAIT = 10.0  # seconds before a missing event fails a test (a bound, not a sleep)
PROGRAM_WAIT = 20.0  # seconds before a missing line of a program's output fails a test
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# The test run writes into temporary folders only, never into the checkout: hypothesis keeps
# its examples (replayed on the next run) in the system's temporary folder, not in .hypothesis/.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "udp-chat-hypothesis"))


@pytest.fixture(autouse=True, scope="session")
def checkout_stays_clean():
    """Fail the run if a test wrote the server's data folder into the checkout (use tmp_path)."""
    data = os.path.join(ROOT, "chat_data")
    existed = os.path.exists(data)
    yield
    assert existed or not os.path.exists(data), "a test wrote chat_data/ into the checkout"


def fast_timing(**changes) -> client.Timing:
    """Client timeouts short enough for tests, long enough for a loaded CI machine."""
    settings = dict(connect_timeout=5.0, heartbeat_every=1.0, lost_contact_after=3.0, give_up_after=8.0,
                    min_rto=0.05, max_rto=0.5, goodbye_timeout=1.0)
    settings.update(changes)
    return client.Timing(**settings)


def lossy_timing(**changes) -> client.Timing:
    """Client timeouts for a link that loses about a third of all datagrams: quick to resend, slow to give up."""
    settings = dict(connect_timeout=10.0, min_rto=0.005, max_rto=0.2, lost_contact_after=10.0, give_up_after=30.0)
    settings.update(changes)
    return fast_timing(**settings)


def patient_channel(cipher, token, rto: RtoEstimator, **options) -> Channel:
    """The server's Channel for a session, with timers as short as lossy_timing's and more patience."""
    return Channel(cipher, token, rto=RtoEstimator(floor=0.005, ceiling=0.2, peer_ack_delay=rto.peer_ack_delay),
                   max_sends=60, **options)


def patient_client_channel(*args, **options) -> Channel:
    """The client's Channel, as patient as patient_channel before it gives up."""
    options.setdefault("max_sends", 60)
    return Channel(*args, **options)


@pytest.fixture
def quick_recovery(monkeypatch):
    """Make a lossy link quick to recover from, for tests of what survives loss.

    The server's session timers become as short as lossy_timing's (a lost reply would
    cost a timeout each, times a hundred), both ends try a packet 60 times before they
    give up, not 20 (loss at both ends loses half of all datagrams each way), tries
    before login are ten a second instead of one, and flood control, which would hold a
    few hundred quick messages for a minute, steps aside.
    """
    monkeypatch.setattr(server, "Channel", patient_channel)
    monkeypatch.setattr(client, "Channel", patient_client_channel)
    monkeypatch.setattr(client, "FIRST_CONTACT_RETRY", 0.1)
    monkeypatch.setattr(server, "MESSAGE_BURST", 10_000)
    monkeypatch.setattr(server, "MESSAGE_RATE", 10_000.0)


def fast_config(data_dir, **changes) -> server.ServerConfig:
    settings = dict(host="127.0.0.1", port=0, data_dir=str(data_dir), kdf_iterations=FAST_HASH)
    settings.update(changes)
    return server.ServerConfig(**settings)


class ServerHandle:
    """A server on a background thread, with the lines it logged."""

    def __init__(self, config: server.ServerConfig):
        self.config = config
        self.log: list[str] = []
        self.loop = server.start_server(config, log=self.log.append)
        self.address = self.loop.address

    @property
    def chat(self) -> server.ChatServer:
        return self.loop.chat

    def stop(self) -> None:
        self.loop.stop()


class WaitingSocket:
    """A non-blocking server socket: its reads return what waits, a (datagram, address) or
    an exception to raise, then nothing (BlockingIOError). It keeps what is sent, and how
    many datagrams had been sent at each read."""

    def __init__(self, reads):
        self.reads, self.sent, self.sent_at_read = list(reads), [], []

    def recvfrom_into(self, buffer):
        self.sent_at_read.append(len(self.sent))
        result = self.reads.pop(0) if self.reads else BlockingIOError()
        if isinstance(result, BaseException):
            raise result
        data, address = result
        buffer[:len(data)] = data
        return len(data), address

    def sendto(self, data, address):
        self.sent.append((data, address))
        return len(data)


def bare_loop(chat, sock) -> server.ServerLoop:
    """Return a ServerLoop with just the parts receive_all uses, around a fake socket."""
    loop = server.ServerLoop.__new__(server.ServerLoop)
    loop.chat, loop.sock = chat, sock
    loop.buffer = bytearray(RECV_BUFFER)
    loop.view = memoryview(loop.buffer)
    return loop


@pytest.fixture
def start_server(tmp_path):
    """Return a function that starts a server (several may run); all are stopped afterwards."""
    handles = []

    def start(**changes) -> ServerHandle:
        handle = ServerHandle(fast_config(changes.pop("data_dir", tmp_path / "data"), **changes))
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


@pytest.fixture
def chat_server(start_server) -> ServerHandle:
    return start_server()


@pytest.fixture
def make_client():
    """Return a function that makes a ChatClient; all are closed afterwards."""
    clients = []

    def make(address, **options) -> client.ChatClient:
        options.setdefault("timing", fast_timing())
        made = client.ChatClient(address[0], address[1], **options)
        clients.append(made)
        return made

    yield make
    for made in clients:
        made.close()


def member(make_client, address, name: str, password: str = "pw", room: str = "lobby",
           room_password: str = "juara", **options) -> client.ChatClient:
    """Return a client registered, logged in and in `room`."""
    made = make_client(address, **options)
    made.register(name, password)
    made.login(name, password)
    made.join(room, room_password)
    return made


def next_event(made: client.ChatClient, kind: str | None = None, timeout: float = EVENT_WAIT) -> client.Event:
    """Return the client's next event (of `kind`, skipping others); fail if none comes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            event = made.events.get(timeout=max(deadline - time.monotonic(), 0.001))
        except queue.Empty:
            pytest.fail(f"{made.name} got no {kind or ''} event within {timeout} s")
        if kind is None or event.kind == kind:
            return event


def texts_of(made: client.ChatClient, kind: str, count: int, timeout: float = 30.0) -> list[str]:
    """Return the texts of the next `count` events of `kind` (others skipped), in arrival order."""
    return [next_event(made, kind, timeout).text for _ in range(count)]


def no_more_events(made: client.ChatClient, probe: client.ChatClient) -> list[client.Event]:
    """Return events `made` still has, after a round trip proves nothing is in flight.

    `probe` (another member of the room) says a marker message; once `made` receives the
    marker, everything sent before it has arrived (the server delivers in order).
    """
    probe.say("--marker--")
    extra = []
    while True:
        event = next_event(made)
        if event.kind == "chat" and event.text == "--marker--":
            return extra
        extra.append(event)


def wait_until(condition, timeout: float = EVENT_WAIT, what: str = "condition") -> None:
    """Poll `condition` until true; fail the test if it never is. For server-side state."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


PYTHON = sys.executable


class Program:
    """A Python program in a subprocess, run from the repository; its output read on a thread.

    The thread keeps the pipe drained (a full pipe would stall the program) and collects
    every line in `output`; `expect` waits for a line, but never longer than a bound.
    """

    def __init__(self, *args, stdin=subprocess.PIPE, inside: tuple = ()):
        environment = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        self.process = subprocess.Popen(  # `inside`: a command to run it in, e.g. ("ip", "netns", "exec", NAME)
            [*inside, sys.executable, *args], cwd=ROOT, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", env=environment,
        )
        self.output: list[str] = []  # every line so far
        self.lines: queue.Queue = queue.Queue()  # the lines `expect` has not looked at yet
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line.rstrip("\n"))
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # end of output: the program has ended

    def type(self, *lines: str) -> None:
        self.process.stdin.write("".join(line + "\n" for line in lines))
        self.process.stdin.flush()

    def expect(self, text: str, wait: float = PROGRAM_WAIT) -> str:
        """Return the next output line containing `text`; fail if none comes within `wait` s."""
        while True:
            try:
                line = self.lines.get(timeout=wait)
            except queue.Empty:
                pytest.fail(f"no line with {text!r} within {wait} s; output so far: {self.output}")
            if line is None:
                pytest.fail(f"program ended without {text!r}; output: {self.output}")
            if text in line:
                return line

    def finish(self) -> int:
        """Wait for the program to end by itself; return its exit code."""
        try:
            return self.process.wait(timeout=PROGRAM_WAIT)
        finally:
            self.stop()

    def stop(self) -> None:
        """Kill the program if it still runs (SIGKILL, TerminateProcess on Windows: no cleanup runs)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.reader.join(timeout=10)  # the output ends with the program
        for stream in (self.process.stdin, self.process.stdout):
            if stream:
                stream.close()


# === The assignment's rubric: `python -m pytest -m assignment [--chat-dir=DIR]` ===========
# The tests of tests/test_assignment.py carry `@pytest.mark.assignment(kind, item)`; the run
# ends with one row per item of the handout, then `assignment: M/6 mandatory, K/N optional`.

RUBRIC_KINDS = {"mandatory": "mandatory", "asked": "also asked", "optional": "optional", "seed": "seed text"}


def pytest_addoption(parser):
    # Written --chat-dir=DIR: pytest reads its command line once before this file, and
    # would take a DIR standing alone for a folder of tests.
    parser.addoption("--chat-dir", default=ROOT, metavar="DIR",
                     help="with -m assignment: grade the copy of the chat in DIR (its server.py and client.py), "
                          "written --chat-dir=DIR; default: this checkout")


@pytest.fixture(scope="session")
def chat_dir(request) -> str:
    """The folder whose server.py and client.py the rubric runs."""
    folder = os.path.abspath(request.config.getoption("--chat-dir"))
    for script in ("server.py", "client.py"):
        if not os.path.isfile(os.path.join(folder, script)):
            pytest.fail(f"--chat-dir {folder} has no {script}", pytrace=False)
    return folder


def pytest_ignore_collect(collection_path, config):
    """A rubric run (`-m assignment`) reads only tests/test_assignment.py, where every test of
    the rubric is: importing the other test files would take longer than some items."""
    if config.getoption("markexpr") == "assignment" and collection_path.name.startswith("test_") \
            and collection_path.suffix == ".py" and collection_path.name != "test_assignment.py":
        return True
    return None


def pytest_collection_modifyitems(items):
    for number, item in enumerate(items):
        marker = item.get_closest_marker("assignment")
        if marker and marker.args:
            item.user_properties.append(("rubric", (*marker.args[:2], number)))


def rubric_rows(stats) -> dict:
    """Each item's outcome: (kind, item, number) -> (result, reason); a failure in any phase wins."""
    rows = {}
    for reports in stats.values():
        for report in reports:
            rubric = dict(getattr(report, "user_properties", ())).get("rubric")
            if not rubric or not isinstance(report, pytest.TestReport) or (report.passed and report.when != "call"):
                continue
            if report.skipped:
                result, reason = "skipped", report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            elif report.failed:
                crash = getattr(report.longrepr, "reprcrash", None)
                result, reason = "FAILED", (crash.message if crash else str(report.longrepr)).split("\n")[0]
            else:
                result, reason = "passed", ""
            if rows.get(tuple(rubric), ("passed",))[0] != "FAILED":
                rows[tuple(rubric)] = (result, reason.removeprefix("Skipped: ").removeprefix("Failed: "))
    return rows


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter, config):
    """After pytest's own summary: the rubric, the last thing before the closing count."""
    yield
    rows = rubric_rows(terminalreporter.stats)
    if not rows:
        return
    write = terminalreporter.write_line
    graded = config.getoption("--chat-dir")
    terminalreporter.write_sep("=", f"assignment rubric: {'this checkout' if graded == ROOT else graded}")
    order = list(RUBRIC_KINDS)
    for (kind, item, _), (result, reason) in sorted(rows.items(), key=lambda row: (order.index(row[0][0]), row[0][2])):
        write(f"{RUBRIC_KINDS[kind]:<13} {result:<8} {item}")
        if reason:
            write(f"{'':<22} {reason[:220]}")
    count = {kind: [result for (of, *_), (result, _) in rows.items() if of == kind] for kind in order}
    write(f"assignment: {count['mandatory'].count('passed')}/6 mandatory, "
          f"{count['optional'].count('passed')}/{len(count['optional']) - count['optional'].count('skipped')} optional")
