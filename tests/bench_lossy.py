"""Benchmark on a really lossy network: chat latency and bulk transfer, our channel beside TCP.

    python tests/bench_lossy.py            # these rows only: about ten minutes
    python tests/bench_lossy.py --quick    # fewer lines and TCP runs: about a minute
    python tests/bench.py                  # the main benchmark, then these rows
    python tests/bench.py --lossy-only     # the same as the first line

It needs Linux, root, `ip` (iproute2) and `nft` (nftables; installed with apt-get when it
is missing and we are root). Where any of that is lacking it says why in one line and
skips its rows; it never fails for it.

**The network.** A network namespace of its own (`udpchat-bench-<pid>`), whose loopback
drops a share of every TCP and UDP packet, both directions, in the kernel - on the input
hook, so that a send never fails, the packet is just lost:

    ip netns add udpchat-bench-<pid>
    ip netns exec udpchat-bench-<pid> ip link set lo up mtu 1500
    ip netns exec udpchat-bench-<pid> nft add table inet lab
    ip netns exec udpchat-bench-<pid> nft 'add chain inet lab in { type filter hook input priority 0; }'
    ip netns exec udpchat-bench-<pid> nft add rule inet lab in \
        meta l4proto '{ tcp, udp }' numgen random mod 100 '<' 20 drop

Between rows the chain is flushed and the rule added again with the next share. Two
more chains only count (they drop nothing): what reaches the input hook before the drop
(on a loopback, everything sent; the output hook misses some of TCP's ACKs) and what got
past it. The namespace is deleted at the end, also on Ctrl+C,
SIGTERM or a failure. Every process of a row runs inside it (`ip netns exec NAME python
tests/bench_lossy.py --role ...`) and talks to 127.0.0.1 only.

**Chat rows** (0, 5, 10 and 20% loss). Our server (server.py, default settings and flood
control, quiet), a receiving ChatClient and a sending ChatClient, each its own process:
both register, log in and join the lobby (while the loss is 0), then the loss is set and
the sender types LINES lines at RATE a second - each submitted without waiting for the
one before (ChatClient.submit), its text stamped with time.monotonic() when it is
submitted, one clock for every process of the machine. The receiver notes when each
line's EVENT arrives. Beside it, at the same time and in the same namespace, TCP_RUNS
TCP baselines (one more at the highest loss): a TCP sender, a small line relay and a TCP
receiver (TCP_NODELAY on every socket), the same lines, newline-framed, at the same pace.
Latency: from the submit (or send) to the line's arrival at the other client. The runs of
one row share the network: their traffic is a few packets a second. Each loss has REPEATS
such rows, one after another, so that ours and TCP's both show how much a run varies.

**Bulk rows** (0 and 20% loss; BULK_RUNS runs of each). 2 MB of seeded random bytes through one Channel between
two processes (xor cipher, the chat's default; every packet tagged and its tag checked, as a
session's are; EVENT packets of MAX_PAYLOAD bytes; the
receiver's channel acknowledges as the client's does, ACK_EVERY / ACK_DELAY), poll,
receive and next_wakeup driven by select() and time.monotonic(); the receiver checks
every byte and their order (SHA-256 of all it delivered). Then TCP moves the same bytes
(time from the connection being up to the receiver having the last byte). One at a time.

**Cost columns**, ours and TCP's measured the same way where they can be:

* retransmits per data packet: packets sent again / data packets that had to get through.
  Ours: counted on the wire by nftables (our datagrams whose header has FLAG_RETRANSMIT
  set, over our datagrams that are not bare ACKs, less those retransmissions) - every
  channel of the row, both clients' and all of the server's. TCP: RetransSegs from
  /proc/net/snmp inside the namespace, over TCP_INFO's data segments sent less the
  retransmitted ones (tcpi_data_segs_out - tcpi_total_retrans), summed over every socket.
  The ideal is p/(1-p): a packet needs 1/(1-p) sends on average.
* sends per data packet: the same as 1 + that; the target is within 1.5x of 1/(1-p).
* wire bytes per byte delivered: IP bytes sent, counted by nftables per protocol
  (headers, ACKs, replies and retransmissions included), over the application bytes
  delivered end to end. A chat line crosses two hops (sender - server - receiver), so
  2.0 is the floor there before any header.
"""

import argparse
import atexit
import datetime
import hashlib
import json
import math
import os
import platform
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import client  # noqa: E402  (after the path is set: the chat's modules live one folder up)
import server  # noqa: E402
from encryption_helper import (  # noqa: E402
    ACK_DELAY,
    ACK_EVERY,
    FLAG_RETRANSMIT,
    HEADER_FORMAT,
    MAGIC,
    MAX_PAYLOAD,
    RECV_BUFFER,
    Channel,
    PacketError,
    PacketType,
    RtoEstimator,
    decode_packet,
    make_cipher,
    tagged_by,
)

THIS_FILE = os.path.abspath(__file__)
PASSWORD = "bench-password"
LOSSES = (0, 5, 10, 20)  # percent, the chat rows
BULK_LOSSES = (0, 20)  # percent, the bulk rows
LINES = 100
RATE = 3.0  # lines a second
REPEATS = 3  # chat rows at each loss, each with our chat and its TCP baselines: several runs of each
TCP_RUNS = 1  # TCP baselines beside each chat row; one more at the highest loss
# Bulk packets are tagged both ways as a session's are (each end knows both keys here).
TAG_KEYS = {"to receiver": bytes(range(32)), "to sender": bytes(range(32, 64))}
LINE_BYTES = 60  # every chat line is padded to this many bytes: a short sentence
BULK_BYTES = 2_000_000
BULK_CIPHER = "xor"
BULK_SEED = 11
SETUP_TIMEOUT = 30.0
SETTLE = 30.0  # after the last line is sent, how long the receivers may take for the rest
BULK_TIMEOUT = 120.0
TCP_BULK_LIMIT = 60.0  # seconds: a TCP transfer not done by then is recorded as unfinished
BULK_RUNS = 3  # runs of each, ours and TCP, at each bulk loss: TCP's time varies a lot from run to run
JSON_PATH = os.path.join(ROOT, "docs", "bench_lossy.json")
# The header's fields, to match on the wire: byte offsets into the UDP payload.
TYPE_OFFSET = struct.calcsize(HEADER_FORMAT[:4])  # "!2sB": magic, version
FLAGS_OFFSET = struct.calcsize(HEADER_FORMAT[:5])  # "!2sBB": ... type
UDP_HEADER = 8


# --- The namespace ----------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why the namespace rows cannot run here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"needs Linux network namespaces, this is {sys.platform}"
    if os.geteuid() != 0:
        return "needs root (network namespaces and nftables); run as root to measure them"
    if not shutil.which("ip"):
        return "needs the `ip` command (Debian package iproute2)"
    if not install_if_missing("nft", "nftables"):
        return "needs `nft` (Debian package nftables); `apt-get install -y nftables` did not work here"
    install_if_missing("ethtool", "ethtool")  # without it TCP's rows are marked not comparable
    return None


