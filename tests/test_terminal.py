"""The text interface: what the screen shows, how long lines are split, and the line being typed.

The pure functions (printable, split_message, names_me, describe_arrival, use_color) are
tested directly. The redraw of the line being typed is tested twice: with a stand-in for
readline, its output fed to `ScreenModel` (just enough of a terminal to see what the
output leaves on screen); and for real, client.py in a pseudo-terminal with a real server.
"""

import codecs
import io
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from conftest import EVENT_WAIT, ROOT, member, next_event
from hypothesis import given
from hypothesis import strategies as st

import client

# --- Just enough of a terminal (VT100/xterm) to see what output leaves on the screen -------

ESCAPE = re.compile(r"\x1b\[([?>]?)([0-9;]*)([@-~])|\x1b[()][0-9A-Za-z]|\x1b[=>78cDEM]")
UNFINISHED_ESCAPE = re.compile(r"\x1b(\[[?>]?[0-9;]*|[()])?")


class ScreenModel:
    """Rows of characters and a cursor, changed by printed text, control characters and the
    ANSI sequences readline and client.py use (cursor moves, erase, insert, delete)."""

    def __init__(self, rows: int = 24, columns: int = 80):
        self.rows, self.columns = rows, columns
        self.grid = [[" "] * columns for _ in range(rows)]
        self.row = self.column = 0  # column == columns: at the right margin, about to wrap
        self.unfinished = ""  # an escape sequence cut in two by a read
        self.bells = 0

    def feed(self, text: str) -> None:
        text, self.unfinished, at = self.unfinished + text, "", 0
        while at < len(text):
            if text[at] == "\x1b":
                found = ESCAPE.match(text, at)
                if found is None and UNFINISHED_ESCAPE.fullmatch(text, at):
                    self.unfinished = text[at:]
                    return
                if found is not None:
                    self.escape(found.group(0), found.group(1) or "", found.group(2) or "", found.group(3) or "")
                at = found.end() if found else at + 1
            else:
                self.character(text[at])
                at += 1

    def character(self, c: str) -> None:
        if c == "\r":
            self.column = 0
        elif c == "\n":
            self.line_feed()
        elif c == "\b":
            self.column = max(0, min(self.column, self.columns - 1) - 1)
        elif c == "\a":
            self.bells += 1
        elif c == "\t":
            self.column = min(self.columns - 1, (self.column // 8 + 1) * 8)
        elif c >= " ":
            if self.column >= self.columns:  # the deferred wrap of a real terminal
                self.column = 0
                self.line_feed()
            self.grid[self.row][self.column] = c
            self.column += 1

    def line_feed(self) -> None:
        if self.row == self.rows - 1:
            self.grid = self.grid[1:] + [[" "] * self.columns]
        else:
            self.row += 1

    def escape(self, sequence: str, private: str, parameters: str, final: str) -> None:
        if not sequence.startswith("\x1b[") or private:
            return  # keypad modes, bracketed paste and the like change nothing on screen
        numbers = [int(n) for n in parameters.split(";") if n]
        n = numbers[0] if numbers else 0
        column = min(self.column, self.columns - 1)
        line = self.grid[self.row]
        if final in "ABCDG":
            moves = {"A": (-max(n, 1), 0), "B": (max(n, 1), 0), "C": (0, max(n, 1)), "D": (0, -max(n, 1))}
            if final == "G":
                self.column = min(max(n, 1), self.columns) - 1
                return
            rows, columns = moves[final]
            self.row = min(max(self.row + rows, 0), self.rows - 1)
            self.column = min(max(column + columns, 0), self.columns - 1)
        elif final in "Hf":
            self.row, self.column = (numbers + [1, 1])[0] - 1, (numbers[1:] + [1])[0] - 1
        elif final == "K":
            start, end = {0: (column, self.columns), 1: (0, column + 1), 2: (0, self.columns)}[n]
            line[start:end] = [" "] * (end - start)
        elif final == "J":
            line[column:] = [" "] * (self.columns - column)
            for below in self.grid[self.row + 1:]:
                below[:] = [" "] * self.columns
        elif final == "@":
            line[column:] = ([" "] * max(n, 1) + line[column:])[: self.columns - column]
        elif final == "P":
            line[column:] = (line[column + max(n, 1):] + [" "] * max(n, 1))[: self.columns - column]

    def lines(self) -> list[str]:
        return ["".join(row).rstrip() for row in self.grid]

    def cursor_line(self) -> str:
        return self.lines()[self.row]


def test_the_screen_model_wraps_moves_and_erases():
    screen = ScreenModel(rows=3, columns=5)
    screen.feed("abcdefg\x1b[1A\r\x1b[2C\x1b[K")
    assert screen.lines() == ["ab", "fg", ""] and (screen.row, screen.column) == (0, 2)
    screen.feed("\x1b[")  # a sequence cut in two by a read
    screen.feed("J")
    assert screen.lines() == ["ab", "", ""]


# --- printable: every printable sequence shown, nothing that moves the cursor -------------


@pytest.mark.parametrize("text", [
    "👩\u200d💻 at work",  # woman technologist: two emoji and a zero width joiner
    "\u2764\ufe0f and \u2764\ufe0e",  # the emoji and the text style of a heart
    "👍🏽 a skin tone",
    "cafe\u0301, ma\u0303e, \u0928\u092e\u0938\u094d\u0924\u0947",  # combining marks
    "🇮🇩 🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # flags: regional letters, tags
    "zero\u200bwidth space, soft\u00adhyphen",
])
def test_printable_keeps_every_printable_sequence(text):
    assert client.printable(text) == text


@pytest.mark.parametrize("text, shown", [
    ("\x1b[2Jclear", "?[2Jclear"),  # ESC: the start of every escape sequence
    ("bell\a", "bell?"),
    ("c1 \x9b31m", "c1 ?31m"),  # a C1 control: CSI in one character
    ("del\x7f", "del?"),
    ("back\bspace", "back?space"),
    ("\u202egnp.exe", "?gnp.exe"),  # right-to-left override: would show 'exe.png'
    ("\u2066isolate\u2069", "?isolate?"),
    ("half \ud800 a character", "half ? a character"),  # a lone surrogate cannot be printed
])
def test_printable_replaces_what_could_move_the_cursor_or_change_the_terminal(text, shown):
    assert client.printable(text) == shown


def test_printable_shows_a_tab_as_spaces_and_indents_line_breaks():
    assert client.printable("tab:\tend") == "tab:    end"
    assert client.printable("one\ntwo\r\nthree\rfour\u2028five") == "one\n    two\n    three\n    four\n    five"


# --- split_message: long lines go as several messages ----------------------------------------


def test_a_line_that_fits_is_sent_whole():
    assert client.split_message("hello   world  ", 100) == ["hello   world  "]
    assert client.split_message("x" * client.MAX_TEXT_BYTES) == ["x" * client.MAX_TEXT_BYTES]


def test_a_long_line_is_cut_between_words():
    assert client.split_message("one two three four", 9) == ["one two", "three", "four"]
    assert client.split_message("one two   three", 8) == ["one two", "three"]  # the spaces at a cut go


def test_a_word_longer_than_the_limit_is_cut_between_characters():
    assert client.split_message("abcdefghij klm", 4) == ["abcd", "efgh", "ij", "klm"]


def test_a_cut_never_splits_a_character():
    assert client.split_message("é" * 5, 4) == ["éé", "éé", "é"]  # 2 bytes each
    technologist = "👩\u200d💻"  # 11 bytes of UTF-8: three characters
    assert "".join(client.split_message(technologist * 3, 15)) == technologist * 3


def test_the_parts_of_a_2000_character_line_each_fit_in_a_message():
    line = " ".join(f"word{n:04}" for n in range(222))[:2000]
    parts = client.split_message(line)
    assert len(parts) == 2 and " ".join(parts) == line
    assert all(len(part.encode()) <= client.MAX_TEXT_BYTES for part in parts)


words = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12), max_size=40)


