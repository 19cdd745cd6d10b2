"""The course handout's rubric, item by item, checked as a student's demo shows it.

Each test runs the real programs as a student would in the lab: `python server.py` in one
terminal, two or three `python client.py` in others, all on 127.0.0.1, and types into them
what a student types, then reads what they print. The terminals are real ones (a pseudo
terminal: passwords are typed unseen, Ctrl+C stops the server) on Linux and macOS; on
Windows, which has none, the programs read their answers as plain lines from a pipe.

Nothing here imports the chat's code: `python -m pytest -m assignment --chat-dir=DIR`
grades another copy of the project (a student's fork) that keeps the same command-line
options and the same texts. The run ends with the rubric as a table (tests/conftest.py).

Every wait is bounded: a test waits for the line it expects, at most WAIT seconds, and
fails with a sentence that says what did not happen.
"""

import codecs
import ctypes
import ctypes.util
import os
import random
import re
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

WAIT = 10.0  # seconds a reply may take before an item fails (a bound, never a sleep)
FIRST_CONTACT = 20.0  # a client gives up on a silent server after 10 s: wait longer for its word
LOSSY_WAIT = 60.0  # on a lossy link, what was lost is sent again: a wider bound
ROOM_PASSWORD = "juara"  # the lobby's password in the seeds and in this project

# Escape sequences (colours, readline's redrawing), carriage returns and the bell: a
# terminal acts on them, and what is left is the text a student reads on the screen.
CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>]"
                     r"|[\r\x07]")

# A program in a pseudo terminal becomes the leader of a session of its own, with that
# terminal as its controlling terminal: so getpass can turn echo off, and Ctrl+C typed
# there sends SIGINT, as in a real terminal window. Then it becomes `python SCRIPT ...`.
TAKE_TERMINAL = "import fcntl, os, sys, termios\nos.setsid()\nfcntl.ioctl(0, termios.TIOCSCTTY, 0)\n" \
                "os.execv(sys.argv[1], sys.argv[1:])\n"

try:
    import fcntl
    import pty
    import struct
    import termios
except ImportError:  # Windows
    pty = None


