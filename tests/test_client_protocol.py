"""ClientProtocol driven directly: datagrams and a fake clock in, datagrams out, no socket.

The server's end is played by hand: its answers to strangers are built here, and after
login a Channel of its own stands for the session, so what the client does with each
datagram the server may send - an answer, an EVENT, a RESET, garbage - is checked
without a network or a thread.
"""

import time

import pytest

import client
import encryption_helper as wire
from encryption_helper import (
    NO_TOKEN,
    Channel,
    Packet,
    PacketType,
    decode_packet,
    encode_packet,
    make_cipher,
    pack_fields,
    unpack_fields,
)

CIPHER = make_cipher("xor")
TOKEN = b"sessionT"
SALT, X = "00" * 16, 12345  # alice's salt and x (the slow hash of her password), made up
VERIFIER = pow(wire.SRP_G, X, wire.SRP_N)
RESET_PROOF = bytes(range(16))  # what this made-up server's RESETs carry
KEYS: dict[str, bytes] = {}  # M2 -> K: the session key of the login that M2 answers


def challenge_for(A: int, b: int = 5) -> tuple[list[str], str]:
    """A server end holding alice's verifier: its answer to a LOGIN's first step with A, and
    the M2 it will send if the second step's M1 is right."""
    B, S = wire.srp_server(VERIFIER, b, A)
    K, _, M2 = wire.srp_proofs("alice", bytes.fromhex(SALT), A, B, S)
    KEYS.pop(M2.hex(), None)  # put last: the newest login's
    KEYS[M2.hex()] = K
    return [SALT, "1000", format(B, "x")], M2.hex()


def second_step(protocol: client.ClientProtocol, a: int = 3) -> tuple[list[str], str]:
    """LOGIN's second step as the protocol makes it, and the M2 that answers it."""
    challenge, m2 = challenge_for(pow(wire.SRP_G, a, wire.SRP_N))
    return list(protocol.prove(challenge, "cookie", "alice", client.public_key(a), a, X)), m2


def answer(re: int, *fields: str, ptype=PacketType.OK, token=NO_TOKEN, cipher=CIPHER) -> bytes:
    """The server's unsequenced answer to a stranger's request number `re`; a welcome (M2 last)
    gets the reset proof, sealed with the session's key, as its last field, and a tag."""
    key = b""
    if token != NO_TOKEN and fields and fields[-1] in KEYS:
        K = KEYS[fields[-1]]
        keys = wire.session_keys(K)
        fields, key = (*fields, wire.seal_text(keys.seal, RESET_PROOF.hex())), keys.to_client
    return encode_packet(Packet(ptype, 0, re, 0, token, 0, pack_fields(str(re), *fields)), cipher, key=key)


def reset(token: bytes, proof: bytes = RESET_PROOF) -> bytes:
    return encode_packet(Packet(PacketType.RESET, 0, 0, 0, token, 0, proof), CIPHER)


class SessionEnd:
    """The server's end of the newest login's session: a Channel that takes requests (each must
    be tagged with the client's key) and sends answers, tagged with the server's."""

    def __init__(self):
        K = list(KEYS.values())[-1]
        self.channel = Channel(CIPHER, TOKEN)
        keys = wire.session_keys(K)
        self.channel.key, self.client_key = keys.to_client, keys.to_server

    def take(self, datagrams: list[bytes], now: float) -> list[Packet]:
        """Return the requests among the client's `datagrams`, in order."""
        requests = []
        for data in datagrams:
            assert wire.tagged_by(data, self.client_key)
            requests += [packet for packet in self.channel.receive(decode_packet(data, CIPHER), now)[1] if packet.seq]
        return requests

    def answer(self, re: int, *fields: str, ptype=PacketType.OK) -> None:
        self.channel.send(ptype, pack_fields(str(re), *fields))

    def tell(self, protocol: client.ClientProtocol, now: float) -> None:
        for data in self.channel.poll(now):
            protocol.receive(data, now)


class Out:
    """What the protocol put in its one stream of events, sorted by kind."""

    def __init__(self, protocol: client.ClientProtocol):
        self.events = protocol.take_events()
        self.answers = {e.more[0]: e.more[1] for e in self.events if e.kind == "answer"}
        self.notices = [e.text for e in self.events if e.kind == "notice"]
        self.states = [e.text for e in self.events if e.kind == "state"]
        self.shown = [e for e in self.events if e.kind not in ("answer", "notice", "state")]


