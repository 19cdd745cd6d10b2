"""Benchmark: what the chat server delivers, how fast, how late, in how much memory.

    python tests/bench.py            # the full run: one to two minutes on 2 cores
    python tests/bench.py --quick    # a smaller run: under a minute
    python tests/bench.py --no-lossy     # without the lossy-network rows at the end
    python tests/bench.py --lossy-only   # only those (tests/bench_lossy.py: root, nftables)

Everything runs on loopback (127.0.0.1) in one go and ends in ONE markdown table, each row
measured in this run:

* our server (server.py in a child process, so that its peak memory can be read from
  /proc/<pid>/status) with 20 receiving ChatClients and one sending ChatClient: a sender
  at a human pace, a sender flat out, 20% loss at every client, 200 receivers, and the
  human pace again while other sockets flood the server with wrong-password LOGINs (each
  one a real PBKDF2 check at the default 600,000 iterations): does chat wait for the hash?
  The sender pipelines: it submits each SAY (ChatClient.submit) without waiting for its
  reply, with at most a channel window (32) of them unanswered, so its queue never
  overflows; flat out, the next SAY goes as soon as one of those 32 is answered. Every
  reply is checked, and a refused SAY is reported.
* for comparison, a fire-and-forget relay of a few lines, the naive solution: it receives
  a datagram and sends it to every other address it has heard from. It gets the same
  traffic (flat out, then paced at the rate our server's flat-out sender reached).

The receivers of our server are real protocol clients (client.ChatClient): they log in,
join the lobby and acknowledge the EVENTs, so the server's retransmission is exercised.
Each receiver is a program of its own, as on its own PC: the receivers are spread over
up to RECEIVER_PROCESSES child processes, one receiver each for the rows of 20, and the
relay's receivers the same way. The sender runs in this process. Every message is
"n=<counter> t=<submit time>"; each receiver notes which counters it got, how often and
in which order, and how long each took (time.monotonic is one clock for every process
of a machine).

Columns: messages sent; delivered % = distinct messages a receiver got / messages sent
(mean over receivers, and the worst receiver); duplicates and out-of-order arrivals summed
over receivers; deliveries/s = distinct deliveries over all receivers / (first send to last
arrival); CPU per delivery = CPU time of the relaying process (from /proc) and of all the
receivers' processes (time.process_time) from the first send until every receiver was
done, over the distinct deliveries; latency p50 and p99 over all deliveries; peak memory
(VmHWM) of the process that relays, "n/a" where /proc is missing; kernel drops, from
/proc/net/udp: datagrams Linux discarded at the relaying socket and at the clients'
because the receive buffer was full.

Setup, not measured: the accounts are written into users.json before the server starts,
with 1,000-iteration hashes, so that 200 logins take a moment; every client still logs in
through the protocol (HELLO, LOGIN, JOIN). The server otherwise runs the default
ServerConfig, except: quiet; and in the server's process, before it starts,
server.MESSAGE_RATE and MESSAGE_BURST raised to 1,000,000 (the flood control,
5 messages a second per member after a burst of 20, would otherwise hold the flat-out
sender's SAYs back and pace it).
"""

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import auth  # noqa: E402  (after the path is set: the chat's modules live one folder up)
import client  # noqa: E402
import server  # noqa: E402
from encryption_helper import (  # noqa: E402
    HEADER_SIZE,
    MIN_HELLO_SIZE,
    Channel,
    LossySocket,
    Packet,
    PacketError,
    PacketType,
    RtoEstimator,
    decode_packet,
    encode_packet,
    make_cipher,
    pack_fields,
    unpack_fields,
)

PASSWORD = "bench-password"
ROOM_PASSWORD = server.ServerConfig.room_password  # the lobby's
CHEAP_HASH = 1_000  # PBKDF2 iterations of the bench accounts' stored hashes
SENDER = "sender"
SETUP_TIMEOUT = 60.0  # seconds for every receiver to be logged in and ready
SETTLE = 5.0  # seconds without a new arrival after which a row stops waiting
RECEIVER_PROCESSES = 20  # the receivers are spread over at most this many child processes

# Flood control off, so that the flat-out sender is paced by the protocol, not held back.
NO_FLOOD_CONTROL = {"MESSAGE_RATE": 1_000_000.0, "MESSAGE_BURST": 1_000_000}

