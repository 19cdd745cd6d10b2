"""Benchmark: files through the chat server on a really lossy network, next to TCP.

    python tests/bench_lossy_files.py            # 1, 10 and 20 MB at 0, 5 and 20% loss, and one share to ten
    python tests/bench_lossy_files.py --quick    # 1 MB at 0 and 20%, and the share to ten
    python tests/bench_lossy_files.py --sizes 20 --losses 20 --limit 300

It needs what tests/bench_lossy.py needs (Linux, root, `ip`, `nft`) and uses its network
namespace: a loopback with Ethernet's MTU, no offloads, and an nftables rule on the input
hook that drops a share of every TCP and UDP packet (`udpchat-bench-<pid>`, removed at
the end, also on Ctrl+C or a failure). Every process runs inside it on 127.0.0.1.

**Ours.** A real server (server.py, its own process, default settings but quiet), a
process with the sender (a ChatClient, alice) and a process with the receivers (bob0,
bob1, ... each a ChatClient with its own downloads folder, accepting every offer unasked:
accept_files=True, where a user types /accept). All log in and join the lobby while
the loss is 0; then the loss is set, alice calls send_file (to bob0, or to the room
when there are several), and the time runs from that call (the file is hashed in it)
to the moment the last receiver has its file saved, SHA-256 checked by the
client, and checked once more here against the file that was sent.

**TCP.** The same bytes, in the same namespace at the same loss, through a TCP relay
process (what arrives from the sender goes to every receiver, blocking sendall: TCP's
own backpressure), from a sender process to a receivers process; from the first sendall
to the last receiver having every byte, each receiver hashing what it got. A run not done
within --limit seconds is reported as "not finished after N s", as are ours.

**Columns.** Seconds; MB/s per receiver (file size / seconds); retransmissions per data
packet on both hops, counted as tests/bench_lossy.py counts them (ours: datagrams with
FLAG_RETRANSMIT on the wire, by nftables, over the data datagrams less those; TCP:
RetransSegs over TCP_INFO's data segments); the ideal is p/(1-p). The server's memory:
its process's peak resident set (VmHWM in /proc/self/status) over its whole life, and
its resident set just before the transfer began, as the server reports them itself.
"""

import argparse
import cProfile
import datetime
import hashlib
import json
import math
import os
import random
import resource
import socket
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_lossy  # noqa: E402  (the namespace, its child processes, the cost counting)
from bench_lossy import ROOT, SETUP_TIMEOUT, Child, Namespace, NamespaceUnavailable, say  # noqa: E402

import client  # noqa: E402
import server  # noqa: E402
from encryption_helper import MB  # noqa: E402

SIZES = (1, 10, 20)  # MB (of 2**20 bytes, as the server's limit counts them)
LOSSES = (0, 5, 20)  # percent
SHARE_MB, SHARE_RECEIVERS = 20, 10  # the memory row: one share to ten
LIMIT = 120.0  # seconds: a transfer not done by then is "not finished"
FILE_SEED = 13
JSON_PATH = os.path.join(ROOT, "docs", "bench_files.json")
PROFILES = ""  # --profile DIR: the server's cProfile of each row goes there
TARGET_SPEEDUP, TARGET_MB_S, TARGET_MEMORY_MB = 5, 10, 60  # issue 13's targets


class FileChild(Child):
    script = os.path.abspath(__file__)  # its roles are this script's

    def result_of(self, word: str, timeout: float = SETUP_TIMEOUT) -> dict:
        return json.loads(self.wait_for(word, timeout))


# --- Roles: what each child process does -------------------------------------------------