def wire_seq(protocol: client.ClientProtocol, ticket: int) -> int:
    """The number a waiting request carries on the wire (its answer names it)."""
    return next(seq for seq, (waiting, *_) in protocol.pending.items() if waiting == ticket)


def logged_in(timing: client.Timing | None = None, **options) -> tuple[client.ClientProtocol, SessionEnd]:
    """A protocol that has just logged in as alice at time 0, and the server's end of its session."""
    protocol = client.ClientProtocol(CIPHER, timing, **options)
    fields, m2 = second_step(protocol)
    login = protocol.request(PacketType.LOGIN, fields, 0.0)
    protocol.poll(0.0)
    protocol.receive(answer(wire_seq(protocol, login), "alice", "lobby", "Welcome, alice.", m2, token=TOKEN), 0.0)
    out = Out(protocol)
    assert out.answers == {login: ["alice", "lobby", "Welcome, alice."]} and out.states == ["connected"]
    assert protocol.logged_in and protocol.token == TOKEN and protocol.state == "connected"
    return protocol, SessionEnd()


def test_answers_are_matched_to_requests_by_their_number():
    protocol, server = logged_in()
    asked = [protocol.request(PacketType.ROOMS, (), 1.0), protocol.request(PacketType.WHO, (), 1.0),
             protocol.request(PacketType.JOIN, ("kelas", "wrong"), 1.0)]
    rooms, who, join = server.take(protocol.poll(1.0), 1.0)
    assert [rooms.type, who.type, join.type] == [PacketType.ROOMS, PacketType.WHO, PacketType.JOIN]
    server.answer(join.seq, "wrong-room-password", "Wrong room password.", ptype=PacketType.ERROR)
    server.answer(who.seq, "lobby", "alice")  # answered in another order than asked
    server.answer(rooms.seq, "lobby", "1")
    server.tell(protocol, 1.01)
    answers = Out(protocol).answers
    assert answers[asked[0]] == ["lobby", "1"] and answers[asked[1]] == ["lobby", "alice"]
    assert isinstance(answers[asked[2]], client.Refused)
    assert (answers[asked[2]].code, answers[asked[2]].text) == ("wrong-room-password", "Wrong room password.")


def test_an_accepted_line_comes_back_as_ones_own_chat_event():
    protocol, server = logged_in()
    protocol.request(PacketType.SAY, ("hello",), 1.0)
    protocol.request(PacketType.PRIVATE, ("bob", "psst"), 1.0)
    say, private = server.take(protocol.poll(1.0), 1.0)
    server.answer(say.seq, "to lobby, 1 other")
    server.answer(private.seq, "private to bob")
    server.tell(protocol, 1.01)
    own = Out(protocol).shown
    assert [(e.kind, e.user, e.text, e.more) for e in own] == [
        ("chat", "alice", "hello", ()), ("private", "alice", "psst", ("bob",))]
    assert [client.format_event(e, "alice").split("] ", 1)[1] for e in own] == ["you: hello", "-> bob: psst"]


def test_reset_for_our_session_fails_what_is_pending_but_a_goodbye():
    protocol, _ = logged_in(rejoin=False)
    say = protocol.request(PacketType.SAY, ("anyone?",), 1.0)
    bye = protocol.request(PacketType.BYE, (), 1.0)
    protocol.poll(1.0)
    protocol.receive(reset(TOKEN), 1.01)  # the server restarted, or forgot us
    out = Out(protocol)
    assert isinstance(out.answers[say], client.SessionLost)
    assert out.answers[bye] == ["goodbye"]  # the session is over, which is what BYE asked for
    assert not protocol.logged_in and protocol.state == "not logged in"
    assert out.notices == [f"[WARN] {client.SESSION_LOST}"]


