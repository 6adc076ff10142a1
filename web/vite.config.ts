import { defineConfig } from "vitest/config";

// The console is served by the orderwave binary at `/`, its files under `/assets/`
// (embedded at compile time from `dist/`). `npm run dev` proxies the API to a local server.
export default defineConfig({
  base: "/",
  build: { outDir: "dist", emptyOutDir: true, sourcemap: false, chunkSizeWarningLimit: 400 },
  server: {
    proxy: {
      "/api": { target: "http://127.0.0.1:8080", ws: true },
      "/console/config.json": "http://127.0.0.1:8080",
      "/health": "http://127.0.0.1:8080",
    },
  },
  test: { environment: "jsdom", include: ["src/**/*.test.{ts,tsx}"] },
});
