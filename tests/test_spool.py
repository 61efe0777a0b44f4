"""Messages past spool_threshold go to a temporary file as they arrive: byte-exact, bounded RAM."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _harness import Harness, settle
from alephsmtp.spool import MessageSpool, SpoolError

TRANSACTION = b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"


@pytest.mark.parametrize("threshold", [0, 10, 1 << 20])
def test_the_spool_keeps_the_bytes_in_memory_or_in_a_file(threshold: int) -> None:
    spool = MessageSpool(threshold)
    pieces = [b"first line\r\n", b"", b"x" * 5000, b"last\r\n"]
    for piece in pieces:
        spool.write(piece)
    whole = b"".join(pieces)
    assert spool.size == len(whole)
    assert spool.spooled == (len(whole) > threshold)
    with spool.open() as one, spool.open() as two:
        assert one.read(11) == b"first line\r"
        assert two.read() == whole  # views do not share a position
        assert one.read() == whole[11:]
        one.seek(-7, os.SEEK_END)
        assert one.read() == b"xlast\r\n"[-7:]
    assert spool.getvalue() == whole
    assert spool.getvalue() is spool.getvalue()  # read once
    with spool.open() as again:
        assert again.read() == whole


def test_a_discarded_spool_cannot_be_read_and_its_file_is_gone() -> None:
    spool = MessageSpool(0)
    spool.write(b"refused message")
    assert spool.spooled
    spool.discard()
    with pytest.raises(SpoolError):
        spool.getvalue()
    with pytest.raises(SpoolError):
        spool.open()


def received(h: Harness) -> list[Any]:
    messages: list[Any] = []
    h.session.message_received += lambda s, e: messages.append(
        (e.size, e.message, e.open().read(), e.envelope.message)
    )
    return messages


@pytest.mark.parametrize("threshold", [0, 100, 1 << 20])
async def test_a_spooled_message_reaches_the_handler_byte_exact(threshold: int) -> None:
    h = Harness(spool_threshold=threshold, read_size=333)
    messages = received(h)
    body = b"".join(b"line %d\r\n..dot\r\n" % n for n in range(2000))
    h.send(TRANSACTION + body + b".\r\n")
    expected = body.replace(b"\r\n..", b"\r\n.")
    assert messages == [(len(expected), expected, expected, expected)]
    assert h.session._tx is None  # the session holds nothing of it any more


async def test_a_message_too_large_keeps_nothing_while_it_is_read_to_its_end() -> None:
    h = Harness(spool_threshold=100, max_message_size=1000)
    messages = received(h)
    h.send(TRANSACTION + b"y" * 998 + b"\r\n")
    assert h.session._tx is not None
    assert h.session._tx.spool is not None
    assert h.session._tx.spool.spooled
    h.send(b"z" * 10000 + b"\r\n")  # past the limit: what was kept is dropped at once
    assert h.session._tx.spool is None
    h.send(b".\r\n")
    assert h.replies()[-1] == "552 5.3.4 Error: message size exceeds fixed maximum message size"
    assert messages == []


async def test_a_disk_that_refuses_the_spool_is_a_temporary_failure(tmp_path: Path) -> None:
    h = Harness(spool_threshold=10, spool_directory=str(tmp_path / "missing"))
    messages = received(h)
    h.send(TRANSACTION + b"more than ten bytes\r\n.\r\nNOOP\r\n")
    await settle()
    assert h.replies()[-2:] == ["452 4.3.1 Error: insufficient system storage", "250 2.0.0 OK"]
    assert messages == []


# --- the memory of a real server ---------------------------------------------------------

SERVER = """
import asyncio, hashlib, sys
from alephsmtp import SmtpServer

digests = []

def on_session(session):
    def received(sender, e):
        digest = hashlib.sha256()
        with e.open() as message:  # read in pieces: never the whole message in memory
            for block in iter(lambda: message.read(1 << 16), b""):
                digest.update(block)
        digests.append(digest.hexdigest())
    session.message_received += received

async def main():
    server = SmtpServer("127.0.0.1", 0, hostname="mx.test", on_session=on_session,
                        max_message_size=int(sys.argv[1]))
    await server.start()
    print("PORT", server.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print("DIGESTS", *digests, flush=True)
    with open("/proc/self/status") as status:
        print(*[line for line in status if line.startswith(("VmHWM", "VmRSS"))], flush=True)
    await server.stop(grace=1)

asyncio.run(main())
"""


def _kib(status: str, field: str) -> int:
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_large_messages_cost_disk_not_ram(tmp_path: Path) -> None:
    """Six clients at once send 24 MiB each, and one a 40 MiB message over the 32 MiB limit:
    the server's peak RSS grows by a few MiB, not by the 184 MiB they sent (it held each
    message in memory while it arrived, and a refused one too)."""
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    server = subprocess.Popen(
        [sys.executable, str(script), str(32 << 20)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdin is not None
    try:
        port = int(server.stdout.readline().split()[1])
        line = b"x" * 1022 + b"\r\n"
        bodies = [(b"%d" % n).rjust(1024, b"-") + b"\r\n" + line * (24 << 10) for n in range(6)]
        codes = asyncio.run(_send_all(port, [*bodies, line * (40 << 10)]))
        assert codes == [250] * 6 + [552]
        server.stdin.write("\n")
        server.stdin.flush()
        digests = server.stdout.readline().split()[1:]
        status = server.stdout.read()
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    assert sorted(digests) == sorted(hashlib.sha256(body).hexdigest() for body in bodies)
    peak = _kib(status, "VmHWM")
    assert peak < 80 << 10, f"peak RSS {peak} KiB"  # the interpreter and library: ~30 MiB


async def _send_all(port: int, bodies: list[bytes]) -> list[int]:
    return list(await asyncio.gather(*(_send(port, body) for body in bodies)))


async def _send(port: int, body: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"EHLO big.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    writer.write(b"DATA\r\n")
    while not (await reader.readline()).startswith(b"354"):
        pass
    view = memoryview(body)
    for start in range(0, len(body), 1 << 20):
        writer.write(view[start : start + (1 << 20)])
        await writer.drain()
    writer.write(b".\r\nQUIT\r\n")
    reply = await reader.readline()
    writer.close()
    return int(reply[:3])
