"""How fast a file goes through the chat server: alice sends, bob (and others) receive.

    python tests/bench_files.py              # 1, 10 and 20 MB at 0% loss; 1 and 10 MB at 5% and 20%
    python tests/bench_files.py --quick      # 1 MB only
    python tests/bench_files.py --receivers 10 --sizes 20 --losses 0    # one share to ten

Everything runs on 127.0.0.1: the server on a thread of this process, the clients beside
it. Loss is simulated (LossySocket, seeded) at the server and at every client, both ways,
so a datagram crosses two lossy hops. Printed per row: seconds from the offer until every
receiver has checked its SHA-256, MB/s, chunks resent per chunk sent, and the most file
bytes the server held in memory at once (its file streams' buffered_bytes, after every fill).
The receivers accept every offer unasked (ChatClient(accept_files=True)): a user types /accept.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client  # noqa: E402
import server  # noqa: E402
from encryption_helper import MB  # noqa: E402

FAST_HASH = 1000  # PBKDF2 iterations: the bench measures files, not logins


class MeasuredRelay(server.FileRelay):
    most = 0
    held: dict = {}

    def fill(self, session):
        super().fill(session)
        MeasuredRelay.held[session] = session.file_stream.buffered_bytes()
        MeasuredRelay.most = max(MeasuredRelay.most, sum(MeasuredRelay.held.values()))


def timing(loss: float) -> client.Timing:
    if not loss:
        return client.Timing()
    return client.Timing(min_rto=0.005, max_rto=0.2, lost_contact_after=10.0, give_up_after=60.0)


def run(size_mb: float, loss: float, receivers: int, folder: str) -> tuple:
    """Return (seconds, MB/s, resent per chunk, peak bytes held) for one file."""
    config = server.ServerConfig(host="127.0.0.1", port=0, data_dir=os.path.join(folder, "data"),
                                 kdf_iterations=FAST_HASH, quiet=True, loss=loss, seed=1, max_file_mb=size_mb + 1)
    server.MESSAGE_BURST = 10_000
    loop = server.start_server(config, log=lambda line: None)
    made = []
    try:
        names = ["alice"] + [f"bob{n}" for n in range(receivers)]
        for number, name in enumerate(names):
            chat = client.ChatClient(*loop.address, timing=timing(loss), loss=loss, seed=number,
                                     downloads=os.path.join(folder, name), rejoin=False,
                                     accept_files=True)
            made.append(chat)
            chat.register(name, "pw")
            chat.login(name, "pw")
            chat.join("lobby", "juara")
        path = os.path.join(folder, "file.bin")
        with open(path, "wb") as file:
            file.write(os.urandom(int(size_mb * MB)))
        MeasuredRelay.most, MeasuredRelay.held = 0, {}
        started = time.monotonic()
        made[0].send_file("" if receivers > 1 else "bob0", path)
        for chat in made[1:]:
            while True:
                event = chat.events.get(timeout=600)
                if event.kind == "transfer" and not event.more[0].active:
                    break
            assert event.more[0].state == "done", event.more[0].note
        seconds = time.monotonic() - started
        stats = made[0].protocol.file_stream.stats
        resent = stats["retransmitted"] / max(stats["sent"], 1)
        return seconds, size_mb * receivers / seconds, resent, MeasuredRelay.most
    finally:
        for chat in made:
            chat.close()
        loop.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=float, nargs="*", default=[1, 10, 20])
    parser.add_argument("--losses", type=float, nargs="*", default=[0, 0.05, 0.2])
    parser.add_argument("--receivers", type=int, default=1)
    args = parser.parse_args(argv)
    server.FileRelay = MeasuredRelay
    sizes = [1] if args.quick else args.sizes
    print("| file | loss | receivers | seconds | MB/s (all receivers) | resent per chunk | "
          "server's file bytes in memory, peak |")
    print("|---|---|---|---|---|---|---|")
    for loss in args.losses:
        for size in sizes:
            if loss >= 0.2 and size > 10 and not args.quick:
                continue  # minutes each; the 1 and 10 MB rows tell the story
            with tempfile.TemporaryDirectory() as folder:
                seconds, speed, resent, most = run(size, loss, args.receivers, folder)
            print(f"| {size:g} MB | {loss:.0%} | {args.receivers} | {seconds:.2f} | {speed:.2f} | {resent:.2f} | "
                  f"{most / 1024:.0f} KB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