@pytest.mark.parametrize("change", ["no tag", "another token", "proof cut to its nonce", "no M2"])
def test_a_welcome_changed_on_the_way_is_refused(change):
    """M2 proves the session's key K; the welcome's tag, made from K, proves the rest."""
    protocol = client.ClientProtocol(CIPHER)
    fields, m2 = second_step(protocol)
    login = protocol.request(PacketType.LOGIN, fields, 0.0)
    protocol.poll(0.0)
    re = wire_seq(protocol, login)
    genuine = answer(re, "alice", "lobby", "Welcome, alice.", m2, token=TOKEN)
    welcome = decode_packet(genuine, CIPHER)
    sealed = unpack_fields(welcome.payload)[-1]
    head = (str(re), "alice", "lobby", "Welcome, alice.")
    payload = {"proof cut to its nonce": pack_fields(*head, m2, sealed[:32]),
               "no M2": pack_fields(*head, "", sealed)}.get(change, welcome.payload)
    changed = welcome._replace(token=b"mallory!" if change == "another token" else TOKEN, payload=payload)
    if change == "no tag":
        forged = encode_packet(changed, CIPHER)
    else:  # the checksum is anyone's to make; the tag is the genuine one, the only one she has
        forged = encode_packet(changed, CIPHER, key=bytes(32))[:-wire.TAG_BYTES] + genuine[-wire.TAG_BYTES:]
    protocol.receive(forged, 0.0)
    result = Out(protocol).answers[login]
    assert isinstance(result, client.Refused) and result.code in ("bad-reply", "bad-proof")
    assert not protocol.logged_in


def test_a_reset_with_our_token_but_not_our_proof_is_ignored():
    """Anyone on the LAN reads our token; only our server can make the proof our login sealed."""
    protocol, server = logged_in()
    for proof in (b"", bytes(16), RESET_PROOF[::-1]):
        protocol.receive(reset(TOKEN, proof), 1.01)
    assert protocol.logged_in and Out(protocol).events == []


def test_a_packet_with_our_token_and_a_wrong_tag_is_dropped():
    protocol, server = logged_in()
    forger = Channel(CIPHER, TOKEN)
    forger.key = bytes(32)  # any key but the session's
    forger.send(PacketType.EVENT, pack_fields("chat", "0", "lobby", "bob", "forged"))
    untagged = encode_packet(Packet(PacketType.EVENT, 1, 0, 0, TOKEN, 0,
                                    pack_fields("chat", "0", "lobby", "bob", "untagged")), CIPHER)
    for data in forger.poll(1.0) + [untagged]:
        protocol.receive(data, 1.0)
    assert Out(protocol).events == [] and protocol.channel.expected == 1  # its number still free
    server.channel.send(PacketType.EVENT, pack_fields("chat", "0", "lobby", "bob", "real"))
    server.tell(protocol, 1.1)
    assert [event.text for event in Out(protocol).shown] == ["real"]


def test_reset_for_another_session_is_ignored():
    protocol, server = logged_in()
    say = protocol.request(PacketType.SAY, ("hello",), 1.0)
    (sent,) = server.take(protocol.poll(1.0), 1.0)
    protocol.receive(reset(b"someone!"), 1.01)  # forged, or meant for an older session
    assert protocol.logged_in and Out(protocol).events == []
    server.answer(sent.seq, "to lobby, 0 others")
    server.tell(protocol, 1.02)
    assert Out(protocol).answers == {say: ["to lobby, 0 others"]}


def test_a_bad_checksum_before_login_means_the_keys_differ():
    protocol = client.ClientProtocol(CIPHER)
    hello = protocol.request(PacketType.HELLO, (), 0.0)
    protocol.poll(0.0)
    protocol.receive(answer(wire_seq(protocol, hello), "cookie", cipher=make_cipher("xor", "another key")), 0.01)
    error = Out(protocol).answers[hello]
    assert isinstance(error, client.ServerNotResponding) and "keys differ" in str(error)


def test_a_bad_checksum_after_login_is_only_dropped():
    protocol, _ = logged_in()
    protocol.request(PacketType.SAY, ("hello",), 1.0)
    protocol.poll(1.0)
    protocol.receive(answer(1, "damaged", cipher=make_cipher("xor", "another key")), 1.01)
    assert Out(protocol).events == [] and protocol.logged_in


def test_two_port_unreachable_reports_before_login_mean_no_server():
    protocol = client.ClientProtocol(CIPHER, server="127.0.0.1:9")
    hello = protocol.request(PacketType.HELLO, (), 0.0)
    protocol.poll(0.0)
    protocol.port_unreachable()
    assert Out(protocol).events == []  # one may be left over from an earlier server
    protocol.port_unreachable()
    error = Out(protocol).answers[hello]
    assert isinstance(error, client.ServerNotResponding)
    assert str(error) == "Server not responding at 127.0.0.1:9 (nothing is listening on that port)"


