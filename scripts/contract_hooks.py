"""schemathesis hooks for scripts/contract-test.sh: what a real client does that a schema
cannot say.

- An Idempotency-Key names one request: a client sends a fresh key with every new request.
  A valid generated key is replaced by a fresh one, so a key is never reused with another body
  (which the API rightly refuses with 422). Invalid keys are kept: they test the 400.
- A cursor is opaque: only a `nextCursor` the API returned is one. Generated cursors are left
  out; the document's links (`nextPage`) make schemathesis follow real ones.
"""

import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"^[!-~]{1,255}$")


@schemathesis.hook
def map_headers(context, headers):
    if headers:
        for name in list(headers):
            if name.lower() == "idempotency-key" and isinstance(headers[name], str) and VALID_KEY.match(headers[name]):
                headers[name] = str(uuid.uuid4())
    return headers


@schemathesis.hook
def map_query(context, query):
    if query and "cursor" in query:
        query = {k: v for k, v in query.items() if k != "cursor"}
    return query
