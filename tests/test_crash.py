"""Crash safety: kill a real server process mid-burst, restart it, and lose nothing confirmed.

The server promises two things about its files:

* users.json is replaced atomically and durably, and a registration is confirmed only
  after its record is on disk - so a confirmed account survives any crash;
* chat_history.txt gets one line per accepted message, flushed to the operating
  system before the sender hears OK - so a confirmed message survives the process being
  killed (a power cut may still tear the last line, which a restart must skip).

`test_killed_server_keeps_every_confirmed_account_and_message` checks the promises the
hard way: clients register and chat in a burst, the server process is killed with
SIGKILL (TerminateProcess on Windows) after a random number of confirmations, and the
files are checked and the server started again on them, many times over. A seeded
random generator picks the moments, so a failure repeats. The last two tests tear a
line by hand, as a power cut would, and start a ChatServer on it.
"""

import itertools
import json
import os
import queue
import random
import subprocess
import threading

import pytest
from conftest import Program

import server
from client import ChatClient, ChatError, Timing

# server.py's command line has no option for the hash cost, and 600,000 PBKDF2
# iterations per registration would make a burst slow; so start the same ServerLoop
# with a cheap hash, and with no per-address limits on registering (every client here
# is 127.0.0.1). Port 0: the operating system picks a free port, printed for us.
LAUNCHER = """
import sys
import server
server.REGISTRATIONS_PER_ADDRESS = 1_000_000
config = server.ServerConfig(host="127.0.0.1", port=0, data_dir=sys.argv[1], quiet=True, kdf_iterations=1000)
loop = server.ServerLoop(server.ChatServer(config), server.open_socket(config.host, config.port))
print("listening on port", loop.address[1], flush=True)
loop.serve_forever()
"""
SEED = 20240611
CYCLES = 12  # kill and restart this many times
WORKERS = 3  # clients registering and chatting at once
MOST_CONFIRMATIONS = 15  # each cycle is killed after 1 to this many confirmations
PASSWORD = "pw"
LOBBY_PASSWORD = "juara"  # ServerConfig's default
STARTUP_WAIT = 30.0  # seconds for a server process to say it listens (a bound, not a sleep)
PROGRESS_WAIT = 30.0  # seconds for a burst to reach its kill point (a bound, not a sleep)
# Quick to notice a dead server, so that each cycle ends soon after the kill; a live
# server on loopback answers in milliseconds.
BURST_TIMING = Timing(connect_timeout=2.0, heartbeat_every=5.0, lost_contact_after=0.5, give_up_after=1.5,
                      min_rto=0.05, max_rto=0.3, goodbye_timeout=0.3)
CHECK_TIMING = Timing(connect_timeout=10.0, give_up_after=10.0, min_rto=0.05, max_rto=0.5, goodbye_timeout=1.0)


class ServerProcess(Program):
    """`python -c LAUNCHER data_dir`: a server that can be killed without warning."""

    def __init__(self, data_dir: str):
        super().__init__("-c", LAUNCHER, data_dir, stdin=subprocess.DEVNULL)
        self.port = int(self.expect("listening on port", wait=STARTUP_WAIT).split()[-1])

    kill = Program.stop  # SIGKILL on POSIX, TerminateProcess on Windows: no cleanup code runs


@pytest.fixture
def start_process():
    """Return a function that starts a server process; all are killed afterwards."""
    started = []

    def start(data_dir) -> ServerProcess:
        started.append(ServerProcess(str(data_dir)))
        return started[-1]

    yield start
    for process in started:
        process.kill()


class Progress:
    """What the killed server confirmed: accounts and messages, counted as they come."""

    def __init__(self):
        self.changed = threading.Condition()
        self.users: set[str] = set()
        self.messages: set[str] = set()
        self.count = 0
        self.errors: list[str] = []

    def confirm(self, found: set, item: str) -> None:
        with self.changed:
            found.add(item)
            self.count += 1
            self.changed.notify_all()

    def wait_for(self, count: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.count >= count, timeout=PROGRESS_WAIT)


def chat_burst(port: int, prefix: str, progress: Progress, stop: threading.Event) -> None:
    """Register account after account; log in with the first and say a line after each.

    Two clients: requests of a logged-in client carry the session's sequence numbers,
    so registering goes through one that never logs in.
    """
    try:
        with ChatClient("127.0.0.1", port, timing=BURST_TIMING) as registrar, \
                ChatClient("127.0.0.1", port, timing=BURST_TIMING) as talker:
            for number in itertools.count():
                if stop.is_set():
                    return
                name = f"{prefix}n{number}"
                if registrar.register(name, PASSWORD) == "Registration successful.":
                    progress.confirm(progress.users, name)
                if number == 0:
                    talker.login(name, PASSWORD)
                    talker.join("lobby", LOBBY_PASSWORD)
                else:
                    text = f"{name} was here"
                    talker.say(text)  # returns only when the server said OK
                    progress.confirm(progress.messages, text)
    except ChatError as error:  # the server was killed under us: what this test is about
        if not stop.is_set():
            progress.errors.append(f"{prefix}: {error}")


