"""``local/fetch``: fetch a web page for an agent without becoming an SSRF hole.

A caller names any URL, so the server must not become its way into the operator's
network. Before every connection (the first and every redirect hop, which is followed
here by hand, never by the HTTP client) the host is resolved and *every* address it
resolves to must be public (``ipaddress.is_global``: no loopback, private, link-local,
carrier-grade NAT, multicast or reserved ranges, which covers cloud metadata at
169.254.169.254) unless the operator allow-listed it (``OMNISTREAM_WEB_FETCH_ALLOW``:
hosts, IPs or CIDRs, each optionally with ``:port``). The connection then goes to the
address that was checked (the URL is rewritten to the IP, ``Host`` and TLS SNI keep the
name), so a DNS answer that changes between check and connect cannot redirect it.
Through an operator's ``HTTP(S)_PROXY`` the proxy connects instead, after the same check.

Bodies are capped in bytes and the whole fetch in time; requests carry no cookies,
credentials or headers of the caller's, and a fresh client per fetch keeps no cookie jar
between callers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import ssl
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from omnistream import __version__
from omnistream.gateway.errors import GatewayError

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_URL_CHARS = 2048
FORMATS = ("markdown", "html", "text")
USER_AGENT = f"omnistream-fetch/{__version__}"
OFFLOAD_BYTES = 64 * 1024  # larger bodies are converted in a worker thread

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AllowEntry:
    """One operator allow-list entry: a network or a host name, optionally one port."""

    network: IPNetwork | None
    host: str | None
    port: int | None

    @classmethod
    def parse(cls, raw: str) -> AllowEntry:
        """``10.0.0.0/8``, ``192.168.1.5:8080``, ``intranet.example``, ``[::1]:80``…"""
        text = raw.strip()
        port: int | None = None
        if text.startswith("["):
            inner, _, rest = text[1:].partition("]")
            text = inner
            if rest.startswith(":"):
                port = int(rest[1:])
        elif text.count(":") == 1:
            text, _, p = text.partition(":")
            port = int(p)
        try:
            return cls(ipaddress.ip_network(text, strict=False), None, port)
        except ValueError:
            return cls(None, text.lower().rstrip("."), port)

    def allows(self, host: str, address: IPAddress, port: int) -> bool:
        """Whether this entry lets a connection to ``address`` (named ``host``) through."""
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address in self.network
        return self.host == host.lower().rstrip(".")


def is_public(address: IPAddress) -> bool:
    """Public unicast only: IPv4-mapped IPv6 is judged by the IPv4 it carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return bool(address.is_global) and not address.is_multicast


# -- HTML to markdown / text --------------------------------------------------------------


