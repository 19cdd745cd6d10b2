"""ClientProtocol driven directly: datagrams and a fake clock in, datagrams out, no socket.

The server's end is played by hand: its answers to strangers are built here, and after
login a Channel of its own stands for the session, so what the client does with each
datagram the server may send - an answer, an EVENT, a RESET, garbage - is checked
without a network or a thread.
"""

import time

import pytest

import client
from encryption_helper import (
    NO_TOKEN,
    Channel,
    Packet,
    PacketType,
    decode_packet,
    encode_packet,
    make_cipher,
    pack_fields,
)

CIPHER = make_cipher("xor")
TOKEN = b"sessionT"


def answer(re: int, *fields: str, ptype=PacketType.OK, token=NO_TOKEN, cipher=CIPHER) -> bytes:
    """The server's unsequenced answer to a stranger's request number `re`."""
    return encode_packet(Packet(ptype, 0, re, 0, token, 0, pack_fields(str(re), *fields)), cipher)


def reset(token: bytes) -> bytes:
    return encode_packet(Packet(PacketType.RESET, 0, 0, 0, token), CIPHER)


class SessionEnd:
    """The server's end of a session: a Channel that takes requests and sends answers."""

    def __init__(self):
        self.channel = Channel(CIPHER, TOKEN)

    def take(self, datagrams: list[bytes], now: float) -> list[Packet]:
        """Return the requests among the client's `datagrams`, in order."""
        requests = []
        for data in datagrams:
            requests += [packet for packet in self.channel.receive(decode_packet(data, CIPHER), now)[1] if packet.seq]
        return requests

    def answer(self, re: int, *fields: str, ptype=PacketType.OK) -> None:
        self.channel.send(ptype, pack_fields(str(re), *fields))

    def tell(self, protocol: client.ClientProtocol, now: float) -> None:
        for data in self.channel.poll(now):
            protocol.receive(data, now)


def logged_in(timing: client.Timing | None = None) -> tuple[client.ClientProtocol, SessionEnd]:
    """A protocol that has just logged in as alice at time 0, and the server's end of its session."""
    protocol = client.ClientProtocol(CIPHER, timing)
    login = protocol.request(PacketType.LOGIN, ["cookie", "alice", "pw"], 0.0)
    protocol.poll(0.0)
    protocol.receive(answer(login, "alice", "lobby", "Welcome, alice.", token=TOKEN), 0.0)
    assert protocol.answers == [(login, ["alice", "lobby", "Welcome, alice."])]
    assert protocol.logged_in and protocol.token == TOKEN
    protocol.answers.clear()
    return protocol, SessionEnd()


def test_answers_are_matched_to_requests_by_their_number():
    protocol, server = logged_in()
    rooms = protocol.request(PacketType.ROOMS, (), 1.0)
    who = protocol.request(PacketType.WHO, (), 1.0)
    join = protocol.request(PacketType.JOIN, ("kelas", "wrong"), 1.0)
    assert [packet.type for packet in server.take(protocol.poll(1.0), 1.0)] == [
        PacketType.ROOMS, PacketType.WHO, PacketType.JOIN]
    server.answer(join, "wrong-room-password", "Wrong room password.", ptype=PacketType.ERROR)
    server.answer(who, "lobby", "alice")  # answered in another order than asked
    server.answer(rooms, "lobby", "1")
    server.tell(protocol, 1.01)
    answers = dict(protocol.answers)
    assert answers[rooms] == ["lobby", "1"] and answers[who] == ["lobby", "alice"]
    assert isinstance(answers[join], client.Refused)
    assert (answers[join].code, answers[join].text) == ("wrong-room-password", "Wrong room password.")


