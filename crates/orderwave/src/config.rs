//! Command line and environment configuration.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "orderwave",
    version,
    about = "Event-driven order management: orders, their lifecycle, events and outbox.",
    long_about = "Event-driven order management.\n\nWith no command, `orderwave` runs `serve` with the options below: the whole platform on \
127.0.0.1:8080 with embedded SQLite storage in ./data. Set DATABASE_URL=postgres://... to run on PostgreSQL instead.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default command).
    Serve(Config),
    /// Apply the database migrations and exit (they also run at every start).
    Migrate(Config),
    /// Delete the streams, exchanges and queues (and the messages in them) this platform made on
    /// the broker of `--bus` under `--bus-prefix`, and exit.
    BusDelete(Config),
    /// Print a bearer token signed with the configured key (the data directory's secret by
    /// default).
    Token(TokenArgs),
    /// Exit 0 if the server at `--listen` answers its liveness check, 1 otherwise (a
    /// container's HEALTHCHECK, where there is no curl).
    Healthcheck(HealthcheckArgs),
}

/// `orderwave healthcheck`.
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// The server's address (0.0.0.0 or [::] are asked on the loopback address).
    #[arg(long, env = "ORDERWAVE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// The path asked.
    #[arg(long, default_value = "/health/live")]
    pub path: String,
}

/// `orderwave token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The subject: a customer's id for the customer role, any name for the others.
    #[arg(long)]
    pub sub: String,

    /// customer, admin or service.
    #[arg(long)]
    pub role: http_kit::Role,

    /// How long the token is valid: seconds, or with a unit (90s, 15m, 24h, 7d).
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    pub ttl: std::time::Duration,

    /// Directory whose signing secret is used (see serve's --data-dir).
    #[arg(long, env = "ORDERWAVE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    #[command(flatten)]
    pub auth: AuthArgs,
}