def test_port_unreachable_in_a_session_only_makes_the_client_ask_the_server():
    protocol, server = logged_in(rejoin=False, timing=client.Timing(give_up_after=45.0))
    protocol.server = "10.0.0.5:9999"
    for _ in range(5):  # forged ones, say: anyone on the LAN can send them
        protocol.port_unreachable()
    (ping,) = server.take(protocol.poll(1.0), 1.0)
    assert ping.type == PacketType.PING and protocol.logged_in and not Out(protocol).notices
    server.answer(ping.seq, "pong")
    server.tell(protocol, 1.1)
    assert protocol.logged_in and protocol.state == "connected"


def test_port_unreachable_and_then_silence_ends_the_session_saying_why():
    protocol, _ = logged_in(rejoin=False, timing=client.Timing(give_up_after=45.0))
    protocol.server = "10.0.0.5:9999"
    say = protocol.request(PacketType.SAY, ("hello",), 1.0)
    protocol.poll(1.0)
    protocol.port_unreachable()
    protocol.port_unreachable()
    protocol.poll(40.0)
    assert protocol.logged_in  # not yet: silence, not the report, decides
    protocol.poll(46.5)
    assert not protocol.logged_in and not protocol.closed_reason  # a session lost: it may log in again
    out = Out(protocol)
    reason = "The server at 10.0.0.5:9999 has stopped (nothing is listening on its port)"
    assert out.notices[-1] == f"[WARN] {reason}." and out.states[-1] == "not logged in"
    assert isinstance(out.answers[say], client.SessionLost)


def server_says_something(server: SessionEnd, now: float) -> bytes:
    """One datagram from the server's end of the session: an EVENT."""
    server.channel.send(PacketType.EVENT, pack_fields("chat", "0", "lobby", "bob", "hi"))
    (data,) = server.channel.poll(now)
    return data


def test_a_ping_goes_out_after_heartbeat_every_of_quiet():
    protocol, server = logged_in()
    protocol.request(PacketType.SAY, ("hello",), 2.0)
    (say,) = server.take(protocol.poll(2.0), 2.0)
    server.answer(say.seq, "to lobby, 0 others")
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
    protocol, _ = logged_in(timing, rejoin=False)
    say = protocol.request(PacketType.SAY, ("anyone?",), 1.0)
    warned = ended = None
    notices = []
    for tick in range(10, 200):  # every 100 ms; the server never answers
        now = tick / 10
        protocol.poll(now)
        out = Out(protocol)
        notices += out.notices
        if "lost contact" in out.states:
            warned = now
        if "not logged in" in out.states:
            ended = now
            break
    assert (warned, ended) == (4.0, 9.0)  # 3 s and 8 s after the request, the last thing heard
    assert notices == ["[WARN] Lost contact with the server... still trying.",
                       "[WARN] Lost contact with the server for 8 s."]
    assert not protocol.closed_reason and isinstance(out.answers[say], client.SessionLost)


def test_a_stop_holds_what_it_never_handled_and_is_acknowledged_at_once():
    protocol, server_end = logged_in()
    said = protocol.request(PacketType.SAY, ("never handled",), 1.0)
    server_end.take(protocol.poll(1.0), 1.0)
    server_end.channel.send(PacketType.EVENT, pack_fields("stop", "0", "", "alice", "The server was stopped."))
    server_end.tell(protocol, 1.1)
    out = Out(protocol)
    assert out.notices == ["[INFO] The server was stopped.", "[INFO] Trying to get back in (exit to stop)..."]
    assert said not in out.answers and protocol.state == "reconnecting"  # held, to send once back in
    last_ack = protocol.poll(1.1)[0]
    assert decode_packet(last_ack, CIPHER).type == PacketType.ACK
    server_end.take([last_ack], 1.1)
    assert server_end.channel.idle()  # the stop is acknowledged: the server need not wait for us


