"""DKIM (RFC 6376) and ARC (RFC 8617) verification of a message fed in pieces.

[`MessageVerifier`][alephsmtp.mailauth.verifier.MessageVerifier] keeps the header section (bounded)
and hashes the body as it streams ([`bodyhash`][alephsmtp.mailauth.bodyhash]), one hash per distinct
(canonicalization, hash, ``l=``) the message's ``DKIM-Signature`` and ``ARC-Message-Signature``
fields ask for. [`MessageVerifier.verify()`][alephsmtp.mailauth.verifier.MessageVerifier.verify]
then looks up every key at once through the resolver (asynchronously, each with a timeout) and lets
dkimpy do the rest — tag checks, header canonicalization and the signature itself — on the header
section alone, with the body-hash comparison done against the streamed hashes. The crypto runs after
all lookups, so no DNS answer is ever awaited with a half-done check.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from dataclasses import replace
from typing import Any

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from .bodyhash import HASHES, BodyCanonicalizer, BodyHasher
from .resolver import DnsError, Resolver
from .results import ArcResult, DkimResult

__all__ = ["MalformedHeader", "MessageVerifier", "parse_headers"]

log = logging.getLogger("alephsmtp.mailauth")

_HEADER_END = b"\r\n\r\n"
_ARC_HEADERS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
_WHITESPACE = re.compile(rb"\s+")


class _DebugOnly(logging.LoggerAdapter):  # type: ignore[type-arg]
    """dkimpy logs every failed check at ERROR; the results say it, so those are debug."""

    def error(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


_DKIMPY_LOG = _DebugOnly(logging.getLogger("alephsmtp.mailauth.dkimpy"), {})

BodyKey = tuple[str, str, "int | None"]  # body canonicalization, hash name, l=


class MalformedHeader(ValueError):
    """A header section dkimpy cannot read (a line that is neither a field nor a
    continuation, RFC 5322 2.2)."""


def parse_headers(block: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields of a header section (CRLF lines), as dkimpy reads them; raises
    [`MalformedHeader`][alephsmtp.mailauth.verifier.MalformedHeader] for one it cannot read."""
    try:
        headers, _ = dkim.rfc822_parse(block + b"\r\n")
    except (dkim.DKIMException, IndexError) as error:  # IndexError: a leading continuation
        raise MalformedHeader(str(error) or "malformed header section") from None
    return [(name, value) for name, value in headers]


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        return dict(parse_tag_value(_unfold(value)))
    except InvalidTagValueList:
        return None


def _unfold(value: bytes) -> bytes:
    return value.replace(b"\r\n", b"").replace(b"\n", b"")


def _body_key(tags: dict[bytes, bytes], default_c: bytes) -> BodyKey | None:
    """The body hash a signature wants, or None when it cannot name one."""
    canon = tags.get(b"c", default_c).strip().split(b"/")
    body = canon[1] if len(canon) == 2 else b"simple"
    algorithm = tags.get(b"a", b"").strip().lower()
    hash_name = algorithm.rsplit(b"-", 1)[-1].decode("ascii", "replace")
    if body not in (b"simple", b"relaxed") or hash_name not in HASHES or len(canon) > 2:
        return None
    limit: int | None = None
    if b"l" in tags:
        try:
            limit = int(tags[b"l"])
        except ValueError:
            return None
    return body.decode(), hash_name, limit


def _text(value: bytes | None) -> str:
    return value.decode("ascii", "replace") if value else ""


class _StreamedBody:
    """dkimpy's signature check with the body hash and the key supplied from outside.

    ``verify_sig`` is the one place dkimpy fetches a key and hashes the body; this override
    takes the key from the prefetched ``keys`` and compares ``bh=`` with the hash computed
    while streaming, then hands the header part to dkimpy's own ``verify_sig_process``.
    """

    keys: dict[bytes, str | None]
    body_hashes: dict[BodyKey, bytes]
    default_c: bytes

    def verify_sig(
        self, sig: dict[bytes, bytes], include_headers: Any, sig_header: Any, dnsfunc: Any
    ) -> bool:
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        record = self.keys.get(name.lower())
        pk, keysize, ktag, seqtlsrpt = dkim.evaluate_pk(name, record)
        self.pk, self.keysize, self.ktag, self.seqtlsrpt = pk, keysize, ktag, seqtlsrpt
        if b"bh" in sig:
            key = _body_key(sig, self.default_c)
            computed = self.body_hashes.get(key) if key is not None else None
            try:
                expected = base64.b64decode(_WHITESPACE.sub(b"", sig[b"bh"]))
            except ValueError as error:
                raise dkim.MessageFormatError(f"bh= is not base64: {error}") from None
            if computed is None or computed != expected:
                raise dkim.ValidationError("body hash mismatch")
            sig = {tag: value for tag, value in sig.items() if tag != b"bh"}
        result: bool = self.verify_sig_process(  # type: ignore[attr-defined]
            sig, include_headers, sig_header, dnsfunc
        )
        return result


