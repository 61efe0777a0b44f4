"""alephsmtp.testing: the threaded test server and its pytest plugin, with real clients."""

from __future__ import annotations

import asyncio
import errno
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from typing import Any

import aiosmtplib
import pytest

from alephsmtp import Reply, SmtpServer
from alephsmtp.testing import CapturedMessage, SmtpTestServer

# The plugin is loaded by name here, as a project without the entry point would; pytester
# (pytest's own plugin for testing plugins) runs inner pytest sessions against it.
pytest_plugins = ["pytester", "alephsmtp.testing"]

MESSAGE = (
    b"From: Alice <a@example.org>\r\n"
    b"To: Bob <b@example.net>\r\n"
    b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"second line\r\n"
)


def _tls_and_auth_in_server() -> bool:
    try:
        SmtpServer(
            "127.0.0.1",
            0,
            hostname="localhost",
            tls_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
            require_tls=False,
            auth_mechanisms=("PLAIN",),
            auth_require=False,
            auth_over_plaintext=False,
        )
    except TypeError:
        return False
    return True


needs_tls_auth = pytest.mark.skipif(
    not _tls_and_auth_in_server(), reason="needs STARTTLS/AUTH in the server"
)


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def send(server: SmtpTestServer, message: bytes = MESSAGE, **kwargs: Any) -> dict[str, Any]:
    with smtplib.SMTP(server.connect_host, server.port) as client:
        return client.sendmail("a@example.org", ["b@example.net"], message, **kwargs)


# --- the server ---------------------------------------------------------------------------


def test_start_stop_cycles_each_serve() -> None:
    server = SmtpTestServer()
    assert not server.is_running
    server.stop()  # not running: nothing to do
    for round_ in range(3):
        assert server.start() is server
        assert server.is_running
        assert server.server.is_serving
        send(server, b"Subject: %d\r\n\r\nbody\r\n" % round_)
        server.stop()
        assert not server.is_running
        assert not server.server.is_serving
    assert [m.message["Subject"] for m in server.messages] == ["0", "1", "2"]
    with server, pytest.raises(RuntimeError, match="already running"):
        server.start()


def test_stop_closes_idle_clients_gracefully() -> None:
    server = SmtpTestServer().start()
    client = smtplib.SMTP(server.connect_host, server.port)
    try:
        assert client.ehlo()[0] == 250
        server.stop()
        # RFC 5321 3.8: the server says why it closes (421 4.3.2), it does not just vanish.
        assert client.noop() == (421, b"4.3.2 Service shutting down, closing connection")
    finally:
        client.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.connect_host, server.port)).close()


def test_stop_from_a_handler_is_refused_not_a_deadlock() -> None:
    errors: list[RuntimeError] = []
    server = SmtpTestServer()

    def on_session(session: Any) -> None:
        try:
            server.stop()
        except RuntimeError as error:
            errors.append(error)

    server.on_session = on_session
    with server:
        send(server)
    assert "deadlock" in str(errors[0])


def test_captures_envelope_raw_bytes_and_parsed_message() -> None:
    with SmtpTestServer() as server:
        with smtplib.SMTP(server.host, server.port, local_hostname="client.test") as client:
            refused = client.sendmail(
                "a@example.org",
                ["b@example.net", "c@example.net"],
                MESSAGE,
                mail_options=["BODY=8BITMIME"],
            )
        assert refused == {}
        (captured,) = server.messages
    assert isinstance(captured, CapturedMessage)
    assert captured.data == MESSAGE  # unstuffed, CRLF, byte-exact
    assert captured.message_bytes == MESSAGE
    envelope = captured.envelope
    assert envelope.return_path == "a@example.org"
    assert envelope.recipients == ["b@example.net", "c@example.net"]
    assert envelope.body_type == "8BITMIME"
    assert envelope.helo_name == "client.test"
    assert envelope.peer[0] == "127.0.0.1"
    message = captured.message
    assert message["Subject"] == "grüße"
    assert message["To"].addresses[0].addr_spec == "b@example.net"
    assert message.get_content() == ".a line that starts with a dot\r\nsecond line\r\n"
    assert captured.tls is None
    assert captured.authenticated_as is None
    assert "a@example.org" in repr(captured)


