// Pages are addressed after `#`, so the server serves only `/`: `#/orders/ID` and so on.
import { useEffect, useState } from "react";

export interface Route {
  /** The path after `#`, e.g. `/orders/019…`. */
  path: string;
  parts: string[];
  query: URLSearchParams;
}

export function parseHash(hash: string): Route {
  const raw = hash.replace(/^#/, "") || "/orders";
  const [path, query = ""] = raw.split("?", 2);
  return {
    path,
    parts: path.split("/").filter(Boolean).map(decodeURIComponent),
    query: new URLSearchParams(query),
  };
}

export function useRoute(): Route {
  const [hash, setHash] = useState(location.hash);
  useEffect(() => {
    const changed = () => setHash(location.hash);
    window.addEventListener("hashchange", changed);
    return () => window.removeEventListener("hashchange", changed);
  }, []);
  return parseHash(hash);
}

export function navigate(path: string) {
  location.hash = path;
}
