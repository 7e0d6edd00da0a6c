"""The feature browser's web app (Starlette, Jinja2 templates, a little plain JavaScript): read-only, GET only.

HTML pages and the JSON API under `/api` render the same dicts (`lm_saes_core.browser.queries`):

- `GET /api/dictionaries`: every stored dictionary (kind, hooks, width, evaluation metrics, analyses, Dagster asset).
- `GET /api/dictionaries/{name}?series=S`: one dictionary and the log-frequency histogram of its features.
- `GET /api/dictionaries/{name}/features?series=S&analysis=A&sort=K&desc=1&page=P&per_page=N&min_frequency=..`:
  one page of its feature table, sorted by K (index, frequency, max_activation, explanation, score) and filtered
  by `min_frequency`/`max_frequency`, `min_max_activation`/`max_max_activation` (ranges are [min, max)),
  `explanation` (a substring) and `min_score`; sorting, filtering and paging run in the store's query.
- `GET /api/dictionaries/{name}/features/{index}?series=S&analysis=A&window=W`: one feature: statistics, activation
  histogram, contexts (tokens with their activations, ±W around each context's max), DLA tokens, explanation and
  scores, decoder norms of a crosscoder's or CLT's feature.
- `GET /api/search?q=TEXT`: features of every dictionary whose explanation contains TEXT.

An unknown dictionary, feature or page is a 404 (an HTML page, or `{"error": ...}` under `/api`), a bad parameter a
400; other errors answer 500 without a traceback (the server log has it).
"""

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from lm_saes_core.browser import queries
from lm_saes_core.browser.queries import BadRequest, NotFound, TableQuery
from lm_saes_core.store import FEATURE_SORT_KEYS, DictionaryRecord, FeatureFilter, RecordNotFoundError, RecordStore
from lm_saes_core.store.base import MAX_PAGE_SIZE

DEFAULT_PER_PAGE = 50
MAX_WINDOW = 512
_FILTER_PARAMS = {  # query parameter -> FeatureFilter field
    "min_frequency": "min_frequency",
    "max_frequency": "max_frequency",
    "min_max_activation": "min_max_activation",
    "max_max_activation": "max_max_activation",
    "min_score": "min_score",
}


class ApiResponse(JSONResponse):
    """JSON without NaN (strict JSON has none): non-finite floats become null."""

    def render(self, content: Any) -> bytes:
        return super().render(queries.finite_json(content))


# ------------------------------------------------------------------------------------------------ parameters


def _float(params, name: str) -> float | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be finite, got {raw!r}")
    return value


def _int(params, name: str, default: int, low: int, high: int | None = None) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        raise BadRequest(f"{name} must be in [{low}, {high if high is not None else 'inf'}], got {value}")
    return value


def parse_table_query(params) -> TableQuery:
    sort = params.get("sort") or "index"
    if sort not in FEATURE_SORT_KEYS:
        raise BadRequest(f"sort must be one of {', '.join(FEATURE_SORT_KEYS)}, got {sort!r}")
    bounds = {field: _float(params, name) for name, field in _FILTER_PARAMS.items()}
    text = (params.get("explanation") or "").strip() or None
    where = FeatureFilter(**bounds, explanation_contains=text)
    return TableQuery(
        series=params.get("series") or None,
        analysis=params.get("analysis") or None,
        sort=sort,
        descending=params.get("desc") in ("1", "true", "yes"),
        where=where if any(value is not None for value in vars(where).values()) else None,
        page=_int(params, "page", 1, 1),
        per_page=_int(params, "per_page", DEFAULT_PER_PAGE, 1, MAX_PAGE_SIZE),
    )


# ------------------------------------------------------------------------------------------------ template helpers


def dictionary_url(name: str, series: str | None = None, **params: Any) -> str:
    query = {"series": series, **params}
    return _with_query(f"/dictionaries/{quote(name, safe='')}", query)


def feature_url(name: str, series: str | None, index: int, **params: Any) -> str:
    query = {"series": series, **params}
    return _with_query(f"/dictionaries/{quote(name, safe='')}/features/{index}", query)


def _with_query(path: str, params: dict[str, Any]) -> str:
    kept = {key: value for key, value in params.items() if value is not None and value != ""}
    return f"{path}?{urlencode(kept)}" if kept else path