# The server as a child process: the settings come as JSON, then the folder of server.py,
# then (JSON) the server module's constants to change before it starts, as {"Class.NAME":
# value} or {"NAME": value}; the chosen port goes to stdout.
SERVER_LAUNCHER = """
import json, sys
sys.path.insert(0, sys.argv[2])
import server
for name, value in json.loads(sys.argv[3]).items():
    owner, _, attribute = name.rpartition(".")
    setattr(getattr(server, owner) if owner else server, attribute, value)
config = server.ServerConfig(**json.loads(sys.argv[1]))
chat = server.ChatServer(config)
loop = server.ServerLoop(chat, server.wrap_socket(server.open_socket(config.host, config.port), config, chat))
print("PORT", loop.address[1], flush=True)
try:
    loop.serve_forever()
except KeyboardInterrupt:
    pass
"""

# The naive relay, complete: every datagram goes to every other address heard from.
RELAY = """
import socket
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 0))
print("PORT", sock.getsockname()[1], flush=True)
members = []
try:
    while True:
        data, sender = sock.recvfrom(65535)
        if sender not in members:
            members.append(sender)
        for member in members:
            if member != sender:
                sock.sendto(data, member)
except KeyboardInterrupt:
    pass
"""


# --- Child processes -----------------------------------------------------------------


def read_memory(pid: int) -> dict[str, float] | None:
    """Return {"VmRSS": MB, "VmHWM": MB} of a process, or None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            lines = status.read().splitlines()
    except OSError:
        return None
    sizes = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            sizes[key] = int(value.split()[0]) / 1024  # the kernel counts in kB
    return sizes or None


def read_cpu_seconds(pid: int) -> float | None:
    """Return the CPU time (user + system) a process has used, or None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # after "pid (name)"
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def kernel_drops(ports) -> int | None:
    """Datagrams Linux dropped at these UDP ports because their receive buffer was full."""
    try:
        with open("/proc/net/udp", encoding="ascii") as table:
            lines = table.read().splitlines()[1:]
    except OSError:
        return None
    wanted = set(ports)
    total = 0
    for line in lines:
        fields = line.split()  # sl local_address rem_address ... drops (the last column)
        if int(fields[1].split(":")[1], 16) in wanted:
            total += int(fields[-1])
    return total


def megabytes(memory: dict[str, float] | None, key: str = "VmHWM") -> str:
    return f"{memory[key]:.1f}" if memory and key in memory else "n/a"


