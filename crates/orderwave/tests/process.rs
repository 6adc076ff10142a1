//! The real binary as a process: crash safety (kill -9), graceful shutdown, the CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::process::{BIN, Server};
use common::{DEMO_CUSTOMER, fresh_pg_database, order_body};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `orderwave serve` on a free port and waits for its "listening on" line.
fn start(data_dir: &Path, database_url: Option<&str>, extra: &[&str]) -> Server {
    start_logging(data_dir, database_url, extra, "info")
}

/// `start`, logging at `rust_log`.
fn start_logging(
    data_dir: &Path,
    database_url: Option<&str>,
    extra: &[&str],
    rust_log: &str,
) -> Server {
    let stderr_path = data_dir.join(format!("stderr-{}.log", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(data_dir).unwrap();
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(["--jwt-secret", common::TEST_SECRET])
        .args(extra)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", rust_log);
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    Server::spawn(command, stderr_path)
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn kill_9_after_a_201_loses_no_order(database_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let client = common::admin_client();
    let mut server = start(dir.path(), database_url.as_deref(), &[]);
    let mut placed = Vec::new();
    let bodies: Vec<Value> = (0..5).map(|_| order_body(DEMO_CUSTOMER)).collect();
    for (i, body) in bodies.iter().enumerate() {
        let response = client
            .post(format!("{}/api/v1/orders", server.base))
            .header("idempotency-key", format!("crash-{i}"))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        placed.push(response.json::<Value>().await.unwrap());
    }
    server.child.kill().unwrap(); // SIGKILL: no shutdown code runs
    server.child.wait().unwrap();

    let mut server = start(dir.path(), database_url.as_deref(), &[]);
    for (i, order) in placed.iter().enumerate() {
        let id = order["id"].as_str().unwrap();
        let response = client
            .get(format!("{}/api/v1/orders/{id}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "order {id} lost in the crash");
        // The saga may have moved it on since; what was placed is unchanged.
        let stored = response.json::<Value>().await.unwrap();
        for field in ["id", "customerId", "items", "total", "createdAt"] {
            assert_eq!(stored[field], order[field], "{field} of order {id}");
        }
        // The retry of a request answered before the crash is a replay, not a new order.
        let retry = client
            .post(format!("{}/api/v1/orders", server.base))
            .header("idempotency-key", format!("crash-{i}"))
            .json(&bodies[i])
            .send()
            .await
            .unwrap();
        assert_eq!(retry.status(), 201);
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        assert_eq!(&retry.json::<Value>().await.unwrap(), order);
    }
    // The relay publishes what the first process had not, each event once, after the dead
    // process's relay lease (3 s) ran out.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let outbox: Value = client
            .get(format!("{}/api/v1/admin/outbox", server.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if outbox[0]["pending"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "outbox not drained: {outbox}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bus_db = match &database_url {
        None => storage::Db::open_sqlite(dir.path(), "bus").await.unwrap(),
        Some(url) => storage::Db::open_postgres(url, "bus", 2).await.unwrap(),
    };
    // The order service's events (the inventory service answers them on the same bus).
    let messages: Vec<_> = common::bus_log(&bus_db)
        .await
        .into_iter()
        .filter(|(topic, _, _)| topic.starts_with("order."))
        .collect();
    bus_db.close().await;
    let subjects: std::collections::HashSet<String> = messages
        .iter()
        .map(|(_, _, event)| event["subject"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        messages.len(),
        5,
        "every event survived with its order, once"
    );
    for order in &placed {
        assert!(subjects.contains(order["id"].as_str().unwrap()));
    }
    signal(&server.child, "TERM");
    assert!(server.child.wait().unwrap().success());
    if let Some(url) = &database_url {
        common::drop_pg_database(url).await;
    }
}

#[tokio::test]
async fn kill_9_after_a_201_loses_no_order_on_sqlite() {
    kill_9_after_a_201_loses_no_order(None).await;
}

#[tokio::test]
async fn kill_9_after_a_201_loses_no_order_on_postgres() {
    kill_9_after_a_201_loses_no_order(Some(fresh_pg_database().await)).await;
}

/// Waits for `child` to exit, failing if it takes longer than `limit` (a shutdown that hangs).
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "orderwave did not exit within {limit:?} of the signal"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn sigterm_finishes_in_flight_requests_and_exits_0(database_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), database_url.as_deref(), &[]);
    let client = common::admin_client();
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            let url = format!("{}/api/v1/orders", server.base);
            tokio::spawn(async move {
                client
                    .post(url)
                    .json(&order_body(DEMO_CUSTOMER))
                    .send()
                    .await
                    .ok()
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    signal(&server.child, "TERM");
    let mut answered = 0;
    for request in requests {
        // A request that arrived after the listener closed is refused (None), never half-done.
        if let Some(status) = request.await.unwrap() {
            assert_eq!(status, 201, "an accepted request is finished, not cut off");
            answered += 1;
        }
    }
    let status = wait_exit(&mut server.child, Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");

    // Every 201 is there after a restart.
    let mut server = start(dir.path(), database_url.as_deref(), &[]);
    let page: Value = client
        .get(format!("{}/api/v1/orders?limit=100", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), answered);
    signal(&server.child, "INT");
    assert!(wait_exit(&mut server.child, Duration::from_secs(20)).success());
    if let Some(url) = &database_url {
        common::drop_pg_database(url).await;
    }
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_exits_0_on_sqlite() {
    sigterm_finishes_in_flight_requests_and_exits_0(None).await;
}

/// Its stores' writers keep their connections between batches: they must not hold up the exit.
#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_exits_0_on_postgres() {
    sigterm_finishes_in_flight_requests_and_exits_0(Some(fresh_pg_database().await)).await;
}

#[tokio::test]
async fn json_logs_carry_the_request_id_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let database = fresh_pg_database().await;
    let url = format!("{database}?password=hunter2");
    // At debug level, so whatever logs a request's details is in the scan below.
    let mut server = start_logging(dir.path(), Some(&url), &["--log-format", "json"], "debug");
    let client = common::admin_client();
    let admin = common::token("test-admin", http_kit::Role::Admin);
    let customer = common::token(DEMO_CUSTOMER, http_kit::Role::Customer);
    let forged = format!("{}.forged-signature", customer.rsplit_once('.').unwrap().0);
    for (token, status) in [(&customer, 200), (&forged, 401)] {
        let response = client
            .get(format!("{}/api/v1/orders", server.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
    }
    let response = client
        .get(format!("{}/api/v1/admin/outbox", server.base))
        .bearer_auth(&customer)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    // A change is logged at INFO (successful reads only at DEBUG).
    let response = client
        .post(format!("{}/api/v1/orders", server.base))
        .header("x-request-id", "req-abc-123")
        .json(&order_body(DEMO_CUSTOMER))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    signal(&server.child, "TERM");
    assert!(server.child.wait().unwrap().success());
    let logs = std::fs::read_to_string(&server.stderr_path).unwrap();
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let access = lines
        .iter()
        .find(|l| l["span"]["request_id"] == "req-abc-123" && !l["fields"]["status"].is_null())
        .unwrap_or_else(|| panic!("no log line with the request id: {logs}"));
    assert_eq!(access["fields"]["status"], 201);
    assert_eq!(access["level"], "INFO");
    assert!(!logs.contains("hunter2"), "a secret leaked into the logs");
    for (what, secret) in [
        ("the admin token", admin.as_str()),
        ("a customer token", customer.as_str()),
        ("a forged token", forged.as_str()),
        ("a token's signature", customer.rsplit_once('.').unwrap().1),
        ("the signing secret", common::TEST_SECRET),
    ] {
        assert!(!logs.contains(secret), "{what} leaked into the logs");
    }
    assert!(
        lines.iter().any(|l| l["fields"]["status"] == 401),
        "the refused request is logged (without its token)"
    );
    common::drop_pg_database(&database).await;
}

#[tokio::test]
async fn the_first_start_creates_a_private_secret_and_prints_an_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    // Without --jwt-secret: the data directory's secret, created now.
    let run = |dir: &Path| {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .env_remove("DATABASE_URL")
            .env_remove("ORDERWAVE_JWT_SECRET")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut printed = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            let done = line.starts_with("tokens:") || line.starts_with("ey");
            printed.push(line);
            if done {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        (child, printed)
    };
    let (mut first, printed) = run(dir.path());
    let base = printed[0]
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let token = printed.last().unwrap().clone();
    assert!(
        token.starts_with("ey"),
        "no admin token printed: {printed:?}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("jwt-secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the secret is readable by others");
    }
    let client = reqwest::Client::new();
    let outbox = format!("{base}/api/v1/admin/outbox");
    let status = |token: String| {
        let (client, outbox) = (client.clone(), outbox.clone());
        async move {
            client
                .get(&outbox)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(token).await, 200);
    // `orderwave token` mints from the same secret.
    let minted = Command::new(BIN)
        .args([
            "token",
            "--sub",
            "ops",
            "--role",
            "admin",
            "--ttl",
            "15m",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("ORDERWAVE_JWT_SECRET")
        .output()
        .unwrap();
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let minted = String::from_utf8(minted.stdout).unwrap().trim().to_string();
    assert_eq!(status(minted.clone()).await, 200);
    let customer = Command::new(BIN)
        .args([
            "token",
            "--sub",
            DEMO_CUSTOMER,
            "--role",
            "customer",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let customer = String::from_utf8(customer.stdout)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(status(customer).await, 403);
    for bad in [
        &["--role", "root"][..],
        &["--role", "admin", "--ttl", "0"][..],
    ] {
        let refused = Command::new(BIN)
            .args(["token", "--sub", "x", "--data-dir"])
            .arg(dir.path())
            .args(bad)
            .output()
            .unwrap();
        assert!(!refused.status.success(), "{bad:?}");
    }
    signal(&first, "TERM");
    assert!(first.wait().unwrap().success());
    // The second start keeps the secret (tokens stay valid) and prints no token.
    let (mut second, printed) = run(dir.path());
    assert!(
        printed.last().unwrap().starts_with("tokens:"),
        "{printed:?}"
    );
    let base = printed[0]
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let response = client
        .get(format!("{base}/api/v1/admin/outbox"))
        .bearer_auth(&minted)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    signal(&second, "TERM");
    assert!(second.wait().unwrap().success());
}

#[test]
fn help_explains_every_option_and_its_environment_variable() {
    let output = Command::new(BIN).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for word in [
        "--listen",
        "ORDERWAVE_LISTEN",
        "--data-dir",
        "ORDERWAVE_DATA_DIR",
        "--database-url",
        "DATABASE_URL",
        "--database-url-order",
        "ORDERWAVE_DATABASE_URL_ORDER",
        "--database-url-notification",
        "ORDERWAVE_DATABASE_URL_NOTIFICATION",
        "--log-format",
        "ORDERWAVE_LOG_FORMAT",
        "--jwt-secret",
        "ORDERWAVE_JWT_SECRET",
        "--jwt-public-key",
        "--rate-limit-write",
        "--cors-origin",
        "--bus",
        "ORDERWAVE_BUS",
        "--bus-prefix",
        "bus-delete",
        "migrate",
        "serve",
        "token",
    ] {
        assert!(
            help.contains(word),
            "--help does not mention {word}:\n{help}"
        );
    }
}

#[test]
fn healthcheck_exits_0_while_the_server_is_live_and_1_once_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), None, &[]);
    let listen = server.base.trim_start_matches("http://").to_string();
    let check = || {
        Command::new(BIN)
            .args(["healthcheck", "--listen", &listen])
            .env_remove("ORDERWAVE_LISTEN")
            .output()
            .unwrap()
    };
    let live = check();
    assert!(
        live.status.success(),
        "{}",
        String::from_utf8_lossy(&live.stderr)
    );
    let _ = server.child.kill();
    let _ = server.child.wait();
    let gone = check();
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("unhealthy"));
}

#[test]
fn migrate_creates_the_databases_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .args(["migrate", "--data-dir"])
        .arg(dir.path())
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(dir.path().join("orders.db").exists());
    assert!(dir.path().join("http.db").exists());
    assert!(dir.path().join("bus.db").exists());
    assert!(dir.path().join("customers.db").exists());
}

#[test]
fn a_bad_database_url_fails_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "postgres://nobody@127.0.0.1:1/none",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("PostgreSQL"), "{stderr}");
}

#[test]
fn a_service_database_without_the_platforms_fails_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--services", "order"])
        .args([
            "--database-url-order",
            "postgres://postgres@127.0.0.1:5432/postgres",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs --database-url too"), "{stderr}");
}

/// Polls `GET path` until `done` holds for the JSON, 120 s at most (after a kill -9 on a
/// broker, a group's partitions wait for the dead process's leases to run out, 15 s, and on
/// NATS for its unacknowledged messages to come back, `AckWait` 30 s).
async fn poll_json(client: &reqwest::Client, url: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let value: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        if done(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "waiting on {url}: {value}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn kill_9_in_the_middle_of_sagas_every_saga_still_ends(database_url: Option<String>) {
    kill_9_in_the_middle_of_sagas_on(database_url, &[]).await;
}

/// The sagas of 20 orders killed in every stage, with `extra` options (a broker as the bus).
async fn kill_9_in_the_middle_of_sagas_on(database_url: Option<String>, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let client = common::admin_client();
    let server = start(dir.path(), database_url.as_deref(), extra);
    // Half the cards succeed, half are declined; killed right after the last 201, with the
    // sagas in every stage.
    let mut placed = Vec::new();
    for i in 0..20 {
        let mut body = order_body(DEMO_CUSTOMER);
        let token = if i % 2 == 0 { "tok_ok" } else { "tok_declined" };
        body["payment"]["token"] = Value::from(token);
        let response = client
            .post(format!("{}/api/v1/orders", server.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let order: Value = response.json().await.unwrap();
        placed.push((order["id"].as_str().unwrap().to_string(), token));
    }
    let mut server = server;
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    let mut server = start(dir.path(), database_url.as_deref(), extra);
    for (id, token) in &placed {
        let expected = if *token == "tok_ok" {
            "CONFIRMED"
        } else {
            "CANCELLED"
        };
        let order = poll_json(
            &client,
            &format!("{}/api/v1/orders/{id}", server.base),
            |o| o["status"] == expected,
        )
        .await;
        if expected == "CANCELLED" {
            assert_eq!(
                order["cancelReason"],
                "payment declined: the card was declined"
            );
        }
    }
    // Stock and money add up: 10 confirmed orders hold 2 chairs and 1 lamp each, the
    // declined ones hold nothing (their reservation was released), every payment once.
    let chairs = poll_json(
        &client,
        &format!("{}/api/v1/inventory/SKU-CHAIR", server.base),
        |p| p["reserved"] == 20,
    )
    .await;
    assert_eq!(chairs["onHand"], 100);
    poll_json(
        &client,
        &format!("{}/api/v1/inventory/SKU-LAMP", server.base),
        |p| p["reserved"] == 10,
    )
    .await;
    let mut succeeded = 0;
    for (id, token) in &placed {
        let page: Value = client
            .get(format!("{}/api/v1/payments?orderId={id}", server.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let payments = page["items"].as_array().unwrap();
        assert_eq!(payments.len(), 1, "one payment for order {id}");
        let status = payments[0]["status"].as_str().unwrap();
        assert_eq!(
            status,
            if *token == "tok_ok" {
                "SUCCEEDED"
            } else {
                "FAILED"
            }
        );
        if status == "SUCCEEDED" {
            succeeded += 1;
            assert_eq!(payments[0]["amount"], "114.85");
        }
    }
    assert_eq!(succeeded, 10);
    signal(&server.child, "TERM");
    assert!(server.child.wait().unwrap().success());
    if let Some(url) = &database_url {
        common::drop_pg_database(url).await;
    }
}

#[tokio::test]
async fn kill_9_in_the_middle_of_sagas_every_saga_still_ends_on_sqlite() {
    kill_9_in_the_middle_of_sagas_every_saga_still_ends(None).await;
}

#[tokio::test]
async fn kill_9_in_the_middle_of_sagas_every_saga_still_ends_on_postgres() {
    kill_9_in_the_middle_of_sagas_every_saga_still_ends(Some(fresh_pg_database().await)).await;
}

/// On PostgreSQL with `url` as the bus, under a prefix of the test's own.
async fn kill_9_in_the_middle_of_sagas_on_broker(url: &str) {
    let prefix = format!("t{}", uuid::Uuid::now_v7().simple());
    // A payment's deadline longer than the takeover after the crash: a declined card is
    // declined, not timed out.
    kill_9_in_the_middle_of_sagas_on(
        Some(fresh_pg_database().await),
        &[
            "--bus",
            url,
            "--bus-prefix",
            &prefix,
            "--payment-timeout-secs",
            "150",
        ],
    )
    .await;
    common::delete_broker_objects(url, &prefix).await;
}

#[cfg(feature = "nats")]
#[tokio::test]
async fn kill_9_in_the_middle_of_sagas_every_saga_still_ends_on_postgres_and_nats() {
    kill_9_in_the_middle_of_sagas_on_broker(common::NATS_URL).await;
}

#[cfg(feature = "rabbitmq")]
#[tokio::test]
async fn kill_9_in_the_middle_of_sagas_every_saga_still_ends_on_postgres_and_rabbitmq() {
    kill_9_in_the_middle_of_sagas_on_broker(&common::rabbitmq_url()).await;
}

#[cfg(feature = "kafka")]
#[tokio::test]
async fn kill_9_in_the_middle_of_sagas_every_saga_still_ends_on_postgres_and_kafka() {
    kill_9_in_the_middle_of_sagas_on_broker(common::KAFKA_URL).await;
}