def free_port() -> int:
    """A UDP port on 127.0.0.1 that nothing uses now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Terminal:
    """One program in a terminal window of its own: what is typed into it, what it shows."""

    def __init__(self, name: str, script: str, args: list[str], cwd, env=None):
        self.name = name
        environment = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", **(env or {}))
        environment.setdefault("TERM", "xterm")
        command = [sys.executable, script, *args]
        if pty:
            self.fd, child = pty.openpty()
            # A wide screen: no line of the chat is wrapped by the terminal.
            fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
            self.process = subprocess.Popen([sys.executable, "-c", TAKE_TERMINAL, *command], stdin=child,
                                            stdout=child, stderr=child, cwd=cwd, env=environment)
            os.close(child)
        else:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, cwd=cwd, env=environment)
            self.fd = self.process.stdout.fileno()
        self.raw = ""
        self.seen = 0  # where in the screen's text the next expect starts looking
        self.ended = False
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the program ended and closed the terminal
                data = b""
            with self.changed:
                self.raw += decoder.decode(data, final=not data)
                self.ended = not data
                self.changed.notify_all()
            if not data:
                return

    @property
    def screen(self) -> str:
        """Everything the program printed so far, as text (what typing echoed included)."""
        with self.changed:
            return CONTROL.sub("", self.raw)

    def type(self, text: str) -> None:
        """Type a line and press Enter."""
        data = (text + ("\r" if pty else "\n")).encode()
        if pty:
            os.write(self.fd, data)
        else:
            self.process.stdin.write(data)
            self.process.stdin.flush()

    def expect(self, text: str, why: str = "", wait: float = WAIT) -> str:
        """Return the line where `text` shows next; fail, saying `why`, if it is not there within `wait` s."""
        deadline = time.monotonic() + wait
        with self.changed:
            while True:
                screen = CONTROL.sub("", self.raw)
                found = screen.find(text, self.seen)
                if found >= 0:
                    self.seen = found + len(text)
                    start = screen.rfind("\n", 0, found) + 1
                    end = screen.find("\n", found)
                    return screen[start:end if end >= 0 else len(screen)].strip()
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    break
                self.changed.wait(left)
        last = [line.strip() for line in screen.split("\n") if line.strip()][-3:]
        ending = "it ended" if self.ended else f"waited {wait:g} s"
        shown = f"its last lines: {last}" if last else "it showed nothing"
        pytest.fail(f"{why or 'no reply'}: {self.name} never showed {text!r} ({ending}; {shown})", pytrace=False)

    def find(self, pattern: str, why: str, wait: float = WAIT) -> str:
        """Return the first line anywhere on the screen that matches `pattern` (a regular
        expression, case ignored); fail, saying `why`, if none does within `wait` s."""
        deadline = time.monotonic() + wait
        with self.changed:
            while True:
                for line in CONTROL.sub("", self.raw).split("\n"):
                    if re.search(pattern, line, re.IGNORECASE):
                        return line.strip()
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    pytest.fail(f"{why}: {self.name} showed no such line within {wait:g} s", pytrace=False)
                self.changed.wait(left)

    def ctrl_c(self) -> None:
        """Press Ctrl+C (on Windows, where a pipe has no Ctrl+C, end the program)."""
        if pty:
            os.write(self.fd, b"\x03")
        else:
            self.process.terminate()

    def finish(self, why: str) -> int:
        """Wait until the program ends by itself; its exit status."""
        try:
            return self.process.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{why}: {self.name} still runs after {WAIT:g} s", pytrace=False)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=WAIT)
        self.reader.join(timeout=WAIT)
        if pty:
            os.close(self.fd)
        for stream in (self.process.stdin, self.process.stdout):
            if stream:
                stream.close()


class Lab:
    """The lab of one test: the project's folder, a scratch folder, and the terminals open."""

    def __init__(self, chat_dir: str, folder):
        self.chat_dir = chat_dir
        self.folder = folder
        self.terminals: list[Terminal] = []

    def run(self, name: str, script: str, *args: str, **options) -> Terminal:
        path = os.path.join(self.chat_dir, script)
        terminal = Terminal(name, path, list(args), cwd=self.folder, **options)
        self.terminals.append(terminal)
        return terminal

    def server(self, *options: str, data: str = "data", name: str = "the server") -> Terminal:
        """`python server.py` on a free port of 127.0.0.1, its files in a folder of this test."""
        port = free_port()
        server = self.run(name, "server.py", "--host", "127.0.0.1", "--port", str(port),
                          "--data-dir", str(self.folder / data), *options)
        server.port = port
        server.expect("listening", "the server did not start")
        return server

    def client(self, name: str, server: Terminal, *options: str, port: int = 0) -> Terminal:
        """`python client.py` given the server's IP and port (or `port`), once it is connected."""
        port = port or server.port
        client = self.run(name, "client.py", "--host", "127.0.0.1", "--port", str(port), *options)
        client.expect("/register", "the client got no reply from the server", FIRST_CONTACT)
        return client

    def close(self) -> None:
        for terminal in self.terminals:
            terminal.close()


@pytest.fixture
def lab(chat_dir, tmp_path):
    made = Lab(chat_dir, tmp_path)
    yield made
    made.close()


def give_account(client: Terminal, command: str, name: str, password: str) -> None:
    """Type `command` (/register or /login), then the name and password it asks for."""
    client.type(command)
    client.expect("Username:", "the client did not ask for a username")
    client.type(name)
    client.expect("Password", "the client did not ask for a password")
    client.type(password)


def register(client: Terminal, name: str, password: str) -> None:
    give_account(client, "/register", name, password)
    client.expect("again", "the client did not ask for the password again")
    client.type(password)


def login(client: Terminal, name: str, password: str) -> None:
    give_account(client, "/login", name, password)


def member(lab: Lab, server: Terminal, name: str, *options: str, password: str = "secret", port: int = 0,
           wait: float = WAIT) -> Terminal:
    """A client of `name`, registered, logged in and in the lobby, as a student gets there."""
    client = lab.client(name, server, *options, port=port)
    register(client, name, password)
    client.expect("Registration successful.", f"{name} could not register", wait)
    login(client, name, password)
    client.expect("Room password", f"{name} could not log in (no room password asked)", wait)
    client.type(ROOM_PASSWORD)
    client.expect("joined lobby", f"{name} could not join the lobby with its password {ROOM_PASSWORD!r}", wait)
    return client