class ChildProcess:
    """`python -c code args...` that prints "PORT n" once it listens; output goes to files."""

    def __init__(self, code: str, *args: str, workdir: str, name: str):
        self.stdout_path = os.path.join(workdir, f"{name}.out")
        self.stderr_path = os.path.join(workdir, f"{name}.err")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err, cwd=ROOT)
        self.port = self.wait_for_port()
        self.address = ("127.0.0.1", self.port)

    def wait_for_port(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stdout().splitlines():
                if line.startswith("PORT "):
                    return int(line.split()[1])
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"the child process did not start:\n{self.stderr()}")

    def stdout(self) -> str:
        with open(self.stdout_path, encoding="utf-8", errors="replace") as file:
            return file.read()

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as file:
            return file.read()

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the process to end; return whether it is alive."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.alive()

    def memory(self) -> dict[str, float] | None:
        return read_memory(self.process.pid)

    def cpu_seconds(self) -> float | None:
        return read_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        """Ask the process to stop as Ctrl+C would; kill it if it does not."""
        if self.alive():
            self.process.send_signal(signal.SIGINT if os.name == "posix" else signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def bench_settings(data_dir: str, **changes) -> dict:
    """The server's settings for a bench row: the defaults, but quiet."""
    settings = dict(host="127.0.0.1", port=0, data_dir=data_dir, quiet=True)
    settings.update(changes)
    server.ServerConfig(**settings)  # a misspelt setting fails here, not in the child
    return settings


def start_server(workdir: str, settings: dict, name: str = "server", constants: dict | None = None) -> ChildProcess:
    """server.py in a child process with `settings` (ServerConfig fields) and `constants`
    ({"MESSAGE_RATE": 1e6, ...}: the server module's names to change first)."""
    constants = constants or {}
    for name_given in constants:  # a misspelt constant fails here, not in the child
        owner, _, attribute = name_given.rpartition(".")
        if not hasattr(getattr(server, owner) if owner else server, attribute):
            raise AttributeError(f"server has no {name_given}")
    return ChildProcess(SERVER_LAUNCHER, json.dumps(settings), ROOT, json.dumps(constants), workdir=workdir, name=name)


def create_accounts(data_dir: str, names: list[str], iterations: int = CHEAP_HASH) -> None:
    """Write users.json with an account for each name, as the server would have stored it."""
    os.makedirs(data_dir, exist_ok=True)
    records = [auth.new_verifier(name, PASSWORD, (client.wire.SRP_N, client.wire.SRP_G), iterations)
               for name in names]
    content = {"version": auth.FILE_VERSION, "users": records}
    auth.write_atomically(os.path.join(data_dir, server.USERS_FILE), json.dumps(content))


# --- Messages and what each receiver got ---------------------------------------------


def make_message(number: int) -> str:
    return f"n={number} t={time.monotonic():.6f}"


def parse_message(text: str) -> tuple[int, float] | None:
    """Return (number, send time) of a bench message, None for anything else."""
    try:
        number, sent = text.split()
        return int(number.removeprefix("n=")), float(sent.removeprefix("t="))
    except ValueError:
        return None


class Tally:
    """One receiver's record: which messages came, duplicates, reorderings, latencies."""

    def __init__(self):
        self.seen: set[int] = set()
        self.duplicates = 0
        self.out_of_order = 0
        self.highest = -1
        self.latencies: list[float] = []  # seconds, for the first arrival of each message
        self.last_arrival = 0.0

    def record(self, text: str) -> None:
        now = time.monotonic()
        parsed = parse_message(text)
        if parsed is None:
            return
        number, sent = parsed
        self.last_arrival = now
        if number in self.seen:
            self.duplicates += 1
            return
        if number < self.highest:
            self.out_of_order += 1
        self.highest = max(self.highest, number)
        self.seen.add(number)
        self.latencies.append(now - sent)


def wait_for_delivery(tallies: list[Tally], count: int, settle: float = SETTLE) -> None:
    """Return when every receiver has all `count` messages, or none came for `settle` s."""
    progress, last_change = -1, time.monotonic()
    while True:
        total = sum(len(tally.seen) for tally in tallies)
        if total >= count * len(tallies):
            return
        now = time.monotonic()
        if total != progress:
            progress, last_change = total, now
        elif now - last_change > settle:
            return
        time.sleep(0.02)


def send_messages(send, count: int, rate: float | None) -> float:
    """Send messages 0 .. count-1, `rate` a second or flat out (None); return when it started.

    `send(number)` sends one; it makes the message (and so stamps its time) itself, when
    it is ready to send it.
    """
    started = time.monotonic()
    for number in range(count):
        if rate:
            delay = started + number / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        send(number)
    return started


# --- Receivers and senders -------------------------------------------------------------


def enter_lobby(made: client.ChatClient, name: str) -> None:
    """Log in and join the lobby; when the server's hash queue is busy, try again."""
    while True:
        try:
            made.login(name, PASSWORD)
            break
        except client.Refused as refusal:
            if refusal.code != "busy":
                raise
            time.sleep(0.05)
    made.join(server.LOBBY, ROOM_PASSWORD)


class ChatReceiver:
    """A real ChatClient in the lobby, tallying the messages it is pushed (and ACKs)."""

    def __init__(self, address, name: str, loss: float, seed: int):
        self.tally = Tally()
        self.sender_joined = threading.Event()  # after it, every earlier EVENT has arrived
        self.client = client.ChatClient(address[0], address[1], loss=loss, seed=seed if loss else None,
                                        on_event=self.on_event)
        enter_lobby(self.client, name)

    def on_event(self, event: client.Event) -> None:
        if event.kind == "chat":
            self.tally.record(event.text)
        elif event.kind == "join" and event.user == SENDER:
            self.sender_joined.set()


class PipelinedSender:
    """Our sender: SAYs submitted without waiting for their replies, a bounded number at once.

    At most `outstanding` SAYs are unanswered at any time (the channel's window, 32, so none
    waits in the client's queue, which therefore never overflows); `send` waits for a
    free place, then stamps and submits the message. Every reply is looked at: a SAY the
    server refused, or that failed, is counted by its reason.
    """

    def __init__(self, chat: client.ChatClient, outstanding: int | None = None):
        self.chat = chat
        self.outstanding = outstanding or chat.protocol.channel.window  # logged in: the session's
        self.places = threading.BoundedSemaphore(self.outstanding)
        self.lock = threading.Lock()
        self.answered = 0
        self.failed: dict[str, int] = {}  # reason -> how many SAYs it stopped
        self.most_unanswered = 0
        self.unanswered = 0

    def send(self, number: int) -> None:
        self.places.acquire()
        with self.lock:
            self.unanswered += 1
            self.most_unanswered = max(self.most_unanswered, self.unanswered)
        try:
            future = self.chat.submit(PacketType.SAY, make_message(number))
        except (client.ChatError, client.Refused) as error:
            self.settle(error)
            return
        future.add_done_callback(lambda done: self.settle(done.exception()))

    def settle(self, error: BaseException | None) -> None:
        """One SAY is answered (or failed): note how, and free its place."""
        with self.lock:
            self.unanswered -= 1
            if error is None:
                self.answered += 1
            else:
                reason = f"{type(error).__name__} {getattr(error, 'code', '')}".rstrip() + f": {error}"
                self.failed[reason] = self.failed.get(reason, 0) + 1
        self.places.release()

    def wait_for_answers(self, timeout: float) -> None:
        """Return once every SAY submitted has its answer (every place is free again)."""
        deadline = time.monotonic() + timeout
        for _ in range(self.outstanding):
            if not self.places.acquire(timeout=max(deadline - time.monotonic(), 0)):
                raise RuntimeError(f"the server did not answer {self.unanswered} SAYs in {timeout:.0f} s")
        for _ in range(self.outstanding):
            self.places.release()

    def summary(self) -> str:
        failed = "; ".join(f"{count} {reason}" for reason, count in sorted(self.failed.items()))
        return (f"{self.answered} SAYs answered OK, at most {self.most_unanswered} unanswered at once"
                + (f"; NOT SENT: {failed}" if failed else ""))


class RelayReceiver:
    """A plain socket of the naive protocol: one datagram to be known, then it listens."""

    def __init__(self, address, loss: float, seed: int):
        self.tally = Tally()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(address)
        sock.settimeout(0.2)
        self.sock = LossySocket(sock, loss, seed) if loss else sock
        self.heard_sender = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.receive_forever, daemon=True)
        self.thread.start()
        self.sock.send(b"join")

    def receive_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                data = self.sock.recv(65535)
            except (TimeoutError, ConnectionRefusedError):
                continue
            text = data.decode("utf-8", errors="replace")
            if text == f"join {SENDER}":
                self.heard_sender.set()
            else:
                self.tally.record(text)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.sock.close()