/// A duration as seconds, or with a unit: 90s, 15m, 24h, 7d.
pub fn parse_ttl(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text:?} (try 3600, 15m, 24h or 7d)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("unknown unit in {text:?}: s, m, h or d")),
    };
    if secs == 0 {
        return Err("a token must be valid for at least a second".into());
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// Authentication, rate limits and the other limits in front of the API.
#[derive(Clone, Args)]
pub struct AuthArgs {
    /// HS256 secret tokens are signed with (32 bytes or more). Without it and without public
    /// keys, a random secret is created in the data directory (`jwt-secret`, mode 0600) at
    /// first start.
    #[arg(long, env = "ORDERWAVE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// A public key tokens may be signed with, pinned to its algorithm: `RS256:/path/key.pem`
    /// or `ES256:/path/key.pem`. Repeatable (comma-separated in the environment).
    #[arg(
        long = "jwt-public-key",
        env = "ORDERWAVE_JWT_PUBLIC_KEYS",
        value_delimiter = ','
    )]
    pub jwt_public_keys: Vec<String>,

    /// A JWKS file of public keys (each with its `alg`, RS256 or ES256, and usually a `kid`).
    #[arg(long, env = "ORDERWAVE_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,

    /// A private key to mint tokens with when tokens are verified by public keys:
    /// `RS256:/path/key.pem` or `ES256:/path/key.pem` (used by `orderwave token` and for this
    /// process's own calls to other services).
    #[arg(long, env = "ORDERWAVE_JWT_PRIVATE_KEY")]
    pub jwt_private_key: Option<String>,

    /// The `iss` every token must carry.
    #[arg(long, env = "ORDERWAVE_JWT_ISSUER", default_value = "orderwave")]
    pub jwt_issuer: String,

    /// The `aud` every token must carry.
    #[arg(long, env = "ORDERWAVE_JWT_AUDIENCE", default_value = "orderwave")]
    pub jwt_audience: String,

    /// Seconds of clock skew allowed when checking `exp`.
    #[arg(long, env = "ORDERWAVE_JWT_LEEWAY_SECS", default_value_t = 30)]
    pub jwt_leeway_secs: u64,

    /// The bearer token this process sends on its calls to other services; without it, it
    /// mints its own short-lived service token with its key.
    #[arg(long, env = "ORDERWAVE_SERVICE_TOKEN", hide_env_values = true)]
    pub service_token: Option<String>,

    /// Put /metrics behind this bearer token (it stays open without one).
    #[arg(long, env = "ORDERWAVE_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// Reads (GET) per second per caller, sustained; 0 turns the limit off.
    #[arg(long, env = "ORDERWAVE_RATE_LIMIT_READ", default_value_t = 50.0)]
    pub rate_limit_read: f64,

    /// Reads a caller may send at once.
    #[arg(long, env = "ORDERWAVE_RATE_LIMIT_READ_BURST", default_value_t = 100)]
    pub rate_limit_read_burst: u32,

    /// Writes (POST, PUT, DELETE) per second per caller, sustained; 0 turns the limit off.
    #[arg(long, env = "ORDERWAVE_RATE_LIMIT_WRITE", default_value_t = 10.0)]
    pub rate_limit_write: f64,

    /// Writes a caller may send at once.
    #[arg(long, env = "ORDERWAVE_RATE_LIMIT_WRITE_BURST", default_value_t = 20)]
    pub rate_limit_write_burst: u32,

    /// Shares the rate limits' buckets among every process using this Redis
    /// (`redis://HOST:PORT/DB`); while it does not answer, each process counts on its own.
    #[arg(long, env = "ORDERWAVE_REDIS", hide_env_values = true)]
    pub redis: Option<String>,

    /// Prefix of the rate limits' keys in Redis (`{prefix}:rate:...`), so several deployments
    /// can share one Redis.
    #[arg(long, env = "ORDERWAVE_REDIS_PREFIX", default_value = "orderwave")]
    pub redis_prefix: String,

    /// Requests in flight at most; more are answered 503 at once instead of queueing.
    #[arg(long, env = "ORDERWAVE_MAX_IN_FLIGHT", default_value_t = 512)]
    pub max_in_flight: usize,

    /// Bytes of request headers at most (431 beyond).
    #[arg(long, env = "ORDERWAVE_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// Origins browsers may call the API from (CORS), e.g. https://shop.example.com.
    /// Repeatable (comma-separated in the environment); none: no cross-origin calls.
    #[arg(
        long = "cors-origin",
        env = "ORDERWAVE_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
}

impl std::fmt::Debug for AuthArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret or the tokens.
        f.debug_struct("AuthArgs")
            .field("jwt_public_keys", &self.jwt_public_keys)
            .field("jwt_jwks", &self.jwt_jwks)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("rate_limit_read", &self.rate_limit_read)
            .field("rate_limit_write", &self.rate_limit_write)
            .field("redis", &self.redis.is_some())
            .field("cors_origins", &self.cors_origins)
            .finish_non_exhaustive()
    }
}

impl Default for AuthArgs {
    fn default() -> Self {
        AuthArgs {
            jwt_secret: None,
            jwt_public_keys: Vec::new(),
            jwt_jwks: None,
            jwt_private_key: None,
            jwt_issuer: "orderwave".into(),
            jwt_audience: "orderwave".into(),
            jwt_leeway_secs: 30,
            service_token: None,
            metrics_token: None,
            rate_limit_read: 50.0,
            rate_limit_read_burst: 100,
            rate_limit_write: 10.0,
            rate_limit_write_burst: 20,
            redis: None,
            redis_prefix: "orderwave".into(),
            max_in_flight: 512,
            max_header_bytes: 16 * 1024,
            cors_origins: Vec::new(),
        }
    }
}

/// A service a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Service {
    /// Every service (the embedded mode).
    All,
    Order,
    Inventory,
    Payment,
    Customer,
    Notification,
    /// The gateway in front of service processes (`--upstream`), in a process of its own.
    Gateway,
}

impl Service {
    /// The five services, each once.
    pub const EACH: [Service; 5] = [
        Service::Order,
        Service::Inventory,
        Service::Payment,
        Service::Customer,
        Service::Notification,
    ];
}