def test_wildcard_ipv4() -> None:
    with SmtpTestServer("0.0.0.0") as server:
        assert server.host == "0.0.0.0"
        assert server.server.sockets[0].getsockname()[0] == "0.0.0.0"
        assert server.address == ("127.0.0.1", server.port)
        send(server)
    assert len(server.messages) == 1


@pytest.mark.skipif(not _ipv6_loopback(), reason="IPv6 loopback (::1) unavailable")
async def test_ipv6_loopback_with_aiosmtplib() -> None:
    with SmtpTestServer("::1") as server:
        assert server.server.sockets[0].family == socket.AF_INET6
        async with aiosmtplib.SMTP(hostname="::1", port=server.port) as client:
            await client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    (captured,) = server.messages
    assert captured.envelope.peer[0] == "::1"
    assert captured.data == MESSAGE


def test_options_go_to_the_smtp_server() -> None:
    server = SmtpTestServer(max_message_size=200, hostname="mx.test")
    with server, smtplib.SMTP(server.host, server.port) as client:
        code, text = client.ehlo()
        assert code == 250
        assert text.splitlines()[0] == b"mx.test"
        assert client.esmtp_features["size"] == "200"
        # Announced with SIZE= (smtplib does): refused at MAIL (RFC 1870 6.1) ...
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@example.org", ["b@example.net"], b"x" * 300 + b"\r\n")
        assert refused.value.smtp_code == 552
        # ... and without, after the data.
        client.mail("a@example.org")
        client.rcpt("b@example.net")
        assert client.data(b"x" * 300 + b"\r\n")[0] == 552
    assert server.messages == []


def test_a_wrong_option_fails_at_construction() -> None:
    with pytest.raises(TypeError):
        SmtpTestServer(no_such_option=1)
    with pytest.raises(ValueError, match="not both"):
        SmtpTestServer(tls=True, tls_context=ssl.create_default_context())


@pytest.mark.skipif(
    sys.platform == "win32",
    reason="SmtpServer sets SO_REUSEADDR, which on Windows lets a second server take the port",
)
def test_start_fails_in_the_callers_thread_when_the_port_is_taken() -> None:
    with SmtpTestServer() as first:
        second = SmtpTestServer(port=first.port)
        with pytest.raises(OSError) as error:  # noqa: PT011 - the text is the OS's own
            second.start()
        assert error.value.errno == errno.EADDRINUSE
        assert not second.is_running


def test_start_fails_for_an_address_not_on_this_host() -> None:
    server = SmtpTestServer("192.0.2.1")  # TEST-NET-1 (RFC 5737): never a local address
    with pytest.raises(OSError):  # noqa: PT011 - the text is the OS's own
        server.start()
    assert not server.is_running


def test_on_session_handlers_decide_and_only_accepted_messages_are_captured() -> None:
    def on_session(session: Any) -> None:
        session.rcpt += lambda s, e: (
            Reply(550, "5.1.1", "No such user")
            if e.command.recipient_address.local_part == "x"
            else None
        )

        def by_subject(s: Any, e: Any) -> str | None:
            if b"Subject: refuse" in e.message:
                return "452 4.3.1 Insufficient system storage"
            if b"Subject: custom" in e.message:
                return "250 2.0.0 stored as 42"
            return None

        session.message_received += by_subject

    with SmtpTestServer(on_session=on_session) as server:
        with smtplib.SMTP(server.host, server.port) as client:
            refused = client.sendmail(
                "a@example.org", ["x@example.net", "b@example.net"], b"Subject: one\r\n\r\n1\r\n"
            )
            assert refused == {"x@example.net": (550, b"5.1.1 No such user")}
            with pytest.raises(smtplib.SMTPDataError) as error:
                client.sendmail("a@example.org", ["b@example.net"], b"Subject: refuse\r\n\r\n")
            assert error.value.smtp_code == 452
            client.mail("a@example.org")
            client.rcpt("b@example.net")
            assert client.data(b"Subject: custom\r\n\r\n3\r\n") == (250, b"2.0.0 stored as 42")
        subjects = [m.message["Subject"] for m in server.messages]
    assert subjects == ["one", "custom"]
    assert server.messages[0].envelope.recipients == ["b@example.net"]