def test_back_in_after_a_stop_the_protocol_logs_in_joins_and_sends_what_waited():
    protocol, _ = logged_in()
    join = protocol.request(PacketType.JOIN, ("kelas", "rahasia"), 0.5)
    server = SessionEnd()
    (joined,) = server.take(protocol.poll(0.5), 0.5)
    server.answer(joined.seq, "kelas", "1", "joined kelas, 1 here")
    server.channel.send(PacketType.EVENT, pack_fields("stop", "0", "", "alice", "The server was stopped."))
    server.tell(protocol, 0.6)
    typed = protocol.request(PacketType.SAY, ("typed while it was down",), 0.7)
    assert Out(protocol).answers == {join: ["kelas", "1", "joined kelas, 1 here"]}
    steps, m2 = [], ""
    for now in (1.0, 1.1, 1.2):
        (request,) = [decode_packet(data, CIPHER) for data in protocol.poll(now)
                      if decode_packet(data, CIPHER).seq]
        steps.append((request.type, unpack_fields(request.payload)))
        if request.type == PacketType.HELLO:
            protocol.receive(answer(request.seq, "cookie-2", "1000"), now)
        elif len(steps[-1][1]) == 3:  # LOGIN's first step: the server's salt, iterations and B
            challenge, m2 = challenge_for(int(steps[-1][1][2], 16))
            protocol.receive(answer(request.seq, *challenge), now)
        else:
            protocol.receive(answer(request.seq, "alice", "lobby", "Welcome back.", m2, token=TOKEN), now)
    assert [ptype for ptype, _ in steps] == [PacketType.HELLO, PacketType.LOGIN, PacketType.LOGIN]
    assert steps[1][1][:2] == ["cookie-2", "alice"] and steps[2][1][-1] == "rejoin"  # x kept: no password
    server = SessionEnd()
    (rejoin,) = server.take(protocol.poll(1.2), 1.2)
    room, sealed = unpack_fields(rejoin.payload)
    assert (rejoin.type, room) == (PacketType.JOIN, "kelas")
    assert wire.open_text(protocol.keys.seal, sealed) == "rahasia"  # sealed with the new session's key
    server.answer(rejoin.seq, "kelas", "1", "joined kelas, 1 here")
    server.tell(protocol, 1.3)
    (held,) = server.take(protocol.poll(1.3), 1.3)
    assert (held.type, held.payload) == (PacketType.SAY, pack_fields("typed while it was down"))
    out = Out(protocol)
    assert out.notices == ["[INFO] Back in as alice.", "[INFO] In kelas again."]
    assert out.states == ["connected"] and typed not in out.answers


def test_replaced_ends_the_session_for_good():
    protocol, server_end = logged_in()
    server_end.channel.send(PacketType.EVENT, pack_fields("replaced", "0", "", "alice", "logged in elsewhere"))
    server_end.tell(protocol, 1.0)
    out = Out(protocol)
    assert out.notices == ["[INFO] You logged in elsewhere; this client is logged out."]
    assert out.states == ["not logged in"]  # no getting back in: the other client has the session


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
    fields, m2 = second_step(protocol)
    login = protocol.request(PacketType.LOGIN, fields, 0.0)
    protocol.poll(0.0)
    welcome = answer(wire_seq(protocol, login), "alice", "lobby", "Welcome, alice.", m2, token=TOKEN)
    protocol.receive(welcome, 0.01)
    protocol.request(PacketType.JOIN, ("lobby", "juara"), 0.02)
    protocol.poll(0.02)  # the JOIN, numbered 1 on the session, is lost on the way
    protocol.receive(welcome, 0.03)  # the answer to a retry of the LOGIN: its ack field is a stranger's number
    resent = [decode_packet(data, CIPHER) for data in protocol.poll(protocol.timing.initial_rto + 0.02)]
    assert [(packet.type, packet.seq) for packet in resent] == [(PacketType.JOIN, 1)]


# --- Nothing is left waiting, and nothing old is taken for new -----------------------------


def test_a_request_queued_behind_the_login_is_answered_not_lost():
    protocol = client.ClientProtocol(CIPHER)
    fields, m2 = second_step(protocol)
    login = protocol.request(PacketType.LOGIN, fields, 0.0)
    behind = protocol.request(PacketType.HELLO, (), 0.0)  # waits: before login, one request at a time
    protocol.poll(0.0)
    protocol.receive(answer(wire_seq(protocol, login), "alice", "lobby", "Welcome, alice.", m2, token=TOKEN), 0.0)
    answered = Out(protocol).answers
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
    answered = Out(protocol).answers
    assert answered[bye] == ["goodbye"] and answered[late].code == "not-sent"
    assert not protocol.logged_in and not protocol.pending and protocol.state == "not logged in"


