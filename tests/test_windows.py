"""What only Windows does, simulated so that it is tested on every system.

* recvfrom() raises ConnectionResetError (WinError 10054) when an earlier sendto() hit a
  closed port; the server must read on. To a client it says the server has stopped.
* Ctrl+C is only noticed when a blocking call returns, so no loop may block for long.
* There is no readline module.
"""

import concurrent.futures
import io
import itertools
import queue

import pytest
from conftest import WaitingSocket, bare_loop, fast_config, fast_timing, member, next_event, wait_until

import client
import server
from encryption_helper import (
    MIN_HELLO_SIZE,
    Packet,
    PacketType,
    RtoEstimator,
    decode_packet,
    encode_packet,
    make_cipher,
    pack_fields,
)

CIPHER = make_cipher("xor")


def windows_like_socket(datagram, address) -> WaitingSocket:
    """A server socket whose reads go: reset, a datagram, reset, nothing."""
    return WaitingSocket([ConnectionResetError(10054, "An existing connection was forcibly closed"),
                          (datagram, address), ConnectionResetError(10054, "again")])


def test_server_loop_reads_on_after_connection_reset(tmp_path):
    chat = server.ChatServer(fast_config(tmp_path), log=lambda line: None)
    hello = encode_packet(Packet(PacketType.HELLO, 1, payload=pack_fields("." * (MIN_HELLO_SIZE - 34))), CIPHER)
    fake = windows_like_socket(hello, ("10.0.0.5", 5000))
    bare_loop(chat, fake).receive_all()
    (reply, to), = fake.sent
    assert to == ("10.0.0.5", 5000) and decode_packet(reply, CIPHER).type == PacketType.OK
    chat.close()


def test_udp_connreset_reports_are_switched_off_where_they_exist(monkeypatch):
    calls = []

    class FakeSocket:
        def __init__(self, *args):
            pass

        def ioctl(self, control, value):
            calls.append((control, value))

        def setsockopt(self, level, option, value):
            pass

        def bind(self, address):
            calls.append(("bind", address))

    monkeypatch.setattr(server.socket, "SIO_UDP_CONNRESET", 0x9800000C, raising=False)
    monkeypatch.setattr(server.socket, "socket", FakeSocket)
    server.open_socket("127.0.0.1", 0)
    assert calls == [(0x9800000C, False), ("bind", ("127.0.0.1", 0))]


class ResettingSocket:
    """Wraps the client's socket; its next read raises ConnectionResetError first, as a
    report left over from an earlier server would (two in a row: the server is gone)."""

    def __init__(self, sock):
        self.sock = sock
        self.resets = 1

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def recv(self, size):
        if self.resets:
            self.resets -= 1
            raise ConnectionResetError(10054, "An existing connection was forcibly closed")
        return self.sock.recv(size)