class _Converter(HTMLParser):
    """A small HTML → markdown/text converter: headings, paragraphs, lists, links, code."""

    SKIP = frozenset({"script", "style", "noscript", "template", "svg", "head"})
    BLOCK = frozenset({"p", "div", "section", "article", "header", "footer", "main", "br",
                       "tr", "table", "ul", "ol", "blockquote", "pre", "hr", "nav", "aside"})

    def __init__(self, base_url: str, markdown: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.base_url = base_url
        self.markdown = markdown
        self.out: list[str] = []
        self.title = ""
        self.links: list[str] = []
        self.images: list[str] = []
        self._skip = 0
        self._in_title = False
        self._href: list[str | None] = []
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "title":
            self._in_title = True
        if tag in self.SKIP:
            self._skip += 1
            return
        if self._skip:
            return
        if tag in self.BLOCK:
            self.out.append("\n\n")
        if tag == "pre":
            self._pre += 1
            if self.markdown:
                self.out.append("```\n")
        elif re.fullmatch(r"h[1-6]", tag):
            self.out.append("\n\n" + ("#" * int(tag[1]) + " " if self.markdown else ""))
        elif tag == "li":
            self.out.append("\n- " if self.markdown else "\n• ")
        elif tag == "a":
            href = values.get("href")
            link = urljoin(self.base_url, href) if href else None
            if link and link.startswith(("http://", "https://")):
                self.links.append(link)
            else:
                link = None
            self._href.append(link)
            if self.markdown and link:
                self.out.append("[")
        elif tag == "img":
            src = values.get("src")
            if src:
                self.images.append(urljoin(self.base_url, src))
                if self.markdown:
                    alt = values.get("alt") or ""
                    self.out.append(f"![{alt}]({urljoin(self.base_url, src)})")
        elif tag in ("strong", "b") and self.markdown:
            self.out.append("**")
        elif tag in ("em", "i") and self.markdown:
            self.out.append("*")
        elif tag == "code" and self.markdown and not self._pre:
            self.out.append("`")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
            return
        if self._skip:
            return
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
            if self.markdown:
                self.out.append("\n```")
        if tag == "a" and self._href:
            link = self._href.pop()
            if self.markdown and link:
                self.out.append(f"]({link})")
        elif tag in ("strong", "b") and self.markdown:
            self.out.append("**")
        elif tag in ("em", "i") and self.markdown:
            self.out.append("*")
        elif tag == "code" and self.markdown and not self._pre:
            self.out.append("`")
        if tag in self.BLOCK or re.fullmatch(r"h[1-6]", tag):
            self.out.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._skip:
            return
        self.out.append(data if self._pre else re.sub(r"\s+", " ", data))

    def result(self) -> str:
        text = "".join(self.out)
        text = re.sub(r"[ \t]+\n", "\n", text)
        text = re.sub(r"\n{3,}", "\n\n", text)
        return text.strip()


def html_to(markup: str, base_url: str, fmt: str) -> tuple[str, str, list[str], list[str]]:
    """``(content, title, links, images)`` of an HTML page as markdown or text."""
    converter = _Converter(base_url, markdown=(fmt == "markdown"))
    converter.feed(markup)
    converter.close()
    links = list(dict.fromkeys(converter.links))[:500]
    images = list(dict.fromkeys(converter.images))[:200]
    return converter.result(), " ".join(converter.title.split()), links, images


# -- the fetcher --------------------------------------------------------------------------


def _blocked(message: str) -> GatewayError:
    return GatewayError(403, "blocked", message)


def _invalid(message: str) -> GatewayError:
    return GatewayError(400, "invalid_url", message, param="url")


class WebFetcher:
    """Fetches public pages (or allow-listed private ones) within size and time caps."""

    def __init__(self, allow: list[str] | None = None, *, max_bytes: int = 2 * 1024 * 1024,
                 timeout_s: float = 15.0) -> None:
        self.allow: list[AllowEntry] = []
        for raw in allow or []:
            if not raw.strip():
                continue
            try:
                self.allow.append(AllowEntry.parse(raw))
            except ValueError:
                log.warning("ignoring web fetch allow-list entry %r: not a host, IP or CIDR "
                            "with an optional :port", raw)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._tls: ssl.SSLContext | None = None

    async def _tls_context(self) -> ssl.SSLContext:
        """One TLS context for every fetch, built off the loop (it reads the CA bundle)."""
        if self._tls is None:
            self._tls = await asyncio.to_thread(httpx.create_ssl_context)
        return self._tls

    def check_url(self, url: Any) -> tuple[str, str, int]:
        """``(scheme, host, port)`` of a URL the fetcher may try, else 400 ``invalid_url``."""
        if not isinstance(url, str) or not url.strip():
            raise _invalid("'url' is required: an http(s) URL")
        if len(url) > MAX_URL_CHARS:
            raise _invalid(f"'url' is longer than {MAX_URL_CHARS} characters")
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            raise _invalid(f"'url' is not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise _invalid("URL must be http or https")
        host = parts.hostname
        if not host:
            raise _invalid("URL has no host")
        if parts.username is not None or parts.password is not None:
            raise _invalid("URLs with credentials (user:password@) are not fetched")
        return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)

    async def resolve(self, host: str, port: int) -> IPAddress:
        """The address to connect to, after checking every address ``host`` resolves to.

        Raises:
            GatewayError: 403 ``blocked`` if any address is not public and not allowed;
                400 ``invalid_url`` if the name does not resolve.
        """
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:
                raise _invalid(f"host '{host}' does not resolve: {exc}") from None
            addresses = []
            for info in infos:
                try:
                    addresses.append(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
                except ValueError:
                    continue
            if not addresses:
                raise _invalid(f"host '{host}' has no usable address")
        for address in addresses:
            if is_public(address):
                continue
            if any(entry.allows(host, address, port) for entry in self.allow):
                continue
            raise _blocked(f"'{host}' resolves to {address}, a private, loopback, link-local "
                           "or reserved address; the operator has not allowed it "
                           "(OMNISTREAM_WEB_FETCH_ALLOW)")
        return addresses[0]

    @staticmethod
    def _proxied(scheme: str, host: str) -> bool:
        proxies = urllib.request.getproxies_environment()
        bypass = getattr(urllib.request, "proxy_bypass_environment")  # noqa: B009 (untyped)
        return bool(proxies.get(scheme)) and not bypass(host)

    async def fetch(self, url: Any, fmt: str = "markdown") -> dict[str, Any]:
        """Fetch ``url`` (following up to five redirects, each checked) as ``fmt``.

        Raises:
            GatewayError: 400 ``invalid_url``/``invalid_format``, 403 ``blocked``, 502
                ``fetch_failed``, 504 ``fetch_timeout``.
        """
        if fmt not in FORMATS:
            raise GatewayError(400, "invalid_format",
                               f"format must be one of {', '.join(FORMATS)}", param="format")
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(str(url).strip() if isinstance(url, str) else url, fmt)
        except TimeoutError:
            raise GatewayError(504, "fetch_timeout",
                               f"The page took longer than {self.timeout_s:.0f} s") from None

    async def _fetch(self, url: Any, fmt: str) -> dict[str, Any]:
        # identity: the body is read raw (so the size cap counts what crosses the wire
        # and no decompression bomb can inflate it), so it must not come compressed.
        headers = {"user-agent": USER_AGENT, "accept-encoding": "identity",
                   "accept": "text/html,application/xhtml+xml,text/plain;q=0.9,*/*;q=0.5"}
        timeout = httpx.Timeout(self.timeout_s)
        tls = await self._tls_context()
        async with httpx.AsyncClient(trust_env=False, timeout=timeout, verify=tls) as direct, \
                httpx.AsyncClient(trust_env=True, timeout=timeout, verify=tls) as proxied:
            current = url
            for _hop in range(MAX_REDIRECTS + 1):
                scheme, host, port = self.check_url(current)
                address = await self.resolve(host, port)
                parts = urlsplit(current)
                extensions: dict[str, Any] = {}
                if self._proxied(scheme, host):
                    client, target = proxied, urlunsplit(parts._replace(fragment=""))
                else:
                    ip = f"[{address}]" if address.version == 6 else str(address)
                    netloc = f"{ip}:{port}"
                    client = direct
                    target = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
                    if scheme == "https":
                        extensions["sni_hostname"] = host
                host_header = host if port in (80, 443) else f"{host}:{port}"
                request = client.build_request("GET", target, headers={**headers,
                                                                       "host": host_header},
                                               extensions=extensions)
                try:
                    response = await client.send(request, stream=True)
                except httpx.HTTPError as exc:
                    raise GatewayError(502, "fetch_failed",
                                       f"Fetching {host} failed: {type(exc).__name__}") from None
                try:
                    if response.status_code in (301, 302, 303, 307, 308) and \
                            response.headers.get("location"):
                        current = urljoin(current, response.headers["location"])
                        continue
                    body, truncated = await self._read(response)
                    # Decoding and converting up to max_bytes of HTML is CPU work: off
                    # the loop when large, so one big page does not stall other sessions.
                    if len(body) > OFFLOAD_BYTES:
                        return await asyncio.to_thread(self._answer, current, response, body,
                                                       truncated, fmt)
                    return self._answer(current, response, body, truncated, fmt)
                finally:
                    await response.aclose()
            raise GatewayError(502, "fetch_failed", f"More than {MAX_REDIRECTS} redirects")

    async def _read(self, response: httpx.Response) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():
            chunks.append(chunk)
            size += len(chunk)
            if size >= self.max_bytes:
                return b"".join(chunks)[:self.max_bytes], True
        return b"".join(chunks), False

    def _answer(self, url: str, response: httpx.Response, body: bytes, truncated: bool,
                fmt: str) -> dict[str, Any]:
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        encoding = response.charset_encoding or "utf-8"
        try:
            text = body.decode(encoding, "replace")
        except LookupError:
            text = body.decode("utf-8", "replace")
        if response.status_code >= 400:
            raise GatewayError(502, "fetch_failed",
                               f"The site answered {response.status_code}")
        out: dict[str, Any] = {"url": url, "status_code": response.status_code,
                               "content_type": content_type, "truncated": truncated}
        if content_type in ("text/html", "application/xhtml+xml") or (
                not content_type and text.lstrip().lower().startswith(("<!doctype", "<html"))):
            if fmt == "html":
                _, title, links, images = html_to(text, url, "text")
                content = text
            else:
                content, title, links, images = html_to(text, url, fmt)
            out.update(title=title, links=links, images=images)
        elif content_type.startswith("text/") or content_type in (
                "application/json", "application/xml", "application/javascript", ""):
            content = text
            out["title"] = ""
        else:
            raise GatewayError(415, "unsupported_content",
                               f"'{content_type}' is not a page the fetcher converts "
                               "(HTML and text only)")
        out[fmt] = content
        out["content"] = content
        return out
