"""Sending files: safe names, chunking and reassembly, and whole transfers through a real server.

Each transfer is waited for by its news ("done", "failed", "cancelled"), never by a sleep.
Where a test needs a transfer caught in the middle, the sender's upload is held at a gate
after a few chunks, so what is checked meanwhile does not depend on speed.
"""

import os
import random
import signal
import threading
import types

import pytest
from conftest import Program, lossy_timing, member, next_event, wait_until
from hypothesis import given
from hypothesis import strategies as st
from test_terminal import RecordingTerminal

import client
import encryption_helper
import server
from client import FileProblem, FileTransfers, safe_file_name, unused_path
from encryption_helper import CHUNK_SIZE, MAX_PAYLOAD, PacketType, unpack_chunk

SIZES = [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2_000_000]

# --- Names made safe -------------------------------------------------------------------------

HOSTILE_NAMES = [
    ("../../x", "x"),
    ("C:\\Windows\\x", "x"),
    ("a/b", "b"),
    ("CON", "_CON"),
    ("nul.txt", "_nul.txt"),
    ("com1", "_com1"),
    ("a\0b.txt", "ab.txt"),
    (".", "file"),
    ("..", "file"),
    ("", "file"),
    ("notes. . ", "notes"),
    (".bashrc", "bashrc"),
    ("a\x1b[31mb", "a[31mb"),
    ("\u202etxt.exe", "txt.exe"),
    ("what?<>|*.pdf", "what_____.pdf"),
    ("C:stream", "C_stream"),
    ("📄 notes 👩\u200d💻.pdf", "📄 notes 👩\u200d💻.pdf"),
]


@pytest.mark.parametrize("hostile, safe", HOSTILE_NAMES)
def test_hostile_names_are_made_safe(hostile, safe):
    assert safe_file_name(hostile) == safe


def test_a_long_name_is_shortened_and_keeps_its_extension():
    name = safe_file_name("x" * 300 + ".pdf")
    assert len(name.encode()) <= client.SAFE_NAME_BYTES and name.endswith(".pdf")
    assert len(safe_file_name("é" * 300).encode()) <= client.SAFE_NAME_BYTES  # never cut inside a character


@given(st.text(max_size=400))
def test_any_name_becomes_one_plain_file_in_the_folder(name):
    safe = safe_file_name(name)
    assert safe and len(safe.encode()) <= client.SAFE_NAME_BYTES
    assert not set(safe) & client.FORBIDDEN and not any(map(client.unprintable, safe))
    assert safe[-1] not in ". " and safe[0] != "."
    assert safe.split(".")[0].upper() not in client.RESERVED_NAMES
    assert os.path.dirname(os.path.join("downloads", safe)) == "downloads"


def test_an_existing_file_is_never_overwritten(tmp_path):
    assert unused_path(str(tmp_path), "notes.pdf") == str(tmp_path / "notes.pdf")
    (tmp_path / "notes.pdf").write_bytes(b"mine")
    (tmp_path / "notes (1).pdf").write_bytes(b"mine too")
    assert unused_path(str(tmp_path), "notes.pdf") == str(tmp_path / "notes (2).pdf")


def test_paths_as_typed_lose_their_quotes_and_expand_the_home_folder():
    assert client.unquote(' "my notes.pdf" ') == "my notes.pdf"
    assert client.unquote("'a b'") == "a b"
    assert client.unquote("my notes.pdf") == "my notes.pdf"
    assert client.unquote("~/x.pdf") == os.path.join(os.path.expanduser("~"), "x.pdf")
    assert client.unquote("C:\\Users\\me\\x.pdf") == "C:\\Users\\me\\x.pdf"


def test_a_missing_file_or_a_folder_gets_a_clear_message(tmp_path):
    with pytest.raises(FileProblem, match="No such file"):
        client.prepare_upload("bob", str(tmp_path / "nothing.pdf"))
    with pytest.raises(FileProblem, match="is a folder"):
        client.prepare_upload("bob", str(tmp_path))


# --- Chunking and reassembly, no network ------------------------------------------------------


