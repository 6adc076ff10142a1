// Small pieces every page uses.
import { useCallback, useEffect, useState, type ReactNode } from "react";
import { ProblemError } from "./api";

export interface Loaded<T> {
  data: T | undefined;
  error: string | undefined;
  loading: boolean;
  reload: () => void;
  /** Replaces the data on screen (after a change the server answered with). */
  set: (data: T) => void;
}

/** Loads `load()` now and whenever `deps` change; keeps the last data while reloading. */
export function useLoad<T>(load: () => Promise<T>, deps: unknown[]): Loaded<T> {
  const [data, setData] = useState<T>();
  const [error, setError] = useState<string>();
  const [loading, setLoading] = useState(true);
  const [tick, setTick] = useState(0);
  const run = useCallback(load, deps);
  useEffect(() => {
    let current = true;
    setLoading(true);
    run().then(
      (value) => {
        if (!current) return;
        setData(value);
        setError(undefined);
        setLoading(false);
      },
      (e: unknown) => {
        if (!current) return;
        setError(errorText(e));
        setLoading(false);
      },
    );
    return () => {
      current = false;
    };
  }, [run, tick]);
  return { data, error, loading, reload: () => setTick((t) => t + 1), set: setData };
}

export function errorText(e: unknown): string {
  if (e instanceof ProblemError) return e.message;
  if (e instanceof Error) return e.message;
  return String(e);
}

/** Runs an action; its error is shown by the page, its success may say something. */
export function useAction(): {
  busy: boolean;
  error: string | undefined;
  done: string | undefined;
  run: (action: () => Promise<string | void>) => Promise<void>;
} {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string>();
  const [done, setDone] = useState<string>();
  const run = async (action: () => Promise<string | void>) => {
    setBusy(true);
    setError(undefined);
    setDone(undefined);
    try {
      const message = await action();
      if (message) setDone(message);
    } catch (e) {
      setError(errorText(e));
    } finally {
      setBusy(false);
    }
  };
  return { busy, error, done, run };
}

export function Alert({ error, done }: { error?: string; done?: string }) {
  if (error) {
    return (
      <p className="alert error" role="alert">
        {error}
      </p>
    );
  }
  if (done) {
    return (
      <p className="alert ok" role="status">
        {done}
      </p>
    );
  }
  return null;
}

export function StatusBadge({ status }: { status: string }) {
  return (
    <span className={`badge status-${status.toLowerCase()}`} data-status={status}>
      {status}
    </span>
  );
}

export function Field({ label, children, hint }: { label: string; children: ReactNode; hint?: string }) {
  return (
    <label className="field">
      <span>{label}</span>
      {children}
      {hint ? <small>{hint}</small> : null}
    </label>
  );
}

export function Section({ title, children, actions }: { title: string; children: ReactNode; actions?: ReactNode }) {
  return (
    <section className="card" aria-label={title}>
      <header className="card-head">
        <h2>{title}</h2>
        {actions}
      </header>
      {children}
    </section>
  );
}

/** Paging by cursor: the cursor of the page on screen, and moving between pages. */
export function useCursorPages() {
  // The cursors of the pages before this one, then this one's.
  const [cursors, setCursors] = useState<string[]>([]);
  return {
    cursor: cursors[cursors.length - 1] as string | undefined,
    page: cursors.length + 1,
    first: () => setCursors([]),
    back: () => setCursors((c) => c.slice(0, -1)),
    next: (cursor: string) => setCursors((c) => [...c, cursor]),
  };
}

export function Pager({ pages, nextCursor }: { pages: ReturnType<typeof useCursorPages>; nextCursor?: string | null }) {
  return (
    <nav className="pager" aria-label="Pages">
      <button type="button" disabled={pages.page === 1} onClick={pages.back}>
        Previous
      </button>
      <span>Page {pages.page}</span>
      <button type="button" disabled={!nextCursor} onClick={() => nextCursor && pages.next(nextCursor)}>
        Next
      </button>
    </nav>
  );
}

/** A table's header row. */
export function TableHead({ columns }: { columns: string[] }) {
  return (
    <thead>
      <tr>
        {columns.map((column, i) => (
          <th key={i} scope="col">
            {column}
          </th>
        ))}
      </tr>
    </thead>
  );
}

/** A form's text fields as one object, and what binds an input to one of them. */
export function useFields<T extends Record<string, string>>(initial: T) {
  const [fields, setFields] = useState(initial);
  const bind = (name: keyof T) => ({
    value: fields[name],
    onChange: (e: React.ChangeEvent<HTMLInputElement>) => setFields((f) => ({ ...f, [name]: e.target.value })),
  });
  return [fields, bind] as const;
}