@given(words.map(" ".join) | st.text(st.characters(blacklist_categories=("Cs",)), max_size=200),
       st.integers(min_value=4, max_value=40))
def test_split_parts_fit_and_give_the_text_back(text, limit):
    parts = client.split_message(text, limit)
    assert all(0 < len(part.encode("utf-8")) <= limit for part in parts)
    assert all(part.strip() for part in parts)
    # Joined back, with the whitespace dropped at the cuts, the parts are the text.
    assert re.fullmatch(r"\s*" + r"\s*".join(re.escape(part) for part in parts) + r"\s*", text)
    if text.strip() and len(text.encode("utf-8")) <= limit:
        assert parts == [text]


# --- Mentions, arrivals, colours -------------------------------------------------------------


@pytest.mark.parametrize("text, mentioned", [
    ("hi alice", True), ("Hi ALICE!", True), ("@alice look", True), ("alice: lunch?", True),
    ("malice", False), ("alicexyz", False), ("alice_2 is here", False), ("nobody", False),
])
def test_a_mention_is_my_name_as_a_word_in_any_case(text, mentioned):
    assert client.names_me(text, "alice") == mentioned
    assert not client.names_me(text, None)


@pytest.mark.parametrize("members, shown", [
    (["alice"], "joined lobby: nobody else here"),
    (["alice", "bob"], "joined lobby: bob here"),
    (["alice", "bob", "carol"], "joined lobby: bob and carol here"),
    (["alice", "bob", "carol", "dave"], "joined lobby: bob, carol and dave here"),
    (["alice", "bob", "carol", "dave", "eve", "frank"], "joined lobby: bob, carol and 3 others here"),
    (["alice", "bob", "+40"], "joined lobby: bob and 40 others here"),  # WHO's "+N": N more did not fit
    (["bob", "carol", "+1"], "joined lobby: bob, carol and 1 other here"),
])
def test_the_arrival_line_says_who_is_here(members, shown):
    assert client.describe_arrival("joined lobby, 9 here", list(members), "Alice") == shown


