"""`lm-saes serve`: a read-only web browser of the record store (dictionaries, feature tables, feature pages, search,
and the same data as JSON under `/api`). See `lm_saes_core.browser.app`."""

from lm_saes_core.browser.app import create_app

__all__ = ["create_app"]