def run_receivers(kind: str, address, loss: float, seeds: list[int], pipe) -> None:
    """A child process's work: the receivers numbered `seeds`, talking to the parent over `pipe`.

    The conversation: we send our sockets' ports once every receiver is connected, then
    "heard" once each has heard the sender; the parent says "go" as it starts sending, and
    (count, settle) when it has sent everything; we answer with the tallies and the CPU
    time this process used since "go", and end when the parent says "close".
    """
    receivers = []
    try:
        if kind == "chat":
            receivers = [ChatReceiver(address, f"r{seed}", loss, seed) for seed in seeds]
            heard = [receiver.sender_joined for receiver in receivers]
            ports = [receiver.client.sock.getsockname()[1] for receiver in receivers]
        else:
            receivers = [RelayReceiver(address, loss, seed) for seed in seeds]
            heard = [receiver.heard_sender for receiver in receivers]
            ports = [receiver.sock.getsockname()[1] for receiver in receivers]
        pipe.send(ports)
        wait_all(heard, SETUP_TIMEOUT, "the sender")
        pipe.send("heard")
        pipe.recv()  # "go": the first message is on its way
        cpu_before = time.process_time()
        count, settle = pipe.recv()
        tallies = [receiver.tally for receiver in receivers]
        wait_for_delivery(tallies, count, settle)
        pipe.send((tallies, time.process_time() - cpu_before))
        pipe.recv()  # "close"
    except Exception:
        pipe.send(RuntimeError(f"a receiver process failed:\n{traceback.format_exc()}"))
    finally:
        for receiver in receivers:
            (receiver.client if kind == "chat" else receiver).close()