def say(client: Terminal, text: str) -> None:
    """Type a chat line; return once the server took it (the client shows `you: text`)."""
    client.type(text)
    client.expect(f"you: {text}", f"the server did not take {client.name}'s message")


# --- The six mandatory items -------------------------------------------------------


@pytest.mark.assignment("mandatory", "1. The server receives a client's message and prints it")
def test_mandatory_1_the_server_prints_what_a_client_sent(lab):
    server = lab.server()
    alice = member(lab, server, "alice")
    alice.type("hello server: 1 | 2")
    server.expect("hello server: 1 | 2", "the server did not print the message alice sent")


@pytest.mark.assignment("mandatory", "2. The server forwards a client's message to the other clients")
def test_mandatory_2_the_server_forwards_it_to_the_others(lab):
    server = lab.server()
    alice, bob, carol = (member(lab, server, name) for name in ("alice", "bob", "carol"))
    say(alice, "to everyone")
    bob.expect("alice: to everyone", "the server did not forward alice's message to bob")
    carol.expect("alice: to everyone", "the server did not forward alice's message to carol")


@pytest.mark.assignment("mandatory", "3. The client sends to a server IP and port that the user chooses")
def test_mandatory_3_the_client_chooses_server_ip_and_port(lab):
    server = lab.server()
    alice = lab.run("alice", "client.py")
    alice.expect("Server IP", "the client did not ask for the server's IP")
    alice.type("127.0.0.1")
    alice.expect("port", "the client did not ask for the server's port")
    alice.type(str(server.port))
    alice.expect("/register", "the client got no reply from the server at the IP and port typed", FIRST_CONTACT)
    register(alice, "alice", "secret")
    alice.expect("Registration successful.", "the server at the IP and port typed did not register alice")


@pytest.mark.assignment("mandatory", "4. The client receives forwarded messages and prints them")
def test_mandatory_4_clients_print_what_they_receive(lab):
    server = lab.server()
    alice, bob = member(lab, server, "alice"), member(lab, server, "bob")
    bob.type("hi alice | ready: 1, 2, 3")
    alice.expect("bob: hi alice | ready: 1, 2, 3", "alice did not print bob's message with his name")
    alice.type("hi bob")
    bob.expect("alice: hi bob", "bob did not print alice's message with her name")


@pytest.mark.assignment("mandatory", "5. A client must enter a password to join the chat room")
def test_mandatory_5_a_password_is_needed_to_join(lab):
    server = lab.server()
    alice = member(lab, server, "alice")
    eve = lab.client("eve", server)
    register(eve, "eve", "secret")
    eve.expect("Registration successful.", "eve could not register")
    login(eve, "eve", "secret")
    eve.expect("Room password", "the client did not ask for the room's password")
    eve.type("wrong")
    eve.expect("Wrong room password.", "a wrong room password was not refused")
    say(alice, "for members only")
    eve.expect("Room password", "the client did not ask for the room's password again")
    eve.type(ROOM_PASSWORD)
    eve.expect("joined lobby", "the right room password did not let eve in")
    before = eve.screen[:eve.seen]
    assert "for members only" not in before, "eve got the room's messages without its password"


@pytest.mark.assignment("mandatory", "6. Every client has a unique username")
def test_mandatory_6_usernames_are_unique(lab):
    server = lab.server()
    alice = lab.client("alice", server)
    register(alice, "alice", "secret")
    alice.expect("Registration successful.", "alice could not register")
    impostor = lab.client("another alice", server)
    register(impostor, "alice", "other")
    impostor.expect("Username already taken.", "a second client could register the name alice again")
    register(impostor, "bob", "other")
    impostor.expect("Registration successful.", "another name was refused too")


# --- What the handout asks of every server ----------------------------------------


@pytest.mark.assignment("asked", "The server prints every action it takes (verbose)")
def test_verbose_server_prints_every_action(lab):
    server = lab.server("--verbose")
    alice = member(lab, server, "alice")
    say(alice, "logged by the server")
    alice.type("exit")
    alice.expect("[INFO] Connection closed.", "alice could not leave")
    server.expect("logged by the server", "the server did not print the message")
    for action, word in (("registering", "regist"), ("logging in", "log ?in"), ("joining the room", "join"),
                         ("leaving", "bye|left|leav|exit|log ?out")):
        server.find(f"alice.*({word})|({word}).*alice", f"the server printed no line about alice {action}")


