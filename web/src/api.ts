// The REST API as the console calls it: a bearer token on every call, problem+json errors
// turned into ProblemError, and the types of the answers the pages read.

export type Status = "PENDING" | "CONFIRMED" | "PROCESSING" | "SHIPPED" | "DELIVERED" | "CANCELLED";
export const STATUSES: Status[] = ["PENDING", "CONFIRMED", "PROCESSING", "SHIPPED", "DELIVERED", "CANCELLED"];

export interface Problem {
  type?: string;
  title?: string;
  status: number;
  detail?: string;
  errors?: { field: string; message: string }[];
}

export class ProblemError extends Error {
  constructor(readonly problem: Problem) {
    super(describeProblem(problem));
  }
}

/** One line a person can read: the title, the detail and each field's message. */
export function describeProblem(p: Problem): string {
  const head = [p.title, p.detail].filter(Boolean).join(": ") || `HTTP ${p.status}`;
  const fields = (p.errors ?? []).map((e) => `${e.field} ${e.message}`);
  return fields.length ? `${head} (${fields.join("; ")})` : head;
}

export interface Address {
  name: string;
  line1: string;
  line2?: string | null;
  city: string;
  postalCode: string;
  country: string;
}

export interface Order {
  id: string;
  customerId: string;
  status: Status;
  currency: string;
  items: { sku: string; quantity: number; unitPrice: string; lineTotal: string }[];
  total: string;
  shippingAddress: Address;
  notes?: string | null;
  shipping?: { carrier: string; trackingNumber: string; estimatedDelivery?: string | null } | null;
  cancelReason?: string | null;
  paymentMethod?: string | null;
  customerVerified: boolean;
  allowedNext: Status[];
  version: number;
  createdAt: string;
  updatedAt: string;
}

export interface HistoryEntry {
  version: number;
  /** `OrderPlaced`, `SagaStepRecorded`, `OrderStatusChanged`, … */
  type: string;
  time: string;
  fromStatus?: string | null;
  toStatus?: string | null;
  reason?: string | null;
  change: unknown;
}

export interface Page<T> {
  items: T[];
  nextCursor?: string | null;
}

export interface Product {
  sku: string;
  name: string;
  price: string;
  currency: string;
  onHand: number;
  reserved: number;
  available: number;
  version: number;
  updatedAt: string;
}

export interface Customer {
  id: string;
  name: string;
  email: string;
  phone?: string;
  notificationPreferences: { email: string[]; sms: string[] };
  version: number;
  createdAt: string;
}

export interface Refund {
  id: string;
  amount: string;
  reason: string;
  status: string;
  createdAt: string;
}

export interface Payment {
  id: string;
  orderId: string;
  amount: string;
  currency: string;
  method: string;
  status: string;
  refundedAmount: string;
  failureReason?: string;
  refunds: Refund[];
  createdAt: string;
}

export interface Notification {
  id: string;
  eventType: string;
  channel: string;
  recipient: string;
  orderId?: string;
  customerId?: string;
  templateKey?: string;
  subject: string;
  textBody: string;
  status: string;
  attempts: number;
  lastError?: string;
  createdAt: string;
  history: { attempt: number; at: string; outcome: string; detail: string }[];
}

export interface Template {
  key: string;
  channel: string;
  subject: string;
  textBody: string;
  htmlBody?: string;
  version: number;
  updatedAt: string;
}

export interface DeadLetter {
  id: string;
  source: string;
  group: string;
  messageId: string;
  topic: string;
  message: unknown;
  error: string;
  attempts: number;
  failedAt: string;
  redriveRequested: boolean;
}

export interface OutboxReport {
  service: string;
  pending: number;
  oldestCreatedAt?: string | null;
  lagSeconds?: number | null;
}

export interface ConsumerLag {
  group: string;
  partition?: number;
  position: number;
  head: number;
  lag: number;
}

export interface Readiness {
  status: string;
  checks: { name: string; status: string }[];
}

export interface Session {
  token: string;
  /** From the token's claims (not verified here: the server checks every call). */
  subject: string;
  role: string;
}

/** The subject and role a JWT names, or null when it is not a JWT. */
export function readToken(token: string): Session | null {
  const parts = token.trim().split(".");
  if (parts.length !== 3) return null;
  try {
    const json = atob(parts[1].replace(/-/g, "+").replace(/_/g, "/"));
    const claims = JSON.parse(json) as { sub?: unknown; role?: unknown };
    if (typeof claims.sub !== "string" || typeof claims.role !== "string") return null;
    return { token: token.trim(), subject: claims.sub, role: claims.role };
  } catch {
    return null;
  }
}

export interface CallOptions {
  method?: string;
  body?: unknown;
  ifMatch?: number;
  idempotencyKey?: string;
}

/** Calls the API as `session`; resolves to the JSON answer (undefined for 204). */
export async function call<T>(session: Session, path: string, options: CallOptions = {}): Promise<T> {
  const headers: Record<string, string> = { authorization: `Bearer ${session.token}`, accept: "application/json" };
  if (options.body !== undefined) headers["content-type"] = "application/json";
  if (options.ifMatch !== undefined) headers["if-match"] = `"${options.ifMatch}"`;
  if (options.idempotencyKey) headers["idempotency-key"] = options.idempotencyKey;
  let response: Response;
  try {
    response = await fetch(path, {
      method: options.method ?? "GET",
      headers,
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
    });
  } catch {
    throw new ProblemError({ status: 0, title: "The server cannot be reached" });
  }
  if (response.status === 204) return undefined as T;
  const text = await response.text();
  const json = text ? safeJson(text) : undefined;
  if (!response.ok) {
    const problem = (json && typeof json === "object" ? json : { title: text }) as Problem;
    throw new ProblemError({ ...problem, status: response.status });
  }
  return json as T;
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** `path?key=value&…` without the empty values. */
export function withQuery(path: string, query: Record<string, string | number | undefined | null>): string {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value !== undefined && value !== null && value !== "") params.set(key, String(value));
  }
  const text = params.toString();
  return text ? `${path}?${text}` : path;
}

export const enc = encodeURIComponent;