def test_reset_for_our_session_fails_what_is_pending_but_a_goodbye():
    protocol, _ = logged_in()
    say = protocol.request(PacketType.SAY, ("anyone?",), 1.0)
    bye = protocol.request(PacketType.BYE, (), 1.0)
    protocol.poll(1.0)
    protocol.receive(reset(TOKEN), 1.01)  # the server restarted, or forgot us
    answers = dict(protocol.answers)
    assert isinstance(answers[say], client.SessionLost)
    assert answers[bye] == ["goodbye"]  # the session is over, which is what BYE asked for
    assert not protocol.logged_in


def test_reset_for_another_session_is_ignored():
    protocol, server = logged_in()
    say = protocol.request(PacketType.SAY, ("hello",), 1.0)
    server.take(protocol.poll(1.0), 1.0)
    protocol.receive(reset(b"someone!"), 1.01)  # forged, or meant for an older session
    assert protocol.logged_in and protocol.answers == []
    server.answer(say, "to lobby, 0 others")
    server.tell(protocol, 1.02)
    assert protocol.answers == [(say, ["to lobby, 0 others"])]


def test_a_bad_checksum_before_login_means_the_keys_differ():
    protocol = client.ClientProtocol(CIPHER)
    hello = protocol.request(PacketType.HELLO, (), 0.0)
    protocol.poll(0.0)
    protocol.receive(answer(hello, "cookie", cipher=make_cipher("xor", "another key")), 0.01)
    ((seq, error),) = protocol.answers
    assert seq == hello and isinstance(error, client.KeyMismatch)
    assert "keys differ" in str(error)


def test_a_bad_checksum_after_login_is_only_dropped():
    protocol, _ = logged_in()
    protocol.request(PacketType.SAY, ("hello",), 1.0)
    protocol.poll(1.0)
    protocol.receive(answer(1, "damaged", cipher=make_cipher("xor", "another key")), 1.01)
    assert protocol.answers == [] and protocol.logged_in


def test_two_port_unreachable_reports_before_login_mean_no_server():
    protocol = client.ClientProtocol(CIPHER, server="127.0.0.1:9")
    hello = protocol.request(PacketType.HELLO, (), 0.0)
    protocol.poll(0.0)
    protocol.port_unreachable()
    assert protocol.answers == []  # one may be left over from an earlier server
    protocol.port_unreachable()
    ((seq, error),) = protocol.answers
    assert seq == hello and isinstance(error, client.ServerNotResponding)
    assert str(error) == "Server not responding at 127.0.0.1:9 (nothing is listening on that port)"


def test_two_port_unreachable_reports_in_a_session_end_it_at_once():
    protocol, server = logged_in()
    protocol.server = "10.0.0.5:9999"
    say = protocol.request(PacketType.SAY, ("hello",), 1.0)
    protocol.poll(1.0)
    protocol.port_unreachable()
    protocol.receive(server_says_something(server, 1.1), 1.1)  # the server spoke between: not gone
    protocol.port_unreachable()
    assert protocol.logged_in and protocol.answers == []
    protocol.port_unreachable()  # a second report with nothing heard since: the process is gone
    assert not protocol.logged_in and not protocol.closed_reason  # a session lost: it may log in again
    reason = "The server at 10.0.0.5:9999 has stopped (nothing is listening on its port)"
    assert protocol.notices == [f"[WARN] {reason}."]
    ((seq, error),) = protocol.answers
    assert seq == say and isinstance(error, client.SessionLost) and protocol.lost is error


def server_says_something(server: SessionEnd, now: float) -> bytes:
    """One datagram from the server's end of the session: an EVENT."""
    server.channel.send(PacketType.EVENT, pack_fields("chat", "0", "lobby", "bob", "hi"))
    (data,) = server.channel.poll(now)
    return data


