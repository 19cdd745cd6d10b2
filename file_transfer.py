"""Sending files through the chat: `/send bob notes.pdf`, `/share slides.pdf`.

Both scripts import this module: the client's side is `FileTransfers`, the server's
`FileRelay`. Neither opens a socket or reads a clock; they are fed packets and the time,
and put what they have to send on the session's channels, so tests drive them directly.

How a file travels, alice to bob:

    alice                               server                                bob
      FILE_OFFER [bob, name, size, sha] ->
                                  <- OK [re, 7]   (or ERROR: too big, no such user...)
                                           EVENT "file" [..., 7, name, size, sha] ->
      FILE_CHUNK [7, 0, data]  ~~~~>  transfers/7.part  ~~~~>  FILE_CHUNK [7, 0, data]
      FILE_CHUNK [7, 1152, ...] ~~~>    (on disk)        ~~~>  downloads/name.part
         ...                                                   SHA-256 checked, renamed
                         <- EVENT "file-done" [..., 7]  (bob has every byte)

* **Two streams.** Every session has two reliable channels (encryption_helper.Channel):
  the chat's, and the file stream, whose packets carry FLAG_FILE_STREAM in the header,
  ACKs too. Each has its own numbers, window and retransmissions. On one channel a chat
  line sent after a lost chunk would wait until that chunk is resent, because a channel
  delivers in order: head-of-line blocking, the reason HTTP/2 over TCP stalls on a loss.
  QUIC gives each stream its own numbering for the same reason; so does this chat.
  FILE_OFFER, FILE_CANCEL and the EVENTs about files go on the chat's channel.
* **Store and forward.** The server writes each upload to `DATA_DIR/transfers/ID.part`
  and reads each receiver's chunks back from that file, as fast as that receiver's file
  stream takes them - at most FILL chunks waiting per stream. So the server never holds
  a whole file in memory; a receiver that stalls or leaves holds back neither the sender
  nor the other receivers; and chunks are relayed while the upload still comes in. The
  file is deleted once every receiver has it or is gone.
* **Checked, then named.** The offer carries the whole file's SHA-256. The server
  checks it when the upload is complete; each receiver writes `NAME.part`, checks it
  once every byte is there, and only then renames it to NAME. A crash at any end leaves
  at most a `.part` file, never one named as if complete; a mismatch removes it.
* **Names made safe.** A name comes from another user, so it is treated as hostile:
  `safe_file_name` keeps no folder, drive, reserved Windows device name, control
  character or trailing dot, and `unused_path` never overwrites (`notes (1).pdf`).
"""

import collections
import dataclasses
import hashlib
import os
import re
import unicodedata

from auth import Refusal, valid_username
from encryption_helper import (
    CHUNK_SIZE,
    PacketError,
    PacketType,
    pack_chunk,
    pack_fields,
    prepare_body,
    unpack_chunk,
    unpack_fields,
)

MB = 1 << 20  # bytes in a megabyte, as the limits count them
DEFAULT_MAX_FILE_MB = 20
# Chunks kept waiting in a file stream beyond the ones in flight: enough to refill its
# window at once when ACKs come, few enough that memory stays small (32 x 1.2 KB).
FILL = 32
SHA_HEX = re.compile(r"[0-9a-f]{64}")
MAX_NAME_BYTES = 255  # most file systems' limit on one name
SAFE_NAME_BYTES = 200  # what a saved name is cut to: room left for " (12)" and ".part"
# Windows will not create a file with these names, with any extension ("con.txt" too).
RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{n}" for n in range(10)), *(f"LPT{n}" for n in range(10))}
FORBIDDEN = set('<>:"/\\|?*')  # characters Windows refuses in a file name
UNPRINTABLE = {"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp"}  # Unicode categories a file name loses
HISTORY = 50  # finished transfers /files still lists


class FileProblem(Exception):
    """A file that cannot be sent or saved; str() says why, in words a user understands."""