def memory_kb() -> dict:
    """This process's resident set now and its peak (VmRSS, VmHWM), in KB; and its CPU seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    found = {"cpu_s": usage.ru_utime + usage.ru_stime}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


def role_file_server(args) -> None:
    """Our server, default settings but quiet; on "before" and "after", it says its memory and CPU time."""
    config = server.ServerConfig(host="127.0.0.1", port=0, data_dir=args.data_dir, quiet=True,
                                 kdf_iterations=1000, max_file_mb=args.max_mb)
    chat = server.ChatServer(config)
    loop = server.ServerLoop(chat, server.wrap_socket(server.open_socket(config.host, config.port), config, chat))
    say("PORT", str(loop.address[1]))

    def answer():
        for line in sys.stdin:
            if line.strip() in ("before", "after"):
                say(line.strip().upper(), memory_kb())
        if not args.profile:
            os._exit(0)  # end of input: the parent is done with us
        loop.stopping.set()  # the loop's own thread writes its profile

    threading.Thread(target=answer, daemon=True).start()
    profile = cProfile.Profile() if args.profile else None
    try:
        profile and profile.enable()
        loop.serve_forever()
    except KeyboardInterrupt:
        pass
    if profile:
        profile.disable()
        profile.dump_stats(args.profile)


def role_file_sender(args) -> None:
    chat = client.ChatClient("127.0.0.1", args.port)
    bench_lossy.enter_lobby(chat, "alice")
    say("READY")
    bench_lossy.wait_for_command("go")
    started = time.monotonic()
    note, transfer = "", None
    try:
        transfer = chat.send_file(args.to, args.path)
    except Exception as error:  # a refusal or a timeout: reported, not raised
        note = f"offer not accepted: {error!r}"
    say("STARTED", {"started": started, "note": note})
    bench_lossy.wait_for_command("report")  # the sender stays until every receiver is done
    with chat.lock:
        stats = dict(chat.protocol.file_stream.stats)
    state, said = (transfer.state, transfer.note) if transfer else ("refused", "")
    say("RESULT", {"state": state, "note": said or note, "file_stream": stats})
    chat.close()


def role_file_receivers(args) -> None:
    """`count` ChatClients; RESULT when all have their file (or after --limit s)."""
    done, all_done = {}, threading.Event()

    def on_event(event: client.Event, name: str) -> None:
        transfer = event.more[0] if event.kind == "transfer" else None
        if transfer and not transfer.active and transfer.direction == "receive" and name not in done:
            done[name] = (time.monotonic(), transfer.state, transfer.note, transfer.path)
            if len(done) == args.count:
                all_done.set()

    chats = []
    for number in range(args.count):
        name = f"bob{number}"
        chat = client.ChatClient("127.0.0.1", args.port, downloads=os.path.join(args.data_dir, name),
                                 on_event=lambda event, name=name: on_event(event, name),
                                 accept_files=True)
        bench_lossy.enter_lobby(chat, name)
        chats.append(chat)
    say("READY")
    all_done.wait(args.limit + SETUP_TIMEOUT)
    results = {name: {"at": at, "state": state, "note": note,
                      "intact": state == "done" and client.file_sha256(path) == args.sha}
               for name, (at, state, note, path) in dict(done).items()}
    say("RESULT", {"receivers": results})
    bench_lossy.wait_for_command("report")
    for chat in chats:
        chat.close()


def role_tcp_file_relay(args) -> None:
    """Accept `count` receivers, then the sender; copy what the sender sends to every receiver."""
    listener = bench_lossy.tcp_listener()
    say("PORT", str(listener.getsockname()[1]))
    sockets: list[socket.socket] = []

    def relay():
        for _ in range(args.count + 1):
            sockets.append(listener.accept()[0])
            say("MEMBERS", str(len(sockets)))
        sender, receivers = sockets[-1], sockets[:-1]
        try:
            while data := sender.recv(1 << 16):
                for receiver in receivers:
                    receiver.sendall(data)  # blocks while that receiver's window is full: backpressure
        except OSError:
            return

    threading.Thread(target=relay, daemon=True).start()
    bench_lossy.wait_for_command("report")
    info: dict[str, int] = {}
    for sock in list(sockets):
        bench_lossy.add_info(info, bench_lossy.tcp_info(sock))
    say("RESULT", {"tcp": info})


def role_tcp_file_receivers(args) -> None:
    results, sockets = {}, []
    for _ in range(args.count):
        sockets.append(bench_lossy.tcp_socket())
        bench_lossy.connect(sockets[-1], args.port)
    say("READY")
    threads = [threading.Thread(target=tcp_receive, args=(sock, args, results, number))
               for number, sock in enumerate(sockets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    info: dict[str, int] = {}
    for sock in sockets:
        bench_lossy.add_info(info, bench_lossy.tcp_info(sock))
    say("RESULT", {"receivers": results, "tcp": info})
    bench_lossy.wait_for_command("report")


def tcp_receive(sock: socket.socket, args, results: dict, number: int) -> None:
    """Read the whole file (or until --limit s after the first byte could have come), hashing it."""
    digest, got, at = hashlib.sha256(), 0, None
    deadline = time.monotonic() + args.limit + SETUP_TIMEOUT  # the sender gives up first
    sock.settimeout(args.limit + SETUP_TIMEOUT)
    while got < args.size and time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 20)
        except OSError:
            break
        if not data:
            break
        digest.update(data)
        got += len(data)
    if got == args.size:
        at = time.monotonic()
    results[f"bob{number}"] = {"at": at, "state": "done" if at else f"{got} bytes",
                               "intact": at is not None and digest.hexdigest() == args.sha}


def role_tcp_file_sender(args) -> None:
    with open(args.path, "rb") as file:
        data = file.read()
    sock = bench_lossy.tcp_socket()
    bench_lossy.connect(sock, args.port)
    say("READY")
    bench_lossy.wait_for_command("go")
    started = time.monotonic()
    sock.settimeout(args.limit)  # for all of sendall (Python 3.5+)
    try:
        sock.sendall(data)
    except OSError:
        pass  # not done within the limit: the receivers say so
    say("STARTED", {"started": started, "note": ""})
    bench_lossy.wait_for_command("report")
    say("RESULT", {"tcp": bench_lossy.tcp_info(sock)})
    sock.close()


ROLES = {"file-server": role_file_server, "file-sender": role_file_sender, "file-receivers": role_file_receivers,
         "tcp-file-relay": role_tcp_file_relay, "tcp-file-receivers": role_tcp_file_receivers,
         "tcp-file-sender": role_tcp_file_sender}


# --- Rows --------------------------------------------------------------------------------


def make_file(folder: str, size_mb: float) -> tuple[str, str]:
    """Seeded random bytes in folder/file.bin; return its path and SHA-256."""
    data = random.Random(FILE_SEED).randbytes(int(size_mb * MB))
    path = os.path.join(folder, "file.bin")
    with open(path, "wb") as file:
        file.write(data)
    return path, hashlib.sha256(data).hexdigest()


def start_ours(start, folder: str, size_mb: float, receivers: int, sha: str, limit: float) -> tuple:
    """The server, the receivers, the sender, all logged in and in the lobby: (server, receivers, sender)."""
    profile = ["--profile", os.path.join(PROFILES, f"server-{os.path.basename(folder)}.prof")] if PROFILES else []
    our_server = start("server", "file-server", "--data-dir", os.path.join(folder, "data"), "--max-mb", size_mb,
                       *profile)
    port = our_server.port()
    got = start("receivers", "file-receivers", "--port", port, "--count", receivers, "--sha", sha,
                "--limit", limit, "--data-dir", os.path.join(folder, "downloads"))
    got.wait_for("READY", SETUP_TIMEOUT * receivers)
    sender = start("sender", "file-sender", "--port", port, "--path", os.path.join(folder, "file.bin"),
                   "--to", "bob0" if receivers == 1 else "", "--limit", limit)
    sender.wait_for("READY", SETUP_TIMEOUT)
    return our_server, got, sender


def start_tcp(start, folder: str, size_mb: float, receivers: int, sha: str, limit: float) -> tuple:
    relay = start("relay", "tcp-file-relay", "--count", receivers)
    port = relay.port()
    got = start("receivers", "tcp-file-receivers", "--port", port, "--count", receivers, "--sha", sha,
                "--limit", limit, "--size", int(size_mb * MB))
    got.wait_for("READY", SETUP_TIMEOUT)
    relay.wait_for(f"MEMBERS {receivers}", SETUP_TIMEOUT)
    sender = start("sender", "tcp-file-sender", "--port", port, "--path", os.path.join(folder, "file.bin"),
                   "--limit", limit)
    sender.wait_for("READY", SETUP_TIMEOUT)
    relay.wait_for(f"MEMBERS {receivers + 1}", SETUP_TIMEOUT)
    return relay, got, sender


def file_row(namespace: Namespace, workdir: str, proto: str, size_mb: float, percent: int, receivers: int,
             limit: float) -> dict:
    """One file (ours or TCP) from one sender to `receivers`, at `percent` % loss."""
    folder = os.path.join(workdir, f"{proto}-{size_mb:g}-{percent}-{receivers}")
    os.makedirs(folder)
    path, sha = make_file(folder, size_mb)
    namespace.set_loss(0)  # logging in is not what we measure
    children: list[Child] = []

    def start(name: str, role: str, *args) -> Child:
        children.append(FileChild(namespace, folder, name, role, *map(str, args)))
        return children[-1]

    try:
        middle, got, sender = (start_ours if proto == "ours" else start_tcp)(start, folder, size_mb, receivers,
                                                                             sha, limit)
        row = measure_row(namespace, (middle, got, sender), proto, percent, limit, int(size_mb * MB))
    finally:
        bench_lossy.stop_all(children)
        os.remove(path)
    return {**row, "proto": proto, "size_mb": size_mb, "loss": percent, "receivers": receivers}


def measure_row(namespace: Namespace, children: tuple, proto: str, percent: int, limit: float, size: int) -> dict:
    middle, got, sender = children  # the server or relay, the receivers, the sender
    time.sleep(0.3)  # the last ACKs of the setup go
    if proto == "ours":
        middle.tell("before")
    before = namespace.measure()
    namespace.set_loss(percent)
    sender.tell("go")
    started = sender.result_of("STARTED", limit + SETUP_TIMEOUT)
    arrived = got.result(limit + 2 * SETUP_TIMEOUT)["receivers"]
    time.sleep(0.3)  # the last ACKs
    counted = bench_lossy.difference(namespace.measure(), before)
    namespace.set_loss(0)
    for child in (middle, got, sender):
        child.tell("after" if child is middle and proto == "ours" else "report")
    sent = sender.result()
    memory = {"before": middle.result_of("BEFORE"), "after": middle.result_of("AFTER")} if proto == "ours" else {}
    results = {"started": started, "arrived": arrived, "sent": sent, "memory": memory}
    return summarise(counted, results, children, proto, limit, size)


def summarise(counted: dict, results: dict, children: tuple, proto: str, limit: float, size: int) -> dict:
    """Seconds to the last intact file, the wire's cost, the server's memory."""
    middle, got, _ = children
    started, arrived, sent = results["started"], results["arrived"], results["sent"]
    ends = [result["at"] for result in arrived.values()]
    intact = len(arrived) > 0 and all(result["intact"] for result in arrived.values())
    seconds = max(ends) - started["started"] if intact and all(ends) else math.inf
    seconds = math.inf if seconds > limit else seconds
    delivered = sum(result["intact"] for result in arrived.values())
    if proto == "ours":
        cost = bench_lossy.our_cost(counted, size * delivered)
        extra = {"sender": sent, "memory_kb": results["memory"]}
    else:
        info: dict[str, int] = {}
        for result in (sent, got.result(), middle.result()):
            bench_lossy.add_info(info, result.get("tcp", {}))
        cost = bench_lossy.tcp_cost(counted, info, size * delivered)
        extra = {}
    return {"seconds": seconds, "intact": intact, "delivered": delivered, "cost": cost,
            "states": sorted({result["state"] for result in arrived.values()}), "note": started["note"], **extra}


# --- The table ----------------------------------------------------------------------------


def seconds_text(value: float, limit: float) -> str:
    if value == math.inf:
        return f"not finished after {limit:.0f} s"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def speed(row: dict) -> float:
    return row["size_mb"] / row["seconds"] if 0 < row["seconds"] < math.inf else 0.0


def speedup_text(ours: dict, tcp: dict, limit: float) -> str:
    if ours["seconds"] == math.inf:
        return "n/a"
    if tcp["seconds"] == math.inf:
        return f"over {limit / ours['seconds']:.1f}x"
    return f"{tcp['seconds'] / ours['seconds']:.1f}x" if tcp["seconds"] >= ours["seconds"] else \
        f"{tcp['seconds'] / ours['seconds']:.2f}x"


def table(pairs: list[tuple[dict, dict]], limit: float) -> list[str]:
    out = ["| file | loss | receivers | seconds ours / TCP | MB/s ours / TCP | TCP's time / ours "
           "| SHA-256 ok ours / TCP | retransmissions per chunk ours / TCP (ideal) | server's peak RSS "
           "| server's CPU s in it |",
           "|" + "---|" * 10]
    for ours, tcp in pairs:
        p = ours["loss"] / 100
        memory = ours.get("memory_kb", {}).get("after", {})
        cpu = memory.get("cpu_s", 0) - ours.get("memory_kb", {}).get("before", {}).get("cpu_s", 0)
        out.append(
            f"| {ours['size_mb']:g} MB | {ours['loss']}% | {ours['receivers']} "
            f"| {seconds_text(ours['seconds'], limit)} / {seconds_text(tcp['seconds'], limit)} "
            f"| {speed(ours):.2f} / {speed(tcp):.2f} | {speedup_text(ours, tcp, limit)} "
            f"| {bench_lossy.yes(ours['intact'])} / {bench_lossy.yes(tcp['intact'])} "
            f"| {ours['cost']['retransmits']:.3f} / {tcp['cost']['retransmits']:.3f} ({p / (1 - p):.3f}) "
            f"| {memory.get('VmHWM', 0) / 1024:.1f} MB | {cpu:.2f} |")
    return out


def targets(pairs: list[tuple[dict, dict]], share: dict | None, limit: float) -> list[str]:
    """Issue 13's targets, each met or missed, from this run."""
    out = []
    for ours, tcp in pairs:
        if ours["receivers"] > 1:
            continue  # the share: its memory, below
        if ours["loss"] == 20:
            fast = ours["seconds"] < math.inf and TARGET_SPEEDUP * ours["seconds"] <= tcp["seconds"]
            out.append(f"- {ours['size_mb']:g} MB at 20% loss at least {TARGET_SPEEDUP}x faster than TCP: "
                       f"{bench_lossy.met(fast)} ({speedup_text(ours, tcp, limit)})")
        if ours["loss"] == 0:
            out.append(f"- {ours['size_mb']:g} MB at 0% loss at least {TARGET_MB_S} MB/s through the server: "
                       f"{bench_lossy.met(speed(ours) >= TARGET_MB_S)} ({speed(ours):.2f} MB/s)")
    if share:
        peak = share["memory_kb"]["after"]["VmHWM"] / 1024
        out.append(f"- the server's memory during a {share['size_mb']:g} MB share to {share['receivers']} receivers "
                   f"under {TARGET_MEMORY_MB} MB: {bench_lossy.met(peak < TARGET_MEMORY_MB and share['intact'])} "
                   f"(peak RSS {peak:.1f} MB, {share['memory_kb']['before']['VmRSS'] / 1024:.1f} MB just before; "
                   f"{seconds_text(share['seconds'], limit)} s, {share['delivered']} of {share['receivers']} intact, "
                   f"{speed(share) * share['delivered']:.1f} MB/s delivered in all)")
    return out