class Receivers:
    """The receivers of one row, in child processes; `kind` is "chat" or "relay"."""

    def __init__(self, kind: str, address, count: int, loss: float):
        context = multiprocessing.get_context("spawn")  # the same on Linux, macOS and Windows
        processes = min(count, RECEIVER_PROCESSES)
        self.pipes, self.processes = [], []
        for index in range(processes):
            ours, theirs = context.Pipe()
            seeds = list(range(index, count, processes))
            process = context.Process(target=run_receivers, args=(kind, address, loss, seeds, theirs), daemon=True)
            process.start()
            self.pipes.append(ours)
            self.processes.append(process)
        self.ports = [port for pipe in self.pipes for port in self.expect(pipe, SETUP_TIMEOUT)]
        self.unheard = list(self.pipes)  # processes whose receivers have not all heard the sender

    @staticmethod
    def expect(pipe, timeout: float):
        """The next thing a child process says; raise what it raised, or if it says nothing."""
        if not pipe.poll(timeout):
            raise RuntimeError("a receiver process did not answer")
        said = pipe.recv()
        if isinstance(said, Exception):
            raise said
        return said

    def all_heard(self, timeout: float = 0.0) -> bool:
        """Has every process said its receivers all heard the sender? Waits `timeout` for each."""
        self.unheard = [pipe for pipe in self.unheard if not (pipe.poll(timeout) and self.expect(pipe, 0) == "heard")]
        return not self.unheard

    def go(self) -> None:
        """Tell every process that sending starts: their CPU time counts from now."""
        for pipe in self.pipes:
            pipe.send("go")

    def tallies(self, count: int, settle: float) -> tuple[list[Tally], float]:
        """Tell every process that `count` messages were sent; return what each receiver got,
        and the CPU seconds all the receivers' processes used meanwhile."""
        for pipe in self.pipes:
            pipe.send((count, settle))
        answers = [self.expect(pipe, SETUP_TIMEOUT + count) for pipe in self.pipes]
        return [tally for tallies, _ in answers for tally in tallies], sum(cpu for _, cpu in answers)

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send("close")
            except OSError:
                pass  # that process has ended already
        deadline = time.monotonic() + 10  # for them all: one stuck after a failure must not cost 10 s each
        for process in self.processes:
            process.join(timeout=max(deadline - time.monotonic(), 0))
            if process.is_alive():
                process.terminate()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class LoginFlood:
    """LOGINs' first steps for unknown names from other sockets, as fast as the server takes them.

    Each socket sends one LOGIN, waits for its answer and sends the next, so 3 sockets keep
    the server's worker busy all the time. A "busy" answer costs the server nothing; the
    socket tries again 20 ms later. An unknown name's first step costs the server as much
    as a real one's (SRP-6a's powers, with a random verifier) and never locks an account.
    """

    def __init__(self, address, sockets: int = 3):
        self.address = address
        self.cipher = make_cipher("xor")
        self.stopping = threading.Event()
        self.answers: dict[str, int] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.flood, args=(index,), daemon=True) for index in range(sockets)]

    def start(self) -> None:
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()
        self.elapsed = time.monotonic() - self.started

    def ask(self, sock, seq: int, ptype: PacketType, *fields: str) -> list[str]:
        """Send one request until its answer comes; return [code-or-first-field, ...].

        A stranger's answer is unsequenced, acknowledges the request's number, and names it
        in its field 0 ("re"): OK [re, ...] or ERROR [re, code, text]; we return what follows.
        """
        data = encode_packet(Packet(ptype, seq, payload=pack_fields(*fields)), self.cipher)
        while not self.stopping.is_set():
            sock.send(data)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    reply = decode_packet(sock.recv(65535), self.cipher)
                    answer = unpack_fields(reply.payload)
                except (TimeoutError, PacketError, ConnectionRefusedError):
                    continue
                if reply.ack == seq and answer[:1] == [str(seq)]:
                    return answer[1:] or [""]
        return ["stopped"]

    def flood(self, index: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(self.address)
            sock.settimeout(0.1)
            seq = 1
            cookie = self.ask(sock, seq, PacketType.HELLO, "." * (MIN_HELLO_SIZE - HEADER_SIZE - 2))[0]
            while not self.stopping.is_set():
                seq += 1
                # A LOGIN's first step: the server's half of SRP-6a runs on its worker.
                answer = self.ask(sock, seq, PacketType.LOGIN, cookie, f"nobody{index}x{seq}",
                                  client.public_key(seq))
                answer = "checked" if len(answer) == 3 else answer[0]  # salt, iterations, B
                with self.lock:
                    self.answers[answer] = self.answers.get(answer, 0) + 1
                if answer == "busy":
                    time.sleep(0.02)
                elif answer == "stale-cookie":
                    seq += 1
                    cookie = self.ask(sock, seq, PacketType.HELLO, "." * (MIN_HELLO_SIZE - HEADER_SIZE - 2))[0]

    def summary(self) -> str:
        checked = self.answers.get("checked", 0)
        busy = self.answers.get("busy", 0)
        return (f"{checked} LOGINs' first steps answered in {self.elapsed:.1f} s ({checked / self.elapsed:.1f}/s, "
                f"each the server's half of SRP-6a), {busy} more refused as busy")


# --- Rows ----------------------------------------------------------------------------


@dataclasses.dataclass
class Scenario:
    label: str
    relay: bool = False  # the naive relay instead of our server
    receivers: int = 20
    messages: int = 1000
    rate: float | None = None  # messages a second; None: flat out
    loss: float = 0.0  # at every client, each way
    login_flood: bool = False


@dataclasses.dataclass
class Row:
    label: str
    sent: int
    delivered_mean: float
    delivered_worst: float
    duplicates: int
    out_of_order: int
    per_second: float
    p50_ms: float
    p99_ms: float
    memory: str
    drops: str  # "server socket / client sockets": datagrams the kernel dropped, buffers full
    send_rate: float  # messages a second the sender achieved
    cpu: str  # "relaying process / receivers": CPU microseconds per distinct delivery


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with q% of them at or below it."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def summarize(scenario: Scenario, tallies: list[Tally], started: float, sent_by: float, memory, drops,
              cpu: tuple[float | None, float]) -> Row:
    delivered = [len(tally.seen) / scenario.messages for tally in tallies]
    deliveries = max(sum(len(tally.seen) for tally in tallies), 1)
    relaying, receiving = (f"{1e6 * seconds / deliveries:.0f}" if seconds is not None else "n/a" for seconds in cpu)
    latencies = [latency for tally in tallies for latency in tally.latencies]
    last = max((tally.last_arrival for tally in tallies), default=started)
    elapsed = max(last - started, 1e-9)
    return Row(
        label=scenario.label, sent=scenario.messages,
        delivered_mean=100 * sum(delivered) / len(delivered), delivered_worst=100 * min(delivered),
        duplicates=sum(tally.duplicates for tally in tallies),
        out_of_order=sum(tally.out_of_order for tally in tallies),
        per_second=sum(len(tally.seen) for tally in tallies) / elapsed,
        p50_ms=1000 * percentile(latencies, 50), p99_ms=1000 * percentile(latencies, 99),
        memory=megabytes(memory), drops=drops, send_rate=scenario.messages / max(sent_by - started, 1e-9),
        cpu=f"{relaying} / {receiving}",
    )