def fmt(value: Any, spec: str = ".4g") -> str:
    """A number for a table cell; empty for a missing or non-finite one."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return format(value, spec)


def fmt_frequency(value: float | None) -> str:
    if value is None:
        return ""
    if value <= 0:
        return "0 (dead)"
    return f"{value:.3%} (1 in {1 / value:,.0f})"


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("lm_saes_core.browser", "templates"), autoescape=select_autoescape())
    env.globals.update(
        dictionary_url=dictionary_url,
        feature_url=feature_url,
        fmt=fmt,
        fmt_frequency=fmt_frequency,
        sort_keys=FEATURE_SORT_KEYS,
        max=max,
        min=min,
        log1p=math.log1p,
        log10=math.log10,
    )
    return env


# ------------------------------------------------------------------------------------------------ the app


class _Tokenizers:
    """The tokenizer of each model, loaded on first use (seconds) and kept; decoding is serialised per app because
    a fast tokenizer's Rust object refuses concurrent borrows."""

    def __init__(self, store: RecordStore):
        self._store = store
        self._loaded: dict[str | None, tuple[object | None, str]] = {}
        self._lock = threading.Lock()

    def decoder(self, record: DictionaryRecord) -> tuple[Callable[[list[int]], list[str]], str]:
        from lm_saes_core.analysis.render import load_tokenizer, token_pieces

        key = record.model_name or record.cfg.get("model_name")
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = load_tokenizer(self._store, record)
        tokenizer, note = self._loaded[key]

        def decode(ids: list[int]) -> list[str]:
            with self._lock:
                return token_pieces(tokenizer, ids)

        return decode, note