def write_json(path: str, rows: list[dict], command: str) -> None:
    content = {"what": "files through our server and the same bytes through a TCP relay, in a lossy network "
                       "namespace; seconds null: not finished. Written by tests/bench_lossy_files.py.",
               "machine": bench_lossy.machine(), "command": command, "date": datetime.date.today().isoformat(),
               "rows": rows}
    with open(path, "w", encoding="utf-8") as file:
        json.dump(bench_lossy.without_nan(content), file, indent=1, allow_nan=False, default=str)
        file.write("\n")


def run_rows(args, namespace: Namespace, workdir: str) -> tuple[list, dict | None]:
    pairs = []
    for percent in args.losses:
        for size in args.sizes:
            print(f"  running: {size:g} MB at {percent}% loss ...", file=sys.stderr, flush=True)
            pairs.append(tuple(file_row(namespace, workdir, proto, size, percent, 1, args.limit)
                               for proto in ("ours", "tcp")))
            print("\n".join(table(pairs[-1:], args.limit)[2:]), file=sys.stderr, flush=True)
    share = None
    if args.share:
        print(f"  running: a {SHARE_MB} MB share to {SHARE_RECEIVERS} ...", file=sys.stderr, flush=True)
        share = file_row(namespace, workdir, "ours", SHARE_MB, 0, SHARE_RECEIVERS, args.limit)
        tcp_share = file_row(namespace, workdir, "tcp", SHARE_MB, 0, SHARE_RECEIVERS, args.limit)
        pairs.append((share, tcp_share))
    return pairs, share