def wait_all(events: list[threading.Event], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    for event in events:
        if not event.wait(max(deadline - time.monotonic(), 0)):
            raise RuntimeError(f"timed out waiting for {what}")


def run_server_row(scenario: Scenario, workdir: str, notes: list[str]) -> Row:
    """One row with our server: receivers log in and join, the sender talks, we count."""
    data_dir = os.path.join(workdir, "data")
    names = [f"r{index}" for index in range(scenario.receivers)]
    create_accounts(data_dir, names + [SENDER])
    sender, flood = None, None
    with start_server(workdir, bench_settings(data_dir), constants=NO_FLOOD_CONTROL) as process, \
            Receivers("chat", process.address, scenario.receivers, scenario.loss) as receivers:
        try:
            sender = client.ChatClient(*process.address, loss=scenario.loss,
                                       seed=10_000 if scenario.loss else None)
            enter_lobby(sender, SENDER)
            pipeline = PipelinedSender(sender)
            if not receivers.all_heard(SETUP_TIMEOUT):
                raise RuntimeError("the receivers never heard the sender join")
            if scenario.login_flood:
                flood = LoginFlood(process.address)
                flood.start()
                time.sleep(1.0)  # the hash worker is busy before the first message
            started, sent_by, tallies, cpu = send_and_count(scenario, pipeline.send, process, receivers, SETTLE,
                                                            drain=pipeline.wait_for_answers)
            notes.append(f"{scenario.label}: {pipeline.summary()}.")
            if flood:
                flood.stop()
                notes.append(f"{scenario.label}: {flood.summary()}.")
            memory = process.memory()
            drops = count_drops(process.port, receivers.ports + [sender.sock.getsockname()[1]])
        finally:
            if flood and not flood.stopping.is_set():
                flood.stop()
            if sender:
                sender.close()
        if not process.alive() or "Traceback" in process.stderr():
            notes.append(f"{scenario.label}: THE SERVER FAILED:\n{process.stderr()}")
    return summarize(scenario, tallies, started, sent_by, memory, drops, cpu)


def send_and_count(scenario: Scenario, send, process: ChildProcess, receivers: Receivers, settle: float,
                   drain=None):
    """Send the row's messages through `send`, then collect what the receivers got.

    `drain(timeout)`, if given, waits until the server has answered every message: then
    sending ends there, not at the last submit.
    Return (when sending started, when it ended, the tallies, (CPU seconds of the relaying
    process or None where /proc is missing, CPU seconds of the receivers' processes)).
    """
    receivers.go()
    cpu_before = process.cpu_seconds()
    started = send_messages(send, scenario.messages, scenario.rate)
    if drain:
        drain(SETUP_TIMEOUT + 2 * client.Timing.give_up_after)
    sent_by = time.monotonic()
    tallies, receivers_cpu = receivers.tallies(scenario.messages, settle)
    cpu_after = process.cpu_seconds()
    relaying_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return started, sent_by, tallies, (relaying_cpu, receivers_cpu)


def count_drops(server_port: int, client_ports: list[int]) -> str:
    """Return "server / clients": datagrams the kernel dropped at those ports, or n/a."""
    at_server = kernel_drops([server_port])
    at_clients = kernel_drops(client_ports)
    return "n/a" if at_server is None else f"{at_server} / {at_clients}"


def run_relay_row(scenario: Scenario, workdir: str, notes: list[str]) -> Row:
    """One row with the naive relay, the same receivers' count and messages."""
    with ChildProcess(RELAY, workdir=workdir, name="relay") as process, \
            Receivers("relay", process.address, scenario.receivers, scenario.loss) as receivers, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        raw.connect(process.address)
        sender = LossySocket(raw, scenario.loss, 10_000) if scenario.loss else raw
        # The relay knows the sender by its first datagram; say who it is until heard.
        deadline = time.monotonic() + SETUP_TIMEOUT
        while not receivers.all_heard():
            if time.monotonic() > deadline:
                raise RuntimeError("the relay's receivers never heard the sender")
            sender.send(f"join {SENDER}".encode())
            time.sleep(0.1)
        started, sent_by, tallies, cpu = send_and_count(scenario,
                                                        lambda number: sender.send(make_message(number).encode()),
                                                        process, receivers, settle=1.0)
        memory = process.memory()
        drops = count_drops(process.port, receivers.ports + [raw.getsockname()[1]])
    return summarize(scenario, tallies, started, sent_by, memory, drops, cpu)


def run_row(scenario: Scenario, notes: list[str]) -> Row:
    print(f"  running: {scenario.label} ...", file=sys.stderr, flush=True)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chat-bench-") as workdir:
        runner = run_relay_row if scenario.relay else run_server_row
        row = runner(scenario, workdir, notes)
    print(f"           {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
    return row


# --- The table -----------------------------------------------------------------------


HEADER = ("| situation | messages sent | delivered % (mean / worst receiver) | duplicates | out of order "
          "| deliveries/s | CPU µs per delivery (server / receivers) | latency p50 ms | latency p99 ms "
          "| peak memory MB | kernel drops (server / clients) |")


def format_row(row: Row) -> str:
    delivered = f"{row.delivered_mean:.1f} / {row.delivered_worst:.1f}"
    return (f"| {row.label} | {row.sent} | {delivered} | {row.duplicates} | {row.out_of_order} "
            f"| {row.per_second:,.0f} | {row.cpu} | {row.p50_ms:.1f} | {row.p99_ms:.1f} | {row.memory} | {row.drops} |")


def print_table(rows: list[Row]) -> None:
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for row in rows:
        print(format_row(row))


def machine() -> str:
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()} ({platform.python_implementation()})")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and 50 instead of 200 receivers")
    parser.add_argument("--many", type=int, help="receivers of the big row (default: 200, or 50 with --quick)")
    lossy = parser.add_mutually_exclusive_group()
    lossy.add_argument("--lossy-only", action="store_true",
                       help="only the rows on a lossy network, beside TCP (tests/bench_lossy.py; needs root)")
    lossy.add_argument("--no-lossy", action="store_true", help="skip the rows on a lossy network")
    return parser.parse_args(argv)


