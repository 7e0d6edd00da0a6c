"""A thin async client for OpenAI-compatible chat endpoints: bounded concurrency, a request-rate limit, a wall-clock
timeout per request and retries with exponential backoff on the failures that are worth retrying.

The API key is read from the environment when the client is made and goes nowhere but the request header: error
messages (which end up in the record store and the logs) are scrubbed of it, since some servers echo a rejected key."""

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.config import scrub_secrets

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
NO_KEY = "no-key"  # sent to a local server when the variable is unset: such servers ignore it, the client wants one


class LLMError(RuntimeError):
    """A request that failed for good (after retries, or with an error not worth retrying); the message says why."""

    def __init__(self, message: str, attempts: int = 1):
        super().__init__(message)
        self.attempts = attempts


@dataclass
class ChatReply:
    text: str
    elapsed_s: float
    attempts: int


class RateLimiter:
    """Spaces request starts at least 60/rpm seconds apart (a steady rate, no bursts)."""

    def __init__(self, requests_per_minute: float | None):
        self.interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next_start = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self._lock:
            now = time.monotonic()
            delay = self._next_start - now
            self._next_start = max(now, self._next_start) + self.interval
        if delay > 0:
            await asyncio.sleep(delay)


def _retry_after_s(error: Exception) -> float | None:
    """The server's Retry-After (seconds form) on a 429/503, when it sent one."""
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _is_retryable(error: Exception) -> bool:
    import openai

    if isinstance(error, (TimeoutError, openai.APITimeoutError, openai.APIConnectionError)):
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code == 429 or error.status_code >= 500
    return False


def _describe(error: Exception) -> str:
    import openai

    if isinstance(error, (TimeoutError, openai.APITimeoutError)):
        return "timed out"
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {str(error)[:300]}"
    return f"{type(error).__name__}: {str(error)[:300]}"


def resolve_api_key(cfg: AutoInterpConfig) -> str:
    """The key from `cfg.api_key_env`; a local server (`base_url` set) may go without one."""
    api_key = os.environ.get(cfg.api_key_env)
    if api_key:
        return api_key
    if cfg.base_url is None:
        raise ValueError(
            f"auto_interp.api_key_env: the environment variable {cfg.api_key_env} holds no API key, and "
            "auto_interp.base_url is unset (the OpenAI API needs a key); set the variable, or point base_url "
            "at a local OpenAI-compatible server"
        )
    return NO_KEY


class LLMClient:
    """One `AsyncOpenAI` client shared by all features of a run. `n_requests` counts HTTP attempts (retries
    included), so a caller can check what a run cost. Create it inside the event loop that uses it."""

    def __init__(self, cfg: AutoInterpConfig):
        import openai  # imported on use: it is slow to import and most users of this package never need it

        api_key = resolve_api_key(cfg)
        self.cfg = cfg
        self.endpoint = cfg.base_url or "https://api.openai.com/v1"
        self._secrets = [api_key] if api_key != NO_KEY else []  # what no message may quote
        # Retries and timeouts are ours (the client's own would retry inside our timeout and hide attempts).
        self._client = openai.AsyncOpenAI(
            base_url=cfg.base_url, api_key=api_key, max_retries=0, timeout=cfg.request_timeout_s
        )
        self._semaphore = asyncio.Semaphore(cfg.max_concurrent_requests)
        self._rate = RateLimiter(cfg.requests_per_minute)
        self.n_requests = 0

    async def chat(self, messages: list[dict[str, str]], *, max_tokens: int) -> ChatReply:
        """The assistant's text for `messages`; raises LLMError when the endpoint does not deliver one."""
        import openai

        kwargs = {"response_format": {"type": "json_object"}} if self.cfg.json_response_format else {}
        start = time.monotonic()
        for attempt in range(self.cfg.max_retries + 1):
            try:
                async with self._semaphore:
                    await self._rate.wait()
                    self.n_requests += 1
                    completion = await asyncio.wait_for(
                        self._client.chat.completions.create(
                            model=self.cfg.model,
                            messages=messages,
                            max_tokens=max_tokens,
                            temperature=self.cfg.temperature,
                            **kwargs,
                        ),
                        timeout=self.cfg.request_timeout_s,
                    )
            except ValueError as error:  # a 200 whose body is not JSON (the client's decoder gives up)
                described = scrub_secrets(str(error), self._secrets)
                raise LLMError(f"{self.endpoint} returned a body that is not JSON: {described}", attempt + 1) from (
                    error if described == str(error) else None
                )
            except (TimeoutError, openai.OpenAIError) as error:
                if not _is_retryable(error) or attempt == self.cfg.max_retries:
                    hint = ""
                    if kwargs and isinstance(error, openai.BadRequestError):
                        hint = " (if the server rejects response_format, set auto_interp.json_response_format=false)"
                    described = self._describe(error)
                    raise LLMError(
                        f"request to {self.endpoint} (model {self.cfg.model!r}) failed after {attempt + 1} "
                        f"attempt(s): {described}{hint}",
                        attempt + 1,
                    ) from (error if described == _describe(error) else None)  # no cause that quotes the key
                backoff = min(self.cfg.retry_backoff_s * 2**attempt, MAX_BACKOFF_S)
                backoff = max(backoff, min(_retry_after_s(error) or 0.0, MAX_BACKOFF_S))
                logger.debug("retrying in %.2fs after %s", backoff, self._describe(error))
                await asyncio.sleep(backoff)
                continue
            return ChatReply(_reply_text(completion, self.endpoint, attempt + 1), time.monotonic() - start, attempt + 1)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _describe(self, error: Exception) -> str:
        return scrub_secrets(_describe(error), self._secrets)

    async def close(self) -> None:
        await self._client.close()


def _reply_text(completion: object, endpoint: str, attempts: int) -> str:
    """The first choice's text; a body that is not a chat completion is the endpoint's fault, reported as such."""
    try:
        content = completion.choices[0].message.content  # type: ignore[attr-defined]
    except (AttributeError, IndexError, TypeError):
        raise LLMError(
            f"{endpoint} returned something that is not a chat completion: {str(completion)[:200]!r}", attempts
        ) from None
    if not isinstance(content, str) or not content.strip():
        raise LLMError(f"{endpoint} returned a chat completion without text", attempts)
    return content