class FakeStream:
    """Stands in for the file stream: keeps what is sent, says everything was delivered."""

    def __init__(self):
        self.waiting, self.sent = [], []

    def send(self, ptype, payload):
        self.waiting.append(payload)
        self.sent.append(payload)
        return len(self.sent)

    def delivered(self, seq):
        return True


class Files(FileTransfers):
    """FileTransfers with its two callbacks recorded: `news` (state, transfer), `cancels` (ids),
    `accepts` (ids)."""

    def __init__(self, downloads: str):
        self.news, self.cancels, self.accepts = [], [], []
        # A change comes as the transfer then, and the live one.
        super().__init__(downloads, lambda then, live: self.news.append((then.state, live)),
                         lambda number, *answer: (self.accepts if answer else self.cancels).append(number))


def chunks_of(tmp_path, data: bytes) -> tuple[Files, list[str], list[bytes]]:
    """Return a sender's FileTransfers, the offer it makes, and every chunk it sends."""
    path = tmp_path / "original.bin"
    path.write_bytes(data)
    sender, stream = Files(str(tmp_path / "unused")), FakeStream()
    transfer = client.prepare_upload("bob", str(path))
    sender.offers[1] = transfer
    sender.answered(1, ["7"])
    while transfer.state == "moving":
        sender.fill(stream)
        stream.waiting.clear()
    assert transfer.state == "done"
    return sender, client.offer_fields(transfer), stream.sent


def accept(receiver: FileTransfers, offer: list[str]) -> None:
    """The offer arrives as transfer 7, and the user accepts it."""
    receiver.offer_arrived("alice", ["7", *offer[1:]])
    receiver.answer_offer(7, True)


def receive(tmp_path, offer: list[str], chunks: list[bytes]) -> Files:
    receiver = Files(str(tmp_path / "downloads"))
    accept(receiver, offer)
    for chunk in chunks:
        receiver.receive_chunk(chunk)
    return receiver


def ended(files: Files) -> list[tuple[str, client.Transfer]]:
    """The news that ended transfers: done, failed, cancelled."""
    return [news for news in files.news if news[0] not in ("offered", "moving")]


def last_line(transfer: client.Transfer) -> str:
    return client.format_event(client.Event("transfer", 0.0, more=(transfer,)))