def run_lossy_rows(quick: bool, argv: list[str]) -> int:
    """The lossy-network rows (tests/bench_lossy.py): our chat and bulk channel beside TCP, in a namespace."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_lossy

    return bench_lossy.main(["--quick"] if quick else [],
                            command=f"python tests/bench.py {' '.join(argv)}".rstrip())


def scenarios(quick: bool, many: int) -> tuple[list[Scenario], Scenario]:
    """Return the rows of our server, and the relay's flat-out row (its paced row follows)."""
    paced = 60 if quick else 200  # 3 or 10 seconds at 20 messages a second
    flat_out = 1000 if quick else 5000
    lossy = 40 if quick else 100
    crowd = 200 if quick else 1000
    ours = [
        Scenario("our server, 20 receivers, sender paced 20 msg/s", messages=paced, rate=20),
        Scenario("our server, 20 receivers, sender flat out", messages=flat_out),
        Scenario("our server, 20 receivers, 20% loss at every client, sender flat out", messages=lossy, loss=0.2),
        Scenario(f"our server, {many} receivers, sender flat out", receivers=many, messages=crowd),
        Scenario("our server, 20 receivers, sender paced 20 msg/s, during a LOGIN flood",
                 messages=paced, rate=20, login_flood=True),
    ]
    relay = Scenario("naive relay, 20 receivers, sender flat out", relay=True, messages=flat_out)
    return ours, relay


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.lossy_only:
        return run_lossy_rows(args.quick, argv)
    many = args.many or (50 if args.quick else 200)
    ours, relay = scenarios(args.quick, many)
    notes: list[str] = []
    began = time.monotonic()
    print(f"Benchmark on {machine()}", file=sys.stderr)
    our_rows = [run_row(scenario, notes) for scenario in ours]
    paced, flat_out, lossy, crowd, flood = our_rows
    relay_rows = [run_row(relay, notes)]
    same_rate = dataclasses.replace(relay, rate=round(flat_out.send_rate),
                                    label=f"naive relay, 20 receivers, paced at our flat-out rate "
                                          f"({flat_out.send_rate:,.0f} msg/s)")
    relay_rows.append(run_row(same_rate, notes))
    idle = idle_server_memory()

    print()
    print_table(relay_rows + our_rows)
    print()
    print("delivered %: distinct messages a receiver got / sent, mean over receivers / worst receiver. "
          "deliveries/s: distinct deliveries, all receivers, from the first send to the last arrival. "
          "Latency: from the sender's submit() of the SAY to the receiver's event (flat out, that includes "
          "the wait behind the earlier SAYs still unanswered, up to a window of them). Peak memory: VmHWM of the "
          f"server's (or relay's) process; an idle server peaks at {idle} MB. Kernel drops: datagrams Linux "
          "discarded because a socket's receive buffer was full; our server sends those again, the relay cannot. "
          "CPU per delivery: the CPU time the server's (or relay's) process, and all the receivers' processes, "
          "used from the first send until every receiver was done, over the distinct deliveries (the server's "
          "is n/a where /proc is missing; in the LOGIN flood row it includes the password hashing).")
    for row in (flat_out, lossy, crowd):
        print(f"{row.label}: the sender (pipelined, up to a window of SAYs unanswered) reached "
              f"{row.send_rate:,.1f} msg/s, from the first submit to the last reply.")
    print(f"LOGIN flood: latency p50 / p99 {flood.p50_ms:.1f} / {flood.p99_ms:.1f} ms during the flood, "
          f"{paced.p50_ms:.1f} / {paced.p99_ms:.1f} ms without it (same pace, same receivers).")
    for note in notes:
        print(note)
    defaults = server.ServerConfig()
    print(f"Server settings: default ServerConfig (kdf_iterations {defaults.kdf_iterations:,}) and constants "
          f"(Channel window {Channel.WINDOW}, max_queue {Channel.MAX_QUEUE}, RTO floor {RtoEstimator.FLOOR} s, "
          f"MAX_PENDING_CHECKS {server.MAX_PENDING_CHECKS}) except quiet, and "
          f"MESSAGE_RATE/MESSAGE_BURST raised to {NO_FLOOD_CONTROL['MESSAGE_RATE']:,.0f} "
          "in the server's process (flood control "
          f"off, from {server.MESSAGE_RATE:g}/s after {server.MESSAGE_BURST}); "
          f"the bench accounts are written to users.json beforehand with {CHEAP_HASH:,}-"
          "iteration hashes, and log in over the protocol. The server runs in a child process (a python -c "
          f"launcher); the receivers in child processes, at most {RECEIVER_PROCESSES} (one each in the rows of 20), "
          "the sender in this one.")
    print("Loss: client.ChatClient(loss=0.2, seed=i) at every receiver and at the sender, each way; the "
          "relay's clients drop the same way (encryption_helper.LossySocket). A SAY, or an EVENT, lost on "
          "the way is sent again by its channel (after a timeout of at least 200 ms, doubling, or at once "
          "when two later packets overtake it), and the receiver holds whatever comes after it until the "
          "gap fills: that waiting is in the latency.")
    print(f"Machine: {machine()}")
    print(f"Command: python tests/bench.py {' '.join(argv)}".rstrip())
    print(f"Run time: {time.monotonic() - began:.0f} s")
    if not args.no_lossy:
        return run_lossy_rows(args.quick, argv)
    return 0


def idle_server_memory() -> str:
    with tempfile.TemporaryDirectory(prefix="chat-bench-") as workdir:
        with start_server(workdir, bench_settings(os.path.join(workdir, "data"))) as process:
            time.sleep(0.5)
            return megabytes(process.memory())


if __name__ == "__main__":
    sys.exit(main())