class FakeStream:
    def __init__(self, terminal: bool):
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def test_colour_only_on_a_terminal_without_no_color():
    assert client.use_color(FakeStream(True), {}, platform="linux")
    assert not client.use_color(FakeStream(False), {}, platform="linux")
    assert not client.use_color(FakeStream(True), {"NO_COLOR": "1"}, platform="linux")
    assert client.use_color(FakeStream(True), {"NO_COLOR": ""}, platform="linux")  # no-color.org: empty is unset
    assert not client.use_color(FakeStream(True), {"TERM": "dumb"}, platform="linux")
    assert not client.use_color(io.StringIO(), {}, platform="linux")


def test_colour_on_windows_only_in_windows_terminal():
    assert client.use_color(FakeStream(True), {"WT_SESSION": "1"}, platform="win32")
    assert not client.use_color(FakeStream(True), {}, platform="win32")  # the old console: no ANSI
    assert not client.use_color(FakeStream(True), {"WT_SESSION": "1", "NO_COLOR": "1"}, platform="win32")


# --- What the terminal shows of events: colours, the bell, history after the arrival line -----


class RecordingTerminal(client.Terminal):
    """A Terminal without a keyboard: the answers it will give, and everything shown and asked."""

    def __init__(self, *answers: str, color: bool = False, bell: bool = False):
        self.interactive, self.color, self.bell = False, color, bell
        self.lock, self.held, self.alive = threading.Lock(), None, lambda: None
        self.prompt, self.secret = "", False
        self.queued, self.shown, self.prompts = list(answers), [], []

    def show(self, text: str, again=None) -> None:
        self.shown.append(text)

    def ask(self, prompt: str, secret: bool = False) -> str:
        self.prompts.append(prompt)
        self.alive()
        if not self.queued:
            raise client.EndOfInput
        return self.queued.pop(0)


def event(kind: str, user: str = "bob", text: str = "hi", more: tuple = ()) -> client.Event:
    return client.Event(kind, 0.0, "lobby", user, text, more)