def run_benchmark(args, command: str) -> int:
    print(f"\n## Files on a lossy network: through our server beside TCP\n\nMachine: {bench_lossy.machine()}. "
          f"Command: {command}.", flush=True)
    reason = bench_lossy.unavailable_reason()
    if reason:
        print(f"Lossy-network file rows skipped: {reason}.")
        return 0
    began = time.monotonic()
    try:
        with Namespace() as namespace, tempfile.TemporaryDirectory(prefix="chat-bench-files-") as workdir:
            pairs, share = run_rows(args, namespace, workdir)
            name = namespace.name
    except NamespaceUnavailable as error:
        print(f"Lossy-network file rows skipped: could not set up the network namespace ({error}).")
        return 0
    except Exception:
        print(f"Lossy-network file rows FAILED:\n{traceback.format_exc()}")
        return 1
    left = bench_lossy.run(["ip", "netns", "list"]).strip()
    print("\n" + "\n".join(table(pairs, args.limit)))
    print("\nTargets (issue 13):\n" + "\n".join(targets(pairs, share, args.limit)))
    print(f"\nNamespace {name}; namespaces left after the run: {left or 'none'}. "
          f"Run time: {time.monotonic() - began:.0f} s.")
    path = (None if args.quick else JSON_PATH) if args.json is None else args.json
    if path:
        write_json(path, [row for pair in pairs for row in pair], command)
        print(f"Figures written to {os.path.relpath(path, ROOT)}.")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 MB at 0 and 20%% loss, and the share to ten")
    parser.add_argument("--sizes", type=float, nargs="*", help="file sizes in MB (default 1 10 20)")
    parser.add_argument("--losses", type=int, nargs="*", help="loss percentages (default 0 5 20)")
    parser.add_argument("--no-share", dest="share", action="store_false",
                        help=f"without the {SHARE_MB} MB share to {SHARE_RECEIVERS} (the memory row)")
    parser.add_argument("--limit", type=float, default=LIMIT, help=f"seconds a transfer may take (default {LIMIT:g})")
    parser.add_argument("--profile", help="a folder for the server's cProfile of each row (pstats files)")
    parser.add_argument("--json", help="where the figures go (default docs/bench_files.json, nowhere with --quick)")
    # A child process's part (inside the namespace):
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    for option, kind in (("--port", int), ("--count", int), ("--size", int), ("--max-mb", float), ("--sha", str),
                         ("--path", str), ("--to", str), ("--data-dir", str)):
        parser.add_argument(option, type=kind, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([1] if args.quick else list(SIZES))
    args.losses = args.losses if args.losses is not None else ([0, 20] if args.quick else list(LOSSES))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    global PROFILES
    PROFILES = os.path.abspath(args.profile) if args.profile and not args.role else ""
    if args.role:
        ROLES[args.role](args)
        return 0
    return run_benchmark(args, f"python tests/bench_lossy_files.py {' '.join(argv)}".rstrip())


if __name__ == "__main__":
    sys.exit(main())