def test_a_ping_goes_out_after_heartbeat_every_of_quiet():
    protocol, server = logged_in()
    say = protocol.request(PacketType.SAY, ("hello",), 2.0)
    server.take(protocol.poll(2.0), 2.0)
    server.answer(say, "to lobby, 0 others")
    server.tell(protocol, 2.01)
    last_sent = 2.0
    while True:
        due = protocol.next_wakeup()
        assert protocol.poll(due - 0.001) == []  # nothing before the protocol said
        sent = [decode_packet(data, CIPHER) for data in protocol.poll(due)]
        if any(packet.type == PacketType.PING for packet in sent):
            break
        assert sent, "woken for nothing"
        last_sent = due  # an acknowledgement counts as something said
    assert due == pytest.approx(last_sent + protocol.timing.heartbeat_every) and last_sent > 2.0
    assert [(packet.type, packet.seq, packet.token) for packet in sent] == [(PacketType.PING, 2, TOKEN)]


def test_silence_brings_a_warning_then_ends_the_session():
    timing = client.Timing(lost_contact_after=3.0, give_up_after=8.0)
    protocol, _ = logged_in(timing)
    say = protocol.request(PacketType.SAY, ("anyone?",), 1.0)
    warned = ended = None
    for tick in range(10, 200):  # every 100 ms; the server never answers
        now = tick / 10
        protocol.poll(now)
        if protocol.notices and warned is None:
            warned = now
        if not protocol.logged_in:
            ended = now
            break
    assert (warned, ended) == (4.0, 9.0)  # 3 s and 8 s after the request, the last thing heard
    assert protocol.notices == ["[WARN] Lost contact with the server... still trying.",
                                "[WARN] Lost contact with the server for 8 s."]
    assert isinstance(protocol.lost, client.SessionLost) and not protocol.closed_reason  # it may log in again
    ((seq, error),) = protocol.answers
    assert seq == say and isinstance(error, client.SessionLost)


def test_a_stop_ends_the_session_and_is_acknowledged_at_once():
    protocol, server_end = logged_in()
    said = protocol.request(PacketType.SAY, ("never handled",), 1.0)
    server_end.take(protocol.poll(1.0), 1.0)
    server_end.channel.send(PacketType.EVENT, pack_fields("stop", "0", "", "alice", "The server was stopped."))
    server_end.tell(protocol, 1.1)
    assert protocol.notices == ["[INFO] The server was stopped."] and not protocol.logged_in
    assert protocol.answers == [(said, protocol.lost)] and isinstance(protocol.lost, client.ServerStopped)
    server_end.take(protocol.poll(1.1), 1.1)
    assert server_end.channel.idle()  # the stop is acknowledged: the server need not wait for us


def test_replaced_ends_the_session_for_good():
    protocol, server_end = logged_in()
    server_end.channel.send(PacketType.EVENT, pack_fields("replaced", "0", "", "alice", "logged in elsewhere"))
    server_end.tell(protocol, 1.0)
    assert protocol.notices == ["[INFO] You logged in elsewhere; this client is logged out."]
    assert isinstance(protocol.lost, client.LoggedInElsewhere)


def test_events_are_shown_as_the_user_sees_them():
    clock = time.strftime("%H:%M", time.localtime(0.0))

    def shown(kind, user="bob", text="hi"):
        return client.format_event(client.Event(kind, 0.0, "lobby", user, text))

    assert shown("chat", text="a | b: 🎉") == f"[{clock}] bob: a | b: 🎉"
    assert shown("private") == f"[{clock}] bob (private): hi"
    assert shown("history") == f"[history] [{clock}] bob: hi"
    assert shown("join", text="") == f"[{clock}] bob joined"
    assert shown("leave", text="") == f"[{clock}] bob left"
    assert shown("leave", text="timed out") == f"[{clock}] bob left (timed out)"
    assert shown("chat", text="\x1b[2Jtwo\nlines") == f"[{clock}] bob: ?[2Jtwo\n    lines"  # no escape codes


