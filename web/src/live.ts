// One WebSocket for the live status of many orders (the orders table): subscribes to the
// orders on screen and resubscribes after a reconnect from the last event seen of each.
import type { HistoryEntry, Session } from "./api";

export interface SocketEvent {
  orderId: string;
  id: number;
  event: string;
  data: HistoryEntry;
}

export class OrderSocket {
  private socket: WebSocket | null = null;
  private readonly last = new Map<string, number>();
  private closed = false;
  private delay = 500;

  constructor(
    private readonly session: Session,
    private readonly onEvent: (event: SocketEvent) => void,
  ) {
    this.connect();
  }

  /** Follows exactly these orders, each from after `version` (its version on screen). */
  follow(orders: { id: string; version: number }[]) {
    const wanted = new Map(orders.map((o) => [o.id, o.version]));
    for (const id of [...this.last.keys()]) {
      if (!wanted.has(id)) {
        this.last.delete(id);
        this.send({ unsubscribe: id });
      }
    }
    for (const [id, version] of wanted) {
      if (!this.last.has(id)) {
        this.last.set(id, version);
        this.send({ subscribe: id, after: version });
      }
    }
  }

  close() {
    this.closed = true;
    this.socket?.close();
  }

  private send(message: object) {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(message));
  }

  private connect() {
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/v1/orders/ws`;
    // A browser cannot set Authorization on an upgrade: the token goes as a subprotocol.
    const socket = new WebSocket(url, ["orderwave.bearer", this.session.token]);
    this.socket = socket;
    socket.onopen = () => {
      this.delay = 500;
      for (const [id, after] of this.last) this.send({ subscribe: id, after });
    };
    socket.onmessage = (message) => {
      const event = JSON.parse(String(message.data)) as SocketEvent & { error?: unknown };
      if (event.error || !this.last.has(event.orderId)) return;
      if (event.id > (this.last.get(event.orderId) ?? 0)) {
        this.last.set(event.orderId, event.id);
        this.onEvent(event);
      }
    };
    socket.onclose = () => {
      if (this.closed) return;
      setTimeout(() => this.connect(), this.delay);
      this.delay = Math.min(this.delay * 2, 10_000);
    };
  }
}