async def test_async_on_session_and_async_handlers() -> None:
    async def on_session(session: Any) -> None:
        await asyncio.sleep(0)  # a lookup before the greeting

        async def later(s: Any, e: Any) -> str | None:
            await asyncio.sleep(0)
            return "554 5.7.1 refused by policy" if b"spam" in e.message else None

        session.message_received += later

    with SmtpTestServer(on_session=on_session) as server:
        async with aiosmtplib.SMTP(hostname=server.host, port=server.port) as client:
            await client.sendmail("a@example.org", ["b@example.net"], b"Subject: ham\r\n\r\n")
            with pytest.raises(aiosmtplib.SMTPDataError) as error:
                await client.sendmail("a@example.org", ["b@example.net"], b"Subject: spam\r\n\r\n")
            assert error.value.code == 554
    assert [m.message["Subject"] for m in server.messages] == ["ham"]


def test_a_raising_handler_is_not_captured() -> None:
    def on_session(session: Any) -> None:
        session.message_received += lambda s, e: 1 / 0

    with SmtpTestServer(on_session=on_session) as server:
        with pytest.raises(smtplib.SMTPDataError) as error:
            send(server)
        assert error.value.smtp_code == 451  # a fault: the client retries
    assert server.messages == []


def test_wait_for_messages_and_clear() -> None:
    with SmtpTestServer() as server:
        sender = threading.Thread(target=lambda: [send(server), send(server)])
        sender.start()
        captured = server.wait_for_messages(2)
        sender.join()
        assert len(captured) == 2
        assert captured == server.messages
        with pytest.raises(TimeoutError, match="2 message"):
            server.wait_for_messages(3, timeout=0)
        server.clear()
        assert server.messages == []
        send(server)
        assert len(server.wait_for_messages(1)) == 1


# --- TLS and AUTH -------------------------------------------------------------------------


@needs_tls_auth
def test_starttls_with_the_test_ca() -> None:
    with SmtpTestServer(tls=True, require_tls=True) as server:
        assert server.client_context is not None
        assert server.ca_pem is not None
        assert server.ca_pem.startswith(b"-----BEGIN CERTIFICATE-----")
        with smtplib.SMTP("localhost", server.port) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            assert client.mail("a@example.org")[0] == 530  # require_tls
            client.starttls(context=server.client_context)
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    (captured,) = server.messages
    assert captured.envelope.tls
    assert captured.tls is not None
    assert captured.tls.version in ("TLSv1.2", "TLSv1.3")


@needs_tls_auth
def test_credentials_over_plaintext_when_no_tls() -> None:
    server = SmtpTestServer(credentials={"alice": "s3cret"}, auth_require=True)
    with server, smtplib.SMTP(server.host, server.port) as client:
        client.ehlo()
        assert client.mail("a@example.org")[0] == 530  # auth_require
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("alice", "wrong")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("mallory", "s3cret")
        client.login("alice", "s3cret")
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    (captured,) = server.messages
    assert captured.authenticated_as == "alice"
    assert captured.envelope.auth_identity == "alice"


@needs_tls_auth
async def test_credentials_after_starttls_with_aiosmtplib() -> None:
    server = SmtpTestServer(tls=True, credentials={"alice": "s3cret"}, auth_mechanisms=["CRAM-MD5"])
    with server:
        assert server.client_context is not None
        async with aiosmtplib.SMTP(
            hostname="localhost", port=server.port, tls_context=server.client_context
        ) as client:
            await client.ehlo()  # aiosmtplib says EHLO again after STARTTLS only when needed
            assert client.supports_extension("auth")
            assert client.server_auth_methods == ["cram-md5"]
            await client.login("alice", "s3cret")
            await client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    assert server.messages[0].authenticated_as == "alice"


@needs_tls_auth
def test_own_auth_handler_decides_before_credentials() -> None:
    def on_session(session: Any) -> None:
        session.auth += lambda s, e: False if e.username == "alice" else None

    server = SmtpTestServer(credentials={"alice": "pw", "bob": "pw"}, on_session=on_session)
    with server, smtplib.SMTP(server.host, server.port) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("alice", "pw")
        assert client.login("bob", "pw")[0] == 235


# --- the pytest plugin, used directly -------------------------------------------------------


def test_fixture(smtp_server: SmtpTestServer) -> None:
    assert smtp_server.is_running
    send(smtp_server)
    assert smtp_server.messages[0].data == MESSAGE