# --- The optional items this project does -----------------------------------------


@pytest.mark.assignment("optional", "TCP over UDP: reliable delivery on a lossy link (--loss 0.3)")
def test_optional_reliable_delivery_over_a_lossy_link(lab):
    # Each client drops 30% of the datagrams it sends and 30% of those it receives, always
    # the same ones for a seed: half of all messages and their acknowledgements are lost.
    server = lab.server()
    alice = member(lab, server, "alice", "--loss", "0.3", "--seed", "1", wait=LOSSY_WAIT)
    bob = member(lab, server, "bob", "--loss", "0.3", "--seed", "2", wait=LOSSY_WAIT)
    numbers = [str(number) for number in range(1, 11)]
    for number in numbers:
        alice.type(f"lossy {number}")
    bob.expect("alice: lossy 10", "bob did not get alice's messages over the lossy link", LOSSY_WAIT)
    got = re.findall(r"alice: lossy (\d+)", bob.screen)
    assert got == numbers, f"bob got {got}, not each of 1-10 once and in order"


@pytest.mark.assignment("optional", "A cipher: a capture shows no plain text; same --cipher/--key chat")
def test_optional_cipher_hides_the_payload(lab):
    cipher = ["--cipher", "caesar", "--key", "7"]
    server = lab.server(*cipher)
    with Capture(server.port) as capture:
        # alice's datagrams go through the capture, bob's straight to the server
        alice = member(lab, server, "alice", *cipher, password="hidden-word", port=capture.port)
        bob = member(lab, server, "bob", *cipher)
        say(alice, "attack at dawn")
        bob.expect("alice: attack at dawn", "bob, with the same --cipher and --key, did not get the message")
    sent = b"".join(capture.datagrams)
    assert capture.datagrams, "the capture saw no datagram"
    for plain in (b"attack at dawn", b"hidden-word", ROOM_PASSWORD.encode()):
        assert plain not in sent, f"a capture shows {plain.decode()!r} in plain text"


@pytest.mark.assignment("optional", "Integrity: a broken message is shown (a client with another --key)")
def test_optional_integrity_broken_is_shown(lab):
    server = lab.server()
    eve = lab.run("eve", "client.py", "--host", "127.0.0.1", "--port", str(server.port), "--key", "not the key")
    eve.expect("keys differ", "a client with another --key was not told that the check failed", FIRST_CONTACT)


@pytest.mark.assignment("optional", "History: past messages kept after the server restarts")
def test_optional_history_kept_after_a_server_restart(lab):
    server = lab.server()
    alice = member(lab, server, "alice")
    say(alice, "remember me after the restart")
    server.ctrl_c()
    server.finish("the server did not stop on Ctrl+C")
    again = lab.server(name="the restarted server")
    bob = member(lab, again, "bob")
    bob.expect("remember me after the restart", "the restarted server did not show the lobby's past messages")
    history = lab.folder / "data" / "chat_history.txt"
    assert history.exists(), "no chat_history.txt in the server's data folder"
    assert "remember me after the restart" in history.read_text(encoding="utf-8"), "chat_history.txt lacks it"


@pytest.mark.assignment("optional", "Authentication: register and log in; a wrong password is refused")
def test_optional_authentication(lab):
    server = lab.server()
    alice = lab.client("alice", server)
    register(alice, "alice", "secret")
    alice.expect("Registration successful.", "alice could not register")
    login(alice, "alice", "not-her-password")
    alice.expect("Invalid username or password.", "a wrong password was not refused")
    login(alice, "nobody", "secret")
    alice.expect("Invalid username or password.", "an unknown user was not refused")
    login(alice, "alice", "secret")
    alice.expect("Room password", "alice's right password did not log her in")
    for path in (lab.folder / "data").rglob("*"):
        if path.is_file():
            assert b"secret" not in path.read_bytes(), f"{path.name} holds the password in plain text"


