//! Wiring: open the databases, build every service's router behind one middleware stack, serve
//! until a shutdown future resolves.

use crate::config::{Config, PaymentProviderKind, Service};
use anyhow::Context;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bus::Bus;
use bus::consumer::{ConsumerConfig, Handler};
use bus::relay::RelayConfig;
use bus::sql::SqlBus;
use customer_service::CustomerService;
use http_kit::Problem;
use http_kit::health::{self, Readiness};
use inventory_service::InventoryService;
use metrics_handle::PrometheusHandle;
use notification_service::NotificationService;
use order_service::OrderService;
use order_service::customers::{CustomerChecker, CustomerDirectory, HttpCustomerDirectory};
use order_service::shared_cache::SharedCache;
use order_service::store::OrderCache;
use payment_service::PaymentService;
use payment_service::provider::{HttpProvider, PaymentProvider, Simulator};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use storage::idempotency::IdempotencyStore;
use storage::{Db, Durability};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

mod metrics_handle {
    pub use metrics_exporter_prometheus::PrometheusHandle;
}

pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(OpenApi)]
#[openapi(
    info(
        title = "orderwave",
        description = "Event-driven order management. Errors are `application/problem+json` (RFC 9457). \
Every POST takes an `Idempotency-Key`; every order carries an `ETag` checked by `If-Match`.",
        license(name = "MIT")
    ),
    tags(
        (name = "orders", description = "Orders and their lifecycle"),
        (name = "inventory", description = "Products, stock and reservations"),
        (name = "payments", description = "Payments of orders and their refunds"),
        (name = "customers", description = "Customers, their contact data and notification preferences"),
        (name = "notifications", description = "Email and SMS to customers: templates, deliveries, attempts and redrive"),
        (name = "reports", description = "Sales and fulfilment reports (admins only)"),
        (name = "admin", description = "Operator endpoints"),
        (name = "operations", description = "Health and metrics"),
    ),
    components(schemas(http_kit::Problem, http_kit::ProblemField, health::HealthReport, health::HealthCheck))
)]
struct ApiDoc;

/// The databases of one running platform: one per service, plus idempotency records and the
/// bus.
struct Databases {
    orders: Option<Db>,
    customers: Option<Db>,
    inventory: Option<Db>,
    payments: Option<Db>,
    notifications: Option<Db>,
    http: Db,
    bus: Db,
}

impl Databases {
    /// Every database this process opened: those of its services, and the shared ones.
    fn all(&self) -> Vec<(String, Db)> {
        [
            ("orders", &self.orders),
            ("customers", &self.customers),
            ("inventory", &self.inventory),
            ("payments", &self.payments),
            ("notifications", &self.notifications),
        ]
        .into_iter()
        .filter_map(|(name, db)| db.clone().map(|db| (name.to_string(), db)))
        .chain([
            ("http".to_string(), self.http.clone()),
            ("bus".to_string(), self.bus.clone()),
        ])
        .collect()
    }
}

/// The database of a service this process runs (opened by [`open_databases`]).
fn opened(db: &Option<Db>) -> anyhow::Result<Db> {
    db.clone()
        .context("the database of a service this process does not run")
}

/// Opens one database: `<name>.db` in the data directory, or schema `<name>` on the
/// PostgreSQL at `url`.
async fn open(
    config: &Config,
    url: Option<&str>,
    name: &str,
    max_connections: u32,
) -> anyhow::Result<Db> {
    open_with(config, url, name, max_connections, Durability::EachCommit).await
}

async fn open_with(
    config: &Config,
    url: Option<&str>,
    name: &str,
    max_connections: u32,
    durability: Durability,
) -> anyhow::Result<Db> {
    match url {
        Some(url) => {
            let db = Db::open_postgres_with(url, name, max_connections, durability)
                .await
                .with_context(|| format!("opening PostgreSQL (schema {name})"))?;
            storage::statistics::keep_current(&db);
            Ok(db)
        }
        None => Db::open_sqlite_with(&config.data_dir, name, durability)
            .await
            .with_context(|| format!("opening {}/{name}.db", config.data_dir.display())),
    }
}

async fn open_databases(config: &Config) -> anyhow::Result<Databases> {
    let small = config.db_max_connections.min(8);
    anyhow::ensure!(
        config.database_url.is_some() || !config.has_service_database_urls(),
        "--database-url-SERVICE needs --database-url too: the platform's idempotency records \
         and bus tables live there, shared by every process"
    );
    // Only the databases of the services this process runs: a process per service holds no
    // connection to the others'.
    let service = async |service: Service, name: &str, connections: u32| match config.runs(service)
    {
        true => open(config, config.database_url_of(service), name, connections)
            .await
            .map(Some),
        false => Ok(None),
    };
    let platform = config.database_url.as_deref();
    Ok(Databases {
        orders: service(Service::Order, "orders", config.db_max_connections).await?,
        customers: service(Service::Customer, "customers", small).await?,
        inventory: service(Service::Inventory, "inventory", small).await?,
        payments: service(Service::Payment, "payments", small).await?,
        notifications: service(Service::Notification, "notifications", small).await?,
        http: open(config, platform, "http", small).await?,
        // The bus log is flushed to disk before a relay marks its messages sent, not on each
        // publish: until then they are still in the outboxes (see `Bus::sync`).
        bus: open_with(config, platform, "bus", small, Durability::OnSync).await?,
    })
}

