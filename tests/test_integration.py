"""The real server and real clients over loopback sockets (port 0 on 127.0.0.1)."""

import socket

import pytest
from conftest import fast_timing, member, next_event, no_more_events, wait_until

import client
from encryption_helper import Packet, PacketType, encode_packet, make_cipher, pack_fields


def test_two_clients_chat(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice")
    bob = member(make_client, chat_server.address, "bob")
    assert next_event(alice, "join").user == "bob"
    alice.say("hello bob: how | are you? 🎉")
    event = next_event(bob, "chat")
    assert (event.user, event.text, event.room) == ("alice", "hello bob: how | are you? 🎉", "lobby")
    assert client.format_event(event).endswith("] alice: hello bob: how | are you? 🎉")


def test_three_clients_everyone_but_the_sender_hears(chat_server, make_client):
    alice, bob, carol = (member(make_client, chat_server.address, name) for name in ("alice", "bob", "carol"))
    bob.say("from bob")
    assert next_event(alice, "chat").text == next_event(carol, "chat").text == "from bob"
    assert [e for e in no_more_events(bob, probe=alice) if e.kind == "chat"] == []  # not sent back to bob


def test_private_message(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice")
    bob = member(make_client, chat_server.address, "bob")
    carol = member(make_client, chat_server.address, "carol")
    alice.private("bob", "only for you")
    event = next_event(bob, "private")
    assert (event.user, event.text) == ("alice", "only for you")
    assert [e.kind for e in no_more_events(carol, probe=alice)] == []


def test_rooms_are_kept_apart(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice")
    bob = member(make_client, chat_server.address, "bob", room="kelas", room_password="rahasia")
    carol = member(make_client, chat_server.address, "carol", room="kelas", room_password="rahasia")
    alice.say("in the lobby")
    bob.say("in kelas")
    assert next_event(carol, "chat").text == "in kelas"
    assert [e.text for e in no_more_events(carol, probe=bob) if e.kind == "chat"] == []
    assert dict(alice.rooms()) == {"lobby": 1, "kelas": 2}
    assert bob.who() == ("kelas", ["bob", "carol"])


def test_wrong_room_password_then_right(chat_server, make_client):
    alice = make_client(chat_server.address)
    alice.register("alice", "pw")
    alice.login("alice", "pw")
    with pytest.raises(client.Refused, match="Wrong room password."):
        alice.join("lobby", "JUARA")
    assert alice.join("lobby", "juara").startswith("joined lobby")


def test_duplicate_login_is_refused(chat_server, make_client):
    member(make_client, chat_server.address, "alice")
    with pytest.raises(client.Refused, match="alice is logged in already"):
        make_client(chat_server.address).login("alice", "pw")


def test_wrong_password_and_taken_name(chat_server, make_client):
    alice = make_client(chat_server.address)
    assert alice.register("alice", "pw") == "Registration successful."
    with pytest.raises(client.Refused, match="^Username already taken.$"):
        alice.register("Alice", "other")
    with pytest.raises(client.Refused, match="^Invalid username or password.$"):
        alice.login("alice", "wrong")


def test_history_is_shown_on_join(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice")
    for number in range(3):
        alice.say(f"earlier {number}")
    bob = member(make_client, chat_server.address, "bob")
    history = [next_event(bob) for _ in range(3)]
    assert [(e.kind, e.text) for e in history] == [("history", f"earlier {n}") for n in range(3)]
    assert client.format_event(history[0]).startswith("[history] [")


def test_a_restart_keeps_accounts_and_history(start_server, make_client, tmp_path):
    first = start_server(data_dir=tmp_path / "kept")
    alice = member(make_client, first.address, "alice", "secret")
    alice.say("before the restart")
    alice.bye()
    first.stop()
    second = start_server(data_dir=tmp_path / "kept")
    again = make_client(second.address)
    again.login("alice", "secret")
    again.join("lobby", "juara")
    event = next_event(again, "history")
    assert (event.user, event.text) == ("alice", "before the restart")


def test_leaving_is_announced(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice")
    bob = member(make_client, chat_server.address, "bob")
    bob.bye()
    event = next_event(alice, "leave")
    assert (event.user, event.text) == ("bob", "")
    assert client.format_event(event).endswith("] bob left")


def test_flood_from_one_member_is_slowed_but_nothing_is_lost(start_server, make_client):
    running = start_server(message_rate=50.0, message_burst=5)
    notices = []
    alice = member(make_client, running.address, "alice", on_notice=notices.append)
    bob = member(make_client, running.address, "bob")
    for number in range(30):
        alice.say(f"pasted line {number}")
    texts = [next_event(bob, "chat").text for _ in range(30)]
    assert texts == [f"pasted line {number}" for number in range(30)]
    assert any("Slow down" in notice for notice in notices)


def test_oversize_message_is_refused_clearly(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice")
    with pytest.raises(client.Refused, match="Message too long"):
        alice.say("x" * 1001)


MALFORMED_BATTERY = [
    b"", b"\x00", b"hello:world", b"UC", b"UC\x01", bytes(27), bytes(28), b"UC" + bytes(26),
    b"\xff" * 1200, b"\xff" * 1500, b"UC\x01\x05" + b"\xff" * 24, "ünïcödé:".encode(),
    encode_packet(Packet(PacketType.SAY, 1, payload=pack_fields("hi")), make_cipher("xor", "other key")),
    encode_packet(Packet(PacketType.LOGIN, 1, payload=b"\x00\x05ab"), make_cipher("xor")),
    encode_packet(Packet(PacketType.LOGIN, 1, payload=pack_fields("a", "b")), make_cipher("xor")),
    encode_packet(Packet(PacketType.JOIN, 2, token=b"AAAAAAAA", payload=pack_fields("lobby", "juara")),
                  make_cipher("xor")),
    encode_packet(Packet(PacketType.EVENT, 3), make_cipher("xor")),
    encode_packet(Packet(PacketType.ACK, 4, 99, b"BBBBBBBB"), make_cipher("xor")),
    encode_packet(Packet(PacketType.HELLO, 5), make_cipher("xor")),
]


def test_malformed_battery_leaves_the_server_working(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        for data in MALFORMED_BATTERY:
            attacker.sendto(data, chat_server.address)
        # a member's own address sending garbage is just as harmless
        for data in MALFORMED_BATTERY:
            alice.sock.send(data)
    bob = member(make_client, chat_server.address, "bob")
    bob.say("still working")
    assert next_event(alice, "chat").text == "still working"
    wait_until(lambda: chat_server.chat.stats["bad"] >= 20, what="the bad datagrams to be counted")
    assert any("bad datagram" in line for line in chat_server.log)
    assert chat_server.loop.thread.is_alive()


def test_wrong_key_is_reported_as_such(chat_server, make_client):
    stranger = make_client(chat_server.address, key="not the key")
    with pytest.raises(client.KeyMismatch, match="server and client keys differ"):
        stranger.register("alice", "pw")


def test_no_server_is_reported(make_client):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(("127.0.0.1", 0))
        address = unused.getsockname()  # nobody will answer here
        lonely = make_client(address, timing=fast_timing(connect_timeout=0.5))
        with pytest.raises(client.ServerNotResponding, match=f"^Server not responding at 127.0.0.1:{address[1]}"):
            lonely.register("alice", "pw")


def test_killed_member_times_out_and_the_name_is_free(start_server, make_client):
    running = start_server(session_timeout=1.0)
    alice = member(make_client, running.address, "alice")
    doomed = member(make_client, running.address, "bob")
    doomed.close()  # gone without a goodbye, like a killed process
    event = next_event(alice, "leave")
    assert (event.user, event.text) == ("bob", "timed out")
    assert client.format_event(event).endswith("bob left (timed out)")
    make_client(running.address).login("bob", "pw")


def test_heartbeat_keeps_an_idle_member(start_server, make_client):
    running = start_server(session_timeout=1.0)
    alice = member(make_client, running.address, "alice", timing=fast_timing(heartbeat_every=0.2))
    start = running.chat.stats["datagrams"]
    wait_until(lambda: running.chat.stats["datagrams"] > start + 6, what="heartbeats")  # 3 timeouts' worth
    assert "alice" in running.chat.online
    alice.say("still here")


def test_killed_server_is_reported(start_server, make_client):
    running = start_server()
    notices = []
    alice = member(make_client, running.address, "alice", on_notice=notices.append,
                   timing=fast_timing(lost_contact_after=0.5, give_up_after=1.5))
    running.stop()
    with pytest.raises(client.ServerNotResponding):
        alice.say("anyone?")
    assert "[WARN] Lost contact with the server... still trying." in notices
    assert alice.closed.is_set()


def test_idle_client_notices_a_killed_server(start_server, make_client):
    running = start_server()
    notices = []
    alice = member(make_client, running.address, "alice", on_notice=notices.append,
                   timing=fast_timing(heartbeat_every=0.1, lost_contact_after=0.5, give_up_after=1.5))
    running.stop()
    assert alice.closed.wait(10)
    assert any(notice.startswith("[WARN] Lost contact") for notice in notices)


def test_after_a_server_restart_the_client_is_told_to_log_in_again(start_server, make_client, tmp_path):
    first = start_server(data_dir=tmp_path / "kept")
    alice = member(make_client, first.address, "alice")
    first.stop()
    start_server(data_dir=tmp_path / "kept", port=first.address[1])
    with pytest.raises(client.SessionLost, match="Log in again"):
        alice.say("hello?")
    alice.login("alice", "pw")
    alice.join("lobby", "juara")
    alice.say("back again")


def test_server_log_names_peer_type_and_size(chat_server, make_client):
    member(make_client, chat_server.address, "alice").say("logged")
    wait_until(lambda: any("[lobby] alice: 'logged'" in line for line in chat_server.log), what="the log")
    say = [line for line in chat_server.log if " SAY " in line]
    assert "127.0.0.1:" in say[0] and "alice" in say[0] and " B " in say[0]


def test_registering_while_logged_in_does_not_break_the_session(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice")
    bob = member(make_client, chat_server.address, "bob")
    assert alice.register("carol", "pw") == "Registration successful."  # uses up request numbers
    alice.say("still heard")
    assert next_event(bob, "chat").text == "still heard"