/// A sampling ratio: a number from 0 to 1.
fn sample_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("{text:?} is not a number from 0 to 1")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SmtpTls {
    /// Plain text (a local relay).
    None,
    /// STARTTLS upgrade (port 587).
    Starttls,
    /// TLS from the start (port 465).
    Tls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PaymentProviderKind {
    /// The embedded simulator: the card token decides (tok_ok, tok_declined, tok_slow,
    /// tok_flaky).
    Simulator,
    /// A Stripe-style HTTP API at --payment-provider-url.
    Http,
}

/// Everything `serve` and `migrate` need.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on; port 0 picks a free port (the printed line gives the real one).
    #[arg(long, env = "ORDERWAVE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory of the embedded SQLite databases (one file per service, WAL mode).
    #[arg(long, env = "ORDERWAVE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// PostgreSQL URL (postgres://user@host:port/db). When set, PostgreSQL is used instead of
    /// the embedded SQLite files, with one schema per service.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// The order service's own PostgreSQL (its schema `orders` there) instead of the one of
    /// `--database-url`, which still holds the platform's idempotency records and bus tables.
    #[arg(long, env = "ORDERWAVE_DATABASE_URL_ORDER", hide_env_values = true)]
    pub database_url_order: Option<String>,

    /// The inventory service's own PostgreSQL (schema `inventory`).
    #[arg(long, env = "ORDERWAVE_DATABASE_URL_INVENTORY", hide_env_values = true)]
    pub database_url_inventory: Option<String>,

    /// The payment service's own PostgreSQL (schema `payments`).
    #[arg(long, env = "ORDERWAVE_DATABASE_URL_PAYMENT", hide_env_values = true)]
    pub database_url_payment: Option<String>,

    /// The customer service's own PostgreSQL (schema `customers`).
    #[arg(long, env = "ORDERWAVE_DATABASE_URL_CUSTOMER", hide_env_values = true)]
    pub database_url_customer: Option<String>,

    /// The notification service's own PostgreSQL (schema `notifications`).
    #[arg(
        long,
        env = "ORDERWAVE_DATABASE_URL_NOTIFICATION",
        hide_env_values = true
    )]
    pub database_url_notification: Option<String>,

    /// The bus events travel on: `sql` (the embedded log in the platform's database),
    /// `nats://HOST:PORT` (NATS JetStream), `amqp://USER:PASS@HOST:PORT/VHOST` (RabbitMQ) or
    /// `kafka://HOST:PORT,HOST:PORT` (Kafka).
    #[arg(
        long,
        env = "ORDERWAVE_BUS",
        default_value = "sql",
        hide_env_values = true
    )]
    pub bus: String,

    /// Prefix of the broker's streams, subjects, exchanges and queues (created at start when
    /// missing), so several deployments can share one broker.
    #[arg(long, env = "ORDERWAVE_BUS_PREFIX", default_value = "orderwave")]
    pub bus_prefix: String,

    /// Partitions of each consumer group (Kafka: of each topic): how many processes of one group
    /// share its work, each key's messages in one partition. Default 8 on a broker, 1 on `sql`
    /// (one process reads a group at a time). Every process must use the same number.
    #[arg(long, env = "ORDERWAVE_BUS_PARTITIONS")]
    pub bus_partitions: Option<u16>,

    /// Copies of each stream (NATS JetStream replicas, Kafka replication factor).
    #[arg(long, env = "ORDERWAVE_BUS_REPLICAS", default_value_t = 1)]
    pub bus_replicas: u16,

    /// How long a broker keeps messages, in hours (NATS JetStream streams).
    #[arg(long, env = "ORDERWAVE_BUS_RETENTION_HOURS", default_value_t = 168)]
    pub bus_retention_hours: u64,

    /// Deliveries of one message before RabbitMQ dead-letters it itself (the consumer runner
    /// dead-letters after 5 attempts; this is the broker's backstop).
    #[arg(long, env = "ORDERWAVE_BUS_DELIVERY_LIMIT", default_value_t = 20)]
    pub bus_delivery_limit: u32,

    /// Maximum connections per PostgreSQL pool.
    #[arg(long, env = "ORDERWAVE_DB_MAX_CONNECTIONS", default_value_t = 32)]
    pub db_max_connections: u32,

    /// Log line format.
    #[arg(
        long,
        env = "ORDERWAVE_LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    pub log_format: LogFormat,

    /// OTLP/HTTP (protobuf) collector to export traces to, as a base URL
    /// (`http://localhost:4318`; `/v1/traces` is added). Traces are off without it.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The service name traces carry; by default `orderwave-<service>` for a process that runs
    /// one service, `orderwave` otherwise.
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,

    /// Share of traces started here that are recorded, 0 to 1; a request or message that
    /// arrives in a trace follows its sender's choice. Without it `OTEL_TRACES_SAMPLER` and
    /// `OTEL_TRACES_SAMPLER_ARG` decide (default `parentbased_always_on`).
    #[arg(long, env = "ORDERWAVE_TRACE_SAMPLE_RATIO", value_parser = sample_ratio)]
    pub trace_sample_ratio: Option<f64>,

    /// How long Idempotency-Key records are kept, in hours.
    #[arg(long, env = "ORDERWAVE_IDEMPOTENCY_TTL_HOURS", default_value_t = 24)]
    pub idempotency_ttl_hours: u64,

    /// Memory for the in-process order cache, in MiB; 0 turns it off (needed when several
    /// order-service processes share one database).
    #[arg(long, env = "ORDERWAVE_ORDER_CACHE_MIB", default_value_t = 4)]
    pub order_cache_mib: u64,

    /// Caches orders in this Redis (`redis://HOST:PORT/DB`) instead of in the process, shared by
    /// every order-service process; with Redis down, orders are read from the database.
    #[arg(long, env = "ORDERWAVE_CACHE", hide_env_values = true)]
    pub cache: Option<String>,

    /// Keys in the Redis cache start with this and a colon.
    #[arg(long, env = "ORDERWAVE_CACHE_PREFIX", default_value = "orderwave")]
    pub cache_prefix: String,

    /// Seconds an order stays in the Redis cache after it was last written.
    #[arg(long, env = "ORDERWAVE_CACHE_TTL_SECS", default_value_t = 600)]
    pub cache_ttl_secs: u64,

    /// Seconds a request may take before it is answered 503.
    #[arg(long, env = "ORDERWAVE_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,

    /// Who charges the cards.
    #[arg(
        long,
        env = "ORDERWAVE_PAYMENT_PROVIDER",
        value_enum,
        default_value = "simulator"
    )]
    pub payment_provider: PaymentProviderKind,

    /// Base URL of the Stripe-style payment API (with --payment-provider http).
    #[arg(long, env = "ORDERWAVE_PAYMENT_PROVIDER_URL")]
    pub payment_provider_url: Option<String>,

    /// API key of the payment provider (with --payment-provider http).
    #[arg(long, env = "ORDERWAVE_PAYMENT_PROVIDER_KEY", hide_env_values = true)]
    pub payment_provider_key: Option<String>,

    /// Seconds a charge may take before the payment fails as timed out and the order is
    /// cancelled.
    #[arg(long, env = "ORDERWAVE_PAYMENT_TIMEOUT_SECS", default_value_t = 30)]
    pub payment_timeout_secs: u64,

    /// Seconds after which an order whose saga has not ended (still PENDING) is cancelled.
    #[arg(long, env = "ORDERWAVE_SAGA_TIMEOUT_SECS", default_value_t = 120)]
    pub saga_timeout_secs: u64,

    /// The services this process runs: all of them, or some (comma-separated), each serving
    /// its own routes, consumers, relays and workers; the others run in other processes on
    /// the same database and bus.
    #[arg(
        long,
        env = "ORDERWAVE_SERVICES",
        value_enum,
        value_delimiter = ',',
        default_value = "all"
    )]
    pub services: Vec<Service>,

    /// Where the gateway (`--services gateway`) sends each service's requests:
    /// `NAME=URL`, several processes of one service joined by `|`
    /// (`order=http://10.0.0.5:8080|http://10.0.0.6:8080`); repeatable (comma-separated in the
    /// environment).
    #[arg(long = "upstream", env = "ORDERWAVE_UPSTREAMS", value_delimiter = ',')]
    pub upstreams: Vec<String>,

    /// Base URL of a customer service running as its own process; by default the order
    /// service asks the customer service of this process. Needed by the order and the
    /// notification services when this process does not run the customer service.
    #[arg(long, env = "ORDERWAVE_CUSTOMER_SERVICE_URL")]
    pub customer_service_url: Option<String>,

    /// Seed a small demo catalogue (SKU-CHAIR, SKU-DESK, SKU-LAMP) and a demo customer at
    /// start, when they do not exist yet.
    #[arg(long, env = "ORDERWAVE_DEMO")]
    pub demo: bool,

    /// Serve HTTP only: no outbox relays, consumers or workers in this process (another
    /// process runs them on the same databases).
    #[arg(long, env = "ORDERWAVE_NO_BACKGROUND")]
    pub no_background: bool,

    /// SMTP server for email; without it email goes through the log transport (recorded and
    /// logged, not sent).
    #[arg(long, env = "ORDERWAVE_SMTP_HOST")]
    pub smtp_host: Option<String>,

    /// SMTP port.
    #[arg(long, env = "ORDERWAVE_SMTP_PORT", default_value_t = 587)]
    pub smtp_port: u16,

    /// How the SMTP connection is secured.
    #[arg(
        long,
        env = "ORDERWAVE_SMTP_TLS",
        value_enum,
        default_value = "starttls"
    )]
    pub smtp_tls: SmtpTls,

    /// SMTP user name (with --smtp-password).
    #[arg(long, env = "ORDERWAVE_SMTP_USERNAME")]
    pub smtp_username: Option<String>,

    /// SMTP password.
    #[arg(long, env = "ORDERWAVE_SMTP_PASSWORD", hide_env_values = true)]
    pub smtp_password: Option<String>,

    /// A PEM CA certificate to trust for the SMTP server's certificate, besides the public
    /// roots (a relay whose certificate comes from a private CA).
    #[arg(long, env = "ORDERWAVE_SMTP_CA_FILE")]
    pub smtp_ca_file: Option<std::path::PathBuf>,

    /// The sender of email.
    #[arg(
        long,
        env = "ORDERWAVE_SMTP_FROM",
        default_value = "orderwave <no-reply@orderwave.example>"
    )]
    pub smtp_from: String,

    /// Base URL of a Twilio-style SMS API; without it SMS go through the log transport
    /// (recorded and logged, not sent).
    #[arg(long, env = "ORDERWAVE_SMS_PROVIDER_URL")]
    pub sms_provider_url: Option<String>,

    /// Account SID for the SMS API (the basic-auth user).
    #[arg(long, env = "ORDERWAVE_SMS_ACCOUNT_SID", default_value = "")]
    pub sms_account_sid: String,

    /// Auth token for the SMS API (the basic-auth password).
    #[arg(
        long,
        env = "ORDERWAVE_SMS_AUTH_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    pub sms_auth_token: String,

    /// The sender number (E.164) of SMS.
    #[arg(long, env = "ORDERWAVE_SMS_FROM", default_value = "+15005550006")]
    pub sms_from: String,

    /// Milliseconds before a failed notification is retried the first time (doubling after
    /// each failure, up to a minute; 5 attempts in all).
    #[arg(long, env = "ORDERWAVE_NOTIFICATION_RETRY_MS", default_value_t = 500)]
    pub notification_retry_ms: u64,

    /// Seconds a notification channel's circuit breaker stays open (after 5 failures in a row)
    /// before one probe is let through.
    #[arg(
        long,
        env = "ORDERWAVE_NOTIFICATION_BREAKER_SECS",
        default_value_t = 10
    )]
    pub notification_breaker_secs: u64,

    /// Change the resilience policy of a dependency: `NAME:timeout=500ms,attempts=2,failures=5,open=10s`
    /// (any subset), NAME one of customer-service, payment-provider, notification-email,
    /// notification-sms. Repeatable (`;`-separated in the environment).
    #[arg(
        long = "dependency-policy",
        env = "ORDERWAVE_DEPENDENCY_POLICIES",
        value_delimiter = ';'
    )]
    pub dependency_policies: Vec<String>,

    #[command(flatten)]
    pub auth: AuthArgs,

    /// Test switch: consumers handle every message twice, as a redelivery would.
    #[arg(long, env = "ORDERWAVE_TEST_DELIVER_TWICE", hide = true)]
    pub test_deliver_twice: bool,
}

