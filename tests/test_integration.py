"""The real server and real clients over loopback sockets (port 0 on 127.0.0.1).

What either side does alone is tested without sockets: the server's rules in
test_chat_server.py, the client's in test_client_protocol.py. Here live the promises
that need both programs, their threads and their sockets.
"""

import binascii
import queue
import selectors
import socket
import threading

import pytest
from conftest import fast_timing, lossy_timing, member, next_event, texts_of, wait_until

import client
import server
from encryption_helper import (
    HEADER,
    MAGIC,
    NO_TOKEN,
    VERSION,
    Packet,
    PacketError,
    PacketType,
    decode_packet,
    encode_packet,
    make_cipher,
    pack_fields,
)

XOR = make_cipher("xor")


def noting(make_client, address, name: str, **options) -> client.ChatClient:
    """A member whose notices are also kept in a list, `notices`; every event still reaches `events`."""
    notices, inbox = [], queue.Queue()

    def on_event(event: client.Event) -> None:
        if event.kind == "notice":
            notices.append(event.text)
        inbox.put(event)

    made = member(make_client, address, name, on_event=on_event, **options)
    made.events, made.notices = inbox, notices
    return made


def test_two_clients_chat(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice")
    bob = member(make_client, chat_server.address, "bob")
    assert next_event(alice, "join").user == "bob"
    alice.say("hello bob: how | are you? 🎉")
    event = next_event(bob, "chat")
    assert (event.user, event.text, event.room) == ("alice", "hello bob: how | are you? 🎉", "lobby")


def unknown_type_with_a_good_checksum() -> bytes:
    header = HEADER.pack(MAGIC, VERSION, 99, 0, 0, 1, 0, 0, NO_TOKEN, 0)
    return header[:-4] + binascii.crc32(header, binascii.crc32(b"")).to_bytes(4, "big")


MALFORMED_BATTERY = [
    b"", b"\x00", b"hello:world", b"UC", b"UC\x02", bytes(31), bytes(32), b"UC" + bytes(30),
    b"\xff" * 1200, b"\xff" * 1500, b"UC\x02\x05" + b"\xff" * 28, "ünïcödé:".encode(),
    b"UC\x01\x05" + bytes(28),  # version 1
    unknown_type_with_a_good_checksum(),
    encode_packet(Packet(PacketType.SAY, 1, payload=pack_fields("hi")), make_cipher("xor", "other key")),
    encode_packet(Packet(PacketType.LOGIN, 1, payload=b"\x00\x05ab"), XOR),
    encode_packet(Packet(PacketType.LOGIN, 1, payload=pack_fields("a", "b")), XOR),
    encode_packet(Packet(PacketType.JOIN, 2, token=b"AAAAAAAA", payload=pack_fields("lobby", "juara")), XOR),
    encode_packet(Packet(PacketType.EVENT, 3), XOR),
    encode_packet(Packet(PacketType.ACK, 4, 99, 0, b"BBBBBBBB"), XOR),
    encode_packet(Packet(PacketType.HELLO, 5), XOR),
]


def undecodable(data: bytes) -> bool:
    try:
        decode_packet(data, XOR)
    except PacketError:
        return True
    return False


def test_malformed_battery_leaves_the_server_working(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        for data in MALFORMED_BATTERY:
            attacker.sendto(data, chat_server.address)
    for data in MALFORMED_BATTERY:  # a member's own address sending garbage is just as harmless
        alice.sock.send(data)
    bob = member(make_client, chat_server.address, "bob")
    bob.say("still working")
    assert next_event(alice, "chat").text == "still working"
    bad = 2 * sum(map(undecodable, MALFORMED_BATTERY))
    wait_until(lambda: chat_server.chat.stats["bad"] >= bad, what="the bad datagrams to be counted")
    assert any("bad datagram" in line for line in chat_server.log)
    assert chat_server.loop.thread.is_alive()


def test_no_server_is_reported(make_client):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(("127.0.0.1", 0))
        address = unused.getsockname()  # nobody will answer here
        lonely = make_client(address, timing=fast_timing(connect_timeout=0.5))
        with pytest.raises(client.ServerNotResponding, match=f"^Server not responding at 127.0.0.1:{address[1]}$"):
            lonely.register("alice", "pw")


def test_idle_client_notices_a_killed_server(start_server, make_client):
    running = start_server()
    alice = noting(make_client, running.address, "alice", rejoin=False,
                   timing=fast_timing(heartbeat_every=0.1, lost_contact_after=0.5, give_up_after=1.5))
    running.stop()
    wait_until(lambda: alice.state == "not logged in", what="the heartbeat to find out")  # nobody typed
    # Nobody listens on the port now: the OS answers the heartbeat with "port unreachable".
    host, port = running.address
    stopped = f"[WARN] The server at {host}:{port} has stopped (nothing is listening on its port)."
    assert stopped in alice.notices
    with pytest.raises(client.SessionLost, match="Log in again"):
        alice.say("anyone?")


def test_after_a_crash_and_restart_the_client_gets_back_in_by_itself(start_server, make_client, tmp_path):
    first = start_server(data_dir=tmp_path / "kept")
    alice = noting(make_client, first.address, "alice")
    alice.join("games", "dadu")
    first.stop()  # as if killed: nobody is told
    second = start_server(data_dir=tmp_path / "kept", port=first.address[1])
    with pytest.raises(client.SessionLost):  # RESET: the new server never knew this session
        alice.say("hello?")
    wait_until(lambda: "[INFO] In games again." in alice.notices, what="alice to get back in")
    bob = member(make_client, second.address, "bob", room="games", room_password="dadu")
    alice.say("back again")
    assert next_event(bob, "chat").text == "back again"


def test_a_stopped_server_loses_no_line_typed_while_it_was_down(start_server, make_client, tmp_path):
    first = start_server(data_dir=tmp_path / "kept")
    alice = noting(make_client, first.address, "alice")
    bob = noting(make_client, first.address, "bob")
    first.loop.stop(grace=5.0)  # as Ctrl+C does: every member is told
    assert first.chat.stop_heard()  # both clients acknowledged it
    assert "[INFO] The server was stopped." in alice.notices
    typed = [alice.submit(PacketType.SAY, f"typed while down {number}") for number in range(3)]
    second = start_server(data_dir=tmp_path / "kept", port=first.address[1])
    assert all(future.result(timeout=30)[-1].startswith("to lobby") for future in typed)
    said = [text for _, user, text in second.chat.rooms["lobby"].history if user == "alice"]
    assert said == [f"typed while down {number}" for number in range(3)]  # each once, in order
    assert alice.notices.count("[INFO] Not back in yet: what you type waits, and goes once back in.") == 1
    wait_until(lambda: bob.state == "connected", what="bob to get back in too")
    seen = []
    while len(seen) < 3:  # said while bob was away too: news to him, not the room's past
        event = next_event(bob)
        seen += [event.kind] if event.text.startswith("typed while down") else []
    assert seen == ["chat", "chat", "chat"]


def test_back_in_after_a_restart_the_rooms_past_is_not_shown_again(start_server, make_client, tmp_path):
    first = start_server(data_dir=tmp_path / "kept")
    alice = member(make_client, first.address, "alice")
    bob = noting(make_client, first.address, "bob")
    alice.say("said before the restart")
    assert next_event(bob, "chat").text == "said before the restart"
    first.loop.stop(grace=5.0)
    start_server(data_dir=tmp_path / "kept", port=first.address[1])
    wait_until(lambda: "[INFO] In lobby again." in bob.notices, what="bob to get back in")
    alice.say("said after it")
    kinds = []
    while not kinds or kinds[-1] != "chat":
        kinds.append(next_event(bob).kind)
    assert "history" not in kinds  # the first line was shown before, so it is not shown again


def test_back_in_ones_own_lines_are_not_shown_again_as_the_rooms_past(start_server, make_client, tmp_path):
    first = start_server(data_dir=tmp_path / "kept")
    alice = noting(make_client, first.address, "alice")
    for text in ["hello", "hello", "bye"]:  # as the terminal and the window send them: without waiting
        alice.submit(PacketType.SAY, text).result(timeout=10)
    first.loop.stop(grace=5.0)
    second = start_server(data_dir=tmp_path / "kept", port=first.address[1])
    wait_until(lambda: "[INFO] In lobby again." in alice.notices, what="alice to get back in")
    bob = member(make_client, second.address, "bob")
    bob.say("after it")
    shown = []
    while not shown or (shown[-1].kind, shown[-1].user) != ("chat", "bob"):
        shown.append(next_event(alice))
    assert [event for event in shown if event.kind == "history"] == []  # each was shown as "you: ..."


def test_a_rejoin_waits_out_a_lockout_of_its_account(start_server, make_client, monkeypatch):
    monkeypatch.setattr(server, "LOGIN_PERIOD", 5.0)  # locked for 5 s, not 300
    monkeypatch.setattr(client, "REJOIN_EVERY", 0.2)
    running = start_server(session_timeout=1.0)
    # Silent (no heartbeat for a minute): the server will time her out.
    alice = noting(make_client, running.address, "alice", timing=fast_timing(heartbeat_every=60.0))
    mallory = make_client(running.address)
    for _ in range(server.LOGIN_FAILURES):  # guessing alice's password locks her account
        with pytest.raises(client.Refused):
            mallory.login("alice", "guess")
    wait_until(lambda: "alice" not in running.loop.chat.online, what="alice's session to time out")
    with pytest.raises(client.SessionLost):  # told RESET: she gets back in by herself...
        alice.say("still here?")
    wait_until(lambda: "[INFO] Back in as alice." in alice.notices, what="alice back in")  # ...once unlocked
    assert any(notice.startswith("[WARN] Not back in yet: Too many failed attempts")
               for notice in alice.notices), alice.notices


def test_a_client_whose_address_changed_is_back_in_once_its_old_session_ends(start_server, make_client,
                                                                             monkeypatch):
    monkeypatch.setattr(client, "REJOIN_EVERY", 0.2)
    running = start_server(session_timeout=2.0)
    alice = noting(make_client, running.address, "alice", timing=fast_timing(heartbeat_every=60.0))
    moved = client.connect_udp(*running.address)  # another port: as after a change of network
    with alice.lock:
        alice.selector.unregister(alice.sock)
        alice.selector.register(moved, selectors.EVENT_READ)
        old, alice.sock = alice.sock, moved
    old.close()
    # Her old session, at her old address, holds the token: nothing is answered (a RESET's proof
    # would let whoever read the token end that session) until it times out; then RESET.
    with pytest.raises(client.SessionLost):
        alice.say("from my new address")
    wait_until(lambda: "[INFO] Back in as alice." in alice.notices, what="alice back in")  # old one gone
    assert running.loop.chat.online["alice"].address[1] == moved.getsockname()[1]


def test_a_room_whose_password_changed_is_not_rejoined_and_says_so(start_server, make_client, tmp_path):
    first = start_server(data_dir=tmp_path / "kept")
    alice = noting(make_client, first.address, "alice")
    first.loop.stop(grace=5.0)
    start_server(data_dir=tmp_path / "kept", port=first.address[1], room_password="baru")
    wait_until(lambda: any(line.startswith("[WARN] Not back in lobby") for line in alice.notices),
               what="the warning")
    assert alice.notices[-1] == "[WARN] Not back in lobby: Wrong room password. Type /join lobby to try again."
    assert alice.logged_in and alice.room is None
    assert alice.join("lobby", "baru").startswith("joined lobby")


def test_registering_while_logged_in_does_not_break_the_session(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice", timing=fast_timing(connect_timeout=2.0,
                                                                                 give_up_after=3.0))
    bob = member(make_client, chat_server.address, "bob")
    assert alice.register("carol", "pw") == "Registration successful."
    alice.say("still heard")
    assert next_event(bob, "chat").text == "still heard"


def test_leaving_right_after_a_long_paste_ends_the_session(start_server, make_client, monkeypatch):
    monkeypatch.setattr(server, "MESSAGE_BURST", 1)  # one line at once, then two a second...
    monkeypatch.setattr(server, "MESSAGE_RATE", 2.0)
    monkeypatch.setattr(server, "MAX_BACKLOG", 2)  # ...two held back, and the rest of the paste refused
    running = start_server()
    alice = member(make_client, running.address, "alice")
    for number in range(5):
        alice.submit(PacketType.SAY, f"pasted line {number}")
    alice.bye()  # the goodbye waits behind the held lines; it is not a message to refuse
    wait_until(lambda: "alice" not in running.chat.online, what="the session to end")
    assert any("'pasted line 2'" in line for line in running.log)  # the held lines went first


def test_loss_switch_on_both_ends(quick_recovery, start_server, make_client):
    running = start_server(loss=0.15, seed=5)  # lost at either end: about 30% in all
    alice = member(make_client, running.address, "alice", loss=0.15, seed=6, timing=lossy_timing())
    bob = member(make_client, running.address, "bob", loss=0.15, seed=7, timing=lossy_timing())
    sent = [f"n{number}" for number in range(30)]
    for text in sent:
        alice.submit(PacketType.SAY, text)
    assert texts_of(bob, "chat", len(sent)) == sent
    assert running.loop.sock.dropped > 0 and alice.sock.dropped > 0


def test_verbose_trace_marks_retransmissions_and_losses(quick_recovery, start_server, make_client):
    running = start_server(loss=0.15, seed=5, verbose=True)
    lines = []
    alice = member(make_client, running.address, "alice", loss=0.15, seed=8, timing=lossy_timing(),
                   trace=lines.append)
    for number in range(10):
        alice.say(f"n{number}")
    assert any("LOST (simulated)" in line for line in lines)
    assert any("retransmitted" in line for line in lines)
    assert any("[trace] in " in line and "SAY" in line for line in running.log)


def test_a_wake_up_never_blocks_its_caller_however_often_it_is_called(monkeypatch):
    """Another thread wakes the network thread by a byte into a socket pair; with nobody
    draining it the pair fills up, and wake() must still return at once."""
    monkeypatch.setattr(client.ChatClient, "drain_wakeups", lambda self: None)
    # Nothing is sent to this address before a request; the test sends none.
    chat = client.ChatClient("127.0.0.1", 9)

    def fill_then_wake():
        # Fill the pair in large gulps, then wake as a busy user would: again and again.
        while True:
            try:
                chat.wake_writer.send(b"!" * 65536)
            except BlockingIOError:
                break
        try:
            for _ in range(1000):
                chat.wake()
        except OSError as error:
            raised.append(error)

    raised = []
    waking = threading.Thread(target=fill_then_wake, daemon=True)
    try:
        waking.start()
        waking.join(timeout=60)
        assert not waking.is_alive(), "wake() blocked on a full pair"
        assert not raised, f"wake() raised on a full pair: {raised}"
    finally:
        chat.close()