class _Dkim(_StreamedBody, dkim.DKIM):  # type: ignore[misc]
    default_c = b"simple/simple"


class _Arc(_StreamedBody, dkim.ARC):  # type: ignore[misc]
    default_c = b"relaxed/relaxed"  # RFC 8617 4.1.2: ARC uses relaxed by default


class MessageVerifier:
    """DKIM and ARC for one message, fed in pieces: ``feed()`` then ``await verify()``.

    ``max_header_size`` bounds what is kept of the header section (a longer one gives
    ``permerror``); ``max_signatures`` bounds the DKIM signatures checked (the rest are
    reported as not checked, ``neutral``); ``min_key_bits`` refuses smaller RSA keys
    (RFC 8301 3.2: at least 1024).
    """

    def __init__(
        self,
        *,
        dkim: bool = True,
        arc: bool = True,
        max_header_size: int = 1 << 20,
        max_signatures: int = 8,
        min_key_bits: int = 1024,
    ) -> None:
        self.check_dkim = dkim
        self.check_arc = arc
        self.max_header_size = max_header_size
        self.max_signatures = max_signatures
        self.min_key_bits = min_key_bits
        self._head = bytearray()
        self._in_body = False
        self._head_too_large = False
        self.header_block = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self._canonicalizers: dict[str, BodyCanonicalizer] = {}
        self._hashers: dict[BodyKey, BodyHasher] = {}
        self._closed = False
        self.malformed = ""  # why the header section could not be read, if it could not

    # --- feeding ------------------------------------------------------------------------

    def feed(self, piece: bytes) -> None:
        """Take the next piece of the message (as received, unstuffed)."""
        if self._in_body:
            for canonicalizer in self._canonicalizers.values():
                canonicalizer.feed(piece)
            return
        if self._head_too_large:
            return
        if not self._head:
            # The usual case, a whole message or a first piece holding the header section:
            # find its end in place rather than copying the piece into the buffer.
            if piece.startswith(b"\r\n"):
                self._start_body(b"", piece[2:])
                return
            end = piece.find(_HEADER_END)
            if end >= 0:
                self._start_body(bytes(piece[: end + 2]), piece[end + 4 :])
                return
        start = max(0, len(self._head) - 3)
        self._head += piece
        if self._head.startswith(b"\r\n"):
            self._start_body(b"", bytes(self._head[2:]))  # no header fields at all
            return
        end = self._head.find(_HEADER_END, start)
        if end >= 0:
            self._start_body(bytes(self._head[: end + 2]), bytes(self._head[end + 4 :]))
        elif len(self._head) > self.max_header_size:
            self._head_too_large = True
            self._head = bytearray()

    def _start_body(self, block: bytes, rest: bytes) -> None:
        self._in_body = True
        self._head = bytearray()
        self.header_block = block
        try:
            self.headers = parse_headers(block) if block else []
        except MalformedHeader as error:
            self.malformed = str(error)
            self.headers = []
        wanted: list[BodyKey | None] = []
        if self.check_dkim:
            for tags in self._signature_tags(b"dkim-signature")[: self.max_signatures]:
                wanted.append(_body_key(tags, b"simple/simple"))
        if self.check_arc:
            for tags in self._signature_tags(b"arc-message-signature"):
                wanted.append(_body_key(tags, b"relaxed/relaxed"))
        for key in wanted:
            if key is None or key in self._hashers:
                continue
            hasher = self._hashers[key] = BodyHasher(key[1], key[2])
            canonicalizer = self._canonicalizers.get(key[0])
            if canonicalizer is None:
                canonicalizer = self._canonicalizers[key[0]] = BodyCanonicalizer(key[0])
            canonicalizer.add_sink(hasher)
        if rest:
            self.feed(rest)

    def close(self) -> None:
        """The message is complete."""
        if self._closed:
            return
        self._closed = True
        if not self._in_body and not self._head_too_large:
            # No empty line: the whole message is its header section (RFC 5322 3.5).
            head = bytes(self._head)
            if head and not head.endswith(b"\r\n"):
                head += b"\r\n"
            self._start_body(head, b"")
        for canonicalizer in self._canonicalizers.values():
            canonicalizer.close()

    def _signature_tags(self, name: bytes) -> list[dict[bytes, bytes]]:
        found = []
        for field_name, value in self.headers:
            if field_name.lower() == name:
                tags = _tags(value)
                found.append(tags if tags is not None else {})
        return found

    def from_header(self) -> list[bytes]:
        """The values of every ``From:`` field."""
        return [value for name, value in self.headers if name.lower() == b"from"]

    @property
    def header_too_large(self) -> bool:
        return self._head_too_large

    # --- verifying ----------------------------------------------------------------------

    def _key_names(self) -> list[bytes]:
        names: list[bytes] = []
        kinds: list[bytes] = []
        if self.check_dkim:
            kinds.append(b"dkim-signature")
        if self.check_arc:
            kinds += [b"arc-seal", b"arc-message-signature"]
        for kind in kinds:
            tags_list = self._signature_tags(kind)
            if kind == b"dkim-signature":
                tags_list = tags_list[: self.max_signatures]
            for tags in tags_list:
                selector, domain = tags.get(b"s"), tags.get(b"d")
                if selector and domain:
                    name = (selector + b"._domainkey." + domain + b".").lower()
                    if name not in names:
                        names.append(name)
        return names

    async def verify(
        self, resolver: Resolver, *, timeout: float = 10.0
    ) -> tuple[list[DkimResult] | None, ArcResult | None]:
        """Look up the keys, then check every DKIM signature and the ARC chain.

        Returns ``(dkim, arc)``, each ``None`` when not asked for. Call after
        [`close()`][alephsmtp.mailauth.verifier.MessageVerifier.close].
        """
        self.close()
        if self._head_too_large:
            reason = f"header section larger than {self.max_header_size} octets"
            return (
                [DkimResult("permerror", reason=reason)] if self.check_dkim else None,
                ArcResult("fail", reason=reason) if self.check_arc else None,
            )
        if self.malformed:
            lowered = self.header_block.lower()
            reason = f"malformed header section: {self.malformed}"
            return (
                ([DkimResult("permerror", reason=reason)] if b"dkim-signature" in lowered else [])
                if self.check_dkim
                else None,
                (ArcResult("fail", reason=reason) if b"arc-seal" in lowered else ArcResult("none"))
                if self.check_arc
                else None,
            )
        names = self._key_names()
        keys: dict[bytes, str | None] = {}
        failed: dict[bytes, str] = {}
        answers = await asyncio.gather(*(_lookup_key(resolver, name, timeout) for name in names))
        for name, (record, error) in zip(names, answers, strict=True):
            if error:
                failed[name] = error
            else:
                keys[name] = record
        body_hashes = {key: hasher.digest() for key, hasher in self._hashers.items()}
        dkim_results = self._verify_dkim(keys, failed, body_hashes) if self.check_dkim else None
        arc_result = self._verify_arc(keys, failed, body_hashes) if self.check_arc else None
        return dkim_results, arc_result

    def _message(self) -> bytes:
        return self.header_block + b"\r\n"

    def _verify_dkim(
        self,
        keys: dict[bytes, str | None],
        failed: dict[bytes, str],
        body_hashes: dict[BodyKey, bytes],
    ) -> list[DkimResult]:
        signatures = [value for name, value in self.headers if name.lower() == b"dkim-signature"]
        if not signatures:
            return []
        verifier = _Dkim(self._message(), logger=_DKIMPY_LOG, minkey=self.min_key_bits)
        verifier.keys, verifier.body_hashes = keys, body_hashes
        results = []
        for index, value in enumerate(signatures):
            tags = _tags(value) or {}
            base = DkimResult(
                "none",
                domain=_text(tags.get(b"d")).lower(),
                selector=_text(tags.get(b"s")),
                identity=_text(tags.get(b"i")),
                algorithm=_text(tags.get(b"a")),
                signature=_text(_WHITESPACE.sub(b"", tags.get(b"b", b""))[:8]),
            )
            if index >= self.max_signatures:
                results.append(replace(base, result="neutral", reason="signature not checked"))
                continue
            results.append(self._verify_one(verifier, index, tags, base, keys, failed))
        return results

    def _verify_one(
        self,
        verifier: _Dkim,
        index: int,
        tags: dict[bytes, bytes],
        base: DkimResult,
        keys: dict[bytes, str | None],
        failed: dict[bytes, str],
    ) -> DkimResult:
        if not tags:
            return replace(base, result="permerror", reason="malformed DKIM-Signature")
        name = (tags.get(b"s", b"") + b"._domainkey." + tags.get(b"d", b"") + b".").lower()
        try:
            prep = verifier.verify_headerprep(index)
            if not prep:
                return replace(base, result="permerror", reason="malformed DKIM-Signature")
            if name in failed:
                # RFC 6376 6.1.2: a key that could not be fetched for a temporary reason.
                return replace(base, result="temperror", reason=failed[name])
            if not keys.get(name):
                return replace(base, result="permerror", reason="no key for signature")
            sig, include_headers, sig_headers = prep
            ok = verifier.verify_sig(sig, include_headers, sig_headers[index], None)
        except dkim.ValidationError as error:
            if str(error) == "body hash mismatch":
                return replace(base, result="fail", reason="body hash did not verify")
            return replace(base, result="permerror", reason=str(error))
        except dkim.DKIMException as error:
            return replace(base, result="permerror", reason=str(error) or type(error).__name__)
        bits = getattr(verifier, "keysize", None)
        if not ok:
            return replace(base, result="fail", reason="signature did not verify", key_bits=bits)
        reason = ""
        key = _body_key(tags, b"simple/simple")
        if key is not None and key[2] is not None:
            hasher = self._hashers.get(key)
            if hasher is not None and hasher.count > key[2]:
                reason = f"l={key[2]}: {hasher.count - key[2]} body octets not signed"
        return replace(base, result="pass", reason=reason, key_bits=bits)

    def _verify_arc(
        self,
        keys: dict[bytes, str | None],
        failed: dict[bytes, str],
        body_hashes: dict[BodyKey, bytes],
    ) -> ArcResult:
        if not any(name.lower() in _ARC_HEADERS for name, _ in self.headers):
            return ArcResult("none")
        verifier = _Arc(self._message(), logger=_DKIMPY_LOG, minkey=self.min_key_bits)
        verifier.keys, verifier.body_hashes = keys, body_hashes
        seals = self._signature_tags(b"arc-seal")
        newest = max(seals, key=lambda tags: _int(tags.get(b"i")), default={})
        domain, selector = _text(newest.get(b"d")).lower(), _text(newest.get(b"s"))
        try:
            cv, data, reason = verifier.verify(dnsfunc=None)
        except dkim.DKIMException as error:
            return ArcResult("fail", reason=str(error), domain=domain, selector=selector)
        instances = max((_int(tags.get(b"i")) for tags in seals), default=0)
        if cv == dkim.CV_Pass:
            oldest = 0
            for result in data:  # newest first
                if not result.get("ams-valid"):
                    break
                oldest = result["instance"]
            return ArcResult(
                "pass",
                instances=instances,
                oldest_pass=0 if oldest == 1 else oldest,
                domain=domain,
                selector=selector,
            )
        if cv == dkim.CV_None:
            return ArcResult("none", reason=str(reason), domain=domain, selector=selector)
        if failed and any(name in failed for name in self._key_names()):
            reason = "key lookup failed: " + "; ".join(sorted(set(failed.values())))
        return ArcResult(
            "fail", reason=str(reason), instances=instances, domain=domain, selector=selector
        )


def _int(value: bytes | None) -> int:
    try:
        return int(value or b"0")
    except ValueError:
        return 0


async def _lookup_key(resolver: Resolver, name: bytes, timeout: float) -> tuple[str | None, str]:
    """A key record (RFC 6376 3.6.2.2): the first TXT at the name; (None, why) on DNS trouble."""
    text = name.decode("ascii", "replace").rstrip(".")
    try:
        records = await asyncio.wait_for(resolver.lookup(text, "TXT"), timeout)
    except (DnsError, asyncio.TimeoutError) as error:
        return None, f"key lookup for {text} failed: {error or 'timeout'}"
    return (records[0] if records else None), ""