def create_app(store: RecordStore, *, dagster_url: str | None = None, source: str | None = None) -> Starlette:
    """The browser over `store` (opened by the caller, read-only for `lm-saes serve`, and closed by it).
    `dagster_url`: the Dagster webserver that pipeline-made dictionaries link to. `source`: how the pages name the
    store (default: its repr)."""
    templates = Jinja2Templates(env=_environment())
    tokenizers = _Tokenizers(store)
    store_name = source or repr(store)

    def page(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> Response:
        return templates.TemplateResponse(request, template, {"store": store_name, **context}, status_code=status_code)

    def dictionary_of(request: Request, series: str | None = None) -> tuple[DictionaryRecord, list[str]]:
        return queries.resolve_dictionary(store, request.path_params["name"], series)

    # pages ----------------------------------------------------------------------------------------------------
    def index(request: Request) -> Response:
        return page(request, "index.html", {"dictionaries": queries.list_dictionaries(store, dagster_url)})

    def dictionary_page(request: Request) -> Response:
        query = parse_table_query(request.query_params)
        record, all_series = dictionary_of(request, query.series)
        counts = queries.analysis_counts(store, record)
        analysis = queries.choose_analysis(record, list(counts), query.analysis)
        context = {
            "dictionary": queries.dictionary_summary(store, record, dagster_url, counts),
            "all_series": all_series,
            "analysis": analysis,
            "analyses": list(counts),
            "histogram": queries.frequency_histogram(store.feature_frequencies(record.name, record.series, analysis)),
            "table": queries.feature_table(store, record, query, analysis),
            "query": query,
            "params": _table_params(request, query),
        }
        return page(request, "dictionary.html", context)

    def jump(request: Request) -> Response:
        """The "jump to index" form: a redirect to the feature's page."""
        record, _ = dictionary_of(request, request.query_params.get("series") or None)
        index = _int(request.query_params, "index", 0, 0)
        queries.check_feature_index(record, index)
        analysis = request.query_params.get("analysis") or None
        return RedirectResponse(feature_url(record.name, record.series, index, analysis=analysis), status_code=303)

    def feature_page(request: Request) -> Response:
        return page(request, "feature.html", {"feature": _feature(request)})

    def search_page(request: Request) -> Response:
        text = request.query_params.get("q", "")
        return page(request, "search.html", {"result": queries.search(store, text)})

    # JSON -----------------------------------------------------------------------------------------------------
    def api_dictionaries(request: Request) -> Response:
        """Every stored dictionary: name, series, model, kind, act_fn, hooks, d_sae, n_features, training_tokens,
        explained_variance, l0, dead_fraction, ce_loss_recovered, metrics, analyses (name -> features analysed),
        path, dagster (the pipeline asset it came from, or null)."""
        return ApiResponse({"dictionaries": queries.list_dictionaries(store, dagster_url)})

    def api_dictionary(request: Request) -> Response:
        """One dictionary (as in /api/dictionaries), its analyses, and `frequency_histogram`: features per bin of
        log10 frequency (`bars`: min, max (null for the last), count; `dead`: features of frequency 0)."""
        record, all_series = dictionary_of(request, request.query_params.get("series") or None)
        counts = queries.analysis_counts(store, record)
        analysis = queries.choose_analysis(record, list(counts), request.query_params.get("analysis") or None)
        frequencies = store.feature_frequencies(record.name, record.series, analysis)
        return ApiResponse(
            {
                "dictionary": queries.dictionary_summary(store, record, dagster_url, counts),
                "all_series": all_series,
                "analysis": analysis,
                "analyses": list(counts),
                "frequency_histogram": queries.frequency_histogram(frequencies),
            }
        )

    def api_features(request: Request) -> Response:
        """One page of the feature table: total (matching the filter), page, per_page, n_pages, sort, descending,
        filter, rows (index, act_times, n_analyzed_tokens, frequency, max_activation, mean_activation,
        explanation, score, scores, location)."""
        query = parse_table_query(request.query_params)
        record, _ = dictionary_of(request, query.series)
        names = store.list_analysis_names(record.name, record.series)
        analysis = queries.choose_analysis(record, names, query.analysis)
        table = queries.feature_table(store, record, query, analysis)
        return ApiResponse({"dictionary": record.name, "series": record.series, "analysis": analysis, **table})

    def api_feature(request: Request) -> Response:
        """One feature: dictionary, index, previous, next, analysis, analyses, statistics, histogram (edges,
        counts, source: "analysis" or "samples"), pools (name, n_contexts, contexts: max_activation, dataset,
        doc_index, doc_position, start, end, tokens: text, activation, position, token_id), decoder (location,
        norms, cosines; null for one decoder per feature), logits (promoted, suppressed), interpretation
        (explanation, model, error, scores)."""
        return ApiResponse(_feature(request))

    def api_search(request: Request) -> Response:
        """Explanations containing `q` across every dictionary: query, hits (dictionary, series, index,
        explanation, score), more (the list was cut at 100)."""
        return ApiResponse(queries.search(store, request.query_params.get("q", "")))

    def _feature(request: Request) -> dict[str, Any]:
        params = request.query_params
        sizes = {
            "window": _int(params, "window", 24, 0, MAX_WINDOW),
            "n_top": _int(params, "top", 10, 0, 1000),
            "n_other": _int(params, "other", 5, 0, 1000),
        }
        record, _ = dictionary_of(request, params.get("series") or None)
        index = request.path_params["index"]
        queries.check_feature_index(record, index)
        decode, note = tokenizers.decoder(record)
        return queries.feature_detail(store, record, index, params.get("analysis") or None, decode, note, **sizes)

    # errors ---------------------------------------------------------------------------------------------------
    def error(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/api/"):
            return ApiResponse({"error": message, "status": status}, status_code=status)
        return page(request, "error.html", {"status": status, "message": message}, status_code=status)

    def not_found(request: Request, exc: Exception) -> Response:
        return error(request, 404, str(exc))

    def bad_request(request: Request, exc: Exception) -> Response:
        return error(request, 400, str(exc))

    def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        messages = {404: f"no page at {request.url.path}", 405: "this browser is read-only: GET requests only"}
        response = error(request, exc.status_code, messages.get(exc.status_code, str(exc.detail)))
        response.headers.update(exc.headers or {})
        return response

    def server_error(request: Request, exc: Exception) -> Response:
        return error(request, 500, f"internal error ({type(exc).__name__}); the server log has the details")

    static = Path(__file__).parent / "static"
    routes = [
        Route("/", index),
        Route("/search", search_page),
        Route("/dictionaries/{name}", dictionary_page),
        Route("/dictionaries/{name}/jump", jump),
        Route("/dictionaries/{name}/features/{index:int}", feature_page),
        Route("/api/dictionaries", api_dictionaries),
        Route("/api/dictionaries/{name}", api_dictionary),
        Route("/api/dictionaries/{name}/features", api_features),
        Route("/api/dictionaries/{name}/features/{index:int}", api_feature),
        Route("/api/search", api_search),
        Mount("/static", StaticFiles(directory=static), name="static"),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={
            NotFound: not_found,
            RecordNotFoundError: not_found,
            BadRequest: bad_request,
            HTTPException: http_error,
            Exception: server_error,
        },
    )


def _table_params(request: Request, query: TableQuery) -> dict[str, Any]:
    """The page's table parameters as they appear in its links (what a sort or page link keeps)."""
    params = {key: request.query_params.get(key) for key in (*_FILTER_PARAMS, "explanation", "analysis", "per_page")}
    return {key: value for key, value in params.items() if value} | {"sort": query.sort, "desc": int(query.descending)}
