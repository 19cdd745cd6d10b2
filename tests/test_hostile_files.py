"""A hostile classmate and files (attacks 5 and 6 of the security review), run again.

Attack 5: `/share` to a room filled a member's disk unasked (73 files, 1.46 GB in 60 s), and
saved `tugas.pdf.exe` as sent. Attack 6: seven sessions trickling one chunk per file every
50 s held every upload place, so an honest /send was refused. Each test runs the attack
against a real server and real clients and shows that it fails; waits are on events.
"""

import os

import pytest
from conftest import member, next_event, wait_until
from test_files import hold_upload, outcome, random_file

import client
import server


def victim_and(make_client, chat_server, tmp_path, *names):
    """Return bob, who accepts nothing unasked, and members (named) that send to him."""
    bob = member(make_client, chat_server.address, "bob", downloads=str(tmp_path / "bob"))
    return [bob] + [member(make_client, chat_server.address, name, downloads=str(tmp_path / name))
                    for name in names]


def session_of(chat_server, name: str) -> server.Session:
    return chat_server.loop.chat.online[name]


def test_a_shared_file_writes_nothing_and_sends_no_chunk_before_the_receiver_accepts(
        chat_server, make_client, tmp_path):
    bob, mallory = victim_and(make_client, chat_server, tmp_path, "mallory")
    path, data = random_file(tmp_path, 300_000, "big.bin")
    number = mallory.send_file("", path).number
    offer = next_event(bob, "file")
    assert offer.text == f"mallory offers big.bin (293.0 KB): /accept {number} or /decline {number}"
    assert outcome(mallory)[0] == "done"  # the server holds it all
    assert not os.path.exists(tmp_path / "bob")  # nothing on bob's disk...
    assert session_of(chat_server, "bob").file_stream.next_seq == 1  # ...nor on his wire
    assert bob.answer_offer(number).number == number
    what, received = outcome(bob)
    assert what == "done" and open(received.path, "rb").read() == data


def test_a_declined_offer_tells_the_sender_and_leaves_nothing(chat_server, make_client, tmp_path):
    bob, mallory = victim_and(make_client, chat_server, tmp_path, "mallory")
    number = mallory.send_file("bob", random_file(tmp_path, 5000)[0]).number
    next_event(bob, "file")
    assert bob.answer_offer(0, accept=False).number == number  # 0: the newest offer
    assert next_event(mallory, "file-declined").text == "bob declined data.bin"
    assert not os.path.exists(tmp_path / "bob") and bob.answer_offer(number) is None


def test_an_offer_not_accepted_lapses_for_each_receiver(chat_server, make_client, tmp_path,
                                                        monkeypatch):
    monkeypatch.setattr(server, "OFFER_LAPSE", 1.0)  # a minute, in the real server
    bob, mallory, carol = victim_and(make_client, chat_server, tmp_path, "mallory", "carol")
    mallory.send_file("", random_file(tmp_path, 5000)[0])
    next_event(carol, "file")
    carol.answer_offer()
    assert outcome(carol)[0] == "done"
    assert next_event(mallory, "file-declined").text == "bob did not accept data.bin in 1 s"
    state, lapsed = outcome(bob)
    assert state == "cancelled" and "lapsed" in lapsed.said and not os.path.exists(tmp_path / "bob")
    wait_until(lambda: not chat_server.loop.chat.files.uploads, what="the upload forgotten")


def test_offers_waiting_for_one_receiver_are_capped(chat_server, make_client, tmp_path):
    bob, *senders = victim_and(make_client, chat_server, tmp_path, "mal1", "mal2", "mal3")
    path = random_file(tmp_path, 1000)[0]
    for sender in senders[:2]:
        for _ in range(server.MAX_FILES_PER_MEMBER):
            sender.send_file("bob", path)
    senders[2].send_file("bob", path)  # the fifth offer waiting for bob
    with pytest.raises(client.Refused, match="Too many offers wait for an answer"):
        senders[2].send_file("bob", path)
    waiting = [t for t in bob.transfers() if t.state == "offered"]
    assert len(waiting) == server.MAX_OFFERS_WAITING and not os.path.exists(tmp_path / "bob")


@pytest.mark.parametrize("sent, saved", [
    ("tugas.pdf.exe", "tugas.pdf.exe.download"),
    ("résumé.scr", "résumé.scr.download"),
    ("tugas.pdf" + " " * 40 + ".exe", "tugas.pdf" + " " * 40 + ".exe.download"),
    ("setup.EXE. . .", "setup.EXE.download"),
    ("run.sh", "run.sh.download"),
    ("notes.pdf", "notes.pdf"),
])
def test_executable_types_are_saved_with_a_harmless_suffix_and_said(chat_server, make_client,
                                                                    tmp_path, sent, saved):
    bob, mallory = victim_and(make_client, chat_server, tmp_path, "mallory")
    path, data = random_file(tmp_path, 100, sent)
    mallory.send_file("bob", path)
    next_event(bob, "file")
    bob.answer_offer()
    what, received = outcome(bob)
    assert os.listdir(tmp_path / "bob") == [saved] and open(received.path, "rb").read() == data
    said = client.describe_transfer(received, final=True)
    assert ("executable type" in said) == (saved != sent)


def test_a_trickling_upload_loses_its_place_and_the_sender_is_told(chat_server, make_client,
                                                                   tmp_path, monkeypatch):
    monkeypatch.setattr(server, "UPLOAD_IDLE_LIMIT", 1.0)  # 15 s, in the real server
    bob, mallory = victim_and(make_client, chat_server, tmp_path, "mallory")
    hold_upload(mallory, 1)  # one chunk, then nothing
    mallory.send_file("bob", random_file(tmp_path, 100_000)[0])
    state, trickled = outcome(mallory)
    assert state == "cancelled" and trickled.said.endswith("no part of it came for 1 s")
    wait_until(lambda: not chat_server.loop.chat.files.uploads, what="its place freed")


def test_an_honest_send_gets_a_place_while_attackers_hold_all_the_others(
        chat_server, make_client, tmp_path):
    names = [f"mal{n}" for n in range(server.MAX_TRANSFERS // server.MAX_FILES_PER_MEMBER)]
    bob, alice, *attackers = victim_and(make_client, chat_server, tmp_path, "alice", *names)
    path, data = random_file(tmp_path, 100_000)
    for attacker, target in zip(attackers, names[1:] + names[:1], strict=True):
        hold_upload(attacker, 1)  # trickling: a chunk, then nothing for now
        for _ in range(server.MAX_FILES_PER_MEMBER):
            attacker.send_file(target, path)
    uploads = chat_server.loop.chat.files.uploads
    assert len(uploads) == server.MAX_TRANSFERS
    alice.send_file("bob", path)  # not refused: an attacker's idlest file gives up its place
    held = [upload.sender.name for upload in list(uploads.values())]
    assert "alice" in held and len(held) == server.MAX_TRANSFERS
    next_event(bob, "file")
    bob.answer_offer()
    what, received = outcome(bob)
    assert what == "done" and open(received.path, "rb").read() == data
