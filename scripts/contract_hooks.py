"""schemathesis hooks for scripts/contract-test.sh: what a real client does that a schema
cannot say.

- An Idempotency-Key names one request: a client sends a fresh key with every new request.
  A valid generated key is replaced by a fresh one, so a key is never reused with another body
  (which the API rightly refuses with 422). Invalid keys are kept: they test the 400.
- A reference names an existing resource: a generated customerId in an order or a
  notification (a valid UUID) is replaced by the demo catalogue's customer, as a client would
  send the id of a customer it registered. Invalid ids are kept: they test the 422.
- A cursor is opaque: only a `nextCursor` the API returned is one. Generated cursors are left
  out; the document's links (`nextPage`) make schemathesis follow real ones.
"""

import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"^[!-~]{1,255}$")
UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# `orderwave --demo`'s customer.
DEMO_CUSTOMER = "019ab1c2-0000-7000-8000-000000000001"
REFERENCING = {("POST", "/api/v1/orders"), ("POST", "/api/v1/notifications")}


@schemathesis.hook
def map_case(context, case):
    headers = case.headers or {}
    for name in list(headers):
        value = headers[name]
        if name.lower() == "idempotency-key" and isinstance(value, str) and VALID_KEY.match(value):
            headers[name] = str(uuid.uuid4())
    operation = (case.operation.method.upper(), case.operation.path)
    body = case.body
    if operation in REFERENCING and isinstance(body, dict):
        customer = body.get("customerId")
        if isinstance(customer, str) and UUID.match(customer):
            body["customerId"] = DEMO_CUSTOMER
    if case.query and "cursor" in case.query:
        case.query = {k: v for k, v in case.query.items() if k != "cursor"}
    return case