impl Config {
    /// Whether this process runs `service` (the gateway only when asked for by name).
    pub fn runs(&self, service: Service) -> bool {
        self.services
            .iter()
            .any(|s| *s == service || (*s == Service::All && service != Service::Gateway))
    }

    /// Whether this process is the gateway.
    pub fn runs_gateway(&self) -> bool {
        self.runs(Service::Gateway)
    }

    /// Whether this process is a front door that serves the web console: the gateway, or a
    /// process running every service.
    pub fn serves_console(&self) -> bool {
        self.runs_gateway() || Service::EACH.into_iter().all(|s| self.runs(s))
    }

    /// The PostgreSQL URL of `service`'s own database: its `--database-url-SERVICE`, or
    /// `--database-url` (None: the embedded SQLite files).
    pub fn database_url_of(&self, service: Service) -> Option<&str> {
        self.own_database_url(service)
            .or(self.database_url.as_deref())
    }

    /// `--database-url-SERVICE` of `service`, if given.
    fn own_database_url(&self, service: Service) -> Option<&str> {
        match service {
            Service::Order => self.database_url_order.as_deref(),
            Service::Inventory => self.database_url_inventory.as_deref(),
            Service::Payment => self.database_url_payment.as_deref(),
            Service::Customer => self.database_url_customer.as_deref(),
            Service::Notification => self.database_url_notification.as_deref(),
            Service::All | Service::Gateway => None,
        }
    }