/// Applies the migrations of the services `--services` names, and the shared ones
/// (`orderwave migrate`).
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let dbs = open_databases(config).await?;
    if let Some(db) = &dbs.orders {
        db.migrate_service(&order_service::MIGRATOR).await?;
    }
    if let Some(db) = &dbs.customers {
        db.migrate_service(&customer_service::MIGRATOR).await?;
    }
    if let Some(db) = &dbs.inventory {
        db.migrate_service(&inventory_service::MIGRATOR).await?;
    }
    if let Some(db) = &dbs.payments {
        db.migrate_service(&payment_service::MIGRATOR).await?;
    }
    if let Some(db) = &dbs.notifications {
        db.migrate_service(&notification_service::MIGRATOR).await?;
    }
    dbs.http.migrate(&storage::idempotency::MIGRATOR).await?;
    dbs.bus.migrate(&bus::sql::MIGRATOR).await?;
    for (_, db) in dbs.all() {
        db.close().await;
    }
    Ok(())
}

/// The bus `--bus` names, its tables migrated in `bus_db` (dead letters live there on every bus).
async fn open_bus(config: &Config, bus_db: &Db) -> anyhow::Result<Arc<dyn Bus>> {
    if config.bus == "sql" {
        let sql_bus = SqlBus::start(bus_db.clone())
            .await
            .context("starting the bus")?
            .with_partitions(u32::from(config.partitions()));
        if let Some(url) = &config.database_url {
            // Other processes publishing on the same database wake our consumers at once.
            sql_bus.listen_postgres(url);
        }
        return Ok(Arc::new(sql_bus));
    }
    bus_db
        .migrate(&bus::sql::MIGRATOR)
        .await
        .context("migrating the bus tables")?;
    Ok(match connect_broker(config).await? {
        #[cfg(feature = "nats")]
        Broker::Nats(nats) => Arc::new(*nats),
        #[cfg(feature = "rabbitmq")]
        Broker::Rabbit(rabbit) => Arc::new(rabbit),
        #[cfg(feature = "kafka")]
        Broker::Kafka(kafka) => Arc::new(kafka),
    })
}

/// A real broker behind `--bus`.
enum Broker {
    #[cfg(feature = "nats")]
    Nats(Box<bus::nats::NatsBus>),
    #[cfg(feature = "rabbitmq")]
    Rabbit(bus::rabbitmq::RabbitBus),
    #[cfg(feature = "kafka")]
    Kafka(bus::kafka::KafkaBus),
}

async fn connect_broker(config: &Config) -> anyhow::Result<Broker> {
    let url = config.bus.as_str();
    // Only the scheme: the URL may carry a password.
    let scheme = url.split("://").next().unwrap_or_default();
    match scheme {
        #[cfg(feature = "nats")]
        "nats" => Ok(Broker::Nats(Box::new(
            bus::nats::NatsBus::connect(
                url,
                bus::nats::NatsConfig {
                    replicas: usize::from(config.bus_replicas.max(1)),
                    max_age: Duration::from_secs(config.bus_retention_hours.max(1) * 3600),
                    partitions: u32::from(config.partitions()),
                    ..bus::nats::NatsConfig::with_prefix(&config.bus_prefix)
                },
            )
            .await
            .context("connecting to NATS")?,
        ))),
        #[cfg(feature = "rabbitmq")]
        "amqp" | "amqps" => Ok(Broker::Rabbit(
            bus::rabbitmq::RabbitBus::connect(
                url,
                bus::rabbitmq::RabbitConfig {
                    prefix: config.bus_prefix.clone(),
                    delivery_limit: config.bus_delivery_limit.max(1),
                    partitions: u32::from(config.partitions()),
                },
            )
            .await
            .context("connecting to RabbitMQ")?,
        )),
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Broker::Kafka(
            bus::kafka::KafkaBus::connect(
                url.trim_start_matches("kafka://"),
                bus::kafka::KafkaConfig {
                    prefix: config.bus_prefix.clone(),
                    partitions: i32::from(config.partitions()),
                    replication: i32::from(config.bus_replicas.max(1)),
                },
            )
            .await
            .context("connecting to Kafka")?,
        )),
        _ => anyhow::bail!(
            "--bus: `{scheme}` is not a bus this build knows (sql{}{}{})",
            if cfg!(feature = "nats") {
                ", nats://HOST:PORT"
            } else {
                ""
            },
            if cfg!(feature = "rabbitmq") {
                ", amqp://USER:PASS@HOST:PORT/VHOST"
            } else {
                ""
            },
            if cfg!(feature = "kafka") {
                ", kafka://HOST:PORT,..."
            } else {
                ""
            },
        ),
    }
}