@pytest.mark.assignment("optional", "A GUI: `client.py --gui` opens a window that logs in")
def test_optional_window_logs_in(lab, tmp_path):
    display = x_display(tmp_path)
    server = lab.server()
    bob = member(lab, server, "bob")
    alice = lab.client("alice's terminal", server)
    register(alice, "alice", "secret")
    alice.expect("Registration successful.", "alice could not register")
    alice.type("exit")
    window = lab.run("alice's window", "client.py", "--gui", "--host", "127.0.0.1", "--port", str(server.port),
                     env={"DISPLAY": display})
    with XKeyboard(display) as keyboard:
        keyboard.wait_for_window("UDP chat", window)
        keyboard.type("alice")  # the username's field has the keyboard first
        before = keyboard.shown_windows()
        keyboard.type("Tab", "secret", "Return")
        keyboard.wait_for_another_window(before, "the window did not ask the room password", window)
        # The room password is asked in a small dialog, which takes the keyboard - once Tk
        # has given its field the focus: keys typed before that are lost, so type again.
        for attempt in range(5):
            keyboard.type(ROOM_PASSWORD, "Return")
            try:
                bob.expect("alice joined", "bob did not see alice join from the window", 4.0)
                break
            except pytest.fail.Exception:
                if attempt == 4:
                    raise
                keyboard.x11.XSetInputFocus(keyboard.display, keyboard.window, 1, 0)


@pytest.mark.assignment("optional", "Binary files: /send a file, received byte for byte")
def test_optional_binary_file_arrives_byte_identical(lab, tmp_path):
    server = lab.server()
    alice = member(lab, server, "alice")
    bob = member(lab, server, "bob", "--downloads", str(tmp_path / "bob's downloads"))
    original = tmp_path / "photo.bin"
    original.write_bytes(bytes(range(256)) * 64 + random.Random(24).randbytes(100_000))
    alice.type(f"/send bob {original}")
    bob.expect("alice offers photo.bin", "bob was not offered the file alice sent")
    bob.type("/accept 1")
    bob.expect("saved", "bob did not save the file alice sent", 30.0)
    received = list((tmp_path / "bob's downloads").iterdir())
    assert [path.name for path in received] == ["photo.bin"], f"bob's downloads hold {received}"
    assert received[0].read_bytes() == original.read_bytes(), "the file bob got differs from alice's"


@pytest.mark.assignment("optional", "Object-oriented design")
def test_optional_object_oriented_design():
    pytest.skip("a design is for the grader to read in the code, not for a test")


# --- Seed 000's replies, word for word ----------------------------------------------


@pytest.mark.assignment("seed", 'Seed 000\'s texts: "Username already taken." and the three others')
def test_seed_000_replies_word_for_word(lab):
    server = lab.server()
    alice = lab.client("alice", server)
    register(alice, "alice", "secret")
    assert alice.expect("Registration successful.") == "Registration successful."
    register(alice, "alice", "secret")
    assert alice.expect("Username already taken.") == "Username already taken."
    login(alice, "alice", "wrong")
    assert alice.expect("Invalid username or password.") == "Invalid username or password."
    alice.type("exit")
    assert alice.expect("[INFO] Connection closed.") == "[INFO] Connection closed."
    assert alice.finish("exit did not end the client") == 0


# --- The rubric itself, on a copy of the project that is broken -----------------------


def test_a_copy_whose_server_does_nothing_fails_every_mandatory_item(tmp_path):
    """`--chat-dir` grades another copy; one whose server.py only sleeps earns nothing, and
    each mandatory item says why in words an instructor reads."""
    copy = tmp_path / "student"
    copy.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            shutil.copy(os.path.join(ROOT, name), copy)
    (copy / "server.py").write_text("import time\n\ntime.sleep(120)  # a server that does nothing\n")
    command = ["-m", "pytest", "tests/test_assignment.py", "-m", "assignment", "-k", "mandatory",
               f"--chat-dir={copy}", "-p", "no:cacheprovider"]
    grading = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             stdin=subprocess.DEVNULL)
    rubric = grading.stdout[grading.stdout.index("assignment rubric"):]
    assert grading.returncode == 1, grading.stdout
    for number in range(1, 7):
        row = re.search(rf"^mandatory +(\S+) +{number}\. .*\n +(.*)$", rubric, re.MULTILINE)
        assert row and row[1] == "FAILED", rubric
        assert row[2].startswith("the server did not start: the server never showed 'listening'"), row[2]
    assert rubric.splitlines()[-2] == "assignment: 0/6 mandatory, 0/0 optional", rubric


# --- Helpers: a capture, a display, a keyboard ---------------------------------------


