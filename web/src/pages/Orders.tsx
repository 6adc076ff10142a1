import { useEffect, useRef, useState } from "react";
import { call, STATUSES, withQuery, type Order, type Page, type Session } from "../api";
import { formatTime, money, shortId } from "../format";
import { OrderSocket } from "../live";
import { Alert, Field, Pager, Section, StatusBadge, useCursorPages, useLoad } from "../ui";

/** The orders table: filters, paging by cursor, and each row's status kept live. */
export function Orders({ session, initialCustomer = "" }: { session: Session; initialCustomer?: string }) {
  const admin = session.role === "admin";
  const [status, setStatus] = useState("");
  const [customer, setCustomer] = useState(initialCustomer);
  const [from, setFrom] = useState("");
  const pages = useCursorPages();
  const cursor = pages.cursor;
  const page = useLoad(
    () =>
      call<Page<Order>>(
        session,
        withQuery("/api/v1/orders", {
          status,
          customerId: admin ? customer.trim() : undefined,
          createdFrom: from ? new Date(`${from}T00:00:00`).toISOString() : undefined,
          limit: 20,
          cursor,
        }),
      ),
    [session, status, customer, from, cursor],
  );
  const [live, setLive] = useState<Record<string, { status: Order["status"]; version: number }>>({});
  const socket = useRef<OrderSocket | null>(null);
  useEffect(() => {
    const s = new OrderSocket(session, (event) => {
      if (!event.data.toStatus) return;
      setLive((l) => ({
        ...l,
        [event.orderId]: { status: event.data.toStatus as Order["status"], version: event.id },
      }));
    });
    socket.current = s;
    return () => s.close();
  }, [session]);
  useEffect(() => {
    socket.current?.follow((page.data?.items ?? []).map((o) => ({ id: o.id, version: o.version })));
  }, [page.data]);
  const filtersChanged = () => pages.first();
  const rows = page.data?.items ?? [];
  return (
    <Section
      title="Orders"
      actions={
        <a className="button" href="#/orders/new">
          Place an order
        </a>
      }
    >
      <form className="filters" onSubmit={(e) => e.preventDefault()} aria-label="Filter orders">
        <Field label="Status">
          <select
            value={status}
            onChange={(e) => {
              setStatus(e.target.value);
              filtersChanged();
            }}
          >
            <option value="">Any</option>
            {STATUSES.map((s) => (
              <option key={s}>{s}</option>
            ))}
          </select>
        </Field>
        {admin ? (
          <Field label="Customer id">
            <input
              value={customer}
              placeholder="all customers"
              onChange={(e) => {
                setCustomer(e.target.value);
                filtersChanged();
              }}
            />
          </Field>
        ) : null}
        <Field label="Created from">
          <input
            type="date"
            value={from}
            onChange={(e) => {
              setFrom(e.target.value);
              filtersChanged();
            }}
          />
        </Field>
      </form>
      <Alert error={page.error} />
      <div className="table-wrap">
        <table>
          <thead>
            <tr>
              <th scope="col">Order</th>
              <th scope="col">Status</th>
              <th scope="col">Total</th>
              {admin ? <th scope="col">Customer</th> : null}
              <th scope="col">Created</th>
            </tr>
          </thead>
          <tbody>
            {rows.map((order) => {
              const now = live[order.id] && live[order.id].version > order.version ? live[order.id].status : order.status;
              return (
                <tr key={order.id} data-order={order.id}>
                  <td>
                    <a href={`#/orders/${order.id}`} title={order.id}>
                      {shortId(order.id)}
                    </a>
                  </td>
                  <td>
                    <StatusBadge status={now} />
                  </td>
                  <td className="num">{money(order.total, order.currency)}</td>
                  {admin ? <td title={order.customerId}>{shortId(order.customerId)}</td> : null}
                  <td>{formatTime(order.createdAt)}</td>
                </tr>
              );
            })}
            {rows.length === 0 && !page.loading ? (
              <tr>
                <td colSpan={5} className="empty">
                  No orders match.
                </td>
              </tr>
            ) : null}
          </tbody>
        </table>
      </div>
      <Pager pages={pages} nextCursor={page.data?.nextCursor} />
    </Section>
  );
}