def test_a_line_that_names_me_is_highlighted_with_the_bell():
    terminal = RecordingTerminal(color=True, bell=True)
    terminal.show_event(event("chat", text="hi Alice, lunch?"), "alice")
    terminal.show_event(event("chat", text="no mention"), "alice")
    terminal.show_event(event("chat", user="ALICE", text="alice here"), "alice")  # my own words: no alarm
    mention, plain, mine = terminal.shown
    assert mention == client.BOLD_YELLOW + client.format_event(event("chat", text="hi Alice, lunch?")) \
        + client.PLAIN + client.BELL
    assert "\x1b" not in plain + mine and "\a" not in plain + mine


def test_private_messages_have_their_own_colour_both_ways():
    terminal = RecordingTerminal(color=True)
    terminal.show_event(event("private", text="psst"), "alice")
    terminal.show_event(event("private", user="alice", text="psst back", more=("bob",)), "alice")
    received, sent = terminal.shown
    assert received.startswith(client.MAGENTA) and received.endswith(client.PLAIN)
    assert re.fullmatch(re.escape(client.MAGENTA) + r"\[\d\d:\d\d\] -> bob: psst back" + re.escape(client.PLAIN),
                        sent)


def test_without_colour_lines_are_plain():
    terminal = RecordingTerminal()
    terminal.show_event(event("chat", text="alice!"), "alice")
    terminal.show_event(event("private"), "alice")
    terminal.show_event(event("chat", user="alice", text="hello"), "alice")
    assert "\x1b" not in "".join(terminal.shown) and "\a" not in "".join(terminal.shown)
    assert re.fullmatch(r"\[\d\d:\d\d\] you: hello", terminal.shown[-1])


def test_what_arrives_during_a_join_is_shown_after_the_arrival_line():
    terminal = RecordingTerminal()
    terminal.hold()
    terminal.show_event(event("history", text="old news"), "alice")
    terminal.show_event(event("join", user="carol", text=""), "alice")
    terminal.release("joined lobby: bob here.")
    terminal.show_event(event("chat", text="now"), "alice")
    assert [line.split("] ")[-1] for line in terminal.shown] == ["joined lobby: bob here.", "bob: old news",
                                                                  "carol joined", "bob: now"]


def test_state_changes_are_not_printed_and_a_files_progress_only_by_quarters():
    terminal = RecordingTerminal()
    terminal.show_event(event("state", text="connected"), "alice")
    download = client.Transfer("receive", "bob", "notes.pdf", 400, "0" * 64, "notes.pdf.part", 7,
                               state="moving")
    for done in (0, 4, 100, 104, 400):
        download.done_bytes = done
        download.state = "done" if done == 400 else "moving"
        download.note = "SHA-256 checked"
        terminal.show_event(event("transfer", more=(download,)), "alice")
    assert terminal.shown == ["notes.pdf: 25% of 400 B", "saved notes.pdf.part (400 B, SHA-256 checked)"]


# --- Terminal.show: a line above the prompt, and the prompt drawn again below it --------------


class FakeReadline:
    """What Terminal uses of readline: the line typed so far."""

    def __init__(self, typed: str):
        self.typed = typed

    def get_line_buffer(self) -> str:
        return self.typed


def shown_above(monkeypatch, typed: str, prompt: str = "> ", secret: bool = False) -> ScreenModel:
    """Put the prompt and `typed` on a screen, show a message; return the screen."""
    monkeypatch.setattr(client, "readline", FakeReadline(typed))
    output = io.StringIO()
    monkeypatch.setattr(client.sys, "stdout", output)
    terminal = RecordingTerminal()
    terminal.prompt, terminal.secret = prompt, secret
    screen = ScreenModel(rows=10, columns=40)
    screen.feed(prompt + ("" if secret else typed))
    client.Terminal.show(terminal, "[12:00] bob: news")
    screen.feed(output.getvalue().replace("\n", "\r\n"))  # a terminal's driver adds the CR (ONLCR)
    return screen