class Capture:
    """A relay between a client and the server that keeps every datagram: what a capture shows."""

    def __init__(self, server_port: int):
        self.outside = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.outside.bind(("127.0.0.1", 0))
        self.port = self.outside.getsockname()[1]
        self.inside = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.inside.connect(("127.0.0.1", server_port))
        self.datagrams: list[bytes] = []
        self.client = None
        self.running = True
        self.thread = threading.Thread(target=self.relay, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *problem):
        self.running = False
        self.thread.join(timeout=WAIT)
        self.outside.close()
        self.inside.close()

    def relay(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.outside, selectors.EVENT_READ)
            selector.register(self.inside, selectors.EVENT_READ)
            while self.running:
                for key, _ in selector.select(0.1):
                    try:
                        data, sender = key.fileobj.recvfrom(65535)
                    except OSError:  # the server's port unreachable: nothing to relay
                        continue
                    self.datagrams.append(data)
                    if key.fileobj is self.outside:
                        self.client = sender
                        self.inside.send(data)
                    elif self.client:
                        self.outside.sendto(data, self.client)


def x_display(folder) -> str:
    """An X display for the window: Xvfb's own, started here; or skip, saying why."""
    if not shutil.which("Xvfb"):
        pytest.skip("no Xvfb here to show the window on (Debian: apt install xvfb)")
    if not ctypes.util.find_library("X11") or not ctypes.util.find_library("Xtst"):
        pytest.skip("no libX11 or libXtst here to type into the window")
    log = open(folder / "xvfb.log", "w+")  # closed with the display
    reader, writer = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(writer), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                            pass_fds=(writer,), stdout=log, stderr=log)
    os.close(writer)
    said = b""
    with selectors.DefaultSelector() as selector:
        selector.register(reader, selectors.EVENT_READ)
        while not said.endswith(b"\n") and selector.select(WAIT):
            said += os.read(reader, 100) or b"\n"
    DISPLAYS.append((xvfb, reader, log))
    if not said.strip().isdigit():
        pytest.skip(f"Xvfb did not start a display: {said!r}")
    return f":{said.decode().strip()}"


DISPLAYS: list = []  # the Xvfb servers started, stopped when the tests end


@pytest.fixture(autouse=True, scope="module")
def stop_displays():
    yield
    for xvfb, reader, log in DISPLAYS:
        xvfb.kill()
        xvfb.wait()
        os.close(reader)
        log.close()