def read_data_files(data_dir) -> tuple[set[str], list[str], bool]:
    """Return the account names, the history's messages, and whether its last line is torn.

    Fails the test if users.json is not whole JSON, or if any history line but the last
    is not.
    """
    with open(os.path.join(data_dir, server.USERS_FILE), encoding="utf-8") as file:
        names = {record["name"] for record in json.load(file)["users"]}
    path = os.path.join(data_dir, server.HISTORY_FILE)
    damaged: list[str] = []
    texts = [text for _, _, _, text in server.HistoryFile.read(path, damaged.append)]
    with open(path, "rb") as file:
        torn = file.read()[-1:] not in (b"", b"\n")
    assert len(damaged) <= torn, f"a history line other than the last is damaged: {damaged}"
    return names, texts, torn


def lobby_history_after_restart(port: int, name: str, count: int) -> list[str]:
    """Log in as `name`, join the lobby, and return the texts of the `count` past messages shown."""
    with ChatClient("127.0.0.1", port, timing=CHECK_TIMING) as chat:
        chat.login(name, PASSWORD)
        chat.join("lobby", LOBBY_PASSWORD)
        texts = []
        while len(texts) < count:
            try:
                event = chat.events.get(timeout=PROGRESS_WAIT)
            except queue.Empty:
                pytest.fail(f"the restarted server showed {len(texts)} past messages, not {count}")
            if event.kind == "history":
                texts.append(event.text)
        chat.bye()
    return texts


def test_killed_server_keeps_every_confirmed_account_and_message(tmp_path, start_process):
    data_dir = tmp_path / "data"
    rng = random.Random(SEED)
    users: set[str] = set()
    messages: set[str] = set()
    texts: list[str] = []
    torn = False
    for cycle in range(CYCLES):
        process = start_process(data_dir)
        if torn:  # SIGKILL hardly ever tears a line (each is one write() call); a power cut can
            assert any("damaged" in line for line in process.output), "a torn history line was not reported"
        if users:
            check_restarted_server(process, rng.choice(sorted(users)), texts)
        progress, stop = Progress(), threading.Event()
        workers = [threading.Thread(target=chat_burst, args=(process.port, f"c{cycle}w{worker}", progress, stop))
                   for worker in range(WORKERS)]
        for worker in workers:
            worker.start()
        try:
            kill_after = rng.randint(1, MOST_CONFIRMATIONS)
            assert progress.wait_for(kill_after), f"cycle {cycle}: no progress; {progress.errors}"
        finally:
            stop.set()  # first, so that the clients take what follows for the crash it is
            process.kill()
            for worker in workers:
                worker.join()
        assert not progress.errors, f"cycle {cycle}: a client failed before the kill: {progress.errors}"
        users |= progress.users
        messages |= progress.messages
        names, texts, torn = read_data_files(data_dir)
        assert users <= names, f"cycle {cycle}: confirmed accounts lost: {sorted(users - names)}"
        assert messages <= set(texts), f"cycle {cycle}: confirmed messages lost: {sorted(messages - set(texts))}"
    check_restarted_server(start_process(data_dir), rng.choice(sorted(users)), texts)


def check_restarted_server(process: ServerProcess, name: str, texts: list[str]) -> None:
    """An account confirmed before a crash logs in; the lobby shows the last messages on file."""
    shown = texts[-server.HISTORY_ON_JOIN:]
    assert lobby_history_after_restart(process.port, name, len(shown)) == shown


# --- A torn last line, as a power cut mid-write leaves it ----------------------------

WHOLE_LINES = [
    "2024-06-11 08:00:00 UTC  #lobby  alice: first",
    "2024-06-11 08:00:01 UTC  #lobby  bob: second",
]


def write_torn_history(data_dir) -> None:
    """Write two whole lines, then the first half of a third, without its newline."""
    os.makedirs(data_dir, exist_ok=True)
    third = "2024-06-11 08:00:02 UTC  #lobby  carol: third, never finished"
    with open(os.path.join(data_dir, server.HISTORY_FILE), "w", encoding="utf-8", newline="\n") as file:
        file.write("".join(line + "\n" for line in WHOLE_LINES) + third[:12])


def open_chat_server(data_dir, log: list[str]) -> server.ChatServer:
    config = server.ServerConfig(host="127.0.0.1", port=0, data_dir=str(data_dir), kdf_iterations=1000, quiet=True)
    return server.ChatServer(config, log=log.append)


def test_restart_skips_a_torn_last_history_line_with_a_warning(tmp_path):
    write_torn_history(tmp_path)
    log: list[str] = []
    chat = open_chat_server(tmp_path, log)
    try:
        history = [(user, text) for _, user, text in chat.rooms[server.LOBBY].history]
        assert history == [("alice", "first"), ("bob", "second")]
        assert any("[WARN]" in line and "line 3" in line for line in log), log
    finally:
        chat.close()


def test_message_after_a_torn_line_survives_the_next_restart(tmp_path):
    write_torn_history(tmp_path)
    chat = open_chat_server(tmp_path, [])
    try:
        chat.history.append(1718092802.0, server.LOBBY, "carol", "after the crash")  # what an accepted SAY does
    finally:
        chat.close()
    chat = open_chat_server(tmp_path, [])
    try:
        texts = [text for _, _, text in chat.rooms[server.LOBBY].history]
        assert texts == ["first", "second", "after the crash"]
    finally:
        chat.close()