def test_client_reads_on_after_connection_reset(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice")
    bob = member(make_client, chat_server.address, "bob")
    alice.sock = ResettingSocket(alice.sock)
    wait_until(lambda: alice.sock.resets == 0, what="the receiver to meet the reset")
    bob.say("after the reset")
    assert next_event(alice, "chat").text == "after the reset"
    assert alice.logged_in


def test_server_loop_never_blocks_longer_than_max_wait(tmp_path, monkeypatch):
    loop = server.ServerLoop(server.ChatServer(fast_config(tmp_path), log=lambda line: None),
                             server.open_socket("127.0.0.1", 0))
    waits = []
    real_select = loop.selector.select

    def select(timeout):
        waits.append(timeout)
        if len(waits) == 5:
            raise KeyboardInterrupt  # what Ctrl+C does on Windows, once select() returns
        return real_select(0)

    monkeypatch.setattr(loop.selector, "select", select)
    with pytest.raises(KeyboardInterrupt):
        loop.serve_then_close()
    assert all(0 <= wait <= server.MAX_WAIT for wait in waits)
    assert loop.sock.fileno() == -1  # closed on the way out


def test_server_main_ends_cleanly_on_ctrl_c(tmp_path, monkeypatch, capsys):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(server.ServerLoop, "serve_forever", interrupted)
    status = server.main(["--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp_path)])
    assert status == 0
    assert capsys.readouterr().out.rstrip().endswith("[INFO] Server stopped.")


class LoseOnSend:
    """Wraps the client's socket: every datagram sent is lost, silently."""

    def __init__(self, sock):
        self.sock = sock

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def send(self, data):
        return len(data)


class ResetOnSend(LoseOnSend):
    """Every send is lost, and reported as Windows reports an ICMP "port unreachable" for
    an earlier one: with ConnectionResetError."""

    def send(self, data):
        raise ConnectionResetError(10054, "An existing connection was forcibly closed")


def test_client_backs_off_its_resends_in_steps_of_max_wait(chat_server, make_client, monkeypatch):
    alice = member(make_client, chat_server.address, "alice", timing=fast_timing(min_rto=0.1, max_rto=2.0))
    protocol = alice.protocol
    sends, waits = [], []  # (time, sequence numbers) of each poll that sent; every wait in select()
    real_poll, real_select = protocol.poll, alice.selector.select

    def poll(now):
        datagrams = real_poll(now)
        if datagrams:
            sends.append((now, [decode_packet(data, CIPHER).seq for data in datagrams]))
        return datagrams

    def select(timeout):
        waits.append(timeout)
        return real_select(timeout)

    monkeypatch.setattr(protocol, "poll", poll)
    monkeypatch.setattr(alice.selector, "select", select)
    alice.sock = LoseOnSend(alice.sock)
    future = alice.submit(PacketType.SAY, "is anyone there?")
    with alice.lock:  # the number it has on the wire
        say = next(seq for seq, (ticket, *_) in protocol.pending.items() if ticket == future.ticket)
    wait_until(lambda: sum(say in seqs for _, seqs in sends) >= 7, what="six resends")
    first_wait = protocol.channel.rto.timeout(0)  # nothing got through to measure: as it was
    times = [now for now, seqs in sends if say in seqs][:7]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    backoff = RtoEstimator.BACKOFF
    assert all(gap >= first_wait * backoff ** number for number, gap in enumerate(gaps)), (first_wait, gaps)
    assert first_wait * backoff ** 5 > client.MAX_WAIT  # the last wait was longer than one step of the loop...
    assert max(waits) <= client.MAX_WAIT  # ...yet the network thread never blocked for longer


def test_resets_on_send_tell_the_client_that_the_server_has_stopped(chat_server, make_client):
    notices = []
    alice = member(make_client, chat_server.address, "alice", rejoin=False,
                   on_event=lambda event: notices.append(event.text) if event.kind == "notice" else None)
    alice.sock = ResetOnSend(alice.sock)
    with pytest.raises(client.SessionLost):
        alice.say("is anyone there?")
    host, port = chat_server.address
    assert notices[-1] == f"[WARN] The server at {host}:{port} has stopped (nothing is listening on its port)."
    assert not alice.closed.is_set()  # the network thread read on: the user may log in again


def test_waiting_for_an_answer_blocks_at_most_max_wait_at_a_time(monkeypatch):
    waits = []

    class Unanswered(concurrent.futures.Future):
        def result(self, timeout=None):
            waits.append(timeout)
            return super().result(timeout=timeout)

    with pytest.raises(concurrent.futures.TimeoutError):
        client.result_within(Unanswered(), 1.2)
    assert len(waits) >= 3 and max(waits) <= client.MAX_WAIT  # a Ctrl+C gets through between steps


def test_client_main_ends_cleanly_on_ctrl_c(chat_server, monkeypatch, capsys):
    def interrupted(self, prompt, secret=False, alive=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(client.Terminal, "ask", interrupted)
    monkeypatch.setattr(client.sys, "stdin", io.StringIO(""))
    host, port = chat_server.address
    assert client.main(["--host", host, "--port", str(port)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("[INFO] Connection closed.")


def test_terminal_waits_in_short_steps_and_can_be_stopped(monkeypatch):
    monkeypatch.setattr(client.sys, "stdin", io.StringIO(""))
    terminal = client.Terminal(interactive=False)
    terminal.answers = _SlowQueue()
    calls = []

    def alive():
        calls.append(1)
        if len(calls) == 3:
            raise client.ConnectionClosed("gone")

    terminal.alive = alive
    with pytest.raises(client.ConnectionClosed):
        terminal.ask("> ")
    assert terminal.answers.timeouts == [client.MAX_WAIT, client.MAX_WAIT]


class _SlowQueue:
    """A queue that is always empty, and remembers how long it was asked to wait."""

    def __init__(self):
        self.timeouts = []

    def get(self, timeout):
        self.timeouts.append(timeout)
        raise queue.Empty

    def put(self, item):
        pass  # the keyboard's answer is never seen


def test_printing_above_the_prompt_without_readline(monkeypatch):
    monkeypatch.setattr(client, "readline", None)
    output = io.StringIO()
    monkeypatch.setattr(client.sys, "stdout", output)
    monkeypatch.setattr(client.sys, "stdin", io.StringIO(""))
    terminal = client.Terminal(interactive=True)
    terminal.prompt = "> "
    terminal.show("[12:00] bob: hi")
    assert output.getvalue() == "\r  \r[12:00] bob: hi\n> "



def test_server_loop_survives_a_bug_in_the_protocol(tmp_path):
    chat = server.ChatServer(fast_config(tmp_path), log=lambda line: None)
    problems = []
    chat.log.problem = problems.append

    def buggy(data, address, now):
        raise ZeroDivisionError("a bug")

    chat.handle_datagram = buggy
    bare_loop(chat, windows_like_socket(b"any", ("10.0.0.5", 5000))).receive_all()  # does not raise
    assert chat.stats["internal-errors"] == 1
    assert "10.0.0.5:5000" in problems[0] and "ZeroDivisionError" in problems[0]
    chat.close()


def test_server_loop_survives_a_bug_in_the_timers(tmp_path, monkeypatch):
    loop = server.ServerLoop(server.ChatServer(fast_config(tmp_path), log=lambda line: None),
                             server.open_socket("127.0.0.1", 0))
    problems = []
    monkeypatch.setattr(loop.chat.log, "problem", problems.append)
    monkeypatch.setattr(loop.chat, "on_timers", lambda now: 1 / 0)
    turns = []

    def select(timeout):
        turns.append(timeout)
        if len(turns) == 3:
            loop.stopping.set()
        return []

    monkeypatch.setattr(loop.selector, "select", select)
    loop.serve_forever()  # three turns of the loop, each with a failing timer pass
    assert len(turns) == 3 and loop.chat.stats["internal-errors"] == 3
    assert "ZeroDivisionError" in problems[0]


def test_a_hang_up_ends_the_client_as_ctrl_c_does():
    with pytest.raises(KeyboardInterrupt):
        client.hang_up(1, None)
