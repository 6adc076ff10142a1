import { useEffect, useState } from "react";
import { readToken, type Session } from "./api";
import { Customers } from "./pages/Customers";
import { Inventory } from "./pages/Inventory";
import { Notifications } from "./pages/Notifications";
import { Operations } from "./pages/Operations";
import { OrderDetail } from "./pages/OrderDetail";
import { Orders } from "./pages/Orders";
import { PlaceOrder } from "./pages/PlaceOrder";
import { useRoute } from "./router";
import { Alert, Field } from "./ui";

const STORAGE_KEY = "orderwave.token";

export function App() {
  const [session, setSession] = useState<Session | null>(() => readToken(sessionStorage.getItem(STORAGE_KEY) ?? ""));
  const signIn = (s: Session) => {
    sessionStorage.setItem(STORAGE_KEY, s.token);
    setSession(s);
  };
  const signOut = () => {
    sessionStorage.removeItem(STORAGE_KEY);
    setSession(null);
  };
  if (!session) return <Login onSignIn={signIn} />;
  return <Shell session={session} onSignOut={signOut} />;
}

const PAGES: { path: string; label: string; admin?: boolean }[] = [
  { path: "/orders", label: "Orders" },
  { path: "/orders/new", label: "Place order" },
  { path: "/inventory", label: "Inventory" },
  { path: "/customers", label: "Customers", admin: true },
  { path: "/notifications", label: "Notifications" },
  { path: "/operations", label: "Operations", admin: true },
];

function Shell({ session, onSignOut }: { session: Session; onSignOut: () => void }) {
  const route = useRoute();
  const admin = session.role === "admin";
  const [menuOpen, setMenuOpen] = useState(false);
  useEffect(() => setMenuOpen(false), [route.path]);
  const current = PAGES.filter((p) => route.path === p.path || route.path.startsWith(`${p.path}/`))
    .sort((a, b) => b.path.length - a.path.length)[0]?.path;
  let page;
  const [first, second] = route.parts;
  if (first === "orders" && second === "new") page = <PlaceOrder session={session} />;
  else if (first === "orders" && second) page = <OrderDetail key={second} session={session} id={second} />;
  else if (first === "orders" || !first)
    page = <Orders key={route.query.get("customerId") ?? ""} session={session} initialCustomer={route.query.get("customerId") ?? ""} />;
  else if (first === "inventory") page = <Inventory session={session} />;
  else if (first === "customers" && admin) page = <Customers session={session} />;
  else if (first === "notifications") page = <Notifications session={session} />;
  else if (first === "operations" && admin) page = <Operations session={session} />;
  else page = <Alert error="No such page." />;
  return (
    <>
      <a className="skip" href="#main" onClick={(e) => { e.preventDefault(); document.getElementById("main")?.focus(); }}>
        Skip to content
      </a>
      <header className="top">
        <span className="brand">orderwave</span>
        <button
          type="button"
          className="menu"
          aria-expanded={menuOpen}
          aria-controls="nav"
          onClick={() => setMenuOpen((o) => !o)}
        >
          Menu
        </button>
        <nav id="nav" aria-label="Main" className={menuOpen ? "open" : ""}>
          {PAGES.filter((p) => admin || !p.admin).map((p) => (
            <a key={p.path} href={`#${p.path}`} aria-current={current === p.path ? "page" : undefined}>
              {p.label}
            </a>
          ))}
        </nav>
        <span className="who">
          {session.subject} ({session.role})
          <button type="button" onClick={onSignOut}>
            Sign out
          </button>
        </span>
      </header>
      <main id="main" tabIndex={-1}>
        {page}
      </main>
    </>
  );
}

function Login({ onSignIn }: { onSignIn: (s: Session) => void }) {
  const [token, setToken] = useState("");
  const [error, setError] = useState<string>();
  const [demoToken, setDemoToken] = useState<string | null>(null);
  useEffect(() => {
    fetch("/console/config.json")
      .then((r) => (r.ok ? r.json() : {}))
      .then((c: { demoToken?: string | null }) => setDemoToken(c.demoToken ?? null))
      .catch(() => setDemoToken(null));
  }, []);
  const use = (text: string) => {
    const session = readToken(text);
    if (!session) {
      setError("That is not a token: paste the whole JWT the server printed or `orderwave token` minted.");
      return;
    }
    onSignIn(session);
  };
  return (
    <main id="main" className="login">
      <h1>orderwave console</h1>
      <form
        className="stack"
        aria-label="Sign in"
        onSubmit={(e) => {
          e.preventDefault();
          use(token);
        }}
      >
        <Field label="Bearer token" hint="Printed at the first start, or minted with `orderwave token --sub ID --role admin`.">
          <textarea rows={4} value={token} onChange={(e) => setToken(e.target.value)} required spellCheck={false} />
        </Field>
        <Alert error={error} />
        <button type="submit">Sign in</button>
        {demoToken ? (
          <button type="button" onClick={() => use(demoToken)}>
            Sign in as the demo admin
          </button>
        ) : null}
      </form>
    </main>
  );
}