    /// Whether a service has a database URL of its own.
    pub fn has_service_database_urls(&self) -> bool {
        Service::EACH
            .into_iter()
            .any(|service| self.own_database_url(service).is_some())
    }

    /// `--bus-partitions`, or its default for the bus: 8 on a broker, 1 on the sql log.
    pub fn partitions(&self) -> u16 {
        let default = if self.bus == "sql" { 1 } else { 8 };
        self.bus_partitions.unwrap_or(default).max(1)
    }

    /// The defaults, as `orderwave serve` with no options and no environment would get.
    pub fn for_tests(data_dir: PathBuf, database_url: Option<String>) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            database_url,
            database_url_order: None,
            database_url_inventory: None,
            database_url_payment: None,
            database_url_customer: None,
            database_url_notification: None,
            bus: "sql".into(),
            bus_prefix: "orderwave".into(),
            bus_partitions: None,
            bus_replicas: 1,
            bus_retention_hours: 168,
            bus_delivery_limit: 20,
            db_max_connections: 4,
            log_format: LogFormat::Pretty,
            otlp_endpoint: None,
            otel_service_name: None,
            trace_sample_ratio: None,
            idempotency_ttl_hours: 24,
            order_cache_mib: 4,
            cache: None,
            cache_prefix: "orderwave".into(),
            cache_ttl_secs: 600,
            request_timeout_secs: 30,
            payment_provider: PaymentProviderKind::Simulator,
            payment_provider_url: None,
            payment_provider_key: None,
            payment_timeout_secs: 30,
            saga_timeout_secs: 120,
            services: vec![Service::All],
            upstreams: Vec::new(),
            customer_service_url: None,
            demo: false,
            no_background: false,
            smtp_host: None,
            smtp_port: 587,
            smtp_tls: SmtpTls::Starttls,
            smtp_username: None,
            smtp_password: None,
            smtp_ca_file: None,
            smtp_from: "orderwave <no-reply@orderwave.example>".into(),
            sms_provider_url: None,
            sms_account_sid: String::new(),
            sms_auth_token: String::new(),
            sms_from: "+15005550006".into(),
            notification_retry_ms: 500,
            notification_breaker_secs: 10,
            dependency_policies: Vec::new(),
            auth: AuthArgs::default(),
            test_deliver_twice: false,
        }
    }
}
