#!/usr/bin/env python3
"""Seeds the order service's tables with N orders and their events, straight into the database
(not through the API), for bench/reports.sh. Deterministic: the same N gives the same orders on
SQLite and PostgreSQL.

  reports_seed.py sqlite ORDERS_DB N   inserts into the SQLite file ORDERS_DB
  reports_seed.py tsv DIR N            writes DIR/orders.tsv and DIR/events.tsv for COPY

Orders are placed evenly over the 365 days before now, in USD (60%), EUR (30%) and JPY (10%),
and end DELIVERED (about 70%), SHIPPED, PROCESSING, CONFIRMED, or CANCELLED on request, by a
declined payment or for want of stock; each has the events the saga and the API would have
written (placed, saga steps, status changes), with log-normal lead times.
"""

import json
import random
import sys
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

SKUS = [("SKU-CHAIR", Decimal("49.90")), ("SKU-LAMP", Decimal("15.05")), ("SKU-DESK", Decimal("189.00"))]
ADDRESS = {"name": "Ada Lovelace", "line1": "12 Analytical Row", "city": "London",
           "postalCode": "N1 7AA", "country": "GB"}


def text(at):
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def order_id(rng, at):
    ms = int(at.timestamp() * 1000)
    return str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (rng.getrandbits(12) << 64)
                         | (0b10 << 62) | rng.getrandbits(62)))


def generate(n):
    """Yields (order row, [event rows]) for n orders."""
    rng = random.Random(20261207)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    start = now - timedelta(days=365)
    span = (now - start).total_seconds()
    customers = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(1000)]
    for i in range(n):
        created = start + timedelta(seconds=span * i / n + rng.random() * span / n)
        created = created.replace(microsecond=rng.randrange(1_000_000))
        oid = order_id(rng, created)
        currency = rng.choices(["USD", "EUR", "JPY"], [6, 3, 1])[0]
        items = []
        for sku, price in rng.sample(SKUS, rng.randint(1, 3)):
            if currency == "JPY":
                price = (price * 150).quantize(Decimal("1"))
            items.append({"sku": sku, "quantity": rng.randint(1, 4), "unitPrice": str(price)})
        total = sum(Decimal(it["unitPrice"]) * it["quantity"] for it in items)
        customer = rng.choice(customers)
        fate = rng.choices(
            ["DELIVERED", "SHIPPED", "PROCESSING", "CONFIRMED", "REQUESTED", "PAYMENT_FAILED",
             "STOCK_REJECTED"], [70, 5, 3, 5, 7, 6, 4])[0]
        events = [("OrderPlaced", {"customerId": customer, "currency": currency, "items": items,
                                   "shippingAddress": ADDRESS, "total": str(total)}, created)]
        doc = {"status": "PENDING", "shipping": None, "cancelReason": None}
        at = created

        def status(frm, to, when, reason=None):
            data = {"from": frm, "to": to}
            if reason:
                data["reason"] = reason
            events.append(("OrderStatusChanged", data, when))
            doc["status"] = to

        def step(name, when, detail=None):
            data = {"step": name}
            if detail:
                data["detail"] = detail
            events.append(("SagaStepRecorded", data, when))

        if fate == "STOCK_REJECTED":
            at += timedelta(milliseconds=rng.lognormvariate(3, 0.5))
            reason = "out of stock: SKU-DESK (requested 4, available 0)"
            step("STOCK_REJECTED", at, reason)
            status("PENDING", "CANCELLED", at, reason)
            doc["cancelReason"] = reason
        else:
            at += timedelta(milliseconds=rng.lognormvariate(3, 0.5))
            step("STOCK_RESERVED", at)
            at += timedelta(milliseconds=rng.lognormvariate(5, 1))
            if fate == "PAYMENT_FAILED":
                reason = "payment declined: the card was declined"
                step("PAYMENT_FAILED", at, reason)
                status("PENDING", "CANCELLED", at, reason)
                doc["cancelReason"] = reason
                events.append(("SagaStepRecorded", {"step": "STOCK_RELEASED"},
                               at + timedelta(milliseconds=5)))
            else:
                step("PAYMENT_SUCCEEDED", at)
                status("PENDING", "CONFIRMED", at)
                doc["confirmedAt"] = text(at)
                if fate == "REQUESTED":
                    at += timedelta(hours=rng.lognormvariate(1, 1))
                    status("CONFIRMED", "CANCELLED", at, "changed my mind")
                    doc["cancelReason"] = "changed my mind"
                elif fate != "CONFIRMED":
                    at += timedelta(hours=rng.lognormvariate(1.5, 0.8))
                    status("CONFIRMED", "PROCESSING", at)
                    if fate != "PROCESSING":
                        at += timedelta(hours=rng.lognormvariate(2.5, 0.6))
                        shipping = {"carrier": "DHL", "trackingNumber": f"JD{i:012d}"}
                        events.append(("ShippingDetailsSet", {"shipping": shipping}, at))
                        doc["shipping"] = shipping
                        status("PROCESSING", "SHIPPED", at)
                        doc["shippedAt"] = text(at)
                        if fate == "DELIVERED":
                            at += timedelta(hours=rng.lognormvariate(3.5, 0.5))
                            status("SHIPPED", "DELIVERED", at)
                            doc["deliveredAt"] = text(at)
        version = len(events)
        document = {
            "id": oid, "customerId": customer, "currency": currency, "status": doc["status"],
            "items": items, "shippingAddress": ADDRESS, "notes": None, "shipping": doc["shipping"],
            "total": str(total), "cancelReason": doc["cancelReason"], "customerVerified": True,
            "stockReserved": fate not in ("STOCK_REJECTED", "PAYMENT_FAILED", "REQUESTED"),
            "version": version, "createdAt": text(created), "updatedAt": text(at),
        }
        for key in ("confirmedAt", "shippedAt", "deliveredAt"):
            if key in doc:
                document[key] = doc[key]
        order = (oid, customer, doc["status"], currency, str(total), version, text(created),
                 text(at), json.dumps(document, separators=(",", ":")))
        rows = [(oid, v + 1, kind, json.dumps({"type": kind, "data": data}, separators=(",", ":")),
                 text(when)) for v, (kind, data, when) in enumerate(events)]
        yield order, rows


def seed_sqlite(path, n):
    import sqlite3
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous = OFF")
    position = db.execute("SELECT COALESCE(MAX(feed_position), 0) FROM events").fetchone()[0]
    orders, events = [], []

    def flush():
        db.executemany("INSERT INTO orders (id, customer_id, status, currency, total, version, "
                       "created_at, updated_at, document) VALUES (?,?,?,?,?,?,?,?,?)", orders)
        db.executemany("INSERT INTO events (aggregate_id, version, event_type, payload, "
                       "occurred_at, feed_position) VALUES (?,?,?,?,?,?)", events)
        orders.clear()
        events.clear()

    for order, rows in generate(n):
        orders.append(order)
        for row in rows:
            position += 1
            events.append(row + (position,))
        if len(orders) >= 20_000:
            flush()
    flush()
    db.commit()
    db.close()


def seed_tsv(directory, n):
    position = 0
    with open(f"{directory}/orders.tsv", "w") as o, open(f"{directory}/events.tsv", "w") as e:
        for order, rows in generate(n):
            o.write("\t".join(map(str, order)) + "\n")
            for row in rows:
                position += 1
                e.write("\t".join(map(str, row + (position,))) + "\n")


if __name__ == "__main__":
    kind, target, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {"sqlite": seed_sqlite, "tsv": seed_tsv}[kind](target, count)