def test_a_message_keeps_the_typed_line_below_it(monkeypatch):
    screen = shown_above(monkeypatch, "hello world")
    assert screen.lines()[:2] == ["[12:00] bob: news", "> hello world"]
    assert (screen.row, screen.column) == (1, 13)  # at the end of what was typed


def test_a_message_during_a_password_prompt_redraws_only_the_prompt(monkeypatch):
    screen = shown_above(monkeypatch, "alice", prompt="Password: ", secret=True)
    assert screen.lines()[:2] == ["[12:00] bob: news", "Password:"]  # what is typed is not shown
    assert (screen.row, screen.column) == (1, 10)


# --- For real: client.py in a pseudo-terminal --------------------------------------------------

pty_only = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX only")


@pty_only
def test_echo_is_off_between_questions_and_back_for_good_once_the_terminal_is_given_back(monkeypatch):
    import termios

    master, follower = os.openpty()
    with open(follower) as keyboard:  # closes the follower too
        monkeypatch.setattr(client.sys, "stdin", keyboard)
        terminal = client.Terminal(interactive=True)

        def echoing() -> bool:
            return bool(termios.tcgetattr(follower)[3] & termios.ECHO)

        assert echoing()
        terminal.echo(False)  # as the keyboard thread does after each answer
        assert not echoing()
        terminal.restore()
        assert echoing()
        terminal.echo(False)  # a last answer read while the client ends
        assert echoing()
    os.close(master)