def test_a_repeated_login_answer_acknowledges_nothing_on_the_session():
    protocol = client.ClientProtocol(CIPHER)
    login = protocol.request(PacketType.LOGIN, ["cookie", "alice", "pw"], 0.0)
    protocol.poll(0.0)
    welcome = answer(login, "alice", "lobby", "Welcome, alice.", token=TOKEN)
    protocol.receive(welcome, 0.01)
    protocol.request(PacketType.JOIN, ("lobby", "juara"), 0.02)
    protocol.poll(0.02)  # the JOIN, numbered 1 on the session, is lost on the way
    protocol.receive(welcome, 0.03)  # the answer to a retry of the LOGIN: its ack field is a stranger's number
    resent = [decode_packet(data, CIPHER) for data in protocol.poll(protocol.timing.initial_rto + 0.02)]
    assert [(packet.type, packet.seq) for packet in resent] == [(PacketType.JOIN, 1)]


# --- Nothing is left waiting, and nothing old is taken for new -----------------------------


def test_a_request_queued_behind_the_login_is_answered_not_lost():
    protocol = client.ClientProtocol(CIPHER)
    login = protocol.request(PacketType.LOGIN, ["cookie", "alice", "pw"], 0.0)
    behind = protocol.request(PacketType.WHO, (), 0.0)  # waits: before login, one request at a time
    protocol.poll(0.0)
    protocol.receive(answer(login, "alice", "lobby", "Welcome, alice.", token=TOKEN), 0.0)
    answered = dict(protocol.answers)
    assert answered[login] == ["alice", "lobby", "Welcome, alice."]
    assert isinstance(answered[behind], client.Refused) and answered[behind].code == "not-sent"
    assert not protocol.pending


def test_requests_after_a_bye_are_answered_when_the_goodbye_comes():
    protocol, server = logged_in()
    bye = protocol.request(PacketType.BYE, (), 1.0)
    late = protocol.request(PacketType.SAY, ("one more",), 1.0)
    requests = server.take(protocol.poll(1.0), 1.0)
    server.answer(requests[0].seq, "goodbye")  # the server ends the session at the BYE
    server.tell(protocol, 1.1)
    answered = dict(protocol.answers)
    assert answered[bye] == ["goodbye"] and answered[late].code == "not-sent"
    assert not protocol.logged_in and not protocol.pending


def test_a_late_answer_to_a_given_up_request_is_not_taken_for_a_new_one():
    protocol = client.ClientProtocol(CIPHER, client.Timing(connect_timeout=2.0))
    register = protocol.request(PacketType.REGISTER, ["cookie", "bob", "pw"], 0.0)
    for now in (0.0, 1.0, 2.0, 3.0):  # unanswered: given up on
        protocol.poll(now)
    assert isinstance(dict(protocol.answers)[register], client.ServerNotResponding)
    protocol.answers.clear()
    login = protocol.request(PacketType.LOGIN, ["cookie", "bob", "pw"], 4.0)
    assert login != register  # numbers before login go on counting
    protocol.receive(answer(register, "Registration successful."), 4.1)  # the first answer, at last
    assert protocol.answers == [] and protocol.pending == {login: PacketType.LOGIN}


def test_a_welcome_without_fields_or_token_is_refused_not_fatal():
    protocol = client.ClientProtocol(CIPHER)
    login = protocol.request(PacketType.LOGIN, ["cookie", "alice", "pw"], 0.0)
    protocol.poll(0.0)
    protocol.receive(answer(login, token=TOKEN), 0.0)  # nothing but its number
    assert dict(protocol.answers)[login].code == "bad-reply" and not protocol.logged_in


@pytest.mark.parametrize("when", ["inf", "nan", "1e300", "-1e300"])
def test_an_event_with_an_impossible_time_is_skipped(when):
    protocol, server = logged_in()
    server.channel.send(PacketType.EVENT, pack_fields("chat", when, "lobby", "mallory", "boom"))
    server.channel.send(PacketType.EVENT, pack_fields("chat", "1767225600", "lobby", "bob", "hi"))
    server.tell(protocol, 1.0)
    assert [event.text for event in protocol.events] == ["hi"]