@pytest.mark.parametrize(
    "smtp_server", [{"max_message_size": 100, "hostname": "param.test"}], indirect=True
)
def test_fixture_options_by_indirect_parameter(smtp_server: SmtpTestServer) -> None:
    assert smtp_server.server.config.max_message_size == 100
    assert smtp_server.server.config.hostname == "param.test"


def test_factory_starts_several(smtp_server_factory: Any) -> None:
    first = smtp_server_factory()
    second = smtp_server_factory(hostname="second.test")
    assert first.port != second.port
    send(second)
    assert first.messages == []
    assert len(second.messages) == 1


# --- the pytest plugin, through pytester ----------------------------------------------------

PLUGIN_TESTS = """
import smtplib

import pytest

SEEN = []


def test_default(smtp_server):
    SEEN.append(smtp_server)
    assert smtp_server.is_running
    with smtplib.SMTP(smtp_server.host, smtp_server.port) as client:
        client.sendmail("a@example.org", ["b@example.net"], b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
    (captured,) = smtp_server.messages
    assert captured.envelope.recipients == ["b@example.net"]
    assert captured.message["Subject"] == "hi"


def test_stopped_after_the_test():
    assert not SEEN[0].is_running


@pytest.mark.smtp_server(max_message_size=100, hostname="marked.test")
def test_marker_options(smtp_server):
    with smtplib.SMTP(smtp_server.host, smtp_server.port) as client:
        assert client.ehlo()[1].splitlines()[0] == b"marked.test"
        assert client.esmtp_features["size"] == "100"


@pytest.mark.smtp_server(tls=True, auth={"alice": "s3cret"})
def test_marker_tls_and_auth(smtp_server):
    with smtplib.SMTP("localhost", smtp_server.port) as client:
        client.starttls(context=smtp_server.client_context)
        client.login("alice", "s3cret")
        client.sendmail("a@example.org", ["b@example.net"], b"\\r\\n")
    assert smtp_server.messages[0].authenticated_as == "alice"


def test_factory(smtp_server_factory):
    assert smtp_server_factory().port != smtp_server_factory().port
"""


@pytest.fixture
def no_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prove the plugin works by name alone, without any installed entry point.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.mark.usefixtures("no_autoload")
def test_plugin_by_name_without_entry_points(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plugin=PLUGIN_TESTS)
    if not _tls_and_auth_in_server():
        pytester.makeconftest(
            "import pytest\n"
            "def pytest_collection_modifyitems(items):\n"
            "    for item in items:\n"
            "        if 'tls' in item.name:\n"
            "            item.add_marker(pytest.mark.skip(reason='needs STARTTLS/AUTH'))\n"
        )
    result = pytester.runpytest("-p", "alephsmtp.testing", "--strict-markers")
    if _tls_and_auth_in_server():
        result.assert_outcomes(passed=5)
    else:
        result.assert_outcomes(passed=4, skipped=1)


@pytest.mark.usefixtures("no_autoload")
def test_plugin_registers_its_marker(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("-p", "alephsmtp.testing", "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.smtp_server(**options)*"])
    assert result.ret == 0


@pytest.mark.usefixtures("no_autoload")
def test_marker_with_positional_arguments_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.smtp_server("127.0.0.1")
        def test_it(smtp_server):
            pass
        """
    )
    result = pytester.runpytest("-p", "alephsmtp.testing")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*keyword options only*"])


def test_plugin_by_entry_point(pytester: pytest.Pytester) -> None:
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="pytest11")}
    if "alephsmtp.testing" not in names:
        pytest.skip("the pytest11 entry point is not installed (reinstall after pyproject)")
    pytester.makepyfile(test_plugin=PLUGIN_TESTS)
    # -p by module name as well: a project may name the plugin and have it installed.
    for args in ([], ["-p", "alephsmtp.testing"]):
        result = pytester.runpytest("-p", "no:asyncio", *args)
        result.assert_outcomes(passed=5)


def test_tls_without_trustme_says_what_to_install() -> None:
    """``tls=True`` needs trustme (the ``testing`` extra): its absence is said as such."""
    code = (
        "import sys; sys.modules['trustme'] = None\n"
        "from alephsmtp.testing import SmtpTestServer\n"
        "try:\n"
        "    SmtpTestServer(tls=True)\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'alephsmtp[testing]'" in done.stdout, done.stdout + done.stderr
