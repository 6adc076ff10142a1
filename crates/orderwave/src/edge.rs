//! The gateway process (`orderwave serve --services gateway --upstream NAME=URL ...`): one
//! address in front of the service processes. It authenticates the caller and applies the rate
//! limits, then forwards `/api/v1/*` to the service that owns the resource
//! ([`gateway::proxy`]); it has no database and no bus.

use crate::config::Config;
use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use gateway::proxy::Proxy;
use http_kit::health::{HealthCheck, HealthReport};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

pub struct GatewayApp {
    listener: TcpListener,
    router: Router,
    addr: SocketAddr,
    proxy: Arc<Proxy>,
}

impl GatewayApp {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let keys = crate::auth::load(&config.auth, &config.data_dir, true)
            .context("loading the token keys")?;
        let policies = http_kit::resilience::PolicyOverrides::parse(
            &config.dependency_policies,
            &crate::app::DEPENDENCIES,
        )
        .map_err(anyhow::Error::msg)
        .context("--dependency-policy")?;
        anyhow::ensure!(
            !config.upstreams.is_empty(),
            "--upstream: the gateway needs at least one service to send requests to"
        );
        let proxy = Arc::new(
            Proxy::new(&config.upstreams, |dependency| {
                policies.for_dependency(dependency, Proxy::default_policy())
            })
            .map_err(anyhow::Error::msg)
            .context("--upstream")?,
        );
        let limiter = crate::app::rate_limiter(config, &policies)?;
        let edge = Arc::new(gateway::Gateway {
            verifier: keys.verifier,
            limiter,
        });
        let auth = &config.auth;
        let api = Router::new()
            .fallback(gateway::proxy::forward)
            .with_state(proxy.clone())
            .layer(axum::middleware::from_fn_with_state(edge, gateway::edge))
            .layer(axum::middleware::from_fn_with_state(
                gateway::limits::InFlight::new(auth.max_in_flight),
                gateway::limits::shed_load,
            ));
        let router = Router::new()
            .route("/health/live", get(http_kit::health::live))
            .route("/health/ready", get(ready).with_state(proxy.clone()))
            .route("/openapi.json", get(openapi).with_state(proxy.clone()))
            .merge(
                utoipa_swagger_ui::SwaggerUi::new("/docs")
                    .config(utoipa_swagger_ui::Config::from("/openapi.json")),
            )
            .route(
                "/metrics",
                get(|| async { http_kit::metrics::handle().render() }),
            )
            .merge(crate::console::router(None))
            // Everything else is forwarded, its path as it came.
            .fallback_service(api);
        let router = crate::app::outer_layers(router, config);
        let (listener, addr) = crate::app::bind(config).await?;
        Ok(Self {
            listener,
            router,
            addr,
            proxy,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.addr, "orderwave gateway listening");
        let proxy = self.proxy;
        let shutdown = async move {
            shutdown.await;
            proxy.stop_streams();
        };
        let served = crate::app::serve(self.listener, self.router, shutdown).await;
        tracing::info!("orderwave gateway stopped");
        served.context("serving HTTP")
    }
}

/// Every service's API in one OpenAPI document, asked of the services now.
async fn openapi(State(proxy): State<Arc<Proxy>>) -> Json<serde_json::Value> {
    Json(proxy.openapi().await)
}

/// Ready while it listens; the report says which service processes answer their own readiness
/// check and the state of each service's breaker (`degraded` when one is down or open).
async fn ready(State(proxy): State<Arc<Proxy>>) -> impl IntoResponse {
    let mut checks = Vec::new();
    let mut degraded = false;
    for (service, upstream) in proxy.upstreams() {
        for url in upstream.urls() {
            let ok = proxy.ready(url).await;
            degraded |= !ok;
            checks.push(HealthCheck {
                name: format!("upstream:{service}:{url}"),
                status: if ok { "ok" } else { "down" }.into(),
            });
        }
        let state = upstream.policy().state().label();
        degraded |= state != "ok";
        checks.push(HealthCheck {
            name: format!("breaker:{}", upstream.policy().dependency()),
            status: state.into(),
        });
    }
    checks.sort_by(|a, b| a.name.cmp(&b.name));
    (
        StatusCode::OK,
        Json(HealthReport {
            status: if degraded { "degraded" } else { "ok" }.into(),
            checks,
        }),
    )
}
