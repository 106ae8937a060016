"""`HttpxEngineClient`: the `EngineClient` over upstream/http11.py (`http://`) and httpx (`https://`,
test transports); their errors are re-raised as EngineConnectError or EngineResponseError."""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Annotated, Any, Final

import httpx
import msgspec

from kvroute.core import EngineResponse
from kvroute.errors import EngineConnectError, EngineError, EngineResponseError, TokenizeError
from kvroute.upstream.http11 import HttpError, LeanPool, LeanResponse, target

__all__ = ["HttpxEngineClient"]

# Failures before a connection exists: the engine cannot have seen the request, so the proxy
# may retry elsewhere (pinned by tests/unit/upstream/test_httpx_client.py).
_CONNECT_FAILURES: Final = (httpx.ConnectError, httpx.ConnectTimeout)
_JSON_HEADERS: Final = {"content-type": "application/json"}
_NO_HEADERS: Final[dict[str, str]] = {}


class _NoCookies(http.cookiejar.CookieJar):
    """A jar that keeps nothing. httpx stores every Set-Cookie it gets and sends it on its
    later requests: an engine's (or its balancer's) cookie for one client, relayed to that
    client, would go out with every other client's requests too; and an empty jar is not
    merged into each request (pinned by test_a_cookie_an_engine_sets_is_never_sent_back)."""

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return

    def extract_cookies(self, response: Any, request: Any) -> None:
        return


class _TokenizeAnswer(msgspec.Struct):
    """vLLM's `/tokenize` answer; other fields (`count`, `max_model_len`) are ignored. The index
    packs token ids as 4-byte unsigned ints (index/hashing.py), hence the range."""

    tokens: list[Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]]


_TOKENIZE_ANSWER: Final = msgspec.json.Decoder(_TokenizeAnswer)