@pytest.mark.parametrize("size", SIZES)
def test_chunks_fill_the_payload_and_reassemble_in_any_order(tmp_path, size):
    data = random.Random(size).randbytes(size)
    _, offer, chunks = chunks_of(tmp_path, data)
    assert len(chunks) == -(-size // CHUNK_SIZE)
    assert all(len(chunk) == MAX_PAYLOAD for chunk in chunks[:-1])
    random.Random(1).shuffle(chunks)  # the file stream delivers in order; any order works
    receiver = receive(tmp_path, offer, chunks)
    (what, transfer), = ended(receiver)
    assert what == "done" and transfer.path == str(tmp_path / "downloads" / "original.bin")
    assert open(transfer.path, "rb").read() == data
    assert os.listdir(tmp_path / "downloads") == ["original.bin"]


def test_files_lists_a_file_sent_and_numbers_only_what_the_server_took(tmp_path):
    sender, _, _ = chunks_of(tmp_path, b"x")
    (sent,) = sender.transfers
    assert not sender.event(client.Event("file-done", 0.0, "", "bob", "bob has original.bin", ("7",)))
    assert client.describe_transfer(sent) == "#7 original.bin -> bob, 1 B: done (the server has it all)"
    refused = client.prepare_upload("dave", str(tmp_path / "original.bin"))
    sender.offers[2] = refused
    sender.answered(2, client.Refused("unknown-user", "No such user."))
    assert client.describe_transfer(refused) == "original.bin -> dave, 1 B: failed (No such user: dave.)"


def test_a_file_the_server_cancels_is_said_once_in_its_words(tmp_path):
    _, offer, chunks = chunks_of(tmp_path, bytes(5000))
    receiver = receive(tmp_path, offer, chunks[:1])
    words = "original.bin from alice cancelled: alice cancelled it"
    cancelled = client.Event("file-cancelled", 0.0, "", "alice", words, ("7",))
    assert receiver.event(cancelled)  # True: no line of its own for the EVENT
    (what, transfer), = ended(receiver)
    assert last_line(transfer) == words
    assert client.describe_transfer(transfer) == f"#7 original.bin <- alice, 4.9 KB: cancelled ({words})"


def test_a_damaged_file_is_removed_and_said_so(tmp_path):
    _, offer, chunks = chunks_of(tmp_path, bytes(5000))
    number, offset, data = unpack_chunk(chunks[1])
    chunks[1] = chunks[1][:-1] + b"!"
    receiver = receive(tmp_path, offer, chunks)
    (what, transfer), = ended(receiver)
    assert what == "failed" and "SHA-256" in transfer.note
    assert os.listdir(tmp_path / "downloads") == []
    assert "partial file was removed" in last_line(transfer)


def test_a_chunk_that_does_not_fit_ends_the_download_and_tells_the_server(tmp_path):
    _, offer, chunks = chunks_of(tmp_path, bytes(5000))
    receiver = receive(tmp_path, offer, [chunks[0][:-1]])  # one byte short
    assert receiver.news[-1][0] == "failed" and receiver.cancels == [7]
    assert os.listdir(tmp_path / "downloads") == []


def test_two_files_of_one_name_are_both_kept(tmp_path):
    _, offer, chunks = chunks_of(tmp_path, b"same name")
    first, second = receive(tmp_path, offer, chunks), receive(tmp_path, offer, chunks)
    assert sorted(os.listdir(tmp_path / "downloads")) == ["original (1).bin", "original.bin"]
    assert first.news[-1][0] == second.news[-1][0] == "done"


def test_two_downloads_of_one_name_at_once_keep_its_extension(tmp_path):
    _, offer, chunks = chunks_of(tmp_path, b"same name")
    first, second = Files(str(tmp_path / "downloads")), Files(str(tmp_path / "downloads"))
    for receiver in (first, second):  # both under way before either is finished
        accept(receiver, offer)
    for receiver in (first, second):
        for chunk in chunks:
            receiver.receive_chunk(chunk)
    assert sorted(os.listdir(tmp_path / "downloads")) == ["original (1).bin", "original.bin"]


def test_a_download_that_cannot_be_written_fails_alone_and_says_why(tmp_path, monkeypatch):
    _, offer, chunks = chunks_of(tmp_path, bytes(3 * CHUNK_SIZE))
    receiver = Files(str(tmp_path / "downloads"))
    accept(receiver, offer)
    (transfer,) = receiver.transfers

    def full_disk(data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transfer.file, "write", full_disk)
    receiver.receive_chunk(chunks[0])  # raises nothing: the client and its chat go on
    assert receiver.news[-1] == ("failed", transfer) and transfer.note == "cannot write it: No space left on device"
    assert receiver.cancels == [7] and os.listdir(tmp_path / "downloads") == []  # the sender is told


def test_progress_is_reported_about_once_a_percent(tmp_path):
    receiver = receive(tmp_path, *chunks_of(tmp_path, bytes(2_000_000))[1:])
    assert 100 <= sum(what == "moving" for what, _ in receiver.news) <= 102


def test_a_terminal_shows_a_few_lines_of_progress_and_a_last_one(tmp_path):
    terminal = RecordingTerminal()

    def show(then: client.Transfer, live: client.Transfer) -> None:
        terminal.show_event(client.Event("transfer", 0.0, more=(then, live)), "bob")

    _, offer, chunks = chunks_of(tmp_path, bytes(100 * CHUNK_SIZE))
    receiver = FileTransfers(str(tmp_path / "downloads"), show, lambda number, *answer: None)
    accept(receiver, offer)
    for chunk in chunks:
        receiver.receive_chunk(chunk)
    path = tmp_path / "downloads" / "original.bin"
    assert terminal.shown == ["original.bin: 25% of 112.5 KB", "original.bin: 50% of 112.5 KB",
                              "original.bin: 75% of 112.5 KB", f"saved {path} (112.5 KB, SHA-256 checked)"]


def test_a_crashed_server_leaves_no_transfer_behind(tmp_path):
    folder = tmp_path / "data" / "transfers"
    folder.mkdir(parents=True)
    (folder / "3.part").write_bytes(b"half a file")
    server.ChatServer(server.ServerConfig(data_dir=str(tmp_path / "data"), kdf_iterations=1000)).close()
    assert os.listdir(folder) == []


# --- Through a real server --------------------------------------------------------------------


def random_file(tmp_path, size: int, name: str = "data.bin") -> tuple[str, bytes]:
    data = random.Random(size).randbytes(size)
    path = tmp_path / name
    path.write_bytes(data)
    return str(path), data


def outcome(made: client.ChatClient, timeout: float = 60.0) -> tuple[str, client.Transfer]:
    """Return the next news of `made` that ends a transfer: done, failed or cancelled."""
    while True:
        transfer = next_event(made, "transfer", timeout).more[0]
        if not transfer.active:
            return transfer.state, transfer


def friends(make_client, chat_server, tmp_path, *names, **options) -> list[client.ChatClient]:
    """Members that accept every file offered (test_hostile_files.py covers asking first)."""
    options.setdefault("accept_files", True)
    return [member(make_client, chat_server.address, name, downloads=str(tmp_path / name), **options)
            for name in names]


def transfers_folder(chat_server) -> list[str]:
    return os.listdir(os.path.join(chat_server.config.data_dir, "transfers"))


@pytest.mark.parametrize("size", SIZES)
def test_a_file_reaches_one_member_byte_for_byte(chat_server, make_client, tmp_path, size):
    alice, bob = friends(make_client, chat_server, tmp_path, "alice", "bob")
    path, data = random_file(tmp_path, size)
    transfer = alice.send_file("bob", path)
    assert transfer.number > 0  # the server's number for it
    offered = f"alice offers data.bin ({encryption_helper.describe_size(size)})"
    assert next_event(bob, "file").text == f"{offered}: /accept {transfer.number} or /decline {transfer.number}"
    what, received = outcome(bob)
    assert what == "done" and open(received.path, "rb").read() == data
    # The server's "file-done" and the end of alice's own upload come in either order (an
    # empty file ends at once): wait for both, and let neither swallow the other.
    ended, told = None, None
    while ended is None or told is None:
        event = next_event(alice)
        if event.kind == "transfer" and not event.more[0].active:
            ended = event.more[0].state
        elif event.kind == "file-done":
            told = event.text
    assert ended == "done" and told == "bob has data.bin"
    wait_until(lambda: not transfers_folder(chat_server), what="the server's copy deleted")


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX's")
def test_a_received_file_is_never_made_executable(chat_server, make_client, tmp_path):
    alice, bob = friends(make_client, chat_server, tmp_path, "alice", "bob")
    path, _ = random_file(tmp_path, 10)
    os.chmod(path, 0o755)  # even if the sender's copy is
    alice.send_file("bob", path)
    what, received = outcome(bob)
    assert what == "done" and not os.stat(received.path).st_mode & 0o111


def test_a_shared_file_reaches_everyone_else_in_the_room(chat_server, make_client, tmp_path):
    alice, bob, carol = friends(make_client, chat_server, tmp_path, "alice", "bob", "carol")
    path, data = random_file(tmp_path, 1 << 20)
    alice.send_file("", path)
    for receiver in (bob, carol):
        what, received = outcome(receiver)
        assert what == "done" and open(received.path, "rb").read() == data
    assert sorted(next_event(alice, "file-done").user for _ in range(2)) == ["bob", "carol"]


def test_files_arrive_whole_through_thirty_percent_loss(start_server, make_client, tmp_path, quick_recovery):
    lossy = start_server(loss=0.3, seed=13)
    options = dict(timing=lossy_timing(), loss=0.3, seed=31)
    alice, bob, carol = friends(make_client, lossy, tmp_path, "alice", "bob", "carol", **options)
    path, data = random_file(tmp_path, 300_000)
    alice.send_file("", path)
    for receiver in (bob, carol):
        what, received = outcome(receiver)
        assert what == "done" and open(received.path, "rb").read() == data
    assert bob.protocol.file_stream.stats["duplicates"] + alice.protocol.file_stream.stats["retransmitted"] > 0


def hold_upload(made: client.ChatClient, chunks: int) -> threading.Event:
    """Let `made` send only `chunks` chunks of its files until the returned gate is set."""
    files, gate, sent = made.protocol.files, threading.Event(), [0]
    original = files.send_chunk

    def send_chunk(stream, transfer):
        if sent[0] >= chunks and not gate.is_set():
            return False  # not now: fill() tries again on the next poll
        sent[0] += 1
        return original(stream, transfer)

    files.send_chunk = send_chunk
    return gate


def download_of(made: client.ChatClient) -> client.Transfer:
    """Wait until `made` is receiving a file and has some of it; return that transfer."""
    files = made.protocol.files
    wait_until(lambda: any(t.done_bytes and t.active for t in files.transfers), what="a download under way")
    return next(t for t in files.transfers if t.active)


def heard(made: client.ChatClient, count: int) -> list[str]:
    """The next `count` lines others said (one's own lines come back as events too)."""
    lines = []
    while len(lines) < count:
        event = next_event(made, "chat")
        lines += [event.text] if event.user != made.name else []
    return lines


def test_chat_lines_arrive_while_a_file_is_on_its_way(chat_server, make_client, tmp_path):
    alice, bob = friends(make_client, chat_server, tmp_path, "alice", "bob")
    gate = hold_upload(alice, 20)
    path, data = random_file(tmp_path, 2_000_000)
    alice.send_file("bob", path)
    download = download_of(bob)
    for line in ("one", "two", "three"):
        alice.say(line)
        bob.say(line.upper())
    assert heard(bob, 3) == ["one", "two", "three"]
    assert heard(alice, 3) == ["ONE", "TWO", "THREE"]
    assert download.state == "moving" and download.done_bytes < download.size  # still on its way
    gate.set()
    alice.wake()
    what, received = outcome(bob)
    assert what == "done" and open(received.path, "rb").read() == data


def test_a_stalled_receiver_holds_back_neither_the_others_nor_the_chat(start_server, make_client, tmp_path,
                                                                       monkeypatch):
    most = [0]

    class MeasuredRelay(server.FileRelay):
        def fill(self, session):
            super().fill(session)
            most[0] = max(most[0], session.file_stream.buffered_bytes())

    monkeypatch.setattr(server, "FileRelay", MeasuredRelay)
    alice, bob, carol = friends(make_client, start_server(), tmp_path, "alice", "bob", "carol")
    path, data = random_file(tmp_path, 2_000_000)
    with carol.lock:  # carol's network thread stops: she reads and acknowledges nothing
        alice.send_file("", path)
        what, received = outcome(bob)
        assert what == "done" and open(received.path, "rb").read() == data
        alice.say("still here")
        assert next_event(bob, "chat").text == "still here"
    what, received = outcome(carol)  # once she reads again, she gets it too
    assert what == "done" and open(received.path, "rb").read() == data
    # Never a whole file in memory: at most a window and the FILL queue for a receiver.
    assert 0 < most[0] <= (32 + encryption_helper.FILL) * MAX_PAYLOAD


def a_download_under_way(make_client, chat_server, tmp_path):
    """Return alice, bob, and bob's download of a file alice sends him, held half-way."""
    alice, bob = friends(make_client, chat_server, tmp_path, "alice", "bob")
    hold_upload(alice, 10)
    alice.send_file("bob", random_file(tmp_path, 100_000)[0])
    return alice, bob, download_of(bob)


def test_the_sender_cancelling_removes_the_receivers_partial_file(chat_server, make_client, tmp_path):
    alice, bob, download = a_download_under_way(make_client, chat_server, tmp_path)
    assert os.path.exists(download.path) and download.path.endswith(".part")
    assert [t.state for t in alice.cancel_files()] == ["cancelled"]
    assert outcome(bob)[0] == "cancelled"
    assert os.listdir(tmp_path / "bob") == []
    wait_until(lambda: not transfers_folder(chat_server), what="the server's copy deleted")


def test_the_receiver_cancelling_stops_the_sender(chat_server, make_client, tmp_path):
    alice, bob, _ = a_download_under_way(make_client, chat_server, tmp_path)
    bob.cancel_files()
    assert outcome(bob)[0] == "cancelled" and os.listdir(tmp_path / "bob") == []
    assert "bob cancelled data.bin" in next_event(alice, "file-declined").text  # then the end of it
    what, upload = outcome(alice)
    assert what == "cancelled"
    wait_until(lambda: not transfers_folder(chat_server), what="the server's copy deleted")


def test_a_receiver_leaving_mid_transfer_ends_it_for_the_sender(chat_server, make_client, tmp_path):
    alice, bob, _ = a_download_under_way(make_client, chat_server, tmp_path)
    bob.bye()
    assert outcome(alice)[0] == "cancelled"
    assert os.listdir(tmp_path / "bob") == []  # its session ended: the partial file went with it
    wait_until(lambda: not transfers_folder(chat_server), what="the server's copy deleted")


def test_a_file_over_the_limit_is_refused_before_any_of_it_is_sent(start_server, make_client, tmp_path):
    small = start_server(max_file_mb=0.5)
    alice, bob = friends(make_client, small, tmp_path, "alice", "bob")
    with pytest.raises(client.Refused, match="the limit is 0.5 MB"):
        alice.send_file("bob", random_file(tmp_path, 600_000)[0])
    what, transfer = outcome(alice)
    assert what == "failed" and "limit" in last_line(transfer)
    assert alice.protocol.file_stream.stats["sent"] == 0 and not transfers_folder(small)


def test_an_upload_that_never_comes_is_cancelled_and_frees_its_place(tmp_path):
    chat = server.ChatServer(server.ServerConfig(data_dir=str(tmp_path), kdf_iterations=1000, quiet=True),
                             log=lambda line: None)
    try:
        relay = chat.files
        gone = types.SimpleNamespace(name="alice", address=("10.0.0.1", 1))  # a sender no longer here
        upload = relay.open(gone, "x.bin", "10", "0" * 64, [], now=100.0)
        relay.expire(100.0 + server.UPLOAD_IDLE_LIMIT - 1)
        assert upload.id in relay.uploads
        relay.expire(100.0 + server.UPLOAD_IDLE_LIMIT + 1)
        assert upload.id not in relay.uploads and os.listdir(relay.folder) == []
    finally:
        chat.close()


def test_a_stopped_server_closes_its_temporary_files(tmp_path):
    chat = server.ChatServer(server.ServerConfig(data_dir=str(tmp_path), kdf_iterations=1000, quiet=True),
                             log=lambda line: None)
    sender = types.SimpleNamespace(name="alice", address=("10.0.0.1", 1))
    upload = chat.files.open(sender, "x.bin", "10", "0" * 64, [], now=0.0)
    chat.close()
    assert upload.file.closed  # Windows could not delete them otherwise


def test_a_checked_upload_reaches_its_receivers_after_its_sender_leaves(chat_server, make_client, tmp_path):
    alice, bob = friends(make_client, chat_server, tmp_path, "alice", "bob")
    path, data = random_file(tmp_path, 200_000)
    with bob.lock:  # bob reads nothing for now: the server holds the file for him
        alice.send_file("bob", path)
        assert outcome(alice)[0] == "done"  # the server has it all, checked
        alice.bye()
    what, received = outcome(bob)
    assert what == "done" and open(received.path, "rb").read() == data


def test_closing_a_client_mid_download_leaves_no_file_open_or_behind(chat_server, make_client, tmp_path):
    alice, bob, download = a_download_under_way(make_client, chat_server, tmp_path)
    bob.close()
    assert download.file.closed and os.listdir(tmp_path / "bob") == []


def test_offers_to_nobody_are_refused(chat_server, make_client, tmp_path):
    alice, = friends(make_client, chat_server, tmp_path, "alice")
    path = random_file(tmp_path, 10)[0]
    friends(make_client, chat_server, tmp_path, "bob")[0].bye()  # bob has an account, but is gone
    for to, words in (("", "Nobody else"), ("zed", "No such user"), ("bob", "bob is not online"),
                      ("alice", "That is you")):
        with pytest.raises(client.Refused, match=words):
            alice.send_file(to, path)


def test_a_member_sends_only_a_few_files_at_once(chat_server, make_client, tmp_path):
    alice, bob = friends(make_client, chat_server, tmp_path, "alice", "bob")
    hold_upload(alice, 0)
    path = random_file(tmp_path, 10_000)[0]
    for _ in range(server.MAX_FILES_PER_MEMBER):
        alice.send_file("bob", path)
    with pytest.raises(client.Refused, match="wait for one to finish"):
        alice.send_file("bob", path)


def test_chunks_on_the_chat_channel_or_for_no_transfer_harm_nothing(chat_server, make_client, tmp_path):
    alice, bob = friends(make_client, chat_server, tmp_path, "alice", "bob")
    with pytest.raises(client.Refused, match="file stream"):
        alice.call(PacketType.FILE_CHUNK, "x")
    with pytest.raises(client.Refused, match="No such transfer"):
        alice.call(PacketType.FILE_CANCEL, "99")
    with alice.lock:
        alice.protocol.file_stream.send(PacketType.FILE_CHUNK, b"\0" * 16 + b"junk")
    alice.wake()
    alice.say("fine")
    assert next_event(bob, "chat").text == "fine"


# --- The real client.py, scripted ------------------------------------------------------------


def test_send_in_the_scripted_client_lands_in_the_downloads_folder(chat_server, tmp_path):
    path, data = random_file(tmp_path, 300_000, "my notes.pdf")
    address = ["--host", chat_server.address[0], "--port", str(chat_server.address[1])]
    bob = Program("client.py", *address, "--downloads", str(tmp_path / "bob"))
    alice = Program("client.py", *address)
    try:
        bob.type("/register", "bob", "pass", "pass", "/login", "bob", "pass", "juara")
        bob.expect("joined lobby")
        alice.type("/register", "alice", "pass", "pass", "/login", "alice", "pass", "juara")
        alice.expect("joined lobby: bob here")
        alice.type(f'/send bob "{path}"')
        offered = "alice offers my notes.pdf (293.0 KB): /accept 1 or /decline 1"
        assert bob.expect("alice offers").endswith(offered)
        bob.type("/accept 1")
        saved = bob.expect("saved ")
        assert saved == f"saved {tmp_path / 'bob' / 'my notes.pdf'} (293.0 KB, SHA-256 checked)"
        assert alice.expect("sent my notes.pdf") == "sent my notes.pdf (293.0 KB) to bob"
        assert (tmp_path / "bob" / "my notes.pdf").read_bytes() == data
        alice.type("/files", "/send bob", f"/send bob {tmp_path}")
        assert "#1 my notes.pdf -> bob, 293.0 KB: done" in alice.expect("#1")
        alice.expect("Usage: /send USER FILE")
        alice.expect("is a folder")
    finally:
        alice.stop()
        bob.stop()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="kills a process the hard way")
def test_a_receiver_killed_mid_transfer_leaves_only_a_part_file(chat_server, make_client, tmp_path):
    address = ["--host", chat_server.address[0], "--port", str(chat_server.address[1])]
    bob = Program("client.py", *address, "--downloads", str(tmp_path / "bob"))
    try:
        bob.type("/register", "bob", "pass", "pass", "/login", "bob", "pass", "juara")
        bob.expect("joined lobby")
        alice, = friends(make_client, chat_server, tmp_path, "alice")
        hold_upload(alice, 30)
        alice.send_file("bob", random_file(tmp_path, 200_000, "photo.jpg")[0])
        bob.expect("alice offers photo.jpg")
        bob.type("/accept 1")
        wait_until(lambda: os.path.exists(tmp_path / "bob" / "photo.jpg.part") and
                   os.path.getsize(tmp_path / "bob" / "photo.jpg.part"), what="a partial download")
    finally:
        bob.stop()  # SIGKILL: nothing of the client runs after it
    assert os.listdir(tmp_path / "bob") == ["photo.jpg.part"]