# Become the session's controlling terminal (getpass opens /dev/tty), then run client.py.
CONTROLLING_TERMINAL = ("import os, sys; os.close(os.open(os.ttyname(0), os.O_RDWR)); "
                        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


class TerminalSession:
    """client.py on a pseudo-terminal of 80 x 24, its output read on a thread into a ScreenModel."""

    def __init__(self, address, **environment):
        import fcntl
        import struct
        import termios

        self.master, follower = os.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES", "NO_COLOR")}
        env.update(TERM="xterm", INPUTRC="/dev/null", PYTHONIOENCODING="utf-8", **environment)
        self.process = subprocess.Popen(
            [sys.executable, "-c", CONTROLLING_TERMINAL, "client.py", "--host", address[0], "--port", str(address[1])],
            cwd=ROOT, stdin=follower, stdout=follower, stderr=follower, env=env, start_new_session=True)
        os.close(follower)
        self.screen = ScreenModel()
        self.raw = ""  # everything the program wrote
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # the program ended: reading the pty fails with EIO
                data = b""
            with self.changed:
                if not data:
                    self.raw += "\x00ended"
                    self.changed.notify_all()
                    return
                text = decoder.decode(data)
                self.raw += text
                self.screen.feed(text)
                self.changed.notify_all()

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait_for(self, condition, what: str) -> None:
        """Wait until condition(screen) holds; fail, showing the screen, if it never does."""
        deadline = time.monotonic() + EVENT_WAIT
        with self.changed:
            while not condition(self.screen):
                if time.monotonic() > deadline or self.raw.endswith("\x00ended"):
                    pytest.fail(f"never saw {what}; the screen:\n" + "\n".join(self.screen.lines()))
                self.changed.wait(timeout=0.1)

    def wait_for_text(self, text: str) -> None:
        self.wait_for(lambda screen: any(text in line for line in screen.lines()), repr(text))

    def log_in(self, name: str, password: str, room_password: str = "juara") -> None:
        for prompt, answer in [("Type /register or /login", "/login"), ("Username:", name),
                               ("Password:", password), ("Room password for lobby:", room_password)]:
            self.wait_for(lambda screen, prompt=prompt: screen.cursor_line().startswith(prompt), prompt)
            self.type(answer + "\r")
        self.wait_for(typed_line(">", 2), "the chat's prompt")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.reader.join(timeout=10)
        os.close(self.master)


@pytest.fixture
def terminal_session(chat_server, make_client):
    """Return a function that starts client.py on a pseudo-terminal, for a registered `name`."""
    sessions = []

    def start(name: str = "alice", **environment) -> TerminalSession:
        make_client(chat_server.address).register(name, "pass")
        session = TerminalSession(chat_server.address, **environment)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.close()


def typed_line(expected: str, column: int):
    """A condition: the cursor's line reads `expected` and the cursor is at `column`."""
    return lambda screen: screen.cursor_line() == expected and screen.column == column


@pty_only
def test_a_message_arriving_while_typing_keeps_what_was_typed(chat_server, make_client, terminal_session):
    bob = member(make_client, chat_server.address, "bob")
    alice = terminal_session("alice")
    alice.log_in("alice", "pass")
    alice.type("hello wor")
    alice.wait_for(typed_line("> hello wor", 11), "the line typed")
    bob.say("big news")
    alice.wait_for(lambda screen: screen.lines()[screen.row - 1].endswith("bob: big news")
                   and typed_line("> hello wor", 11)(screen), "the message above an unchanged line")
    alice.type("ld\r")
    assert next_event(bob, "chat").text == "big news"  # bob's own line comes back as an event too
    assert next_event(bob, "chat").text == "hello world"
    alice.wait_for_text("] you: hello world")


@pty_only
def test_a_password_typed_before_its_prompt_is_never_echoed(chat_server, make_client, terminal_session,
                                                             monkeypatch):
    import server

    alice = terminal_session("alice")
    checking, go_on = threading.Event(), threading.Event()
    slow_check = server.srp_challenge

    def held_check(*args):
        checking.set()
        go_on.wait(timeout=EVENT_WAIT)  # the login takes as long as the test wants
        return slow_check(*args)

    monkeypatch.setattr(server, "srp_challenge", held_check)
    for prompt, answer in [("Type /register or /login", "/login"), ("Username:", "alice"), ("Password:", "pass")]:
        alice.wait_for(lambda screen, prompt=prompt: screen.cursor_line().startswith(prompt), prompt)
        alice.type(answer + "\r")
    assert checking.wait(timeout=EVENT_WAIT)  # the login is being checked: no prompt is up
    alice.type("juara\r")  # the room's password, typed before its prompt appears
    go_on.set()
    alice.wait_for(lambda screen: screen.cursor_line().startswith("Room password for lobby:"), "the prompt")
    alice.type("juara\r")  # getpass discarded what was typed ahead (as sudo and ssh do): typed again
    alice.wait_for_text("joined lobby")
    assert "juara" not in alice.raw


@pty_only
def test_a_line_that_names_me_rings_and_is_highlighted_in_a_terminal(chat_server, make_client, terminal_session):
    bob = member(make_client, chat_server.address, "bob")
    alice = terminal_session("alice")
    alice.log_in("alice", "pass")
    bob.say("lunch, Alice?")
    alice.wait_for_text("bob: lunch, Alice?")
    assert re.search(re.escape(client.BOLD_YELLOW) + r"\[\d\d:\d\d\] bob: lunch, Alice\?"
                     + re.escape(client.PLAIN + client.BELL), alice.raw)


@pty_only
def test_no_colour_in_a_terminal_with_no_color_set(chat_server, make_client, terminal_session):
    bob = member(make_client, chat_server.address, "bob")
    alice = terminal_session("alice", NO_COLOR="1")
    alice.log_in("alice", "pass")
    bob.say("lunch, Alice?")
    alice.wait_for_text("bob: lunch, Alice?")
    assert client.BOLD_YELLOW not in alice.raw and client.BELL in alice.raw  # the bell still rings


def test_a_closed_terminal_does_not_make_showing_a_line_fail(monkeypatch):
    terminal = RecordingTerminal()  # no keyboard thread: only show() is tried
    terminal.prompt = ""

    class HungUp(io.StringIO):
        def write(self, text):
            raise OSError(5, "Input/output error")  # writing to a terminal whose window closed

    monkeypatch.setattr(client.sys, "stdout", HungUp())
    client.Terminal.show(terminal, "[INFO] Connection closed.")  # raises nothing: the goodbye was said