class XKeyboard:
    """Keys pressed on an X display as a user does (the XTEST extension), and its windows' titles."""

    def __init__(self, display: str):
        self.x11 = ctypes.CDLL(ctypes.util.find_library("X11"))
        self.xtst = ctypes.CDLL(ctypes.util.find_library("Xtst"))
        self.x11.XOpenDisplay.restype = ctypes.c_void_p
        self.x11.XDefaultRootWindow.restype = ctypes.c_ulong
        self.x11.XStringToKeysym.restype = ctypes.c_ulong
        for name, types in (("XDefaultRootWindow", [ctypes.c_void_p]), ("XFlush", [ctypes.c_void_p]),
                            ("XSync", [ctypes.c_void_p, ctypes.c_int]), ("XCloseDisplay", [ctypes.c_void_p]),
                            ("XKeysymToKeycode", [ctypes.c_void_p, ctypes.c_ulong]),
                            ("XQueryTree", [ctypes.c_void_p, ctypes.c_ulong] + [ctypes.c_void_p] * 4),
                            ("XFetchName", [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p]),
                            ("XSetInputFocus", [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_ulong]),
                            ("XGetWindowAttributes", [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p]),
                            ("XFree", [ctypes.c_void_p])):
            getattr(self.x11, name).argtypes = types
        self.xtst.XTestFakeKeyEvent.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_ulong]
        # A failed request (a window that went away meanwhile) must not end the test run.
        self.ignore = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(lambda *_: 0)
        self.x11.XSetErrorHandler(self.ignore)
        self.display = self.x11.XOpenDisplay(display.encode())
        if not self.display:
            pytest.skip(f"cannot open the X display {display}")
        self.window = 0

    def __enter__(self):
        return self

    def __exit__(self, *problem):
        self.x11.XCloseDisplay(self.display)

    def children(self, window: int) -> list[int]:
        root, parent, children, count = ctypes.c_ulong(), ctypes.c_ulong(), ctypes.POINTER(ctypes.c_ulong)(), \
            ctypes.c_uint()
        if not self.x11.XQueryTree(self.display, window, ctypes.byref(root), ctypes.byref(parent),
                                   ctypes.byref(children), ctypes.byref(count)):
            return []
        found = [children[index] for index in range(count.value)]
        if count.value:
            self.x11.XFree(children)
        return found

    def titles(self) -> dict[str, int]:
        """The title of each top-level window (no window manager: the root's children)."""
        found = {}
        for child in self.children(self.x11.XDefaultRootWindow(self.display)):
            name = ctypes.c_char_p()
            if self.x11.XFetchName(self.display, child, ctypes.byref(name)) and name.value:
                found[name.value.decode("utf-8", "replace")] = child
                self.x11.XFree(name)
        return found

    def viewable(self, window: int) -> bool:
        attributes = WindowAttributes()
        # map_state 2 is IsViewable: mapped, and so are all its ancestors
        return bool(self.x11.XGetWindowAttributes(self.display, window, ctypes.byref(attributes))) \
            and attributes.map_state == 2

    def shown_windows(self) -> set[int]:
        """The top-level windows on the screen now (no window manager: the root's children)."""
        return {child for child in self.children(self.x11.XDefaultRootWindow(self.display))
                if self.viewable(child)}

    def wait_for_another_window(self, before: set[int], why: str, program: Terminal) -> None:
        """Wait until a window that was not on the screen `before` shows; give it the keyboard."""
        deadline = time.monotonic() + FIRST_CONTACT
        while not (new := self.shown_windows() - before):
            if time.monotonic() > deadline or program.process.poll() is not None:
                pytest.fail(f"{why} within {FIRST_CONTACT:g} s", pytrace=False)
            time.sleep(0.05)  # polling the display, as above
        self.window = min(new)
        self.x11.XSetInputFocus(self.display, self.window, 1, 0)
        self.x11.XSync(self.display, 0)

    def wait_for_window(self, title: str, program: Terminal) -> None:
        """Wait until a window with exactly this title is on the screen, then give it the keyboard.

        Tk shows a window once its parts are laid out and mapped: from then on, what is
        on the screen is the whole screen, and keys reach it.
        """
        deadline = time.monotonic() + FIRST_CONTACT
        while title not in (titles := self.titles()) or not self.viewable(titles[title]):
            if time.monotonic() > deadline or program.process.poll() is not None:
                last = [line for line in program.screen.split("\n") if line.strip()][-2:]
                pytest.fail(f"no window titled {title!r} (windows: {list(titles)}; it printed {last})",
                            pytrace=False)
            time.sleep(0.05)  # polling the display: X tells no one when a title changes
        self.window = titles[title]
        self.x11.XSetInputFocus(self.display, self.window, 1, 0)
        self.x11.XSync(self.display, 0)

    def type(self, *keys: str) -> None:
        """Type each key: a named one ("Return", "Tab") or the letters of a word."""
        for key in keys:
            for name in [key] if len(key) > 1 and key[0].isupper() else list(key):
                code = self.x11.XKeysymToKeycode(self.display, self.x11.XStringToKeysym(name.encode()))
                for down in (1, 0):
                    self.xtst.XTestFakeKeyEvent(self.display, code, down, 0)
            self.x11.XSync(self.display, 0)


class WindowAttributes(ctypes.Structure):
    """Xlib's XWindowAttributes: what XGetWindowAttributes fills in (map_state is the one read)."""

    _fields_ = [(name, ctypes.c_int) for name in ("x", "y", "width", "height", "border_width", "depth")] + [
        ("visual", ctypes.c_void_p), ("root", ctypes.c_ulong), ("class_", ctypes.c_int),
        ("bit_gravity", ctypes.c_int), ("win_gravity", ctypes.c_int), ("backing_store", ctypes.c_int),
        ("backing_planes", ctypes.c_ulong), ("backing_pixel", ctypes.c_ulong), ("save_under", ctypes.c_int),
        ("colormap", ctypes.c_ulong), ("map_installed", ctypes.c_int), ("map_state", ctypes.c_int),
        ("all_event_masks", ctypes.c_long), ("your_event_mask", ctypes.c_long),
        ("do_not_propagate_mask", ctypes.c_long), ("override_redirect", ctypes.c_int), ("screen", ctypes.c_void_p)]