# --- Sizes, names, hashes ----------------------------------------------------------------


def describe_size(size: int) -> str:
    """Return a size as people read it: 512 B, 14.2 KB, 2.1 MB."""
    if size < 1024:
        return f"{size} B"
    if size < MB:
        return f"{size / 1024:.1f} KB"
    return f"{size / MB:.1f} MB"


def safe_file_name(name: str) -> str:
    """Return `name` made safe to save: no folders, drives, devices, controls; not too long.

    >>> safe_file_name("../../etc/passwd"), safe_file_name("C:\\\\Windows\\\\x"), safe_file_name("con.txt")
    ('passwd', 'x', '_con.txt')
    """
    name = unicodedata.normalize("NFC", name)
    name = re.split(r"[/\\]", name.replace("\0", ""))[-1]  # the last part: no folder, no "..", no drive
    name = "".join("_" if ch in FORBIDDEN else ch for ch in name if not unprintable(ch))
    name = name.strip(" .")  # Windows drops trailing dots and spaces; a leading dot hides a file
    if not name:
        return "file"
    if name.split(".")[0].upper().rstrip(" ") in RESERVED_NAMES:
        name = "_" + name
    return shorten(name, SAFE_NAME_BYTES)


def unprintable(character: str) -> bool:
    """Is it a control, a format character (bidi overrides...), unassigned, or a line break?
    Emoji's zero-width joiner and variation selector are kept: they are part of the emoji."""
    return unicodedata.category(character) in UNPRINTABLE and character not in "\u200d\ufe0f"


def shorten(name: str, limit: int) -> str:
    """Return `name` cut to `limit` UTF-8 bytes, its extension kept when it is short."""
    if len(name.encode("utf-8")) <= limit:
        return name
    stem, extension = os.path.splitext(name)
    if len(extension.encode("utf-8")) > 20:
        stem, extension = name, ""
    room = limit - len(extension.encode("utf-8"))
    stem = stem.encode("utf-8")[:room].decode("utf-8", "ignore").rstrip(" .")
    return (stem or "file") + extension


def unused_path(folder: str, name: str) -> str:
    """Return folder/name, or folder/name (1), (2)... : the first that does not exist yet."""
    stem, extension = os.path.splitext(name)
    candidate, number = os.path.join(folder, name), 0
    while os.path.lexists(candidate):
        number += 1
        candidate = os.path.join(folder, f"{stem} ({number}){extension}")
    return candidate