def install_if_missing(command: str, package: str) -> bool:
    """Is `command` there, after trying apt-get (updating its lists if need be)?"""
    if shutil.which(command):
        return True
    try:  # the package lists may be missing on a fresh machine: then update them, and try again
        for steps in ([["apt-get", "install", "-y", "-qq", package]],
                      [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]]):
            for step in steps:
                subprocess.run(step, capture_output=True, timeout=300)
            if shutil.which(command):
                return True
    except (OSError, subprocess.TimeoutExpired):
        pass
    return False


LIVE_NAMESPACES: set[str] = set()
LIVE_CHILDREN: set["Child"] = set()


def clean_up_everything() -> None:
    """End every child process we started and delete every namespace we made (atexit)."""
    for child in list(LIVE_CHILDREN):
        child.kill()
    for name in list(LIVE_NAMESPACES):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        LIVE_NAMESPACES.discard(name)


atexit.register(clean_up_everything)



LAN_MTU = 1500  # bytes: Ethernet's, as on a lab network

class NamespaceUnavailable(Exception):
    """The namespace or its nftables rules could not be made here."""


def raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # so that every finally block and atexit runs


class Namespace:
    """A network namespace whose loopback loses `percent` % of TCP and UDP packets; a context manager."""

    COUNTERS = ("ours_out", "ours_retx", "ours_ack", "ours_in", "tcp_out", "tcp_in")

    def __init__(self, name: str | None = None):
        self.name = name or f"udpchat-bench-{os.getpid()}"
        self.offloads_off = False
        self.percent = 0
        self.previous_sigterm = None

    def __enter__(self) -> "Namespace":
        if threading.current_thread() is threading.main_thread():
            self.previous_sigterm = signal.signal(signal.SIGTERM, raise_on_sigterm)
        try:
            run(["ip", "netns", "add", self.name])
            LIVE_NAMESPACES.add(self.name)
            # Ethernet's MTU, as on a lab network: with the loopback's 64 KB, TCP would move
            # bulk data in a few dozen giant segments that no LAN carries.
            self.inside(["ip", "link", "set", "lo", "up", "mtu", str(LAN_MTU)])
            # ...and no offloads: else the kernel hands TCP 64 KB super-segments past the
            # MTU (TSO/GSO), and the loss rule drops or keeps 44 packets' worth at once.
            self.offloads_off = self.switch_off_offloads()
            self.inside(["nft", "add", "table", "inet", "lab"])
            self.inside(["nft", "add chain inet lab in { type filter hook input priority 0; }"])
            self.nft_script(self.counting_rules())
        except RuntimeError as error:
            self.delete()
            raise NamespaceUnavailable(str(error)) from None
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.delete()

    def delete(self) -> None:
        for child in list(LIVE_CHILDREN):  # every process inside is one of ours
            child.kill()
        if self.name in LIVE_NAMESPACES:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            LIVE_NAMESPACES.discard(self.name)
        if self.previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self.previous_sigterm)
            self.previous_sigterm = None

    @staticmethod
    def counting_rules() -> str:
        """Chains that count and drop nothing: what arrives at the loopback's input before the drop (all
        that was sent: the output hook misses some of TCP's ACKs), and what got past it."""
        ours = f"meta l4proto udp @th,{8 * UDP_HEADER},16 0x{MAGIC.hex()}"
        retransmitted = f"@th,{8 * (UDP_HEADER + FLAGS_OFFSET)},16 & {FLAG_RETRANSMIT:#x} == {FLAG_RETRANSMIT:#x}"
        bare_ack = f"@th,{8 * (UDP_HEADER + TYPE_OFFSET)},8 {int(PacketType.ACK)}"
        lines = [f"add counter inet lab {name}" for name in Namespace.COUNTERS]
        lines += [
            "add chain inet lab wire { type filter hook input priority -10; }",
            "add chain inet lab got { type filter hook input priority 10; }",
            f"add rule inet lab wire {ours} counter name ours_out",
            f"add rule inet lab wire {ours} {retransmitted} counter name ours_retx",
            f"add rule inet lab wire {ours} {bare_ack} counter name ours_ack",
            "add rule inet lab wire meta l4proto tcp counter name tcp_out",
            f"add rule inet lab got {ours} counter name ours_in",
            "add rule inet lab got meta l4proto tcp counter name tcp_in",
        ]
        return "\n".join(lines) + "\n"

    def command(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def switch_off_offloads(self) -> bool:
        if not shutil.which("ethtool"):
            return False
        try:
            self.inside(["ethtool", "-K", "lo", "tso", "off", "gso", "off", "gro", "off"])
        except RuntimeError:
            return False
        return True

    def inside(self, args: list[str]) -> str:
        return run(self.command(args))

    def nft_script(self, script: str) -> None:
        run(self.command(["nft", "-f", "-"]), stdin=script)

    def set_loss(self, percent: int) -> None:
        """Drop `percent` % of TCP and UDP packets from now on (the issue's rule)."""
        script = "flush chain inet lab in\n"
        if percent:
            script += f"add rule inet lab in meta l4proto {{ tcp, udp }} numgen random mod 100 < {percent} drop\n"
        self.nft_script(script)
        self.percent = percent

    def measure(self) -> dict[str, int]:
        """The counters now: nftables' (packets and bytes) and /proc/net/snmp's Tcp and Udp lines."""
        found = {}
        listing = json.loads(self.inside(["nft", "-j", "list", "counters", "table", "inet", "lab"]))
        for item in listing.get("nftables", []):
            counter = item.get("counter")
            if counter:
                found[f"{counter['name']} packets"] = counter["packets"]
                found[f"{counter['name']} bytes"] = counter["bytes"]
        lines = self.inside(["cat", "/proc/net/snmp"]).splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            protocol, _, names = names.partition(":")
            if protocol in ("Tcp", "Udp"):
                for key, value in zip(names.split(), values.split()[1:], strict=True):
                    found[f"{protocol} {key}"] = int(value)
        return found


def run(args: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: value - before.get(key, 0) for key, value in after.items()}


# --- Child processes in the namespace -------------------------------------------------------


class Child:
    """`python tests/bench_lossy.py --role ROLE args...` inside the namespace.

    It says how it is doing in lines on stdout ("PORT 4711", "READY", "ALL", "RESULT {json}")
    and takes commands on stdin ("go", "report"); at end of input it ends.
    """

    script = THIS_FILE  # the script whose --role it plays (tests/bench_lossy_files.py has roles of its own)

    def __init__(self, namespace: Namespace, workdir: str, name: str, role: str, *args: str):
        self.name = name
        self.stdout_path = os.path.join(workdir, f"{name}.out")
        self.stderr_path = os.path.join(workdir, f"{name}.err")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(namespace.command([sys.executable, self.script, "--role", role, *args]),
                                            stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=ROOT)
        LIVE_CHILDREN.add(self)

    def said(self, word: str) -> str | None:
        """The rest of the first line that starts with `word`, None if there is none yet."""
        with open(self.stdout_path, encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith(word + " ") or line.rstrip("\n") == word:
                    return line[len(word):].strip()
        return None

    def wait_for(self, word: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            found = self.said(word)
            if found is not None:
                return found
            if self.process.poll() is not None:
                time.sleep(0.1)  # its last words may still be on their way to the file
                found = self.said(word)
                if found is not None:
                    return found
                raise RuntimeError(f"{self.name} ended before saying {word}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not say {word} within {timeout:.0f} s:\n{self.stderr()}")
            time.sleep(0.01)

    def port(self) -> int:
        return int(self.wait_for("PORT", SETUP_TIMEOUT))

    def result(self, timeout: float = SETUP_TIMEOUT) -> dict:
        return json.loads(self.wait_for("RESULT", timeout))

    def tell(self, command: str) -> None:
        try:
            self.process.stdin.write(command.encode() + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # it has ended already

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as file:
            return file.read()[-3000:]

    def stop(self) -> None:
        """Ask it to end (end of input, then Ctrl+C); kill it if it does not."""
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    pass
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        LIVE_CHILDREN.discard(self)


def stop_all(children: list[Child]) -> None:
    for child in children:
        if child.process.poll() is None:
            try:
                child.process.stdin.close()
            except OSError:
                pass
    for child in children:
        child.stop()


# --- Roles: what each child process does -------------------------------------------------


def say(word: str, content=None) -> None:
    text = word if content is None else f"{word} {json.dumps(content) if not isinstance(content, str) else content}"
    print(text, flush=True)


def wait_for_command(expected: str) -> None:
    """Read stdin until `expected` comes; at end of input, end the process."""
    while True:
        line = sys.stdin.readline()
        if not line:
            os._exit(0)  # the parent is gone or done with us
        if line.strip() == expected:
            return


def exit_at_end_of_input() -> None:
    """A thread: end this process when stdin ends (the parent closed it, or died)."""
    def watch():
        while os.read(sys.stdin.fileno(), 4096):
            pass
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()


def make_line(number: int) -> str:
    return f"n={number} t={time.monotonic():.6f} ".ljust(LINE_BYTES, ".")


def parse_line(text: str) -> tuple[int, float] | None:
    try:
        number, sent = text.split()[:2]
        return int(number.removeprefix("n=")), float(sent.removeprefix("t="))
    except ValueError:
        return None


class Arrivals:
    """What a receiver got: each line's first latency, duplicates, reorderings."""

    def __init__(self, count: int):
        self.count = count
        self.latency: dict[int, float] = {}  # line number -> seconds
        self.duplicates = self.out_of_order = 0
        self.highest = -1
        self.lock = threading.Lock()

    def record(self, text: str, now: float) -> None:
        parsed = parse_line(text)
        if parsed is None:
            return
        number, sent = parsed
        with self.lock:
            if number in self.latency:
                self.duplicates += 1
                return
            if number < self.highest:
                self.out_of_order += 1
            self.highest = max(self.highest, number)
            self.latency[number] = now - sent
            if len(self.latency) == self.count:
                say("ALL")

    def summary(self) -> dict:
        with self.lock:
            return {"latency_ms": [round(1000 * self.latency[n], 2) if n in self.latency else None
                                   for n in range(self.count)],
                    "duplicates": self.duplicates, "out_of_order": self.out_of_order}


def role_server(args) -> None:
    """Our chat server, default settings but quiet; accounts are hashed cheaply (setup only)."""
    config = server.ServerConfig(host="127.0.0.1", port=0, data_dir=args.data_dir, quiet=True, kdf_iterations=1000)
    chat = server.ChatServer(config)
    loop = server.ServerLoop(chat, server.wrap_socket(server.open_socket(config.host, config.port), config, chat))
    say("PORT", str(loop.address[1]))
    exit_at_end_of_input()
    try:
        loop.serve_forever()
    except KeyboardInterrupt:
        pass


def enter_lobby(chat: client.ChatClient, name: str) -> None:
    chat.register(name, PASSWORD)
    chat.login(name, PASSWORD)
    chat.join(server.LOBBY, server.ServerConfig.room_password)


def channel_stats(chat: client.ChatClient) -> dict:
    with chat.lock:
        return dict(chat.protocol.channel.stats)


def role_chat_receiver(args) -> None:
    arrivals = Arrivals(args.count)

    def on_event(event: client.Event) -> None:
        if event.kind == "chat":
            arrivals.record(event.text, time.monotonic())

    chat = client.ChatClient("127.0.0.1", args.port, on_event=on_event)
    enter_lobby(chat, args.name)
    say("READY")
    wait_for_command("report")
    say("RESULT", {**arrivals.summary(), "channel": channel_stats(chat)})
    chat.close()


def role_chat_sender(args) -> None:
    chat = client.ChatClient("127.0.0.1", args.port)
    enter_lobby(chat, args.name)
    say("READY")
    wait_for_command("go")
    futures, refused = [], {}
    started = time.monotonic()
    for number in range(args.count):
        delay = started + number / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            futures.append(chat.submit(PacketType.SAY, make_line(number)))
        except (client.ChatError, client.Refused) as error:
            refused[type(error).__name__] = refused.get(type(error).__name__, 0) + 1
    for future in futures:
        try:
            future.result(timeout=SETTLE + 60)
        except Exception as error:  # a refusal, a lost session, a timeout: counted, reported
            refused[type(error).__name__] = refused.get(type(error).__name__, 0) + 1
    say("SENT", {"seconds": time.monotonic() - started, "not_sent": refused})
    wait_for_command("report")
    say("RESULT", {"channel": channel_stats(chat), "not_sent": refused})
    chat.close()


def tcp_info(sock: socket.socket) -> dict[str, int]:
    """TCP_INFO's data segments sent and segments retransmitted, {} where the kernel does not say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return {}
    if len(info) < 160:
        return {}
    # struct tcp_info (linux/tcp.h): tcpi_total_retrans at byte 100, tcpi_data_segs_out at 156
    return {"total_retrans": struct.unpack_from("=I", info, 100)[0],
            "data_segs_out": struct.unpack_from("=I", info, 156)[0]}


def add_info(total: dict[str, int], more: dict[str, int]) -> None:
    for key, value in more.items():
        total[key] = total.get(key, 0) + value


def tcp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def tcp_listener() -> socket.socket:
    sock = tcp_socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def connect(sock: socket.socket, port: int) -> None:
    """Connect, however long the handshake takes (SYNs are lost too)."""
    sock.settimeout(SETUP_TIMEOUT)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(None)


def role_tcp_relay(args) -> None:
    """The TCP baseline's server: every complete line from one connection goes to all the others."""
    listener = tcp_listener()
    say("PORT", str(listener.getsockname()[1]))
    members: dict[socket.socket, bytes] = {}  # connection -> the start of a line not yet complete
    info: dict[str, int] = {}
    while True:
        ready, _, _ = select.select([listener, sys.stdin, *members], [], [])
        for sock in ready:
            if sock is listener:
                accepted, _ = listener.accept()
                accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it; be sure
                members[accepted] = b""
                say("MEMBERS", str(len(members)))
            elif sock is sys.stdin:
                command = os.read(sys.stdin.fileno(), 4096)
                if not command or b"report" in command:
                    for member in members:
                        add_info(info, tcp_info(member))
                    say("RESULT", {"tcp": info})
                    return
            else:
                data = sock.recv(65536)
                if not data:
                    add_info(info, tcp_info(sock))
                    del members[sock]
                    sock.close()
                    continue
                *complete, members[sock] = (members[sock] + data).split(b"\n")
                if complete:
                    out = b"\n".join(complete) + b"\n"
                    for member in members:
                        if member is not sock:
                            member.sendall(out)


def role_tcp_receiver(args) -> None:
    sock = tcp_socket()
    connect(sock, args.port)
    arrivals = Arrivals(args.count)

    def read():
        rest = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            now = time.monotonic()
            *complete, rest = (rest + data).split(b"\n")
            for line in complete:
                arrivals.record(line.decode("utf-8", "replace"), now)

    threading.Thread(target=read, daemon=True).start()
    say("READY")
    wait_for_command("report")
    say("RESULT", {**arrivals.summary(), "tcp": tcp_info(sock)})
    sock.close()


def role_tcp_sender(args) -> None:
    sock = tcp_socket()
    connect(sock, args.port)
    say("READY")
    wait_for_command("go")
    started = time.monotonic()
    for number in range(args.count):
        delay = started + number / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sock.sendall(make_line(number).encode() + b"\n")
    say("SENT", {"seconds": time.monotonic() - started})
    wait_for_command("report")
    say("RESULT", {"tcp": tcp_info(sock)})
    sock.close()


def bulk_data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
        except OSError:
            pass
    return sock


def receiving_channel(cipher) -> Channel:
    """The receiver acknowledges as our client does: every second packet, or after ACK_DELAY."""
    channel = Channel(cipher, ack_delay=ACK_DELAY, ack_every=ACK_EVERY)
    channel.key = TAG_KEYS["to sender"]
    return channel


def role_bulk_receiver(args) -> None:
    cipher = make_cipher(args.cipher)
    if args.proto == "tcp":
        listener = tcp_listener()
        say("PORT", str(listener.getsockname()[1]))
        listener.settimeout(BULK_TIMEOUT)
        sock, _ = listener.accept()
        sock.settimeout(TCP_BULK_LIMIT + SETUP_TIMEOUT)  # the sender gives up first
        digest, got, first = hashlib.sha256(), 0, None
        while got < args.size:
            try:
                data = sock.recv(1 << 20)
            except TimeoutError:
                break
            if not data:
                break
            first = first or time.monotonic()
            digest.update(data)
            got += len(data)
        done = time.monotonic() if got == args.size else None
        info = tcp_info(sock)
        sock.close()  # the sender waits for this: then it knows everything arrived
        say("RESULT", {"done": done, "first": first, "bytes": got, "tcp": info,
                       "intact": digest.digest() == hashlib.sha256(bulk_data(args.size, args.seed)).digest()})
        return
    sock = udp_socket()
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    say("PORT", str(sock.getsockname()[1]))
    channel = receiving_channel(cipher)
    digest, got, peer, done, first = hashlib.sha256(), 0, None, None, None
    last_heard = time.monotonic()
    datagrams = wire = 0
    while True:
        now = time.monotonic()
        if done is not None and now - last_heard > 1.0:
            break  # everything arrived, and the sender has stopped asking: it has our last ACK
        if now - last_heard > BULK_TIMEOUT:
            break
        wait = min(max(channel.next_wakeup() - now, 0.0), 0.2)
        select.select([sock], [], [], wait)
        while True:
            try:
                data, peer = sock.recvfrom(RECV_BUFFER)
            except BlockingIOError:
                break
            now = last_heard = time.monotonic()
            try:
                packet = decode_packet(data, cipher)
            except PacketError:
                continue
            if not tagged_by(data, TAG_KEYS["to receiver"]):
                continue
            _, ready = channel.receive(packet, now)
            for delivered in ready:
                first = first or now
                digest.update(delivered.payload)
                got += len(delivered.payload)
            if got >= args.size and done is None:
                done = now
        if peer:
            for data in channel.poll(time.monotonic()):
                sock.sendto(data, peer)
                datagrams += 1
                wire += len(data)
    intact = got == args.size and digest.digest() == hashlib.sha256(bulk_data(args.size, args.seed)).digest()
    say("RESULT", {"done": done, "first": first, "bytes": got, "intact": intact, "channel": dict(channel.stats),
                   "datagrams": datagrams, "wire": wire})


def role_bulk_sender(args) -> None:
    data = bulk_data(args.size, args.seed)
    if args.proto == "tcp":
        sock = tcp_socket()
        connect(sock, args.port)
        started = time.monotonic()
        finished = None
        try:
            sock.settimeout(TCP_BULK_LIMIT)  # for all of sendall (Python 3.5+), then for the end
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # until the receiver closes: it has every byte
                pass
            finished = time.monotonic()
        except TimeoutError:
            pass  # not done within TCP_BULK_LIMIT: recorded as unfinished
        say("RESULT", {"started": started, "finished": finished, "tcp": tcp_info(sock)})
        sock.close()
        return
    cipher = make_cipher(args.cipher)
    sock = udp_socket()
    sock.connect(("127.0.0.1", args.port))
    sock.setblocking(False)
    channel = Channel(cipher, rto=RtoEstimator(peer_ack_delay=ACK_DELAY))  # as the server's: its peer delays ACKs
    channel.key = TAG_KEYS["to receiver"]
    offset, datagrams, wire, local_drops = 0, 0, 0, 0
    started = time.monotonic()
    while not channel.failed and time.monotonic() - started < BULK_TIMEOUT:
        # The first chunk goes alone, and the rest once it is acknowledged: that round trip is
        # the channel's first measurement, as TCP's handshake (outside TCP's time here) is TCP's.
        # Without one, a lost first ACK would stall everything for the initial 1 s timeout.
        # (Acknowledged is enough: a first chunk sent twice gives no sample, by Karn's rule.)
        measured = channel.rto.srtt is not None or (offset > 0 and channel.delivered(1))
        while offset < len(data) and (measured or offset == 0) and channel.send(
                PacketType.EVENT, data[offset:offset + MAX_PAYLOAD]):
            offset += MAX_PAYLOAD
        for datagram in channel.poll(time.monotonic()):
            try:
                sock.send(datagram)
            except (BlockingIOError, ConnectionRefusedError):
                local_drops += 1
                continue
            datagrams += 1
            wire += len(datagram)
        if offset >= len(data) and channel.idle():
            break
        wait = min(max(channel.next_wakeup() - time.monotonic(), 0.0), 0.2)
        select.select([sock], [], [], wait)
        while True:
            try:
                reply = sock.recv(RECV_BUFFER)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                continue
            try:
                if tagged_by(reply, TAG_KEYS["to sender"]):
                    channel.receive(decode_packet(reply, cipher), time.monotonic())
            except PacketError:
                continue
    say("RESULT", {"started": started, "finished": time.monotonic(), "failed": channel.failed,
                   "complete": offset >= len(data) and channel.idle(), "channel": dict(channel.stats),
                   "datagrams": datagrams, "wire": wire, "local_drops": local_drops, "srtt": channel.rto.srtt,
                   "rto": channel.rto.rto})


ROLES = {"server": role_server, "chat-receiver": role_chat_receiver, "chat-sender": role_chat_sender,
         "tcp-relay": role_tcp_relay, "tcp-receiver": role_tcp_receiver, "tcp-sender": role_tcp_sender,
         "bulk-receiver": role_bulk_receiver, "bulk-sender": role_bulk_sender}


# --- Rows --------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (as tests/bench.py): the smallest value with q% at or below it."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def with_missing(latencies: list) -> list[float]:
    """The latencies, a line that never arrived counted as infinitely late (it was at least SETTLE s)."""
    return [math.inf if value is None else value for value in latencies]


def latency_summary(arrived: dict, count: int) -> dict:
    samples = with_missing(arrived["latency_ms"])
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99), "max": max(samples, default=math.nan),
            "delivered": 100 * sum(value is not None for value in arrived["latency_ms"]) / count,
            "duplicates": arrived["duplicates"], "out_of_order": arrived["out_of_order"]}


def our_cost(counted: dict[str, int], delivered_bytes: int) -> dict:
    """Retransmits and sends per data packet, and wire bytes per byte delivered, from nftables' counters."""
    data = counted["ours_out packets"] - counted["ours_ack packets"]
    retransmitted = counted["ours_retx packets"]
    first = max(data - retransmitted, 1)
    return {"retransmits": retransmitted / first, "sends": data / first,
            "wire": counted["ours_out bytes"] / max(delivered_bytes, 1),
            "packets": counted["ours_out packets"], "acks": counted["ours_ack packets"], "retransmitted": retransmitted,
            "lost": 1 - counted["ours_in packets"] / max(counted["ours_out packets"], 1)}


def tcp_cost(counted: dict[str, int], info: dict[str, int], delivered_bytes: int) -> dict:
    """The same for TCP: RetransSegs (/proc/net/snmp) over data segments (TCP_INFO), nftables' bytes."""
    retransmitted = counted.get("Tcp RetransSegs", 0)
    if info.get("data_segs_out"):
        first = max(info["data_segs_out"] - info.get("total_retrans", 0), 1)
    else:  # no TCP_INFO: every segment that was not a retransmission, ACKs included
        first = max(counted.get("Tcp OutSegs", 0), 1)
    return {"retransmits": retransmitted / first, "sends": 1 + retransmitted / first,
            "wire": counted["tcp_out bytes"] / max(delivered_bytes, 1), "segments": counted.get("Tcp OutSegs", 0),
            "retransmitted": retransmitted, "info": info,
            "lost": 1 - counted["tcp_in packets"] / max(counted["tcp_out packets"], 1)}


def chat_row(namespace: Namespace, workdir: str, percent: int, lines: int, tcp_runs: int, repeat: int) -> dict:
    """Our chat and `tcp_runs` TCP baselines at once, `lines` lines each at RATE a second."""
    namespace.set_loss(0)  # logging in is not what we measure
    folder = os.path.join(workdir, f"chat{percent}-{repeat}")
    os.makedirs(folder)
    children: list[Child] = []

    def start(name: str, role: str, *args) -> Child:
        child = Child(namespace, folder, name, role, *map(str, args))
        children.append(child)
        return child

    try:
        our_server = start("server", "server", "--data-dir", os.path.join(folder, "data"))
        relays = [start(f"relay{k}", "tcp-relay") for k in range(tcp_runs)]
        port = our_server.port()
        our_receiver = start("receiver", "chat-receiver", "--port", port, "--name", "reader", "--count", lines)
        tcp_receivers = [start(f"tcp-receiver{k}", "tcp-receiver", "--port", relay.port(), "--count", lines)
                         for k, relay in enumerate(relays)]
        for child in [our_receiver, *tcp_receivers]:
            child.wait_for("READY", SETUP_TIMEOUT)
        our_sender = start("sender", "chat-sender", "--port", port, "--name", "writer", "--count", lines,
                           "--rate", RATE)
        tcp_senders = [start(f"tcp-sender{k}", "tcp-sender", "--port", relay.port(), "--count", lines,
                             "--rate", RATE) for k, relay in enumerate(relays)]
        for child in [our_sender, *tcp_senders]:
            child.wait_for("READY", SETUP_TIMEOUT)
        for relay in relays:
            relay.wait_for("MEMBERS 2", SETUP_TIMEOUT)
        time.sleep(0.3)  # the sender's join reaches the receiver; the last ACKs of the setup go
        before = namespace.measure()
        namespace.set_loss(percent)
        for sender in [our_sender, *tcp_senders]:
            sender.tell("go")
        senders = [our_sender, *tcp_senders]
        for sender in senders:
            sender.wait_for("SENT", lines / RATE + SETTLE + 90)
        deadline = time.monotonic() + SETTLE
        receivers = [our_receiver, *tcp_receivers]
        while time.monotonic() < deadline and not all(child.said("ALL") is not None for child in receivers):
            time.sleep(0.05)
        time.sleep(0.3)  # the last ACKs
        counted = difference(namespace.measure(), before)
        namespace.set_loss(0)
        for child in [*receivers, *senders, *relays]:
            child.tell("report")
        ours = our_receiver.result()
        sent = our_sender.result()
        tcp = [receiver.result() for receiver in tcp_receivers]
        info: dict[str, int] = {}
        for result in [*tcp, *(child.result() for child in [*tcp_senders, *relays])]:
            add_info(info, result.get("tcp", {}))
        server_failed = "Traceback" in our_server.stderr()
    finally:
        stop_all(children)
    ours_summary = latency_summary(ours, lines)
    tcp_summaries = [latency_summary(run, lines) for run in tcp]
    pooled = [value for run in tcp for value in with_missing(run["latency_ms"])]
    ours_bytes = LINE_BYTES * sum(value is not None for value in ours["latency_ms"])
    tcp_bytes = LINE_BYTES * sum(value != math.inf for value in pooled)
    return {"loss": percent, "lines": lines, "ours": ours_summary, "tcp": tcp_summaries,
            "tcp_pooled": {"p50": percentile(pooled, 50), "p99": percentile(pooled, 99),
                           "max": max(pooled, default=math.nan)},
            "ours_cost": our_cost(counted, ours_bytes), "tcp_cost": tcp_cost(counted, info, tcp_bytes),
            "ours_ms": ours["latency_ms"], "tcp_ms": [run["latency_ms"] for run in tcp],
            "not_sent": sent.get("not_sent", {}), "server_failed": server_failed,
            "channels": {"sender": sent.get("channel", {}), "receiver": ours.get("channel", {})}}


def bulk_run(namespace: Namespace, workdir: str, percent: int, proto: str, size: int, tag: str) -> dict:
    folder = os.path.join(workdir, f"bulk-{proto}-{percent}-{tag}")
    os.makedirs(folder)
    namespace.set_loss(percent)
    before = namespace.measure()
    common = ["--proto", proto, "--size", str(size), "--seed", str(BULK_SEED), "--cipher", BULK_CIPHER]
    receiver = Child(namespace, folder, "receiver", "bulk-receiver", *common)
    sender = None
    try:
        sender = Child(namespace, folder, "sender", "bulk-sender", "--port", str(receiver.port()), *common)
        sent = sender.result(BULK_TIMEOUT + SETUP_TIMEOUT)
        got = receiver.result(BULK_TIMEOUT + SETUP_TIMEOUT)
    finally:
        stop_all([child for child in (sender, receiver) if child])
    counted = difference(namespace.measure(), before)
    namespace.set_loss(0)
    seconds = (got["done"] - sent["started"]) if got.get("done") else math.inf  # inf: did not finish
    row = {"loss": percent, "proto": proto, "bytes": got["bytes"], "intact": got["intact"], "seconds": seconds,
           "mb_per_s": size / 1e6 / seconds if 0 < seconds < math.inf else 0.0}
    if proto == "tcp":
        info: dict[str, int] = {}
        add_info(info, sent.get("tcp", {}))
        add_info(info, got.get("tcp", {}))
        row["cost"] = tcp_cost(counted, info, got["bytes"])
    else:
        row["cost"] = our_cost(counted, got["bytes"])
        row["sender"] = {key: sent[key] for key in ("channel", "datagrams", "wire", "local_drops", "failed",
                                                    "complete", "srtt", "rto")}
        row["receiver"] = {key: got[key] for key in ("channel", "datagrams", "wire")}
    return row


# --- The tables ----------------------------------------------------------------------------


def ms(value: float) -> str:
    if value != value:
        return "n/a"
    if value == math.inf:
        return "∞"
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def seconds(value: float) -> str:
    if value == math.inf:
        return f"unfinished in {TCP_BULK_LIMIT:.0f}"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def times(value: float) -> str:
    """A factor: 3.1x, 0.05x."""
    if value == math.inf:
        return f"over {TCP_BULK_LIMIT:.0f} s / ours"
    return f"{value:.2f}x" if value < 1 else f"{value:.1f}x"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def ratio(value: float) -> str:
    return f"{value:.3f}"


def chat_table(rows: list[dict]) -> list[str]:
    out = ["| loss | lines | delivered % ours / TCP | duplicates / out of order, ours / TCP "
           "| latency p50 ms ours / TCP | p99 ms ours / TCP all runs (each run) | max ms ours / TCP "
           "| retransmits per data packet ours / TCP (ideal) | sends per data packet ours / TCP (ideal) "
           "| wire bytes per line byte ours / TCP |"]
    out.append("|" + "---|" * 10)
    for row in rows:
        p = row["loss"] / 100
        ours, tcp, pooled = row["ours"], row["tcp"], row["tcp_pooled"]
        delivered = " ".join(f"{run['delivered']:.0f}" for run in tcp)
        faults = "+".join(f"{run['duplicates']}/{run['out_of_order']}" for run in tcp)
        each = ", ".join(ms(run["p99"]) for run in tcp)
        oc, tc = row["ours_cost"], row["tcp_cost"]
        out.append(
            f"| {row['loss']}% | {row['lines']} | {ours['delivered']:.0f} / {delivered} "
            f"| {ours['duplicates']}/{ours['out_of_order']} / {faults} | {ms(ours['p50'])} / {ms(pooled['p50'])} "
            f"| **{ms(ours['p99'])}** / **{ms(pooled['p99'])}** ({each}) | {ms(ours['max'])} / {ms(pooled['max'])} "
            f"| {ratio(oc['retransmits'])} / {ratio(tc['retransmits'])} ({ratio(p / (1 - p))}) "
            f"| {ratio(oc['sends'])} / {ratio(tc['sends'])} ({ratio(1 / (1 - p))}) "
            f"| {oc['wire']:.1f} / {tc['wire']:.1f} |")
    return out


def bulk_table(rows: list[dict]) -> list[str]:
    out = ["| loss | bytes | time s, median (each run), ours / TCP | MB/s ours / TCP median | TCP's median time / ours "
           "| intact ours / TCP "
           "| retransmits per data packet ours / TCP (ideal) | sends per data packet ours / TCP (ideal) "
           "| wire bytes per byte ours / TCP |"]
    out.append("|" + "---|" * 9)
    for percent in sorted({row["loss"] for row in rows}):
        p = percent / 100
        ours = [row for row in rows if row["loss"] == percent and row["proto"] == "ours"]
        tcp = [row for row in rows if row["loss"] == percent and row["proto"] == "tcp"]
        if not ours or not tcp:
            continue
        # Our median run (of an odd number, one of them), beside TCP's median.
        mine = sorted(ours, key=lambda row: row["seconds"])[(len(ours) - 1) // 2]
        tcp_seconds = [row["seconds"] for row in tcp]
        typical = median(tcp_seconds)
        tc = pooled_tcp_cost(tcp)
        oc = mine["cost"]
        out.append(
            f"| {percent}% | {mine['bytes']:,} | {seconds(mine['seconds'])} "
            f"({', '.join(seconds(row['seconds']) for row in ours)}) / {seconds(typical)} "
            f"({', '.join(seconds(value) for value in tcp_seconds)}) "
            f"| {mine['mb_per_s']:.2f} / {mine['bytes'] / 1e6 / typical:.2f} | **{times(typical / mine['seconds'])}** "
            f"| {'/'.join(yes(r['intact']) for r in ours)} / {'/'.join(yes(r['intact']) for r in tcp)} "
            f"| {ratio(oc['retransmits'])} / {ratio(tc['retransmits'])} ({ratio(p / (1 - p))}) "
            f"| {ratio(oc['sends'])} / {ratio(tc['sends'])} ({ratio(1 / (1 - p))}) "
            f"| {oc['wire']:.3f} / {tc['wire']:.3f} |")
    return out


def pooled_tcp_cost(runs: list[dict]) -> dict:
    retransmitted = sum(run["cost"]["retransmitted"] for run in runs)
    first = sum(max(run["cost"]["info"].get("data_segs_out", 0) - run["cost"]["info"].get("total_retrans", 0), 0)
                for run in runs)
    wire = sum(run["cost"]["wire"] * run["bytes"] for run in runs) / max(sum(run["bytes"] for run in runs), 1)
    rate = retransmitted / first if first else runs[0]["cost"]["retransmits"]
    return {"retransmits": rate, "sends": 1 + rate, "wire": wire}


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def targets(chat: list[dict], bulk: list[dict]) -> list[str]:
    """The issue's targets, each met or missed, from this run."""
    out = []
    loss = max((row["loss"] for row in chat), default=None)
    if loss is not None:
        top = [row for row in chat if row["loss"] == loss]
        ours = max(row["ours"]["p99"] for row in top)  # our worst run
        pooled = percentile([value for row in top for run in row["tcp_ms"] for value in with_missing(run)], 99)
        tcp_runs = sum(len(row["tcp"]) for row in top)
        out.append(f"- chat p99 at {loss}% loss <= 250 ms in each of our {len(top)} runs: {met(ours <= 250)} "
                   f"(the worst {ours:,.0f} ms)")
        out.append(f"- chat p99 at {loss}% loss at least 5x below TCP's: {met(5 * ours <= pooled)} "
                   f"(TCP's p99 over its {tcp_runs} runs {pooled:,.0f} ms = {pooled / ours:.1f}x our worst run's)")
    exact = all(row["ours"]["delivered"] == 100 and not row["ours"]["duplicates"] and not row["ours"]["out_of_order"]
                for row in chat)
    out.append(f"- chat: 100% delivered exactly once, in order, at every loss: {met(exact)}")
    top = max((row["loss"] for row in bulk), default=None)
    if top is not None:
        ours = [row["seconds"] for row in bulk if row["loss"] == top and row["proto"] == "ours"]
        tcp = [row["seconds"] for row in bulk if row["loss"] == top and row["proto"] == "tcp"]
        intact = all(row["intact"] for row in bulk if row["proto"] == "ours")
        if ours and tcp:
            speedup = median(tcp) / median(ours)
            out.append(f"- bulk at {top}% loss beats TCP by a wide margin (taken as TCP's median run at least 2x "
                       f"ours): {met(speedup >= 2 and intact)} ({times(speedup)}; ours "
                       f"{', '.join(seconds(value) for value in ours)} s against TCP's "
                       f"{', '.join(seconds(value) for value in tcp)} s)")
    for row in [*chat, *[row for row in bulk if row["proto"] == "ours"]]:
        p = row["loss"] / 100
        cost = row["ours_cost"] if "ours_cost" in row else row["cost"]
        what = "chat" if "ours_cost" in row else "bulk"
        out.append(f"- {what} at {row['loss']}%: ours within 1.5x of the ideal 1/(1-p) = {1 / (1 - p):.3f} sends per "
                   f"data packet: {met(cost['sends'] <= 1.5 / (1 - p))} ({cost['sends']:.3f}, "
                   f"{cost['sends'] * (1 - p):.2f}x the ideal)")
    return out


def met(flag: bool) -> str:
    return "**met**" if flag else "**missed**"


def machine() -> str:
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()} ({platform.python_implementation()})")


def notes(chat: list[dict], bulk: list[dict]) -> list[str]:
    out = []
    for row in chat:
        sender, receiver = row["channels"]["sender"], row["channels"]["receiver"]
        out.append(f"- chat at {row['loss']}%: dropped by the rule, measured: {100 * row['ours_cost']['lost']:.1f}% "
                   f"of ours, {100 * row['tcp_cost']['lost']:.1f}% of TCP's packets; ours on the wire "
                   f"{row['ours_cost']['packets']} datagrams ({row['ours_cost']['acks']} bare ACKs, "
                   f"{row['ours_cost']['retransmitted']} retransmissions); since its login, the sending "
                   f"client's channel {format_stats(sender)}, the receiving client's {format_stats(receiver)}"
                   + (f"; NOT SENT: {row['not_sent']}" if row["not_sent"] else "")
                   + ("; THE SERVER FAILED (see its stderr)" if row["server_failed"] else "") + ".")
    for row in bulk:
        if row["proto"] == "ours":
            sender = row["sender"]
            out.append(f"- bulk ours at {row['loss']}%: dropped {100 * row['cost']['lost']:.1f}%; the sender's "
                       f"channel {format_stats(sender['channel'])}, {sender['datagrams']} datagrams, "
                       f"{sender['wire']:,} bytes of UDP payload; the receiver's {row['receiver']['datagrams']} "
                       f"datagrams (ACKs); srtt {1000 * (sender['srtt'] or 0):.2f} ms, rto at the end "
                       f"{1000 * sender['rto']:.0f} ms" + ("; THE CHANNEL GAVE UP" if sender["failed"] else "") + ".")
        else:
            out.append(f"- bulk TCP at {row['loss']}%: dropped {100 * row['cost']['lost']:.1f}%; "
                       f"OutSegs {row['cost']['segments']}, RetransSegs {row['cost']['retransmitted']}, "
                       f"TCP_INFO {row['cost']['info']}.")
    return out


def constant(owner, name: str) -> str:
    return f"{getattr(owner, name):g}" if isinstance(getattr(owner, name, None), (int, float)) else "n/a"


def format_stats(stats: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(stats.items())) or "(nothing)"


def write_json(path: str, chat: list[dict], bulk: list[dict], command: str) -> None:
    content = {
        "what": "chat latency samples (ms, by line number; null: never arrived) of our chat and of the TCP baseline "
                f"runs, {RATE:g} lines a second, at each loss; bulk transfer times. Written by tests/bench_lossy.py.",
        "machine": machine(), "command": command, "date": datetime.date.today().isoformat(),
        "rto_floor_s": getattr(RtoEstimator, "FLOOR", None),
        "chat": [{"loss_percent": row["loss"], "ours_ms": [round_ms(v) for v in row["ours_ms"]],
                  "tcp_ms": [[round_ms(v) for v in run] for run in row["tcp_ms"]],
                  "ours": row["ours"], "tcp": row["tcp"]} for row in chat],
        "bulk": [{**{key: row[key] for key in ("loss", "proto", "bytes", "mb_per_s", "intact")},
                  "seconds": row["seconds"] if row["seconds"] < math.inf else None}  # None: unfinished
                 for row in bulk],
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(without_nan(content), file, separators=(",", ":"), allow_nan=False, default=str)
        file.write("\n")


def without_nan(value):
    """The same data with every NaN (a statistic of no samples) as None: JSON has no NaN."""
    if isinstance(value, float) and (value != value or value == math.inf):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nan(item) for item in value]
    return value


def round_ms(value):
    return None if value is None else round(value, 1)


def run_benchmark(args, command: str) -> int:
    print(f"\n## Lossy network: our channel beside TCP\n\nMachine: {machine()}. Command: {command}.", flush=True)
    reason = unavailable_reason()
    if reason:
        print(f"Lossy-network rows skipped: {reason}.")
        return 0
    lines = args.lines or (30 if args.quick else LINES)
    runs, repeats = (1, 1) if args.quick else (TCP_RUNS, args.repeats)
    began = time.monotonic()
    chat, bulk = [], []
    try:
        with Namespace() as namespace, tempfile.TemporaryDirectory(prefix="chat-bench-lossy-") as workdir:
            for percent in args.losses:
                for repeat in range(repeats):
                    print(f"  running: chat at {percent}% loss, run {repeat + 1} ...", file=sys.stderr, flush=True)
                    chat.append(chat_row(namespace, workdir, percent, lines,
                                         runs + (1 if percent == max(args.losses) else 0), repeat))
            for percent in BULK_LOSSES:
                for proto in ("ours", "tcp"):
                    for index in range(1 if args.quick else BULK_RUNS):
                        print(f"  running: bulk {proto} at {percent}% loss ...", file=sys.stderr, flush=True)
                        bulk.append(bulk_run(namespace, workdir, percent, proto, args.bytes, str(index)))
            extra = notes(chat, bulk)
            name, offloads_off = namespace.name, namespace.offloads_off
    except NamespaceUnavailable as error:
        print(f"Lossy-network rows skipped: could not set up the network namespace ({error}).")
        return 0
    except Exception:
        print(f"Lossy-network rows FAILED:\n{traceback.format_exc()}")
        return 1
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    print()
    print(f"Chat: {lines} lines at {RATE:g} a second through our server (ours) and through a TCP line relay "
          "(TCP, several runs at once beside ours); latency from submit to arrival at the other client.")
    print()
    print("\n".join(chat_table(chat)))
    print()
    print(f"Bulk: {args.bytes:,} bytes through one Channel ({BULK_CIPHER} cipher, {MAX_PAYLOAD}-byte payloads) and "
          "through one TCP connection.")
    print()
    print("\n".join(bulk_table(bulk)))
    print()
    print("Targets (issue 11):")
    print("\n".join(targets(chat, bulk)))
    print()
    print("Notes:")
    print("\n".join(extra))
    print(f"- Loss: nftables in network namespace {name}, `meta l4proto {{ tcp, udp }} numgen random mod 100 < P "
          f"drop` on the input hook of its loopback, both directions; the loopback's MTU set to {LAN_MTU} bytes, "
          "Ethernet's, " + ("and its segmentation offloads off (ethtool), so TCP's segments are at most 1448 bytes of "
          "data and ours 1168, as on a lab network." if offloads_off else "but ethtool is missing, so its offloads "
          "stay on: TCP's bulk packets are 64 KB super-segments, and TCP's bulk rows are NOT comparable."))
    print(f"- Our channel (the tree as it is): window {constant(Channel, 'WINDOW')}, RTO floor "
          f"{constant(RtoEstimator, 'FLOOR')} s, backoff x{constant(RtoEstimator, 'BACKOFF')}, initial "
          f"{constant(RtoEstimator, 'INITIAL')} s, ceiling "
          f"{constant(RtoEstimator, 'CEILING')} s, fast retransmit after {constant(Channel, 'FAST_RETRANSMIT_AFTER')} "
          f"overtaking ACKs; the client's ACK delay {constant(client, 'ACK_DELAY')} s, every "
          f"{constant(client, 'ACK_EVERY')} packets. Server defaults, quiet, flood "
          f"control at its defaults ({server.MESSAGE_RATE:g}/s after "
          f"{server.MESSAGE_BURST}).")
    print("- Counted: ours on the wire by nftables (every datagram with our magic, at the input hook before the drop; "
          "retransmissions by FLAG_RETRANSMIT in the header; bare ACKs by type), which covers both clients and all "
          "of the server's channels; TCP's retransmissions from /proc/net/snmp (RetransSegs) in the namespace, "
          "its data segments from TCP_INFO (tcpi_data_segs_out - tcpi_total_retrans) of every socket, its bytes by "
          "nftables. Chat cost: all of a row's traffic (our SAYs, OK replies, EVENTs, ACKs; TCP's two hops, "
          "all runs together), from the moment the loss was set to the last arrival; bytes per line byte "
          "delivered end to end.")
    print("- Latency p99 of TCP: over the samples of all its runs together; each run's p99 in brackets. "
          f"A line that had not arrived when its row ended ({SETTLE:.0f} s after the last line was sent) counts "
          "as infinitely late (∞).")
    print(f"- Namespaces left after the run: {left.strip() or 'none'}.")
    path = (None if args.quick else JSON_PATH) if args.json is None else args.json
    if path:
        write_json(path, chat, bulk, command)
        print(f"- Samples written to {os.path.relpath(path, ROOT)}.")
    print(f"Run time (lossy part): {time.monotonic() - began:.0f} s")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 lines, one run of each at each loss (two of TCP "
                        "at the highest), one bulk run of each")
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"chat rows at each loss (default {REPEATS})")
    parser.add_argument("--lines", type=int, help=f"chat lines per row (default {LINES})")
    parser.add_argument("--losses", type=lambda text: [int(x) for x in text.split(",")], default=list(LOSSES),
                        help="chat rows' loss percentages, e.g. 0,20 (default 0,5,10,20)")
    parser.add_argument("--bytes", type=int, default=BULK_BYTES, help="bulk bytes (default 2,000,000)")
    parser.add_argument("--json", help="where the samples go (default: docs/bench_lossy.json, but nowhere with "
                        "--quick; '' for nowhere)")
    # A child process's part (inside the namespace):
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--proto", choices=("ours", "tcp"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cipher", default=BULK_CIPHER, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.role:
        ROLES[args.role](args)
        return 0
    return run_benchmark(args, command or f"python tests/bench_lossy.py {' '.join(argv)}".rstrip())


if __name__ == "__main__":
    sys.exit(main())