def test_a_late_answer_to_a_given_up_request_is_not_taken_for_a_new_one():
    protocol = client.ClientProtocol(CIPHER, client.Timing(connect_timeout=2.0))
    register = protocol.request(PacketType.REGISTER, ["cookie", "bob", "pw"], 0.0)
    first = wire_seq(protocol, register)
    for now in (0.0, 1.0, 2.0, 3.0):  # unanswered: given up on
        protocol.poll(now)
    assert isinstance(Out(protocol).answers[register], client.ServerNotResponding)
    login = protocol.request(PacketType.LOGIN, ["cookie", "bob", "pw"], 4.0)
    assert wire_seq(protocol, login) != first  # numbers before login go on counting
    protocol.receive(answer(first, "Registration successful."), 4.1)  # the first answer, at last
    assert Out(protocol).events == [] and [entry[0] for entry in protocol.pending.values()] == [login]


def test_a_welcome_without_fields_or_token_is_refused_not_fatal():
    protocol = client.ClientProtocol(CIPHER)
    login = protocol.request(PacketType.LOGIN, second_step(protocol)[0], 0.0)
    protocol.poll(0.0)
    protocol.receive(answer(wire_seq(protocol, login), token=TOKEN), 0.0)  # nothing but its number
    assert Out(protocol).answers[login].code == "bad-reply" and not protocol.logged_in


@pytest.mark.parametrize("when", ["inf", "nan", "1e300", "-1e300"])
def test_an_event_with_an_impossible_time_is_skipped(when):
    protocol, server = logged_in()
    server.channel.send(PacketType.EVENT, pack_fields("chat", when, "lobby", "mallory", "boom"))
    server.channel.send(PacketType.EVENT, pack_fields("chat", "1767225600", "lobby", "bob", "hi"))
    server.tell(protocol, 1.0)
    assert [event.text for event in Out(protocol).shown] == ["hi"]


# --- The room's past after a rejoin: shown once, never one's own lines --------------------


def past(when: float, user: str, text: str) -> client.Event:
    return client.Event("history", when, "lobby", user, text)


def returning(*seen: client.Event) -> client.ClientProtocol:
    """A protocol logged in as alice that has shown `seen`, and is on its way back into the room."""
    protocol = client.ClientProtocol(CIPHER)
    protocol.name = "alice"
    for event in seen:
        protocol.fresh(event)
    protocol.returning = True
    return protocol


def test_back_in_the_rooms_past_shown_already_is_skipped_and_what_came_meanwhile_is_news():
    back = returning(client.Event("chat", 100.0, "lobby", "bob", "before"))
    assert back.fresh(past(99.0, "bob", "older")) is None
    assert back.fresh(past(100.0, "bob", "before")) is None
    later = back.fresh(past(120.0, "carol", "said while we were away"))
    assert later.kind == "chat"  # not marked [history]: it is news to us


def test_back_in_a_message_of_the_last_second_seen_is_shown_if_it_never_came():
    back = returning(client.Event("chat", 100.0, "lobby", "bob", "seen"))
    assert back.fresh(past(100.0, "bob", "seen")) is None
    assert back.fresh(past(100.0, "carol", "never came")).text == "never came"


def test_back_in_ones_own_old_lines_are_not_shown_as_the_rooms_past():
    back = returning(client.Event("chat", 100.0, "lobby", "bob", "seen"))
    assert back.fresh(past(130.0, "Alice", "mine, shown as I said it")) is None


def test_a_room_joined_by_the_user_shows_all_its_past():
    back = returning(client.Event("chat", 100.0, "lobby", "bob", "seen"))
    back.returning = False  # the user chose a room: its past is news
    assert back.fresh(past(50.0, "bob", "old")).kind == "history"
    assert back.fresh(past(60.0, "alice", "my old line")).kind == "history"


def test_a_transfer_event_shows_the_transfer_as_it_was_when_it_happened():
    """Events are shown later, on another thread: by then the transfer has moved on. Each
    event must still say what happened then - 75% once, saved once - not where it is now."""
    protocol = client.ClientProtocol(CIPHER)
    transfer = client.Transfer("receive", "bob", "cat.jpg", 1000, "0" * 64, "downloads/cat.jpg",
                               number=3, done_bytes=750, state="moving")
    protocol.files.emit(transfer)
    transfer.done_bytes, transfer.state, transfer.note = 1000, "done", "SHA-256 checked"
    protocol.files.emit(transfer)
    lines = [client.format_event(event) for event in protocol.take_events()
             if event.kind == "transfer"]
    assert lines == ["cat.jpg: 75% of 1000 B", "saved downloads/cat.jpg (1000 B, SHA-256 checked)"]