/// Every consumer group of the platform, one per service that listens.
fn consumer_groups() -> [ConsumerConfig; 4] {
    [
        inventory_service::consumers::config(),
        payment_service::consumers::config(),
        order_service::consumers::config(),
        notification_service::consumers::config(),
    ]
}

/// `orderwave bus-delete`: deletes the streams, exchanges and queues the platform made on the
/// broker under `--bus-prefix`, with what they hold (for tests, benchmarks, a deployment torn
/// down). `extra_groups` are consumer groups of the caller's own under the same prefix.
pub async fn delete_broker_objects(
    config: &Config,
    extra_groups: &[ConsumerConfig],
) -> anyhow::Result<()> {
    if config.bus == "sql" {
        anyhow::bail!("--bus is sql: its log lives in the platform's database, not on a broker");
    }
    match connect_broker(config).await? {
        #[cfg(feature = "nats")]
        Broker::Nats(nats) => {
            let _ = extra_groups;
            nats.delete_streams().await?;
        }
        #[cfg(feature = "rabbitmq")]
        Broker::Rabbit(rabbit) => {
            use bus::Subscriber;
            // Declared again, the same way, so that this handle knows what to delete.
            for group in consumer_groups().iter().chain(extra_groups) {
                rabbit.declare_group(group).await?;
            }
            rabbit.delete_declared().await?;
        }
        // Only once no consumer reads them (see `KafkaBus::delete_topics`).
        #[cfg(feature = "kafka")]
        Broker::Kafka(kafka) => {
            let _ = extra_groups;
            kafka.delete_topics().await?;
        }
    }
    Ok(())
}

/// How long a relay lets messages nobody waits on closely gather (all of the notification
/// service's, the order's milestones that only notifications follow).
const RELAY_LINGER: Duration = Duration::from_millis(100);

/// A service's outbox, drained to the bus by a relay.
struct Outbox {
    service: &'static str,
    db: Db,
    handoff: storage::outbox::Handoff,
    /// How long its relay lets handed rows wait for more, and on which topics (see
    /// `RelayConfig::linger`).
    linger: Duration,
    linger_topics: Option<&'static [&'static str]>,
}

/// A built platform, bound to its address, not yet serving.
/// What `orderwave serve` runs: some or all of the services, or the gateway in front of them.
pub enum Application {
    Services(Box<Platform>),
    Gateway(Box<crate::edge::GatewayApp>),
}

impl Application {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        if config.runs_gateway() {
            anyhow::ensure!(
                config.services == [Service::Gateway],
                "--services: the gateway runs in a process of its own"
            );
            return Ok(Self::Gateway(Box::new(
                crate::edge::GatewayApp::build(config).await?,
            )));
        }
        Ok(Self::Services(Box::new(Platform::build(config).await?)))
    }

    pub fn local_addr(&self) -> SocketAddr {
        match self {
            Self::Services(platform) => platform.local_addr(),
            Self::Gateway(gateway) => gateway.local_addr(),
        }
    }

    /// An admin token, minted when this start created the signing secret.
    pub fn first_admin_token(&self) -> Option<&str> {
        match self {
            Self::Services(platform) => platform.first_admin_token(),
            Self::Gateway(_) => None,
        }
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        match self {
            Self::Services(platform) => platform.run_until_stopped(shutdown).await,
            Self::Gateway(gateway) => gateway.run_until_stopped(shutdown).await,
        }
    }
}

/// The services this process runs, with their HTTP API.
pub struct Platform {
    listener: TcpListener,
    router: Router,
    addr: SocketAddr,
    databases: Vec<Db>,
    idempotency: IdempotencyStore,
    outboxes: Vec<Outbox>,
    consumers: Vec<(ConsumerConfig, Arc<dyn Handler>)>,
    bus: Arc<dyn Bus>,
    dead_letters: bus::dead_letters::DeadLetters,
    orders: Option<OrderService>,
    payments: Option<PaymentService>,
    notifications: Option<NotificationService>,
    /// An admin token, minted when this start created the signing secret.
    first_admin_token: Option<String>,
    saga_timeout: Duration,
    /// Relays, consumers and workers run here (not with `--no-background`).
    background: bool,
}

#[derive(Clone)]
struct MetricsState {
    handle: PrometheusHandle,
    sources: Arc<crate::scrape::Sources>,
}