def file_sha256(path: str) -> str:
    """Return the SHA-256 of a file, read in pieces (a big file is never all in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for piece in iter(lambda: file.read(MB), b""):
            digest.update(piece)
    return digest.hexdigest()


def chunk_offsets(size: int) -> range:
    """Return where each chunk of a file of `size` bytes starts."""
    return range(0, size, CHUNK_SIZE)


def chunk_length(size: int, offset: int) -> int:
    """Return how long the chunk at `offset` is: CHUNK_SIZE, or what is left at the end."""
    return min(CHUNK_SIZE, size - offset)


def file_event_fields(kind: str, when: float, room: str, user: str, text: str, *more: str) -> bytes:
    """Return an EVENT's payload about a file: the five usual fields, then the file's."""
    return pack_fields(kind, str(int(when)), room, user, text, *more)


# --- The client's side --------------------------------------------------------------------


@dataclasses.dataclass
class Transfer:
    """One file on its way, to or from us; what /files and the progress bar show."""

    direction: str  # "up": we send it; "down": we receive it
    peer: str  # to whom ("bob", or "the room"), or from whom
    name: str  # the file's name as offered (shown with printable())
    size: int
    sha256: str
    path: str  # up: the file we read; down: the .part file we write, then the final name
    id: int = 0  # the server's number for it; 0 until the offer is accepted
    done: int = 0  # bytes sent into the file stream, or received
    state: str = "offered"  # offered, sending, checking, done, failed, cancelled
    started: float = 0.0  # when bytes began to move (the time we are given, not read)
    note: str = ""  # how it ended
    file: object = None  # the open file, while bytes move
    last_seq: int = 0  # up: the file stream's number of the last chunk
    offsets: set = dataclasses.field(default_factory=set)  # down: the chunks that arrived

    @property
    def active(self) -> bool:
        return self.state in ("offered", "sending", "checking")


class FileTransfers:
    """A client's files, both ways: offers, chunks out of the file, reassembly, checks.

    `fill` puts chunks of the files being sent into the file stream while it has room;
    `receive_chunk` writes an arriving chunk where its offset says, so chunks may come
    in any order; a download is checked once every chunk is there. What the user should
    see is left in `news` as (what, transfer) pairs: "progress", "done", "failed". A
    request the protocol must send (a FILE_CANCEL) is left in `cancels`.
    """

    def __init__(self, downloads: str = "downloads"):
        self.downloads = downloads
        self.offers: dict[int, Transfer] = {}  # request number -> offer not answered yet
        self.uploads: dict[int, Transfer] = {}  # transfer id -> file we send
        self.incoming: dict[int, Transfer] = {}  # transfer id -> file we receive
        self.finished: collections.deque = collections.deque(maxlen=HISTORY)
        self.news: list[tuple[str, Transfer]] = []
        self.cancels: list[int] = []  # ids to tell the server about

    # --- Sending ---

    @staticmethod
    def prepare(to: str, path: str) -> Transfer:
        """Check a file we are asked to send and hash it; raise FileProblem if it cannot go."""
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise FileProblem(f"No such file: {path}")
        if os.path.isdir(path):
            raise FileProblem(f"{path} is a folder; send the files in it one by one (or a .zip of it).")
        try:
            size, sha = os.path.getsize(path), file_sha256(path)
        except OSError as error:
            raise FileProblem(f"Cannot read {path}: {error.strerror or error}") from None
        name = shorten(os.path.basename(path), MAX_NAME_BYTES)
        return Transfer("up", to or "the room", name, size, sha, path)

    @staticmethod
    def offer_fields(transfer: Transfer) -> list[str]:
        """Return a FILE_OFFER's fields: [to ('' = the room), name, size, SHA-256]."""
        to = "" if transfer.peer == "the room" else transfer.peer
        return [to, transfer.name, str(transfer.size), transfer.sha256]

    def offered(self, seq: int, transfer: Transfer) -> None:
        self.offers[seq] = transfer

    def answered(self, seq: int, fields, now: float) -> None:
        """The server answered an offer: OK [id] starts the upload; a refusal ends it."""
        transfer = self.offers.pop(seq, None)
        if transfer is None:
            return
        if transfer.state != "offered":  # cancelled before the server answered
            if isinstance(fields, list) and fields and fields[0].isdigit():
                self.cancels.append(int(fields[0]))
            return
        if isinstance(fields, Exception) or not fields or not fields[0].isdigit():
            self.end(transfer, "failed", str(fields) if isinstance(fields, Exception) else "refused")
            return
        transfer.id, transfer.started = int(fields[0]), now
        try:
            transfer.file = open(transfer.path, "rb")
        except OSError as error:
            self.end(transfer, "failed", f"cannot read it: {error.strerror or error}", tell=True)
            return
        transfer.state = "sending"
        self.uploads[transfer.id] = transfer

    def fill(self, stream, now: float) -> None:
        """Put chunks of the files being sent into the file stream, in turn, while it has room."""
        sending = [t for t in self.uploads.values() if t.state == "sending" and t.done < t.size]
        while sending and len(stream.waiting) < FILL:
            for transfer in list(sending):
                if not self.send_chunk(stream, transfer) or transfer.done >= transfer.size:
                    sending.remove(transfer)
        for transfer in list(self.uploads.values()):
            if transfer.state == "sending" and transfer.done >= transfer.size and stream.delivered(transfer.last_seq):
                self.end(transfer, "done", "the server has it all")

    def send_chunk(self, stream, transfer: Transfer) -> bool:
        """Read the next chunk from disk and queue it; False if the file could not be read."""
        want = chunk_length(transfer.size, transfer.done)
        try:
            data = transfer.file.read(want)
        except OSError as error:
            data, why = b"", f"cannot read it: {error.strerror or error}"
        else:
            why = "the file got shorter while it was sent"
        if len(data) != want:
            self.end(transfer, "failed", why, tell=True)
            return False
        transfer.last_seq = stream.send(PacketType.FILE_CHUNK, pack_chunk(transfer.id, transfer.done, data))
        transfer.done += want
        self.progress(transfer)
        return True

    # --- Receiving ---

    def offer_arrived(self, sender: str, more: list[str], now: float) -> None:
        """An EVENT "file" [id, name, size, sha]: make the .part file and wait for chunks."""
        if len(more) != 4 or not more[0].isdigit() or not more[2].isdigit() or not SHA_HEX.fullmatch(more[3]):
            return  # unreadable: no file is started, its chunks are ignored
        transfer = Transfer("down", sender, more[1], int(more[2]), more[3], "", int(more[0]), started=now)
        self.incoming[transfer.id] = transfer
        try:
            os.makedirs(self.downloads, exist_ok=True)
            transfer.path = self.create_part(safe_file_name(transfer.name))
            transfer.file = open(transfer.path, "r+b")
        except OSError as error:
            self.end(transfer, "failed", f"cannot save in {self.downloads}: {error.strerror or error}", tell=True)
            return
        transfer.state = "sending"
        self.progress(transfer)
        if transfer.size == 0:
            self.check(transfer)

    def create_part(self, name: str) -> str:
        """Create NAME.part (or NAME (1).part...) exclusively; return its path."""
        while True:
            path = unused_path(self.downloads, name + ".part")
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)))
                return path
            except FileExistsError:
                continue  # another download took that name a moment ago

    def receive_chunk(self, payload: bytes) -> None:
        """A FILE_CHUNK from the file stream: write it where its offset says."""
        try:
            number, offset, data = unpack_chunk(payload)
        except PacketError:
            return
        transfer = self.incoming.get(number)
        if transfer is None or transfer.state != "sending":
            return  # cancelled, failed or unknown: its chunks still in flight are dropped
        if offset >= transfer.size or offset % CHUNK_SIZE or len(data) != chunk_length(transfer.size, offset):
            self.end(transfer, "failed", "a chunk did not fit the file", tell=True)
            return
        if offset in transfer.offsets:
            return  # had it already
        transfer.file.seek(offset)
        transfer.file.write(data)
        transfer.offsets.add(offset)
        transfer.done += len(data)
        self.progress(transfer)
        if transfer.done == transfer.size:
            self.check(transfer)

    def check(self, transfer: Transfer) -> None:
        """Every byte is there: compare the SHA-256, then give the file its real name."""
        transfer.state = "checking"
        transfer.file.close()
        if file_sha256(transfer.path) != transfer.sha256:
            self.end(transfer, "failed", "its SHA-256 does not match: the file arrived damaged")
            return
        final = transfer.path[: -len(".part")]
        while True:
            final = unused_path(os.path.dirname(final), os.path.basename(final))
            try:
                os.rename(transfer.path, final)  # the name says "complete" only now
                break
            except FileExistsError:  # Windows: made a moment ago; take the next name
                continue
        transfer.path = final
        self.end(transfer, "done", "SHA-256 checked")

    # --- Ending ---

    def end(self, transfer: Transfer, state: str, note: str, tell: bool = False) -> None:
        """Finish a transfer; a receiver's partial file is removed unless it is done."""
        if not transfer.active:
            return
        transfer.state, transfer.note = state, note
        if transfer.file is not None:
            transfer.file.close()
        if transfer.direction == "down" and state != "done" and transfer.path.endswith(".part"):
            try:
                os.remove(transfer.path)
            except OSError:
                pass  # never made, or already gone
        (self.uploads if transfer.direction == "up" else self.incoming).pop(transfer.id, None)
        self.finished.append(transfer)
        self.news.append((state, transfer))
        if tell and transfer.id:
            self.cancels.append(transfer.id)

    def event(self, kind: str, more: list[str]) -> None:
        """A "file-cancelled" EVENT [id]: the transfer ended for everyone."""
        number = int(more[0]) if more and more[0].isdigit() else 0
        transfer = self.uploads.get(number) or self.incoming.get(number)
        if kind == "file-cancelled" and transfer:
            self.end(transfer, "cancelled", "cancelled")

    def cancel(self, number: int = 0) -> list[Transfer]:
        """Stop our transfers (all, or the one numbered); return them. The server is told."""
        stopped = [t for t in [*self.offers.values(), *self.uploads.values(), *self.incoming.values()]
                   if t.active and number in (0, t.id)]
        for transfer in stopped:
            self.end(transfer, "cancelled", "you cancelled it", tell=True)
        return stopped  # an offer stays in `offers`: its id, once answered, is cancelled too

    def end_all(self, why: str) -> None:
        """The session ended: every transfer with it (the server forgets them too)."""
        for transfer in [*self.offers.values(), *self.uploads.values(), *self.incoming.values()]:
            self.end(transfer, "failed", why)
        self.offers.clear()
        self.cancels.clear()

    def progress(self, transfer: Transfer) -> None:
        """Report progress each time another percent (or the whole file) is done."""
        step = max(transfer.size // 100, 1)
        if transfer.done >= transfer.size or transfer.done // step != (transfer.done - CHUNK_SIZE) // step:
            self.news.append(("progress", transfer))

    def listing(self) -> list[Transfer]:
        """Every transfer of this session we know of: in progress, then finished."""
        active = [*self.offers.values(), *self.uploads.values(), *self.incoming.values()]
        return [t for t in active if t.active] + list(self.finished)


# --- The server's side --------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Upload:
    """A file coming in from its sender, kept in a temporary file until every receiver has it."""

    id: int
    sender: object  # the sender's server.Session
    name: str
    size: int
    sha256: str
    path: str  # DATA_DIR/transfers/ID.part
    writer: object  # the temporary file, written as chunks come
    reader: object  # the same file, read for each receiver
    receivers: dict = dataclasses.field(default_factory=dict)  # id(session) -> Receiver, until done or gone
    received: int = 0
    checked: bool = False  # every byte is in, and the SHA-256 matched
    digest: object = dataclasses.field(default_factory=hashlib.sha256)


@dataclasses.dataclass(eq=False)
class Receiver:
    """Where one receiver is in one file: what has gone into its file stream."""

    session: object  # server.Session
    upload: Upload
    offer_seq: int  # the "file" EVENT's number on its chat channel: no chunk goes before it arrives
    sent: int = 0  # bytes put into its file stream
    last_seq: int = 0  # the file stream's number of the last chunk put in


class FileRelay:
    """The server's part in sending files: offers, uploads to disk, relaying to each receiver.

    Chunks go to a receiver only after it has acknowledged the "file" EVENT (the two
    streams are independent, so a chunk could otherwise overtake its offer), and only
    while its file stream holds fewer than FILL waiting: the relay buffers nothing itself.
    """

    # A member may send a few files at once; more would only share the same bandwidth.
    MAX_PER_MEMBER = 3
    # Files in transfer on the whole server: with --max-file-mb 20, at most 400 MB of disk.
    MAX_TRANSFERS = 20

    def __init__(self, chat, max_file_mb: float = DEFAULT_MAX_FILE_MB):
        self.chat = chat
        self.max_file_mb = max_file_mb
        self.limit = int(max_file_mb * MB)
        self.folder = os.path.join(chat.config.data_dir, "transfers")
        self.uploads: dict[int, Upload] = {}  # transfer id -> upload
        self.receiving: dict[int, list[Receiver]] = {}  # id(session) -> the files it is being sent
        self.next_id = 1
        self.clear_folder()

    def clear_folder(self) -> None:
        """Delete what a crash left in the transfers folder: files never completed."""
        os.makedirs(self.folder, exist_ok=True)
        for name in os.listdir(self.folder):
            if name.endswith(".part"):
                os.remove(os.path.join(self.folder, name))

    # --- Requests: FILE_OFFER and FILE_CANCEL, on a member's chat channel ---

    def handle_offer(self, request) -> list[str]:
        """FILE_OFFER [to, name, size, SHA-256] -> OK [id]; refused before any byte is sent."""
        session = request.session
        to, name, size, sha = unpack_fields(request.packet.payload, 4)
        size = self.check_offer(session, name, size, sha)
        members = self.receivers_for(session, to)
        upload = self.open_upload(session, name, size, sha)
        for member in members:
            self.offer_to(upload, member)
        if size == 0:
            self.upload_complete(upload)
        self.chat.log.event(session.address, session.name,
                            f"offers {name!r} ({describe_size(size)}) to {to or 'the room'}: transfer {upload.id}")
        return [str(upload.id)]

    def check_offer(self, session, name: str, size: str, sha: str) -> int:
        """Return the offered size; refuse a file too big, a bad offer, or one too many."""
        if not size.isdigit() or not SHA_HEX.fullmatch(sha) or not name or len(name.encode()) > MAX_NAME_BYTES:
            raise Refusal("bad-request", "A file offer is [to, name (1-255 bytes), size, SHA-256 in hex].")
        if int(size) > self.limit:
            raise Refusal("too-big", f"That file is {describe_size(int(size))}; the limit is {self.max_file_mb:g} MB.")
        if sum(upload.sender is session for upload in self.uploads.values()) >= self.MAX_PER_MEMBER:
            raise Refusal("too-many", f"You are sending {self.MAX_PER_MEMBER} files already; wait for one to finish.")
        if len(self.uploads) >= self.MAX_TRANSFERS:
            raise Refusal("busy", "The server is busy with other files; try again in a while.")
        return int(size)

    def receivers_for(self, session, to: str) -> list:
        """Return who gets the file: the user named, or everyone else in the sender's room."""
        if not to:
            others = [m for m in self.chat.rooms.of(session).members.values() if m is not session]
            if not others:
                raise Refusal("nobody", "Nobody else is in the room to share it with.")
            return others
        member = self.chat.online.get(to.lower())
        if member is None:
            raise Refusal("unknown-user", f"{to if valid_username(to) else 'That user'} is not online.")
        if member is session:
            raise Refusal("to-self", "That is you; send it to someone else.")
        return [member]

    def open_upload(self, session, name: str, size: int, sha: str) -> Upload:
        number, self.next_id = self.next_id, self.next_id + 1
        path = os.path.join(self.folder, f"{number}.part")
        try:
            writer = open(path, "wb", buffering=0)  # unbuffered: what is written can be read back at once
            reader = open(path, "rb")
        except OSError as error:
            self.chat.log.problem(f"cannot open {path}: {error}")
            raise Refusal("server-error", "The server cannot store files now; try again later.") from None
        upload = Upload(number, session, name, size, sha, path, writer, reader)
        self.uploads[number] = upload
        return upload

    def offer_to(self, upload: Upload, member) -> None:
        """Send a receiver the "file" EVENT; remember its number, to know when it has arrived."""
        text = f"{upload.sender.name} is sending {upload.name} ({describe_size(upload.size)})"
        room = self.chat.rooms.of(member).name if member.room else ""
        body = self.event_body("file", room, upload.sender.name, text, upload.id, upload.name, upload.size,
                               upload.sha256)
        seq = member.channel.send(PacketType.EVENT, body)
        if not seq:
            self.chat.delivery.give_up_on(member)  # its queue is full: it cannot keep up
            return
        receiver = Receiver(member, upload, seq)
        upload.receivers[id(member)] = receiver
        self.receiving.setdefault(id(member), []).append(receiver)
        self.chat.delivery.touch(member)

    def handle_cancel(self, request) -> list[str]:
        """FILE_CANCEL [id]: the sender's stops the transfer for all; a receiver's, for itself."""
        (number,) = unpack_fields(request.packet.payload, 1)
        session = request.session
        upload = self.uploads.get(int(number)) if number.isdigit() else None
        if upload is not None and upload.sender is session:
            self.cancel(upload, f"{session.name} cancelled it", tell_sender=False)
            return ["cancelled"]
        receiver = upload.receivers.get(id(session)) if upload else None
        if receiver is None:
            raise Refusal("no-such-transfer", "No such transfer (finished already?).")
        self.drop_receiver(receiver, f"{session.name} cancelled {upload.name}")
        return ["cancelled"]

    @staticmethod
    def refuse_chunk(request) -> None:
        raise Refusal("bad-request", "A FILE_CHUNK goes on the file stream (FLAG_FILE_STREAM), not the chat's.")

    # --- The file stream ---

    def receive_stream(self, session, packet, now: float) -> None:
        """A packet on a member's file stream: acknowledgements, and chunks of its uploads."""
        _, ready = session.file_stream.receive(packet, now)
        for delivered in ready:
            if delivered.seq and delivered.type == PacketType.FILE_CHUNK:
                self.take_chunk(session, delivered.payload)
        self.chat.delivery.touch(session)

    def take_chunk(self, session, payload: bytes) -> None:
        """Write an upload's next chunk to its temporary file; chunks come in order, so at its end."""
        try:
            number, offset, data = unpack_chunk(payload)
        except PacketError:
            return
        upload = self.uploads.get(number)
        if upload is None or upload.sender is not session or upload.received == upload.size:
            return  # cancelled meanwhile (its chunks in flight still come), or not the sender's
        if offset != upload.received or len(data) != chunk_length(upload.size, offset):
            self.cancel(upload, "its chunks did not fit the file")
            return
        try:
            upload.writer.write(data)
        except OSError as error:
            self.chat.log.problem(f"cannot write {upload.path}: {error}")
            self.cancel(upload, "the server could not store it")
            return
        upload.digest.update(data)
        upload.received += len(data)
        for receiver in upload.receivers.values():
            self.chat.delivery.touch(receiver.session)  # more to relay
        if upload.received == upload.size:
            self.upload_complete(upload)

    def upload_complete(self, upload: Upload) -> None:
        if upload.digest.hexdigest() != upload.sha256:
            self.cancel(upload, "it arrived damaged (SHA-256 mismatch)")
            return
        upload.checked = True
        upload.writer.close()
        self.release_if_unused(upload)

    def pump(self, sessions, now: float) -> None:
        """For each session: note the files it now has whole, and refill its file stream."""
        for session in sessions:
            for receiver in list(self.receiving.get(id(session), ())):
                if self.has_it_all(receiver):
                    self.delivered(receiver)
            self.fill(session)

    def fill(self, session) -> None:
        """Put chunks into the session's file stream, one file after the other in turn, while it has room."""
        stream = session.file_stream
        ready = [r for r in self.receiving.get(id(session), ())
                 if session.channel.delivered(r.offer_seq) and r.sent < r.upload.received]
        while ready and len(stream.waiting) < FILL:
            for receiver in list(ready):
                upload = receiver.upload
                upload.reader.seek(receiver.sent)
                data = upload.reader.read(chunk_length(upload.size, receiver.sent))
                receiver.last_seq = stream.send(PacketType.FILE_CHUNK, pack_chunk(upload.id, receiver.sent, data))
                receiver.sent += len(data)
                if receiver.sent >= upload.received or not data:
                    ready.remove(receiver)

    def has_it_all(self, receiver: Receiver) -> bool:
        session, upload = receiver.session, receiver.upload
        if not upload.checked or receiver.sent < upload.size:
            return False
        if upload.size == 0:
            return session.channel.delivered(receiver.offer_seq)
        return session.file_stream.delivered(receiver.last_seq)

    def delivered(self, receiver: Receiver) -> None:
        """A receiver acknowledged every chunk: tell the sender, and let the file go if it was the last."""
        upload = receiver.upload
        self.forget_receiver(receiver)
        self.tell_sender(upload, "file-done", receiver.session.name, f"{receiver.session.name} has {upload.name}")
        self.release_if_unused(upload)

    # --- Ending ---

    def drop_receiver(self, receiver: Receiver, why: str) -> None:
        upload = receiver.upload
        self.forget_receiver(receiver)
        self.tell_sender(upload, "file-declined", receiver.session.name, why)
        self.release_if_unused(upload)

    def forget_receiver(self, receiver: Receiver) -> None:
        receiver.upload.receivers.pop(id(receiver.session), None)
        mine = self.receiving.get(id(receiver.session), [])
        if receiver in mine:
            mine.remove(receiver)
        if not mine:
            self.receiving.pop(id(receiver.session), None)

    def release_if_unused(self, upload: Upload) -> None:
        """Nobody left to receive it: delete the temporary file (and stop an upload still coming)."""
        if upload.receivers:
            return
        if not upload.checked:
            self.cancel(upload, "nobody is left to receive it")
        else:
            self.close(upload)

    def cancel(self, upload: Upload, why: str, tell_sender: bool = True) -> None:
        """End a transfer for everyone: its receivers and (unless it asked) its sender hear why."""
        if tell_sender:
            self.tell_sender(upload, "file-cancelled", upload.sender.name, f"{upload.name} not sent: {why}")
        for receiver in list(upload.receivers.values()):
            self.forget_receiver(receiver)
            text = f"{upload.name} from {upload.sender.name} cancelled: {why}"
            self.chat.delivery.push(receiver.session, self.event_body("file-cancelled", "", upload.sender.name,
                                                                      text, upload.id))
        self.close(upload)

    def close(self, upload: Upload) -> None:
        self.uploads.pop(upload.id, None)
        upload.writer.close()
        upload.reader.close()
        try:
            os.remove(upload.path)
        except OSError as error:
            self.chat.log.problem(f"cannot delete {upload.path}: {error}")

    def drop(self, session) -> None:
        """A session ended: its uploads stop, and it leaves the files it was receiving."""
        for upload in [u for u in self.uploads.values() if u.sender is session]:
            self.cancel(upload, f"{session.name} left", tell_sender=False)
        for receiver in list(self.receiving.get(id(session), ())):
            self.drop_receiver(receiver, f"{session.name} left before {receiver.upload.name} arrived")

    def tell_sender(self, upload: Upload, kind: str, user: str, text: str) -> None:
        sender = upload.sender
        if self.chat.sessions.get(sender.address) is sender:
            self.chat.delivery.push(sender, self.event_body(kind, "", user, text, upload.id))

    def event_body(self, kind: str, room: str, user: str, text: str, *more):
        """Return an EVENT about a file, ready for the wire: the five usual fields, then the file's."""
        fields = file_event_fields(kind, self.chat.wall_clock(), room, user, text, *(str(m) for m in more))
        return prepare_body(fields, self.chat.cipher)

    def buffered_bytes(self) -> int:
        """Return the file bytes the server holds in memory: those in its members' file streams."""
        return sum(session.file_stream.buffered_bytes() for session in self.chat.sessions.values())