def _join(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _translate(method: str, url: str, exc: httpx.HTTPError, timeout_s: float | None) -> EngineError:
    """The kvroute error for an httpx error of `method url` (`timeout_s`: the call's deadline)."""
    if isinstance(exc, _CONNECT_FAILURES):
        return EngineConnectError(f"{method} {url}: {_describe(exc)}")
    if timeout_s is not None and isinstance(exc, httpx.TimeoutException):
        return EngineResponseError(
            f"{method} {url}: timed out after {timeout_s} s ({type(exc).__name__})"
        )
    return EngineResponseError(f"{method} {url}: {_describe(exc)}")


def _translate_lean(method: str, url: str, exc: HttpError) -> EngineError:
    """The kvroute error for a lean client's error of `method url`."""
    if exc.connect_failure:
        return EngineConnectError(f"{method} {url}: {exc}")
    return EngineResponseError(f"{method} {url}: {exc}")


class _LeanChunks:
    """A lean response's body iterator whose errors arrive as EngineResponseError."""

    __slots__ = ("_response", "_url")

    def __init__(self, response: LeanResponse, url: str) -> None:
        self._response = response
        self._url = url

    def __aiter__(self) -> _LeanChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._response.__anext__()
        except HttpError as exc:
            raise _translate_lean("POST", self._url, exc) from exc


class _LeanStreamed:
    """An `EngineResponse` over a lean response (status and headers in, body to come)."""

    __slots__ = ("_response", "_url", "headers", "status_code")

    def __init__(self, response: LeanResponse, url: str) -> None:
        self._response = response
        self._url = url
        self.status_code = response.status_code
        # Lower-case names, repeated headers comma-joined (as httpx.Headers gives them).
        self.headers: Mapping[str, str] = response.headers

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return _LeanChunks(self._response, self._url)

    async def aclose(self) -> None:
        await self._response.aclose()


@dataclass(frozen=True, slots=True)
class _Answer:
    """A complete answer to a call with a deadline."""

    status_code: int
    content: bytes
    content_type: str

    @property
    def text(self) -> str:
        charset = "utf-8"
        for part in self.content_type.split(";")[1:]:
            name, _, value = part.strip().partition("=")
            if name.lower() == "charset" and value:
                charset = value.strip('"')
        try:
            return self.content.decode(charset, errors="replace")
        except LookupError:  # a charset Python does not know
            return self.content.decode("utf-8", errors="replace")


class _RawChunks:
    """An httpx body iterator whose errors arrive as EngineResponseError."""

    __slots__ = ("_chunks", "_url")

    def __init__(self, chunks: AsyncIterator[bytes], url: str) -> None:
        self._chunks = chunks
        self._url = url

    def __aiter__(self) -> _RawChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except httpx.HTTPError as exc:
            raise _translate("POST", self._url, exc, None) from exc


class _StreamedResponse:
    """An `EngineResponse` over an httpx response opened with `stream=True`."""

    __slots__ = ("_response", "_url", "headers", "status_code")

    def __init__(self, response: httpx.Response, url: str) -> None:
        self._response = response
        self._url = url
        self.status_code = response.status_code
        # httpx.Headers: lower-case names, repeated headers comma-joined by items() and [].
        self.headers: Mapping[str, str] = response.headers

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return _RawChunks(self._response.aiter_raw(), self._url)

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxEngineClient:
    """The pooled HTTP client to engines (proxy, health probes, scrapes, remote tokenizer).

    `connect_timeout_s` bounds each connect (a failure lets the proxy retry elsewhere),
    `read_timeout_s` each wait for more bytes (and sending, and waiting for a pooled
    connection); `max_connections` is the pool over all engines. Health probes and scrapes
    have a pool of their own: requests filling that one must not starve them, or an overload
    would get every engine ejected. An idle pooled connection is dropped after `keep_alive_s`,
    which must be shorter than the engines' own idle timeout (vLLM: 5 s): else a request can
    go out on a connection the engine is closing, and fail. Proxy variables in the
    environment are ignored: engines sit on the cluster network, and variables meant for the
    outside world must not divert that traffic. `transport` plugs in an in-process app
    (`httpx.ASGITransport`, for tests); one client then serves all, and the pool limits do
    not apply.

    `http://` engines are reached by the lean client (upstream/http11.py: one socket write per
    request, a quarter of the gateway's CPU per request less than httpx), `https://` ones and
    injected transports by httpx; limits, timeouts and errors are the same on both.
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        keep_alive_s: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        timeout = httpx.Timeout(
            connect=connect_timeout_s,
            read=read_timeout_s,
            write=read_timeout_s,
            pool=read_timeout_s,
        )
        self._client = httpx.AsyncClient(
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=keep_alive_s,
            ),
            trust_env=False,
            transport=transport,
            cookies=_NoCookies(),
        )
        self._lean: LeanPool | None = None
        self._lean_probes: LeanPool | None = None
        if transport is None:
            self._lean = LeanPool(
                connect_timeout_s=connect_timeout_s,
                read_timeout_s=read_timeout_s,
                max_connections=max_connections,
                keep_alive_s=keep_alive_s,
            )
            self._lean_probes = LeanPool(
                connect_timeout_s=connect_timeout_s,
                read_timeout_s=read_timeout_s,
                max_connections=None,
                keep_alive_s=keep_alive_s,
            )
        # At most two calls per engine at a time (a probe, a scrape), each with its deadline.
        self._probes = (
            self._client
            if transport is not None
            else httpx.AsyncClient(
                timeout=timeout,
                limits=httpx.Limits(max_connections=None, keepalive_expiry=keep_alive_s),
                trust_env=False,
                cookies=_NoCookies(),
            )
        )

    async def aclose(self) -> None:
        for pool in (self._lean, self._lean_probes):
            if pool is not None:
                await pool.aclose()
        await self._client.aclose()
        if self._probes is not self._client:
            await self._probes.aclose()

    async def __aenter__(self) -> HttpxEngineClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- calls with a deadline

    async def _call(
        self,
        method: str,
        base_url: str,
        path: str,
        timeout_s: float,
        content: bytes | None = None,
        *,
        probe: bool = False,
    ) -> _Answer:
        """`method` to `base_url` + `path` with its whole answer read, all within `timeout_s`:
        the clients' timeouts are per phase, and a slowly dripping body must not outlast the
        deadline. `probe`: on the pool of health probes and scrapes."""
        url = _join(base_url, path)
        pool = self._lean_probes if probe else self._lean
        where = target(base_url) if pool is not None else None
        try:
            async with asyncio.timeout(timeout_s):
                if pool is not None and where is not None:
                    headers = _JSON_HEADERS if content is not None else _NO_HEADERS
                    lean = await pool.request(method, where, path, headers, content)
                    try:
                        body = await lean.read()
                    finally:
                        await lean.aclose()
                    return _Answer(lean.status_code, body, lean.headers.get("content-type", ""))
                client = self._probes if probe else self._client
                response = await client.request(
                    method,
                    url,
                    content=content,
                    headers=_JSON_HEADERS if content is not None else None,
                    timeout=timeout_s,
                )
                return _Answer(
                    response.status_code,
                    response.content,
                    response.headers.get("content-type", ""),
                )
        except TimeoutError as exc:
            raise EngineResponseError(f"{method} {url}: timed out after {timeout_s} s") from exc
        except HttpError as exc:
            raise _translate_lean(method, url, exc) from exc
        except httpx.HTTPError as exc:
            raise _translate(method, url, exc, timeout_s) from exc

    async def health(self, base_url: str, *, timeout_s: float) -> int:
        response = await self._call("GET", base_url, "/health", timeout_s, probe=True)
        return response.status_code

    async def metrics_text(self, base_url: str, *, timeout_s: float) -> str:
        response = await self._call("GET", base_url, "/metrics", timeout_s, probe=True)
        if response.status_code != 200:
            url = _join(base_url, "/metrics")
            raise EngineResponseError(f"GET {url}: expected status 200, got {response.status_code}")
        return response.text

    async def tokenize_prompt(
        self, base_url: str, model: str, prompt: str, *, add_special_tokens: bool, timeout_s: float
    ) -> list[int]:
        body = {"model": model, "prompt": prompt, "add_special_tokens": add_special_tokens}
        return await self._tokenize(base_url, body, timeout_s)

    async def tokenize_chat(
        self,
        base_url: str,
        model: str,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        chat_template_kwargs: dict[str, Any] | None,
        timeout_s: float,
    ) -> list[int]:
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        if chat_template_kwargs:
            body["chat_template_kwargs"] = chat_template_kwargs
        return await self._tokenize(base_url, body, timeout_s)

    async def _tokenize(self, base_url: str, body: dict[str, Any], timeout_s: float) -> list[int]:
        url = _join(base_url, "/tokenize")
        try:
            # Strict JSON, as engines parse it: no NaN, no lone surrogates (pinned by
            # test_a_body_json_cannot_encode_is_a_tokenize_error).
            content = json.dumps(
                body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise TokenizeError(f"POST {url}: request not encodable as JSON: {exc}") from exc
        response = await self._call("POST", base_url, "/tokenize", timeout_s, content)
        if response.status_code != 200:
            raise EngineResponseError(
                f"POST {url}: expected status 200, got {response.status_code}: "
                f"{response.text[:200]!r}"
            )
        try:
            return _TOKENIZE_ANSWER.decode(response.content).tokens
        except msgspec.ValidationError as exc:
            raise EngineResponseError(
                f"POST {url}: expected an object with 'tokens' (ids in [0, 2**32)): {exc}"
            ) from exc
        except msgspec.DecodeError as exc:
            raise EngineResponseError(
                f"POST {url}: expected a JSON body, got {response.text[:80]!r}"
            ) from exc

    # --- the proxied request

    async def post_stream(
        self, base_url: str, path: str, *, body: bytes, headers: Mapping[str, str]
    ) -> EngineResponse:
        url = _join(base_url, path)
        if self._lean is not None and (where := target(base_url)) is not None:
            try:
                lean = await self._lean.request("POST", where, path, headers, body)
            except HttpError as exc:
                raise _translate_lean("POST", url, exc) from exc
            return _LeanStreamed(lean, url)
        request = self._client.build_request("POST", url, content=body, headers=headers)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _translate("POST", url, exc, None) from exc
        return _StreamedResponse(response, url)