impl Platform {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        // Installed before anything records: a value set earlier (a breaker's first state)
        // would be lost.
        http_kit::metrics::handle();
        let keys = crate::auth::load(&config.auth, &config.data_dir, true)
            .context("loading the token keys")?;
        let policies = http_kit::resilience::PolicyOverrides::parse(
            &config.dependency_policies,
            &DEPENDENCIES,
        )
        .map_err(anyhow::Error::msg)
        .context("--dependency-policy")?;
        let dbs = open_databases(config).await?;
        dbs.http
            .migrate(&storage::idempotency::MIGRATOR)
            .await
            .context("migrating the http database")?;
        let bus = open_bus(config, &dbs.bus).await?;
        // Whatever the broker, the groups' dead letters stay in the platform's own database.
        let dead_letters = bus::dead_letters::DeadLetters::new(dbs.bus.clone());
        let runs = |service| config.runs(service);
        let customers = match runs(Service::Customer) {
            true => Some(
                CustomerService::start(opened(&dbs.customers)?)
                    .await
                    .context("starting the customer service")?,
            ),
            false => None,
        };
        // The customer service of another process, for the order and notification services.
        let customer_client = || -> anyhow::Result<http_kit::client::ServiceClient> {
            let url = config.customer_service_url.as_deref().context(
                "--customer-service-url: the order and notification services need it when this process does not run the customer service",
            )?;
            http_kit::client::ServiceClient::new(url, service_token(&keys, config))
                .map_err(|e| anyhow::anyhow!("customer service client: {e}"))
        };
        let order_cache = order_cache(config, &policies)?;
        let cache_breaker = match &order_cache {
            OrderCache::Shared(shared) if runs(Service::Order) => Some(shared.policy()),
            _ => None,
        };
        let orders = match runs(Service::Order) {
            true => {
                let directory: Arc<dyn CustomerDirectory> =
                    match (&config.customer_service_url, &customers) {
                        (None, Some(customers)) => {
                            Arc::new(InProcessCustomers(customers.store.clone()))
                        }
                        _ => Arc::new(HttpCustomerDirectory::from(customer_client()?)),
                    };
                Some(
                    OrderService::start(
                        opened(&dbs.orders)?,
                        order_cache,
                        CustomerChecker::new(
                            directory,
                            policies.for_dependency(
                                "customer-service",
                                CustomerChecker::default_policy(),
                            ),
                        ),
                    )
                    .await
                    .context("starting the order service")?,
                )
            }
            false => None,
        };
        let inventory = match runs(Service::Inventory) {
            true => Some(
                InventoryService::start(opened(&dbs.inventory)?)
                    .await
                    .context("starting the inventory service")?,
            ),
            false => None,
        };
        let (payments, provider_breaker) = match runs(Service::Payment) {
            true => {
                let (provider, breaker) = payment_provider(config, &policies)?;
                let payments = PaymentService::start(
                    opened(&dbs.payments)?,
                    provider,
                    Duration::from_secs(config.payment_timeout_secs.max(1)),
                )
                .await
                .context("starting the payment service")?;
                (Some(payments), breaker)
            }
            false => (None, None),
        };
        let notifications = match runs(Service::Notification) {
            true => {
                let contacts: Arc<dyn notification_service::consumers::Contacts> = match &customers
                {
                    Some(customers) => Arc::new(InProcessContacts(customers.store.clone())),
                    None => Arc::new(notification_service::consumers::HttpContacts(
                        customer_client()?,
                    )),
                };
                Some(
                    NotificationService::start(
                        opened(&dbs.notifications)?,
                        contacts,
                        notification_transports(config)?,
                        notification_service::worker::WorkerConfig {
                            backoff_base: Duration::from_millis(
                                config.notification_retry_ms.max(1),
                            ),
                            breaker_open_for: Duration::from_secs(
                                config.notification_breaker_secs.max(1),
                            ),
                            policies: policies.clone(),
                            ..Default::default()
                        },
                    )
                    .await
                    .context("starting the notification service")?,
                )
            }
            false => None,
        };
        if config.demo {
            crate::demo::seed(inventory.as_ref(), customers.as_ref())
                .await
                .context("seeding the demo catalogue")?;
        }
        let [
            inventory_group,
            payment_group,
            order_group,
            notification_group,
        ] = consumer_groups();
        let mut consumers: Vec<(ConsumerConfig, Arc<dyn Handler>)> = Vec::new();
        if let Some(inventory) = &inventory {
            consumers.push((
                inventory_group,
                Arc::new(inventory_service::consumers::InventoryHandler {
                    store: inventory.store.clone(),
                }),
            ));
        }
        if let Some(payments) = &payments {
            consumers.push((payment_group, Arc::new(payments.handler())));
        }
        if let Some(orders) = &orders {
            consumers.push((order_group, Arc::new(orders.handler())));
        }
        if let Some(notifications) = &notifications {
            consumers.push((notification_group, Arc::new(notifications.handler())));
        }
        for (consumer, _) in &mut consumers {
            consumer.deliver_twice = config.test_deliver_twice;
        }
        // Every group, also those of services other processes run, before any relay publishes:
        // a broker that routes on publish (RabbitMQ) drops what no group's queue is bound for
        // yet, and this process may start before theirs.
        for group in consumer_groups() {
            bus.declare_group(&group)
                .await
                .with_context(|| format!("declaring consumer group {} on the bus", group.group))?;
        }
        // A key stays locked while its request may still be running: past the request
        // timeout (plus a margin) its holder is gone and a retry may take the key over.
        let idempotency = IdempotencyStore::new(
            dbs.http.writer().clone(),
            Duration::from_secs(config.idempotency_ttl_hours.saturating_mul(3600)),
        )
        .with_lock_timeout(Duration::from_secs(config.request_timeout_secs.max(1) + 30));
        let mut outboxes = Vec::new();
        let mut api = OpenApiRouter::with_openapi(ApiDoc::openapi());
        if let Some(orders) = &orders {
            outboxes.push(Outbox {
                service: "order",
                // What the saga and the compensations wait for goes at once; the milestones
                // only notifications follow ride along with the next of those.
                linger: RELAY_LINGER,
                linger_topics: Some(&["order.confirmed", "order.delivered"]),
                db: opened(&dbs.orders)?,
                handoff: orders.store.handoff(),
            });
            api = api.merge(orders.router());
        }
        if let Some(customers) = &customers {
            outboxes.push(Outbox {
                service: "customer",
                linger: Duration::ZERO,
                linger_topics: None,
                db: opened(&dbs.customers)?,
                handoff: customers.store.handoff(),
            });
            api = api.merge(customers.router());
        }
        if let Some(inventory) = &inventory {
            outboxes.push(Outbox {
                service: "inventory",
                linger: Duration::ZERO,
                linger_topics: None,
                db: opened(&dbs.inventory)?,
                handoff: inventory.store.handoff(),
            });
            api = api.merge(inventory.router());
        }
        if let Some(payments) = &payments {
            outboxes.push(Outbox {
                service: "payment",
                linger: Duration::ZERO,
                linger_topics: None,
                db: opened(&dbs.payments)?,
                handoff: payments.store.handoff(),
            });
            api = api.merge(payments.router());
        }
        if let Some(notifications) = &notifications {
            outboxes.push(Outbox {
                service: "notification",
                // Nothing in the saga waits for notification.sent and notification.failed:
                // published a tenth of a second later, many to a statement, instead of each in
                // a statement of its own (two per order).
                linger: RELAY_LINGER,
                linger_topics: None,
                db: opened(&dbs.notifications)?,
                handoff: notifications.store.handoff(),
            });
            api = api.merge(notifications.router());
        }
        let admin_dead_letters = crate::admin::DeadLetters {
            bus: dead_letters.clone(),
            notifications: notifications.as_ref().map(|n| n.store.clone()),
        };
        let outbox_dbs: crate::admin::Outboxes = Arc::new(
            outboxes
                .iter()
                .map(|o| (o.service.to_string(), o.db.clone()))
                .collect(),
        );
        let api = api.merge(crate::admin::router(
            admin_dead_letters.clone(),
            bus.clone(),
            outbox_dbs.clone(),
        ));
        crate::scrape::register(&crate::scrape::Known {
            groups: &consumers
                .iter()
                .map(|(c, _)| c.group.as_str())
                .collect::<Vec<_>>(),
            outboxes: &outboxes.iter().map(|o| o.service).collect::<Vec<_>>(),
            channels: &notifications
                .iter()
                .flat_map(|n| n.breakers.keys().cloned())
                .collect::<Vec<_>>(),
            orders: orders.is_some(),
            payments: payments.is_some(),
        });
        let scrape = crate::scrape::Sources {
            outboxes: outbox_dbs,
            bus: bus.clone(),
            dead: admin_dead_letters,
            orders: orders.as_ref().map(|o| o.store.clone()),
            groups: consumer_groups().into_iter().map(|c| c.group).collect(),
        };
        let limiter = rate_limiter(config, &policies)?;
        let readiness = Readiness {
            databases: dbs.all(),
            breakers: notifications
                .iter()
                .flat_map(|n| n.breakers.values().cloned())
                .chain(orders.as_ref().map(|o| o.customers.policy()))
                .chain(provider_breaker)
                .chain(cache_breaker)
                .chain(limiter.policy())
                .collect(),
        };
        let first_admin_token = match (&keys.signer, keys.created_secret) {
            (Some(signer), true) => Some(
                signer
                    .mint(
                        "admin",
                        http_kit::Role::Admin,
                        Duration::from_secs(24 * 3600),
                    )
                    .map_err(anyhow::Error::msg)?,
            ),
            _ => None,
        };
        let cors = gateway::limits::cors(&config.auth.cors_origins).map_err(anyhow::Error::msg)?;
        let console = config.serves_console().then(|| {
            // In demo mode the console signs in without pasting a token: an admin token for
            // an hour, minted for each visit.
            let demo_token = keys.signer.clone().filter(|_| config.demo).map(|signer| {
                std::sync::Arc::new(move || {
                    signer
                        .mint(
                            "console-demo",
                            http_kit::Role::Admin,
                            Duration::from_secs(3600),
                        )
                        .ok()
                }) as crate::console::DemoToken
            });
            crate::console::router(demo_token)
        });
        let router = build_router(
            config,
            gateway::Gateway {
                verifier: keys.verifier,
                limiter,
            },
            cors,
            api,
            scrape,
            idempotency.clone(),
            readiness,
        );
        let router = match console {
            Some(console) => router.merge(outer_layers(console, config)),
            None => router,
        };
        let (listener, addr) = bind(config).await?;
        Ok(Self {
            listener,
            router,
            addr,
            databases: dbs.all().into_iter().map(|(_, db)| db).collect(),
            idempotency,
            outboxes,
            consumers,
            bus,
            dead_letters,
            orders,
            payments,
            notifications,
            first_admin_token,
            saga_timeout: Duration::from_secs(config.saga_timeout_secs.max(1)),
            background: !config.no_background,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// An admin token valid for 24 h, when this start created the signing secret (first start
    /// on this data directory).
    pub fn first_admin_token(&self) -> Option<&str> {
        self.first_admin_token.as_deref()
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests, stops the relays and
    /// closes the databases.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.addr, "orderwave listening");
        let (stop, stopped) = watch::channel(false);
        let purger = tokio::spawn(purge_idempotency_keys(self.idempotency.clone()));
        let (outboxes, consumers) = if self.background {
            (self.outboxes, self.consumers)
        } else {
            tracing::info!("serving HTTP only: relays, consumers and workers run elsewhere");
            (Vec::new(), Vec::new())
        };
        let relays: Vec<_> = outboxes
            .into_iter()
            .map(|outbox| {
                tokio::spawn(bus::relay::run(
                    outbox.db,
                    self.bus.clone(),
                    RelayConfig {
                        linger: outbox.linger,
                        linger_topics: outbox
                            .linger_topics
                            .map(|topics| topics.iter().map(|t| t.to_string()).collect()),
                        ..RelayConfig::new(outbox.service)
                    },
                    outbox.handoff,
                    stopped.clone(),
                ))
            })
            .collect();
        let consumers: Vec<_> = consumers
            .into_iter()
            .map(|(config, handler)| {
                tokio::spawn(bus::consumer::run(
                    self.bus.clone(),
                    self.dead_letters.clone(),
                    config,
                    handler,
                    stopped.clone(),
                ))
            })
            .collect();
        let mut background = Vec::new();
        if self.background {
            if let Some(payments) = &self.payments {
                background.push(tokio::spawn(payments.worker(stopped.clone())));
            }
            if let Some(notifications) = &self.notifications {
                background.push(tokio::spawn(notifications.worker(stopped.clone())));
            }
            if let Some(orders) = &self.orders {
                background.push(tokio::spawn(
                    orders.saga_deadline(self.saga_timeout, stopped.clone()),
                ));
                background.push(tokio::spawn(orders.feeder(stopped.clone())));
            }
        }
        // Live streams never end on their own: they end when shutdown begins, so the
        // connections close and in-flight requests can finish.
        let live = self.orders.as_ref().map(|orders| orders.live.clone());
        let shutdown = async move {
            shutdown.await;
            if let Some(live) = live {
                live.stop();
            }
        };
        let served = serve(self.listener, self.router, shutdown).await;
        // Requests are done; let the background work finish its current step.
        let _ = stop.send(true);
        for task in relays.into_iter().chain(consumers).chain(background) {
            if let Err(error) = task.await {
                tracing::error!(%error, "a relay or consumer crashed");
            }
        }
        purger.abort();
        for db in &self.databases {
            db.close().await;
        }
        tracing::info!("orderwave stopped");
        served.context("serving HTTP")
    }
}

/// Contact data and preferences from the customer service of this process.
struct InProcessContacts(Arc<customer_service::store::CustomerStore>);

impl notification_service::consumers::Contacts for InProcessContacts {
    fn contact<'a>(
        &'a self,
        customer_id: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<domain::customer::Contact>, String>> {
        Box::pin(async move {
            let Ok(id) = uuid::Uuid::parse_str(customer_id) else {
                return Ok(None);
            };
            self.0
                .get(id)
                .await
                .map(|c| c.map(|c| c.contact))
                .map_err(|e| e.to_string())
        })
    }
}

/// The customer service of this process, asked directly.
struct InProcessCustomers(Arc<customer_service::store::CustomerStore>);

impl CustomerDirectory for InProcessCustomers {
    fn exists(&self, id: uuid::Uuid) -> futures::future::BoxFuture<'_, Result<bool, String>> {
        Box::pin(async move {
            self.0
                .get(id)
                .await
                .map(|c| c.is_some())
                .map_err(|e| e.to_string())
        })
    }
}

/// Email over SMTP and SMS over the Twilio-style API when configured; the log transport otherwise.
fn notification_transports(
    config: &Config,
) -> anyhow::Result<
    std::collections::HashMap<String, Arc<dyn notification_service::transport::Transport>>,
> {
    use notification_service::transport::{SmtpConfig, SmtpEmail, SmtpSecurity};
    let mut transports = NotificationService::log_transports();
    if let Some(host) = &config.smtp_host {
        let email = SmtpEmail::new(&SmtpConfig {
            host: host.clone(),
            port: config.smtp_port,
            security: match config.smtp_tls {
                crate::config::SmtpTls::None => SmtpSecurity::None,
                crate::config::SmtpTls::Starttls => SmtpSecurity::StartTls,
                crate::config::SmtpTls::Tls => SmtpSecurity::Tls,
            },
            username: config.smtp_username.clone(),
            password: config.smtp_password.clone(),
            from: config.smtp_from.clone(),
            ca_pem: config
                .smtp_ca_file
                .as_ref()
                .map(|path| {
                    std::fs::read(path)
                        .with_context(|| format!("reading the SMTP CA file {}", path.display()))
                })
                .transpose()?,
        })
        .map_err(|e| anyhow::anyhow!("SMTP client: {e}"))?;
        transports.insert("email".into(), Arc::new(email));
    }
    if let Some(url) = &config.sms_provider_url {
        let sms = notification_service::transport::TwilioSms::new(
            url,
            &config.sms_account_sid,
            &config.sms_auth_token,
            &config.sms_from,
        )
        .map_err(|e| anyhow::anyhow!("SMS provider client: {e}"))?;
        transports.insert("sms".into(), Arc::new(sms));
    }
    Ok(transports)
}

/// What this process sends on its calls to other services: the configured service token, or
/// else a short-lived one minted with its own key (renewed before it expires).
fn service_token(
    keys: &crate::auth::Keys,
    config: &Config,
) -> order_service::customers::TokenSource {
    const TTL: Duration = Duration::from_secs(600);
    let fixed = config.auth.service_token.clone();
    let signer = keys.signer.clone();
    let cache: Arc<std::sync::Mutex<Option<(String, std::time::Instant)>>> = Arc::default();
    Arc::new(move || {
        let Some(signer) = signer.as_ref().filter(|_| fixed.is_none()) else {
            return fixed.clone();
        };
        let mut cache = cache.lock().ok()?;
        if let Some((token, at)) = cache.as_ref()
            && at.elapsed() < TTL / 2
        {
            return Some(token.clone());
        }
        let token = signer
            .mint("orderwave", http_kit::Role::Service, TTL)
            .map_err(|error| tracing::error!(%error, "cannot mint a service token"))
            .ok()?;
        *cache = Some((token.clone(), std::time::Instant::now()));
        Some(token)
    })
}

/// The gateway's rate limits, their buckets in Redis with `--redis`.
pub(crate) fn rate_limiter(
    config: &Config,
    policies: &http_kit::resilience::PolicyOverrides,
) -> anyhow::Result<gateway::RateLimiter> {
    let auth = &config.auth;
    let limiter = gateway::RateLimiter::new(
        gateway::Limit {
            per_second: auth.rate_limit_read,
            burst: auth.rate_limit_read_burst,
        },
        gateway::Limit {
            per_second: auth.rate_limit_write,
            burst: auth.rate_limit_write_burst,
        },
    );
    Ok(match &auth.redis {
        Some(url) => limiter
            .with_redis(
                url,
                &auth.redis_prefix,
                policies.for_dependency(
                    gateway::rate_limit::DEPENDENCY,
                    gateway::RateLimiter::default_redis_policy(),
                ),
            )
            .map_err(anyhow::Error::msg)
            .context("--redis")?,
        None => limiter,
    })
}

/// Where the order service caches orders: Redis with `--cache`, else in the process.
fn order_cache(
    config: &Config,
    policies: &http_kit::resilience::PolicyOverrides,
) -> anyhow::Result<OrderCache> {
    Ok(match &config.cache {
        Some(url) => OrderCache::Shared(
            SharedCache::new(
                url,
                &config.cache_prefix,
                Duration::from_secs(config.cache_ttl_secs.max(1)),
                policies.for_dependency(
                    order_service::shared_cache::DEPENDENCY,
                    SharedCache::default_policy(),
                ),
            )
            .map_err(anyhow::Error::msg)
            .context("--cache")?,
        ),
        None => OrderCache::Local(config.order_cache_mib * 1024 * 1024),
    })
}

/// The dependencies whose policy `--dependency-policy` may change.
pub(crate) const DEPENDENCIES: [&str; 11] = [
    "customer-service",
    "payment-provider",
    "notification-email",
    "notification-sms",
    order_service::shared_cache::DEPENDENCY,
    gateway::rate_limit::DEPENDENCY,
    "upstream-order",
    "upstream-inventory",
    "upstream-payment",
    "upstream-customer",
    "upstream-notification",
];

/// The payment provider, and the breaker of a remote one. The embedded simulator is no
/// outbound call: it has none.
#[allow(clippy::type_complexity)]
fn payment_provider(
    config: &Config,
    policies: &http_kit::resilience::PolicyOverrides,
) -> anyhow::Result<(
    Arc<dyn PaymentProvider>,
    Option<Arc<http_kit::resilience::Policy>>,
)> {
    Ok(match config.payment_provider {
        PaymentProviderKind::Simulator => (Arc::new(Simulator::default()), None),
        PaymentProviderKind::Http => {
            let url = config
                .payment_provider_url
                .as_deref()
                .context("--payment-provider http needs --payment-provider-url")?;
            let key = config.payment_provider_key.as_deref().unwrap_or_default();
            let http = HttpProvider::new(url, key)
                .map_err(|e| anyhow::anyhow!("payment provider client: {e}"))?;
            let guarded = payment_service::provider::Guarded::new(
                Arc::new(http),
                policies.for_dependency(
                    "payment-provider",
                    payment_service::provider::Guarded::default_policy(),
                ),
            );
            let breaker = guarded.policy();
            (Arc::new(guarded), Some(breaker))
        }
    })
}

async fn purge_idempotency_keys(store: IdempotencyStore) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        match store.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired idempotency keys removed"),
            Err(error) => tracing::warn!(%error, "could not purge idempotency keys"),
        }
    }
}

fn build_router(
    config: &Config,
    gateway: gateway::Gateway,
    cors: Option<tower_http::cors::CorsLayer>,
    api: OpenApiRouter,
    scrape: crate::scrape::Sources,
    idempotency: IdempotencyStore,
    readiness: Readiness,
) -> Router {
    let metrics_state = MetricsState {
        handle: http_kit::metrics::handle(),
        sources: Arc::new(scrape),
    };
    let (api, mut openapi) = api.split_for_parts();
    crate::openapi_security::require_bearer(&mut openapi);
    let methods = Arc::new(crate::openapi_security::methods_by_path(&openapi));
    let metrics_token = config
        .auth
        .metrics_token
        .as_deref()
        .map(gateway::limits::MetricsToken::new);
    let (operations, operations_doc) = OpenApiRouter::new()
        .routes(routes!(health::live))
        .merge(
            OpenApiRouter::new()
                .routes(routes!(health::ready))
                .with_state(readiness),
        )
        .merge(
            OpenApiRouter::new()
                .routes(routes!(render_metrics))
                .with_state(metrics_state)
                .layer(axum::middleware::from_fn_with_state(
                    metrics_token,
                    gateway::limits::metrics_token,
                )),
        )
        .split_for_parts();
    openapi.merge(operations_doc);
    let docs = SwaggerUi::new("/docs").url("/openapi.json", openapi);
    let auth = &config.auth;
    let gateway = Arc::new(gateway);
    // Per route, innermost first: idempotency (scoped by the caller the guard found), the
    // guard (token, rate limit, role), load shedding, and before anything else a method the
    // document does not give the path: 405 with `Allow`.
    let router = api
        .route_layer(axum::middleware::from_fn_with_state(
            idempotency,
            http_kit::idempotency::layer,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            gateway,
            gateway::guard,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            gateway::limits::InFlight::new(auth.max_in_flight),
            gateway::limits::shed_load,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            methods,
            crate::openapi_security::method_allowed,
        ))
        .merge(operations)
        .merge(docs)
        .fallback(not_found);
    let router = outer_layers(router, config);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// What every answer of a process passes through, innermost first: the request timeout, panic
/// capture, problem+json for bare errors, the access log and metrics, the request id and the
/// header size limit.
pub(crate) fn outer_layers(router: Router, config: &Config) -> Router {
    let request_timeout = Duration::from_secs(config.request_timeout_secs.max(1));
    router
        // Innermost first: the timeout's 503 and a panic's 500 pass through the problem+json
        // mapping, the access log and the metrics like every other answer.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .layer(CatchPanicLayer::new())
        .layer(axum::middleware::from_fn(
            http_kit::problem::problem_for_errors,
        ))
        .layer(axum::middleware::from_fn(http_kit::metrics::access_log))
        .layer(axum::middleware::from_fn(http_kit::metrics::track))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let request_id = request
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    let route = request
                        .extensions()
                        .get::<axum::extract::MatchedPath>()
                        .map(|p| p.as_str());
                    let span = tracing::info_span!(
                        "request",
                        request_id = %request_id,
                        method = %request.method(),
                        path = %request.uri().path(),
                        // The route when one matched (the gateway's proxy has none).
                        otel.name = %route.map_or_else(
                            || request.method().to_string(),
                            |route| format!("{} {route}", request.method()),
                        ),
                        otel.kind = "server",
                        otel.status_code = tracing::field::Empty,
                        http.request.method = %request.method(),
                        http.route = route,
                        http.response.status_code = tracing::field::Empty,
                    );
                    http_kit::trace::continue_from(&span, request.headers());
                    span
                })
                .on_request(())
                .on_response(|response: &Response, _: Duration, span: &tracing::Span| {
                    let status = response.status();
                    span.record("http.response.status_code", status.as_u16());
                    if status.is_server_error() {
                        span.record("otel.status_code", "ERROR");
                    }
                }),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(axum::middleware::from_fn_with_state(
            gateway::limits::MaxHeaderBytes(config.auth.max_header_bytes),
            gateway::limits::limit_headers,
        ))
}

/// Serves `router` until `shutdown`, then lets the requests in flight finish. The client address
/// keys the rate limit of requests without a valid token.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Binds `--listen`.
pub(crate) async fn bind(config: &Config) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

async fn not_found() -> Problem {
    Problem::no_route()
}

/// Prometheus metrics: requests, saga steps and confirmations, outbox backlog, consumer lag,
/// dead letters, circuit breakers, payments and notification deliveries (README.md lists
/// them).
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"))
)]
async fn render_metrics(State(state): State<MetricsState>) -> Response {
    // The backlog, lag and dead-letter gauges are read now, so a scrape sees current figures.
    state.sources.refresh().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.handle.render(),
    )
        .into_response()
}
